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
