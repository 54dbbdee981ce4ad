"""Nothing lost, nothing changed: kills, full disks, hostile files, bad input, and a probe that
leaves the program as it was (frozen models, pickle, deepcopy, threads, failing blocks).

The kill and full-disk cases run in one child process (tests/fault_child.py), which imports
torch once and forks a grandchild per kill point.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import records
from gradprobe.cli import main

HERE = Path(__file__).parent
LINUX = sys.platform.startswith("linux")  # fork, RLIMIT_FSIZE and an unwritable /proc
BLOCKS = 3  # of fault_child.make_net


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(BLOCKS)]).double()


def train(net: nn.Module, probe: gradprobe.Probe, steps: int) -> None:
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for i in range(steps):
        net(x).pow(2).mean().backward()
        probe.log(loss=float(i))
        probe.step()


def quiet_load(folder, **kwargs) -> tuple[records.Run, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = gradprobe.load(folder, **kwargs)
    return run, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- kills (child process)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    if not LINUX:
        pytest.skip("the kill and full-disk cases fork and use RLIMIT_FSIZE: Linux only")
    out = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "fault_child.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    reference = gradprobe.load(out / "reference")
    return results, reference


def assert_prefix_loads_exactly(folder: str, lines: list[list[int]], reference: records.Run) -> list[str]:
    """Every step in a chunk completed before the kill loads, equal to the run without a sink."""
    if not (Path(folder) / "meta.json").exists():
        assert not lines, "a step finished but meta.json is missing"
        return []
    run, messages = quiet_load(folder)
    frame, scalars = run.frame(), run.scalars()
    steps = sorted(frame["step"].unique().tolist())
    assert steps == list(range(len(steps))), f"not a prefix of the run: {steps}"
    assert scalars["step"].tolist() == steps
    if lines:
        final_seq = lines[-1][1]
        flushed = next(step for step, seq in lines if seq == final_seq) + 1 if final_seq else 0
        assert len(steps) >= flushed, f"{flushed} steps were flushed before the kill, {len(steps)} load"
    expected = reference.frame()
    expected = expected[expected["step"] < len(steps)].reset_index(drop=True)
    assert all(isinstance(b, str) for b in frame["block"])
    pd.testing.assert_frame_equal(frame, expected, check_dtype=False, check_exact=True)
    ref_scalars = reference.scalars()
    if steps:
        pd.testing.assert_frame_equal(
            scalars,
            ref_scalars[ref_scalars["step"] < len(steps)].reset_index(drop=True),
            check_dtype=False,
            check_exact=True,
        )
    return messages


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_random_sigkills_lose_nothing_before_the_last_flush(faults, fmt):
    results, reference = faults
    kills = [r for r in results if r["kind"] == "kill" and r["fmt"] == fmt]
    assert len(kills) >= 16
    killed = 0
    for kill in kills:
        killed += kill["status"] != 0
        assert_prefix_loads_exactly(kill["folder"], kill["lines"], reference)
    assert killed >= len(kills) // 2  # the kill points landed inside the runs


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("point", ["chunk", "between", "meta"])
def test_kill_at_injected_points_of_a_write(faults, point, fmt):
    results, reference = faults
    cases = [r for r in results if r["kind"] == "inject" and r["point"] == point and r["fmt"] == fmt]
    assert cases
    for case in cases:
        assert case["status"] != 0
        messages = assert_prefix_loads_exactly(case["folder"], case["lines"], reference)
        if point == "between":  # a frame chunk without its scalars: dropped, and said so
            assert any("unpaired" in m for m in messages), messages
            with pytest.raises(ValueError, match="unpaired"):
                gradprobe.load(case["folder"], strict=True)
        if point == "chunk" or (point == "meta" and case["nth"] > 1):
            assert any("incomplete write" in m for m in messages), messages


def test_kill_inside_a_report_leaves_the_source_run_intact(faults):
    results, reference = faults
    cases = [r for r in results if r["kind"] == "report"]
    assert len(cases) == 3
    for case in cases:
        assert case["status"] != 0 and not case["finished"]
        run, _ = quiet_load(case["folder"])
        pd.testing.assert_frame_equal(run.frame(), reference.frame())
        pd.testing.assert_frame_equal(run.scalars(), reference.scalars())


def test_full_disk_warns_once_keeps_the_rows_and_backs_off(faults):
    results, _ = faults
    (full,) = [r for r in results if r["kind"] == "full" and r["bound"] > 1000]
    result = full["result"]
    assert result["rows"] == 100 * BLOCKS  # frame() and detach() did not raise; nothing lost
    assert result["write_attempts"] <= 10  # retried with backoff, not at each of the 100 steps
    cannot = [w for w in result["warnings"] if "cannot write the sink folder" in w]
    assert len(cannot) == 1 and full["folder"] in cannot[0] and "File too large" in cannot[0]


def test_full_disk_drops_steps_beyond_the_bound_and_counts_them(faults):
    results, _ = faults
    (full,) = [r for r in results if r["kind"] == "full" and r["bound"] < 1000]
    assert full["result"]["steps"] == 5  # 15 rows of 3 blocks kept in memory
    meta = json.loads((Path(full["folder"]) / "meta.json").read_text())
    assert meta["dropped_steps"] == 95 and meta["dropped_rows"] == 95 * BLOCKS
    _, messages = quiet_load(full["folder"])
    assert any("dropped 95 step(s)" in m for m in messages)


def test_resume_after_a_kill_takes_over_the_stale_lock(faults):
    results, _ = faults
    kill = next(r for r in results if r["kind"] == "kill" and len(r["lines"]) >= 4 and r["status"] != 0)
    before, _ = quiet_load(kill["folder"])
    done = before.frame()["step"].nunique()
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the killed run's incomplete write is reported
        with gradprobe.attach(net, sink=kill["folder"], sink_options={"resume": True}) as probe:
            # numbering goes on after every step on disk, also those of a chunk pair written
            # just before the kill, which meta.json (replaced after the chunks) does not count yet
            assert probe.current_step == max(before.meta["steps_written"], done)
            train(net, probe, 2)
    run, _ = quiet_load(kill["folder"])
    steps = sorted(run.frame()["step"].unique())
    assert len(steps) == done + 2 and run.meta["run_id"] == before.meta["run_id"]


def test_a_script_ending_without_detach_writes_its_buffered_steps(faults):
    results, _ = faults
    (case,) = [r for r in results if r["kind"] == "exit"]
    assert case["status"] == 0 and case["lines"]
    assert gradprobe.load(case["folder"]).frame()["step"].nunique() == 3
    assert not (Path(case["folder"]) / records.LOCK_FILE).exists()


# ----------------------------------------------------------------------------- sinks in-process


def test_runs_streamed_before_run_ids_still_load(tmp_path):
    run = sinked_run(tmp_path / "new", "parquet", steps=2)
    folder = tmp_path / "legacy"
    folder.mkdir()
    for seq, step in enumerate((0, 1)):
        frame, scalars = run.frame(), run.scalars()
        frame[frame["step"] == step].to_parquet(folder / f"frame-{seq:06d}.parquet", index=False)
        scalars[scalars["step"] == step].to_parquet(folder / f"scalars-{seq:06d}.parquet", index=False)
    meta = {k: v for k, v in run.meta.items() if k != "run_id"}
    (folder / "meta.json").write_text(json.dumps(meta))
    pd.testing.assert_frame_equal(gradprobe.load(folder).frame(), run.frame())


def test_sink_writes_meta_json_at_attach_and_flushes_on_time(tmp_path):
    net = make_net()
    probe = gradprobe.attach(net, sink=tmp_path / "run", sink_options={"flush_seconds": 0})
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["streamed"] and meta["run_id"] and meta["blocks"] == ["0", "1", "2"]
    assert len(gradprobe.load(tmp_path / "run").frame()) == 0
    train(net, probe, 3)  # far below chunk_rows: only the time interval writes them
    assert gradprobe.load(tmp_path / "run").frame()["step"].nunique() == 3
    probe.detach()


def test_second_probe_on_a_sink_folder_is_refused_naming_the_first(tmp_path, no_leaks):
    net = make_net()
    first = gradprobe.attach(net, sink=tmp_path / "run")
    other = no_leaks(make_net())
    with pytest.raises(FileExistsError, match=f"in use by another probe \\(run {first.meta()['run_id']}"):
        gradprobe.attach(other, sink=tmp_path / "run")
    train(net, first, 4)
    first.detach()
    assert not (tmp_path / "run" / records.LOCK_FILE).exists()
    assert gradprobe.load(tmp_path / "run").frame()["step"].nunique() == 4


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    script = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    folder = tmp_path / "run"
    folder.mkdir()
    lock = {"pid": int(dead.stdout), "host": __import__("socket").gethostname(), "run_id": "0" * 12}
    (folder / records.LOCK_FILE).write_text(json.dumps(lock))
    net = make_net()
    with gradprobe.attach(net, sink=folder) as probe:
        train(net, probe, 1)
    assert gradprobe.load(folder).frame()["step"].tolist() == [0] * BLOCKS


def test_resume_appends_only_to_a_run_of_the_same_model(tmp_path):
    net = make_net()
    with gradprobe.attach(net, sink=tmp_path / "run") as probe:
        train(net, probe, 2)
    with pytest.raises(FileExistsError, match="resume"):
        gradprobe.attach(net, sink=tmp_path / "run")
    other = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    with pytest.raises(ValueError, match="same model"):
        gradprobe.attach(other, sink=tmp_path / "run", sink_options={"resume": True})
    with gradprobe.attach(net, sink=tmp_path / "run", sink_options={"resume": True}) as probe:
        train(net, probe, 3)
    run = gradprobe.load(tmp_path / "run")
    assert sorted(run.frame()["step"].unique()) == [0, 1, 2, 3, 4]
    assert run.scalars()["loss"].tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]


def test_sink_never_writes_over_a_saved_run(tmp_path):
    net = make_net()
    with gradprobe.attach(net) as probe:
        train(net, probe, 2)
    probe.save(tmp_path / "saved")
    before = (tmp_path / "saved" / "meta.json").read_text()
    with pytest.raises(FileExistsError, match="saved run"):
        gradprobe.attach(make_net(), sink=tmp_path / "saved")
    assert (tmp_path / "saved" / "meta.json").read_text() == before
    assert len(gradprobe.load(tmp_path / "saved").frame()) == 2 * BLOCKS


def sinked_run(folder: Path, fmt: str, steps: int = 4) -> records.Run:
    net = make_net()
    with gradprobe.attach(net, sink=folder, sink_options={"fmt": fmt, "chunk_rows": BLOCKS}) as probe:
        train(net, probe, steps)
    return gradprobe.load(folder)


def test_stray_files_in_a_sink_folder_are_ignored_with_a_warning(tmp_path):
    run = sinked_run(tmp_path / "run", "parquet")
    run.frame().to_parquet(tmp_path / "run" / "frame-backup.parquet")
    (tmp_path / "run" / "scalars-000001.csv").write_text("step\n7\n")
    loaded, messages = quiet_load(tmp_path / "run")
    pd.testing.assert_frame_equal(loaded.frame(), run.frame())
    assert any("frame-backup.parquet" in m and "ignored 2" in m for m in messages)


def test_csv_chunk_cut_mid_row_is_reported_and_strict_fails(tmp_path):
    sinked_run(tmp_path / "run", "csv")
    last = sorted((tmp_path / "run").glob("frame-*.csv"))[-1]
    last.write_bytes(last.read_bytes()[:-25])
    loaded, messages = quiet_load(tmp_path / "run")
    assert sorted(loaded.frame()["step"].unique()) == [0, 1, 2]  # the other chunks load
    assert any("1 damaged chunk" in m and "cut mid-row" in m for m in messages)
    with pytest.raises(ValueError, match="damaged"):
        gradprobe.load(tmp_path / "run", strict=True)


def test_corrupt_parquet_chunk_is_skipped_and_counted(tmp_path):
    run = sinked_run(tmp_path / "run", "parquet")
    first = sorted((tmp_path / "run").glob("frame-*.parquet"))[0]
    first.write_bytes(b"PAR1 not really")
    loaded, messages = quiet_load(tmp_path / "run")
    assert sorted(loaded.frame()["step"].unique()) == [1, 2, 3]
    assert len(loaded.frame()) == len(run.frame()) - BLOCKS
    assert any("1 damaged chunk" in m for m in messages)


@pytest.mark.parametrize("streamed", [True, False])
def test_csv_block_names_stay_strings(tmp_path, streamed):
    if streamed:
        run = sinked_run(tmp_path / "run", "csv")
    else:
        net = make_net()
        with gradprobe.attach(net) as probe:
            train(net, probe, 2)
        records.save_run(tmp_path / "run", probe.frame(), probe.scalars(), probe.meta(), fmt="csv")
        run = gradprobe.load(tmp_path / "run")
    assert run.frame()["block"].tolist()[:BLOCKS] == ["0", "1", "2"]


def test_bad_sink_options_are_rejected_at_attach(tmp_path, no_leaks):
    net = no_leaks(make_net())
    with pytest.raises(ValueError, match="'parquet' or 'csv'"):
        gradprobe.attach(net, sink=tmp_path / "xml", sink_options={"fmt": "xml"})
    with pytest.raises(ValueError, match="unknown sink_options"):
        gradprobe.attach(net, sink=tmp_path / "typo", sink_options={"chunk_row": 5})
    assert not (tmp_path / "xml").exists() and not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "holds a JSON list"),
        ('{"dtypes": {"frame": {"step": "int128"}}}', "unknown dtype 'int128'"),
        ("", "not readable gradprobe metadata"),
        (None, "is a folder"),
    ],
)
def test_corrupt_meta_json_is_one_clear_error_naming_the_file(tmp_path, content, match):
    folder = tmp_path / "run"
    records.Run(records.empty_frame(), pd.DataFrame({"step": [0]}), {}).save(folder)
    meta = folder / "meta.json"
    meta.unlink()
    if content is None:
        meta.mkdir()
    else:
        meta.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        gradprobe.load(folder)
    assert str(meta) in str(info.value)


# ----------------------------------------------------------------------------- saving and reports


def small_run(folder: Path, steps: int = 3) -> records.Run:
    net = make_net()
    with gradprobe.attach(net) as probe:
        train(net, probe, steps)
    probe.save(folder)
    return gradprobe.load(folder)


def test_report_into_the_run_folder_only_adds_files(tmp_path):
    run = small_run(tmp_path / "run")
    tables = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir()}
    gradprobe.report(tmp_path / "run", progress=False, figures=["highway"])
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir()}
    assert {k: after[k] for k in tables} == tables  # the run's files untouched
    assert {"index.html", "highway.png"} <= set(after)
    pd.testing.assert_frame_equal(gradprobe.load(tmp_path / "run").frame(), run.frame())


def test_saving_into_a_folder_holding_another_run_needs_overwrite(tmp_path):
    small_run(tmp_path / "big", steps=5)
    small = small_run(tmp_path / "small", steps=2)
    with pytest.raises(FileExistsError, match="another gradprobe run"):
        gradprobe.report(small, tmp_path / "big", progress=False, figures=["highway"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        small.save(tmp_path / "big")
    assert gradprobe.load(tmp_path / "big").frame()["step"].nunique() == 5
    small.save(tmp_path / "big", overwrite=True)
    assert gradprobe.load(tmp_path / "big").frame()["step"].nunique() == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_saving_a_probe_again_updates_its_folder(tmp_path):
    net = make_net()
    probe = gradprobe.attach(net)
    train(net, probe, 2)
    probe.save(tmp_path / "run")
    train(net, probe, 2)
    probe.save(tmp_path / "run")  # the same run: no overwrite needed
    probe.detach()
    assert gradprobe.load(tmp_path / "run").frame()["step"].nunique() == 4
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["frame.parquet", "meta.json", "scalars.parquet"]


# ----------------------------------------------------------------------------- the program is unchanged


def test_hundred_caught_failures_in_a_block_retain_nothing():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(128, 128).double()

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("out of memory")

    net = nn.Sequential(nn.Sequential(nn.Linear(128, 128).double()), Failing())
    probe = gradprobe.attach(net, blocks=["0", "1"])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            # numpy-backed inputs: tracemalloc sees their memory, kept alive by any leaked graph
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 128))).requires_grad_()
            with contextlib.suppress(RuntimeError):
                net(x)
        del x
        probe.detach()
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 2**20, f"{retained / 2**20:.1f} MiB retained (100 inputs are 6.3 MiB)"


def test_a_muted_pass_runs_its_backward_on_the_calling_thread_and_mutes_no_other_thread():
    # The mute used to fall back to a process-wide counter on autograd's device threads (which see
    # no ContextVar), muting every thread's probe there; now the muted passes' backward runs on
    # the thread that muted (multithreaded backward off, a thread-local autograd setting).
    from gradprobe._tensors import mute, muted

    seen: dict[str, bool] = {}

    def other() -> None:
        seen["muted"] = muted()
        seen["multithreaded"] = torch._C._is_multithreading_enabled()

    hook_threads: list[int] = []
    with mute():
        assert muted() and not torch._C._is_multithreading_enabled()
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        x = torch.ones(3, requires_grad=True)
        y = x * 2
        y.register_hook(lambda g: hook_threads.append(threading.get_ident()))
        y.sum().backward()
    assert hook_threads == [threading.get_ident()]
    assert seen == {"muted": False, "multithreaded": True}
    assert not muted() and torch._C._is_multithreading_enabled()


def test_a_thread_computing_jacobians_does_not_mute_another_threads_probe():
    busy, quiet = make_net(), make_net()
    stop = threading.Event()
    errors: list[BaseException] = []

    def jacobians():
        try:
            with gradprobe.attach(busy, jacobian=True, jacobian_options={"spec": True}) as probe:
                x = torch.randn(5, 6, dtype=torch.float64)
                while not stop.is_set():
                    busy(x).pow(2).mean().backward()
                    probe.step()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=jacobians)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thread.start()
        try:
            with gradprobe.attach(quiet) as probe:
                x = torch.randn(5, 6, dtype=torch.float64)
                for i in range(150):
                    quiet(x).pow(2).mean().backward()
                    probe.log(loss=float(i))
                    probe.step()
        finally:
            stop.set()
            thread.join()
    assert not errors
    frame = probe.frame()
    assert frame["step"].nunique() == 150 and len(frame) == 150 * BLOCKS
    assert frame["grad_in"].notna().all() and (frame["calls"] == 1).all()
    assert probe.scalars()["loss"].tolist() == [float(i) for i in range(150)]
    assert not [w for w in caught if "non-finite" in str(w.message)]


def test_frozen_model_output_needs_no_grad_with_a_probe(no_leaks):
    net = no_leaks(make_net())
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 6, dtype=torch.float64)
    with gradprobe.attach(net):
        y = net(x)
        assert not y.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            y.sum().backward()


def test_pickle_torch_save_and_deepcopy_work_while_attached(no_leaks):
    net = no_leaks(make_net())
    x = torch.randn(5, 6, dtype=torch.float64)
    with gradprobe.attach(net) as probe:
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        unpickled = pickle.loads(pickle.dumps(net))
        for copy_ in (loaded, unpickled):
            torch.testing.assert_close(copy_(x), net(x).detach())
            copy_(x).sum().backward()
        net(x).sum().backward()
        probe.step()
    assert probe.frame()["step"].nunique() == 1  # the copies recorded nothing into the probe
    # the pickle needs nothing of gradprobe to load
    assert b"gradprobe" not in pickle.dumps(net)


def test_ema_deepcopy_never_writes_into_the_original_probe(no_leaks):
    net = no_leaks(make_net())
    x = torch.randn(5, 6, dtype=torch.float64)
    with gradprobe.attach(net) as probe:
        ema = copy.deepcopy(net)
        opt = torch.optim.SGD(ema.parameters(), lr=0.1)
        for _ in range(5):  # train the copy
            ema(x).pow(2).mean().backward()
            opt.step()
        net(x).pow(2).mean().backward()
        probe.step()
        with torch.no_grad():  # the EMA update itself
            for a, b in zip(ema.parameters(), net.parameters(), strict=True):
                a.mul_(0.9).add_(b, alpha=0.1)
    assert probe.frame()["step"].nunique() == 1 and (probe.frame()["calls"] == 1).all()
    shallow = copy.copy(net)  # shares the hook dicts: ignored by identity
    assert shallow(x).shape == (5, 6)


def test_entering_a_detached_probe_raises():
    net = make_net()
    probe = gradprobe.attach(net)
    probe.detach()
    with pytest.raises(RuntimeError, match="detached"), probe:
        pass


# ----------------------------------------------------------------------------- the command line


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


READ_ONLY = "/proc/gradprobe-cannot-write"  # not writable even for root
INSPECT = (
    "inspect",
    "gradprobe.models:mlp",
    "--arg",
    "4",
    "--arg",
    "in_features=3",
    "--arg",
    "num_classes=2",
)
LONG_IDS = ("--input-shape", "2,3", "--input-dtype", "long")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    small_run(base / "small", steps=3)
    small_run(base / "other", steps=5)
    (base / "file").write_text("not a folder")
    for name, content in (("list", "[]"), ("dtype", '{"dtypes": {"frame": {"gain": "float128x"}}}')):
        records.Run(records.empty_frame(), pd.DataFrame({"step": [0]}), {}).save(base / name)
        (base / name / "meta.json").write_text(content)
    records.Run(records.empty_frame(), pd.DataFrame({"step": [0]}), {}).save(base / "dir")
    (base / "dir" / "meta.json").unlink()
    (base / "dir" / "meta.json").mkdir()
    return base


BAD_INPUTS = [
    (("report", "{b}/small", "--out", "{b}/file"), "is a file"),
    (("report", "{b}/small", "--out", READ_ONLY), "cannot be written"),
    (("report", "{b}/small", "--out", "{b}/other"), "--force"),
    (("report", "{b}/list"), "meta.json holds a JSON list"),
    (("report", "{b}/dtype"), "unknown dtype 'float128x'"),
    (("report", "{b}/dir"), "meta.json is a folder"),
    ((*INSPECT, "--batch", "-1"), "--batch must be between 1"),
    ((*INSPECT, "--batch", "0"), "--batch must be between 1"),
    ((*INSPECT, "--batch", "10000000000"), "--batch must be between 1"),
    ((*INSPECT, *LONG_IDS, "--vocab-size", "-5"), "--vocab-size must be"),
    ((*INSPECT, "--csv", "{b}/missing/x.csv"), "does not exist"),
    ((*INSPECT, "--csv", "{b}/small"), "is a folder"),
    ((*INSPECT, "--csv", READ_ONLY + "/x.csv"), "does not exist"),
    ((*INSPECT, "--csv", "/proc/x.csv"), "cannot be written"),
    (("compare", "--width", "0"), "--width must be between 1"),
    (("compare", "--epochs", "0"), "--epochs must be"),
    (("compare", "--lr", "-1"), "--lr must be"),
    (("compare", "--batch-size", "0"), "--batch-size must be"),
    (("compare", "--quick", "--out", READ_ONLY), "cannot be written"),
    (("compare", "--quick", "--out", "{b}/file"), "not a folder"),
    (("compare", "--quick", "--out", "{b}/other"), "--force"),
]


@pytest.mark.parametrize(("args", "match"), BAD_INPUTS)
def test_bad_input_is_one_line_and_a_non_zero_exit(cli_runs, args, match, capsys):
    if not LINUX and any(a.startswith("/proc") for a in args):
        pytest.skip("an unwritable path even for root: /proc, Linux only")
    args = [a.format(b=cli_runs) for a in args]
    code, stdout, stderr = run_cli(*args)
    err = stderr + capsys.readouterr().err  # argparse writes through sys.stderr directly
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert code == 2, (code, stdout, err)
    assert "Traceback" not in err and "gradprobe compare:" not in "".join(lines[1:])
    assert match in lines[-1], lines
    assert not stdout or "Trained" not in stdout  # refused before any training
    # the run that --out pointed at is intact
    assert gradprobe.load(cli_runs / "other").frame()["step"].nunique() == 5


def test_report_force_replaces_another_run(cli_runs, tmp_path):
    target = tmp_path / "target"
    small_run(target, steps=4)
    args = ("report", str(cli_runs / "small"), "--out", str(target), "--force", "--no-progress")
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert gradprobe.load(target).frame()["step"].nunique() == 3


def test_resaving_a_run_that_fails_while_writing_its_scalars_leaves_the_old_run_whole(tmp_path, monkeypatch):
    """Regression: a save into the folder of the same run replaced frame.* before scalars.* was
    even written, so a failure (or a kill) in between left a new frame beside old scalars."""

    def run_at(step: int, meta: dict | None = None) -> records.Run:
        frame = records.rows_to_frame([{"step": step, "block": "b", "index": 0, "calls": 1, "gain": 0.5}])
        scalars = pd.DataFrame({"step": [step], "loss": [float(step)]})
        return records.Run(frame, scalars, meta)

    old = run_at(0)
    folder = old.save(tmp_path / "run")
    new = run_at(1, old.meta)  # the same run id: saved into its own folder again
    original = records.run._write_table  # the binding save_run calls
    written: list[str] = []

    def failing(frame, file, fmt):
        written.append(file.name)
        if len(written) == 2:  # the scalars table
            raise OSError(28, "No space left on device")
        original(frame, file, fmt)

    monkeypatch.setattr(records.run, "_write_table", failing)
    with pytest.raises(OSError, match="No space"):
        new.save(folder)
    monkeypatch.setattr(records.run, "_write_table", original)
    back = gradprobe.load(folder)
    assert back.frame()["step"].tolist() == [0] and back.scalars()["step"].tolist() == [0]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # nothing left behind
    new.save(folder)
    back = gradprobe.load(folder)
    assert back.frame()["step"].tolist() == [1] and back.scalars()["step"].tolist() == [1]


def test_resume_after_a_kill_inside_meta_json_numbers_on_after_the_chunks_on_disk(faults):
    """Regression: meta.json is replaced after its chunk pair, so a kill inside that write left
    steps on disk that meta.json did not count, and resume numbered new steps over them."""
    results, _ = faults
    case = next(
        r
        for r in results
        if r["kind"] == "inject" and r["point"] == "meta" and r["nth"] > 1 and r["fmt"] == "csv"
    )
    before, _ = quiet_load(case["folder"])
    done = before.frame()["step"].nunique()
    assert done > before.meta["steps_written"]  # the case this is about: meta.json lags its chunks
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradprobe.attach(net, sink=case["folder"], sink_options={"resume": True}) as probe:
            assert probe.current_step == done
            train(net, probe, 2)
    run, _ = quiet_load(case["folder"])
    assert sorted(run.frame()["step"].unique()) == list(range(done + 2))


# ----------------------------------------------------------------------------- termination signals and fork


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.mark.skipif(not LINUX, reason="SIGHUP and os.fork: POSIX; the child harness: Linux")
@pytest.mark.parametrize(
    ("signame", "mode"), [("SIGTERM", "default"), ("SIGHUP", "default"), ("SIGTERM", "chained")]
)
def test_a_termination_signal_writes_the_sink_out_and_frees_its_lock(tmp_path, signame, mode):
    """Regression: SIGTERM (SLURM, Kubernetes, docker stop) lost every step since the last flush
    and left the lock behind; SIGHUP lost tens of steps."""
    import signal

    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fault_child.py"), "--signal", str(folder), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None
    printed = []
    for line in proc.stdout:
        printed.append(line.strip())
        if len(printed) >= 20:  # well inside the run, long before a flush is due (flush_seconds=3600)
            break
    sig = getattr(signal, signame)
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=120)
    lines = printed + rest.split()
    steps_closed = len([x for x in lines if x.isdigit()])
    if mode == "default":
        assert proc.returncode == -sig, err[-2000:]  # the exit status says "killed by <signal>"
    else:
        assert proc.returncode == 3 and "chained" in lines, err[-2000:]  # the previous handler ran
    assert "Traceback" not in err
    assert not (folder / records.LOCK_FILE).exists()
    run, messages = quiet_load(folder)
    assert not messages, messages
    steps = sorted(run.frame()["step"].unique().tolist())
    assert steps == list(range(len(steps)))
    # every step closed before the signal is on disk; at most the one being recorded is lost
    assert steps_closed <= len(steps) <= steps_closed + 1
    assert run.scalars()["step"].tolist() == steps


@pytest.mark.skipif(not LINUX, reason="SIGHUP: POSIX")
def test_signal_handlers_chain_and_are_put_back_when_the_last_sink_closes(tmp_path):
    import signal

    def mine(signum, frame):
        pass

    saved = signal.signal(signal.SIGTERM, mine), signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        first = gradprobe.attach(make_net(), sink=tmp_path / "a")
        second = gradprobe.attach(make_net(), sink=tmp_path / "b")
        assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # ignored (nohup): left ignored
        first.detach()
        assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL)  # a sink is still open
        second.detach()
        assert signal.getsignal(signal.SIGTERM) is mine
        # from another thread no handler can be installed: the sink works without one
        probes = []
        worker = threading.Thread(
            target=lambda: probes.append(gradprobe.attach(make_net(), sink=tmp_path / "c"))
        )
        worker.start()
        worker.join()
        assert signal.getsignal(signal.SIGTERM) is mine
        probes[0].detach()
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGHUP, saved[1])


@pytest.mark.skipif(not LINUX, reason="os.fork: the child harness is Linux only")
def test_a_forked_child_never_touches_its_parents_sink(tmp_path):
    """Regression: a forked child that exited normally closed the inherited sink: it deleted the
    parent's lock and wrote chunks under the parent's sequence numbers, which load mixed in."""
    folder = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(HERE / "fault_child.py"), "--fork", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert result["status"] == 0
    assert result["lock_kept"]  # the child left the parent's lock as it was
    assert not result["lock_left"]  # and the parent freed it at detach
    assert any("belongs to process" in w for w in result["child_warnings"]), result["child_warnings"]
    assert not [n for n in result["names_after_child"] if n.endswith(".tmp")]
    run, messages = quiet_load(folder)
    assert not messages, messages
    assert sorted(run.frame()["step"].unique()) == [0, 1, 2, 3]  # the parent's 4 steps, no child's
    assert len(run.frame()) == 4 * BLOCKS
    seqs = sorted(int(p.name.split("-")[2]) for p in folder.glob("frame-*"))
    assert seqs == list(range(len(seqs)))


def test_a_lock_of_a_live_process_is_never_taken_over(tmp_path):
    """Regression: a second probe with resume=True could take the folder while its owner wrote."""
    import socket

    sinked_run(tmp_path / "run", "csv", steps=2)
    lock = tmp_path / "run" / records.LOCK_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host, pid in ((socket.gethostname(), sleeper.pid), ("another-host", 999_999_999)):
            lock.write_text(json.dumps({"pid": pid, "host": host, "run_id": "x", "token": "t"}))
            with pytest.raises(FileExistsError, match="in use by another probe"):
                gradprobe.attach(make_net(), sink=tmp_path / "run", sink_options={"resume": True})
            assert json.loads(lock.read_text())["pid"] == pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    # a lock naming no process (crafted): not a pid to signal; old enough, it is stale
    lock.write_text(json.dumps({"pid": -1, "host": socket.gethostname()}))
    os.utime(lock, (0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradprobe.attach(make_net(), sink=tmp_path / "run", sink_options={"resume": True}) as probe:
            assert probe.current_step == 2


# ----------------------------------------------------------------------------- names and files from a folder


def crafted_streamed(folder: Path, **meta_changes) -> Path:
    sinked_run(folder, "csv", steps=4)
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(meta_changes)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_crafted_run_id_never_names_a_file_outside_the_run(tmp_path):
    """Regression: resume adopted meta.json's run_id unchecked and built chunk names from it."""
    folder = crafted_streamed(tmp_path / "deep" / "run", run_id="/../../escaped")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match="run_id") as info:
        gradprobe.attach(make_net(), sink=folder, sink_options={"resume": True})
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(records.RunFormatError, match="12 hexadecimal digits"):
        gradprobe.load(folder)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    with pytest.raises(records.RunFormatError):
        records.files.chunk_name(folder, "frame", "/../x", 0, 1, "csv")


def fresh_saved(folder: Path) -> Path:
    small_run(folder, steps=2)
    return folder


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


CRAFTED_META = [
    ({"streamed": True}, "says the run was streamed"),
    ({"format_version": 999}, "format_version 999 is newer"),
    ({"format_version": "2"}, "'format_version' must be"),
    ({"table_format": "xml"}, "'table_format' must be 'parquet' or 'csv'"),
    ({"steps": "many"}, "'steps' must be an integer"),
    ({"blocks": [1, 2]}, "'blocks' must be a list"),
    ({"dtypes": {"frame": {"gain": ["float64"]}}}, "unknown dtype"),
]


@pytest.mark.parametrize(("changes", "match"), CRAFTED_META)
def test_a_crafted_meta_json_is_one_error_naming_the_file(tmp_path, changes, match):
    folder = fresh_saved(tmp_path / "run")
    edit_meta(folder, **changes)
    with pytest.raises(records.RunFormatError, match=match) as info:
        gradprobe.load(folder)
    message = str(info.value)
    assert str(folder) in message and len(message.splitlines()) == 1


def test_meta_json_nested_deep_is_one_error_not_a_recursion_error(tmp_path):
    folder = fresh_saved(tmp_path / "run")
    (folder / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(records.RunFormatError, match="nested"):
        gradprobe.load(folder)
    deep: list = [1]
    for _ in range(40):
        deep = [deep]
    (folder / "meta.json").write_text(json.dumps({"x": deep}))
    with pytest.raises(records.RunFormatError, match="nested deeper"):
        gradprobe.load(folder)


@pytest.mark.skipif(not LINUX, reason="FIFOs and /dev/zero: POSIX")
@pytest.mark.parametrize("what", ["fifo", "dev-zero"])
def test_meta_json_that_is_a_fifo_or_a_device_is_refused_without_reading(tmp_path, what):
    """Regression: a FIFO hung load forever; a link to /dev/zero exhausted memory."""
    folder = fresh_saved(tmp_path / "run")
    (folder / "meta.json").unlink()
    if what == "fifo":
        os.mkfifo(folder / "meta.json")
    else:
        (folder / "meta.json").symlink_to("/dev/zero")
    done: list[BaseException] = []

    def load() -> None:
        try:
            gradprobe.load(folder)
        except BaseException as exc:  # handed to the test thread
            done.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "load hung"
    assert isinstance(done[0], records.RunFormatError), done
    assert "not a regular file" in str(done[0])
    code, _, err = run_cli("report", str(folder))
    assert code == 2 and "not a regular file" in err


@pytest.mark.skipif(not LINUX, reason="FIFOs: POSIX")
def test_a_chunk_that_is_a_fifo_or_huge_is_skipped_without_reading_it(tmp_path):
    import time

    folder = crafted_streamed(tmp_path / "run")
    chunks = sorted(folder.glob("frame-*.csv"))
    chunks[0].unlink()
    os.mkfifo(chunks[0])
    with open(chunks[1], "r+b") as f:  # 2 GB, sparse: no disk used, and never read
        f.truncate(2 * 2**30)
    started = time.perf_counter()
    run, messages = quiet_load(folder)
    assert time.perf_counter() - started < 10
    assert sorted(run.frame()["step"].unique()) == [2, 3]
    (message,) = [m for m in messages if "damaged" in m]
    assert "2 damaged chunk(s)" in message and "a FIFO" in message and "bytes" in message


def rewrite_chunk(folder: Path, index: int, edit) -> Path:
    chunk = sorted(folder.glob("frame-*.csv"))[index]
    frame = pd.read_csv(chunk, dtype={"block": str, "stack": str}, keep_default_na=False, na_values=[""])
    edit(frame).to_csv(chunk, index=False)
    return chunk


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda f: f.drop(columns=["block"]), "lacks the column(s) block"),
        (lambda f: f.drop(columns=["calls"]), "lacks the column(s) calls"),
        (lambda f: f.assign(gain="high"), "values, not numbers"),
        (lambda f: f.assign(step=f["step"] - 1), "already in an earlier chunk"),
    ],
)
def test_a_damaged_chunk_is_named_and_skipped_never_merged(tmp_path, edit, match):
    """Regression: a chunk without block added a block named nan, one without calls raised
    IntCastingNaNError from inside pandas, duplicated steps merged in silence."""
    folder = crafted_streamed(tmp_path / "run")
    chunk = rewrite_chunk(folder, 1, edit)
    run, messages = quiet_load(folder)
    assert sorted(run.frame()["step"].unique()) == [0, 2, 3]
    assert "nan" not in set(run.frame()["block"])
    (message,) = [m for m in messages if "damaged" in m]
    assert chunk.name in message and match in message
    with pytest.raises(records.RunFormatError, match="damaged"):
        gradprobe.load(folder, strict=True)


def test_a_renamed_metric_column_is_named(tmp_path):
    folder = crafted_streamed(tmp_path / "run")
    chunk = rewrite_chunk(folder, 2, lambda f: f.rename(columns={"gain": "gian"}))
    _, messages = quiet_load(folder)
    (message,) = [m for m in messages if "other columns" in m]
    assert chunk.name in message and "unknown: gian" in message and "missing: gain" in message
    with pytest.raises(records.RunFormatError):
        gradprobe.load(folder, strict=True)


def test_a_string_metric_column_of_a_saved_run_is_one_error(tmp_path):
    folder = tmp_path / "run"
    frame = records.rows_to_frame([{"step": 0, "block": "b", "index": 0, "calls": 1, "gain": 0.5}])
    records.save_run(folder, frame.assign(gain="x"), pd.DataFrame({"step": [0]}), {}, fmt="csv")
    with pytest.raises(records.RunFormatError, match=r"'gain' holds .* values, not numbers") as info:
        gradprobe.load(folder)
    assert "frame.csv" in str(info.value)
    code, _, err = run_cli("report", str(folder))
    assert code == 2 and "'gain' holds" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"steps_written": "3"}, "'steps_written' must be an integer"),
        ({"steps": 2**40}, "'steps' must be an integer from 0"),
        ({"table_format": "xml"}, "'table_format'"),
        ({"dropped_rows": -1}, "'dropped_rows'"),
    ],
)
def test_resume_checks_meta_json_and_detach_never_raises(tmp_path, changes, match, no_leaks):
    """Regression: a crafted meta.json raised bare ValueError/TypeError at resume, or an
    OverflowError from detach()."""
    folder = crafted_streamed(tmp_path / "run", **changes)
    net = no_leaks(make_net())
    with pytest.raises(FileExistsError, match=match) as info:
        gradprobe.attach(net, sink=folder, sink_options={"resume": True})
    assert len(str(info.value).splitlines()) == 1
    assert not (folder / records.LOCK_FILE).exists()


def test_a_sink_never_raises_at_detach_whatever_its_rows(tmp_path):
    sink = records.Sink(tmp_path / "run", fmt="csv")
    sink.append([{"step": 2**40, "block": "b", "index": 0, "calls": 1, "stack": ""}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.end_step()
        assert sink.close()
    assert any("cannot be stored" in str(w.message) for w in caught)
    assert sink.dropped_steps == 1


# ----------------------------------------------------------------------------- a live run is not a crash


def test_a_run_being_written_by_a_live_process_is_not_reported_as_damage(tmp_path):
    """Regression: load of a folder that a live sink wrote warned of a crash in 5-6% of loads."""
    import socket

    folder = crafted_streamed(tmp_path / "run")
    run_id = json.loads((folder / "meta.json").read_text())["run_id"]
    # what a live sink's folder looks like mid-flush: a temporary chunk, a frame chunk whose scalars
    # are being written
    (folder / f".frame-{run_id}-000009-r3.csv.123-abc.tmp").write_text("step\n")
    frame = sorted(folder.glob("frame-*.csv"))[-1]
    (folder / f"frame-{run_id}-000004-r3.csv").write_bytes(frame.read_bytes())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / records.LOCK_FILE).write_text(
            json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "run_id": run_id, "token": "t"})
        )
        run, messages = quiet_load(folder)
        assert sorted(run.frame()["step"].unique()) == [0, 1, 2, 3]
        (message,) = messages
        assert "being written by process" in message and "read 12 rows of 4 steps so far" in message
        assert "crash" not in message and "interruption" not in message
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the "being written" note
            gradprobe.load(folder, strict=True)  # not damage
    finally:
        sleeper.kill()
        sleeper.wait()
    _, messages = quiet_load(folder)  # the writer is gone: now it is damage
    assert any("unpaired" in m and "incomplete write" in m for m in messages), messages


def test_loading_a_live_sink_from_another_process_never_warns_of_damage(tmp_path):
    """A reader polling a folder that a live sink flushes into at every step."""
    folder = tmp_path / "run"
    script = (
        "import sys, torch, gradprobe\n"
        "net = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(3)])\n"
        "options = {'flush_seconds': 0, 'fmt': 'csv'}\n"
        "p = gradprobe.attach(net, ['0', '1', '2'], sink=sys.argv[1], sink_options=options)\n"
        "print('ready', flush=True)\n"
        "for _ in range(400):\n"
        "    net(torch.randn(4, 6)).sum().backward(); p.step()\n"
        "p.detach()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    loads = 0
    while proc.poll() is None and loads < 200:
        _, messages = quiet_load(folder)
        assert not [m for m in messages if "being written" not in m], messages
        loads += 1
    proc.wait(timeout=120)
    assert proc.returncode == 0 and loads > 5


# ----------------------------------------------------------------------------- user folders and device nodes


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "index.html").write_text("<html>my own page</html>")
    (path / "highway.png").write_bytes(b"my figure")
    (path / "spectrum.png").write_bytes(b"my other figure")
    return path


def test_report_save_and_compare_refuse_a_folder_of_the_users_files(tmp_path, cli_runs):
    """Regression: `gradprobe report RUN --out DIR` overwrote the user's index.html and PNGs in a
    folder holding no run, exit 0, and deleted a PNG of a figure it did not draw."""
    mine = user_folder(tmp_path / "mine")
    code, _, err = run_cli("report", str(cli_runs / "small"), "--out", str(mine), "--no-progress")
    assert code == 2 and "holds no gradprobe run or report" in err and "--force" in err
    code, _, err = run_cli("compare", "--quick", "--out", str(mine))
    assert code == 2 and "--force" in err
    with pytest.raises(FileExistsError, match="holds no gradprobe run or report"):
        gradprobe.load(cli_runs / "small").save(mine)
    with pytest.raises(FileExistsError, match="holds no gradprobe run or report"):
        gradprobe.report(cli_runs / "small", mine, progress=False, figures=["gain"])
    assert (mine / "index.html").read_text() == "<html>my own page</html>"
    assert (mine / "highway.png").read_bytes() == b"my figure"
    # forced: only the files of the report's own names are written; a figure not drawn stays
    code, _, err = run_cli("report", str(cli_runs / "small"), "--out", str(mine), "--force", "--no-progress")
    assert code == 0, err
    assert (mine / "spectrum.png").read_bytes() == b"my other figure"


@pytest.mark.parametrize("command", [("report", "{b}/small"), ("compare", "--quick")])
def test_an_empty_out_is_refused(cli_runs, command):
    code, stdout, err = run_cli(*[c.format(b=cli_runs) for c in command], "--out", "")
    assert code == 2 and "--out is empty" in err and "Trained" not in stdout


@pytest.mark.skipif(not LINUX, reason="/dev/null as a character device and FIFOs: POSIX")
def test_no_output_path_is_ever_a_device_or_a_fifo(tmp_path):
    """Regression: as root, `inspect --csv /dev/null` replaced the device node with a regular file.
    Only refusals are tested: nothing here writes to /dev/null."""
    import stat

    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for target in ("/dev/null", str(fifo)):
        code, stdout, err = run_cli(*INSPECT, "--csv", target)
        assert code == 2 and "not a regular file" in err and not stdout, err
        with pytest.raises(OSError, match="not a regular file"):
            records.atomic_write_text(target, "x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe.csv"]  # no temporary file left either


# ----------------------------------------------------------------------------- the command line: user code


FACTORY = """
import torch


class Stop(BaseException):
    pass


def exits():
    raise SystemExit(0)


def stops():
    raise Stop("stopped by the user's code")


def interrupted():
    raise KeyboardInterrupt


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 3)

    def forward(self, x):
        raise Stop("forward ended the program")


def net():
    return Net()
"""


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("exits", "raised SystemExit(0)"),
        ("stops", "Stop: stopped by the user's code"),
        ("interrupted", "raised KeyboardInterrupt"),
        ("net", "Stop: forward ended the program"),
    ],
)
def test_base_exceptions_of_user_code_are_one_line_and_a_non_zero_exit(tmp_path, factory, match, capsys):
    """Regression: a factory raising SystemExit(0) exited 0 in silence; a BaseException subclass
    printed a traceback."""
    module = tmp_path / "user_models.py"
    module.write_text(FACTORY)
    args = ("--input-shape", "2,3", "--no-jacobian", "--blocks", "layer")
    code, stdout, stderr = run_cli("inspect", f"{module}:{factory}", *args)
    err = stderr + capsys.readouterr().err
    assert code != 0, (stdout, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err


HUGE = "99999999999999999999999"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((*INSPECT, "--seed", HUGE), "--seed must be between 0 and"),
        ((*INSPECT, "--seed", "-1"), "--seed must be between 0 and"),
        (("compare", "--quick", "--seed", str(2**63)), "--seed must be between 0 and"),
        (("compare", "--quick", "--threads", HUGE), "--threads must be between"),
        (("compare", "--quick", "--epochs", HUGE), "--epochs must be between"),
        (("compare", "--quick", "--lr", "1e308"), "--lr must be between"),
        (("compare", "--quick", "--batch-size", HUGE), "--batch-size must be between"),
        ((*INSPECT, "--input-shape", f"{HUGE},3"), "below 2**31"),
        ((*INSPECT, *LONG_IDS, "--vocab-size", HUGE), "--vocab-size must be between"),
    ],
)
def test_numbers_out_of_range_are_one_line(args, match, capsys):
    """Regression: --seed 99999999999999999999999 raised 'Overflow when unpacking long long'."""
    code, stdout, stderr = run_cli(*args)
    err = stderr + capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err, err
    assert "Trained" not in stdout


def test_compare_tensorboard_that_is_a_file_is_refused_before_training(tmp_path):
    """Regression: compare --tensorboard FILE failed only after training, with a traceback."""
    (tmp_path / "file").write_text("x")
    code, stdout, err = run_cli(
        "compare", "--quick", "--out", str(tmp_path / "out"), "--tensorboard", str(tmp_path / "file")
    )
    assert code == 2 and "--tensorboard" in err and "not a folder" in err and "Traceback" not in err
    assert "Trained" not in stdout and not (tmp_path / "out").exists()
    from gradprobe.experiment import TrainConfig

    with pytest.raises(ValueError, match="not a folder"):
        TrainConfig(tensorboard=str(tmp_path / "file"))
