"""The benchmark scripts run on tiny settings and refuse a ratio whose control is off (no speed asserted)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def overhead():
    return _load("overhead")


def test_a_ratio_is_refused_when_the_bare_control_is_outside_its_band(overhead):
    steady = overhead.Result("x", bare=[[1.0] * 4, [1.0] * 4], probed=[[1.5] * 4] * 2, blocks=2, recorded=1.0)
    assert steady.median_control() == 1.0 and steady.median_ratio() == 1.5
    assert overhead.ratio_text(steady.median_ratio(), steady.median_control()).startswith("1.500")
    assert steady.us_per_block() == pytest.approx(0.25e6)
    noisy = overhead.Result("x", bare=[[1.0] * 4, [1.2] * 4], probed=[[1.5] * 4] * 2, blocks=2, recorded=1.0)
    assert noisy.median_text().startswith("refused (control 0.833")
    assert not noisy.us_valid()
    noisy_probed = overhead.Result("x", [[1.0] * 4] * 2, [[1.5] * 4, [2.0] * 4], blocks=2, recorded=1.0)
    assert noisy_probed.median_text() == "refused (control 1.000, probed 0.750)"
    assert steady.us_valid() and steady.median_text() == "1.500 (control 1.000)"
    skewed = overhead.Result("x", [[1.0] * 4] * 2, [[1.5, 1.5, 1.5, 9.0]] * 2, blocks=2, recorded=1.0)
    assert skewed.median_text().startswith("refused (median 1.500 and total 3.375 disagree")
    assert not skewed.us_valid()


def test_the_harness_runs_and_prints_a_table_row(overhead, capsys):
    overhead.main(["--model", "mlp", "--config", "default", "--pairs", "2", "--chunk", "9", "--threads", "1"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| mlp | default |")]
    assert len(row) == 1 and "control" in row[0]
    assert "20 blocks, 1.00 recorded per step" in out
    assert overhead.chunk_for("every10", 9) == 12  # 2 dropped + a whole cycle of one recorded step in ten


def test_peers_report_a_missing_peer_instead_of_failing(capsys):
    peers = _load("peers")
    pytest.importorskip("gradprobe")
    peers.main(["--model", "mlp", "--tools", "naive", "--pairs", "2", "--chunk", "9", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| naive |" in out


def test_jacobian10_is_not_refused_for_a_median_and_total_that_differ_by_design(overhead):
    # One Jacobian step in ten moves the total ratio, not the median: that is no noise.
    steps = [1.5] * 9 + [6.0]
    periodic = overhead.Result("jacobian10", [[1.0] * 10] * 2, [steps] * 2, blocks=2, recorded=1.0)
    assert periodic.consistent()
    assert periodic.median_text().startswith("1.500") and periodic.total_text().startswith("1.950")
    assert not overhead.Result("default", [[1.0] * 10] * 2, [steps] * 2, blocks=2, recorded=1.0).consistent()


def test_the_scaling_benchmark_prints_a_row_per_depth(capsys):
    scaling = _load("scaling")
    scaling.main(["--blocks", "3", "6", "--pairs", "2", "--chunk", "9", "--count-steps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 3 |", "| 6 |"))]
    assert len(rows) == 2 and all(row.count("|") == 10 for row in rows)


def test_schedule_cycles_hold_every_expensive_step_of_the_schedule(overhead):
    # every10: one recorded step in 10; jacobian10: 20 Jacobian steps of 10, the first spectral
    # (spec=20); paths50: one decomposition in 50.
    assert [overhead.cycle_steps(c) for c in ("default", "every10", "jacobian10", "paths50")] == [
        1,
        10,
        200,
        50,
    ]
    assert (
        overhead.chunk_for("jacobian10", 11) == 201 and overhead.chunk_for("jacobian10", 11, cycles=2) == 401
    )
    assert overhead.chunk_for("paths50", 9) == 51 and overhead.chunk_for("default", 9, cycles=3) == 9
    # the dropped first step (0) is never a recorded one under a schedule; under every10 the
    # attach's first recorded step (1) is dropped too, and the cycles start at step 2
    schedule = overhead.probe_kwargs("every10")["every"]
    assert [s for s in range(25) if schedule(s)] == [1, 2, 12, 22]
    assert overhead.lead_steps("every10") == 2 and overhead.chunk_for("every10", 11) == 12
    schedule = overhead.probe_kwargs("jacobian10")["every"]
    assert [s for s in range(4) if schedule(s)] == [1, 2, 3] and overhead.lead_steps("jacobian10") == 1
    assert overhead.probe_kwargs("default") == {}


def test_the_first_jacobian_step_is_measured_and_not_the_dropped_first_step(overhead, monkeypatch):
    # A spectral cycle scaled down: Jacobian columns every 2nd recorded step, spectral on every
    # 2nd of those, so a cycle is 4 steps and a chunk 1 + 4. The chunk's first (spectral)
    # Jacobian step must be among the measured steps, the dropped step unrecorded.
    monkeypatch.setitem(overhead.CONFIGS, "jac_small", {"jacobian": 2, "jacobian_options": {"spec": 2}})
    assert overhead.cycle_steps("jac_small") == 4
    work = overhead.build("mlp", 4, overhead.torch.device("cpu"))
    (r,) = overhead.measure(
        work, "jac_small", pairs=2, chunk=9, device=overhead.torch.device("cpu"), cycles=1
    )
    assert r.counts == "4 measured steps: 4 recorded, 2 Jacobian, 1 spectral"
    assert r.scheduled and r.figure_text().startswith("total ")
    assert "supplementary" in r.supplementary_text() and len(r.bare) == len(r.probed) == 2
    assert all(len(c) == 4 for c in r.bare + r.probed)


def test_a_scheduled_configuration_prints_the_total_as_its_figure(overhead, capsys):
    overhead.main(["--model", "mlp", "--config", "every10", "--pairs", "2", "--chunk", "9", "--threads", "1"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| mlp | every10 |")]
    assert len(row) == 1
    assert row[0].split("|")[7].strip().startswith("total ")  # the figure column
    assert "median" in row[0].split("|")[8] and "supplementary" in row[0].split("|")[8]
    assert "each probed chunk held: 10 measured steps: 1 recorded" in out


def test_the_floor_reads_x_y_and_both_gradients_of_each_block_once_and_removes_its_hooks():
    floor = _load("floor")
    torch = pytest.importorskip("torch")
    work = floor.build("mlp", 4, torch.device("cpu"))
    tool = floor.FloorTool()
    model = work.model
    tool.attach(model)
    reads = []
    try:
        for step in range(2):  # the first step makes the slots the second one writes into
            tool.backward(tool.loss(work, work.batches[0], {}), step, {})
            reads.append(tool.read)
    finally:
        tool.detach(model, 2)
    assert tool.blocks == 20 and len(tool.read) == 4 * 20  # x, y, g_y, g_x per block
    assert reads[0] == reads[1]  # no update between: the same values, by either path
    # the values are the norms: check one block's against a plain autograd pass
    blocks = [m for _, m in floor.select_blocks(model)]
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        seen["x"], seen["y"] = args[0], output
        args[0].retain_grad()
        output.retain_grad()

    handle = blocks[3].register_forward_hook(keep)
    try:
        model.zero_grad()
        work.loss(model, work.batches[0]).backward()
    finally:
        handle.remove()
    want = [
        float(torch.linalg.vector_norm(t.detach()))
        for t in (seen["x"], seen["y"], seen["y"].grad, seen["x"].grad)
    ]
    # forward: x, y of blocks 0..19; backward: g_y, g_x of blocks 19..0
    got = [tool.read[2 * 3], tool.read[2 * 3 + 1], tool.read[40 + 2 * 16], tool.read[40 + 2 * 16 + 1]]
    assert got == pytest.approx(want, rel=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in blocks)


def test_overhead_prints_the_probe_as_a_multiple_of_the_floor(overhead, capsys):
    overhead.main(
        ["--model", "mlp", "--config", "default", "--pairs", "2", "--chunk", "9", "--threads", "1", "--floor"]
    )
    out = capsys.readouterr().out
    assert "the probe against the floor: " in out
    assert any(line.startswith("| mlp | floor (beside default) |") for line in out.splitlines())


def test_floor_main_prints_the_floor_against_bare(capsys):
    floor = _load("floor")
    floor.main(["--model", "mlp", "--pairs", "2", "--chunk", "5", "--threads", "1"])
    out = capsys.readouterr().out
    assert "floor on mlp, batch 32" in out and "(20 blocks, 80 values read per step)" in out


def test_host_reads_are_counted_once_each_and_the_patches_removed():
    profile = _load("profile_probe")
    import torch

    x = torch.arange(4.0)
    before = {n: getattr(torch.Tensor, n) for n in (*profile.HOST_READS, "to")}
    with profile.count_host_reads() as reads:
        x.sum().item()
        float(x.max())
        if x.any():  # __bool__
            pass
        x.tolist()
        f"{x.sum()}"  # __format__ calls item: counted as the item it is
        host = x.to("cpu")  # the host copy is the read; reading the copy is no other
        host.numpy()
        x.to(torch.float64)  # no device: not a read
    assert dict(reads) == {"item": 2, "__float__": 1, "__bool__": 1, "tolist": 1, "to(host)": 1}
    assert {n: getattr(torch.Tensor, n) for n in before} == before
    assert not set(before) & set(torch.Tensor.__dict__)


def test_profile_probe_prints_host_reads_per_recorded_step(capsys):
    profile = _load("profile_probe")
    profile.main(["--steps", "2", "--floor"])
    out = capsys.readouterr().out
    assert "gradprobe: windows of 2 steps, 2 of them recorded, 20 blocks" in out
    assert "host reads per recorded step: " in out and "nested ones and views included" in out
    # the floor: four norms and a share of one stack per block, one .tolist() a step
    floor = out[out.index("floor (floor.py): windows of 2 steps, 2 of them recorded, 20 blocks") :]
    assert "host reads per recorded step: 1 (" in floor and "tolist 1" in floor


@pytest.mark.skipif(torch_cuda_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_stops_with_one_clear_line_without_cuda():
    script = BENCH / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "needs a CUDA build of torch and a CUDA device" in done.stderr
    assert "== " not in done.stdout  # no part ran


def test_gpu_counts_refuses_without_cuda_and_runs_on_the_cpu(capsys):
    counts = _load("gpu_counts")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            counts.main(["--model", "mlp"])
    counts.main(["--model", "mlp", "--device", "cpu", "--steps", "2"])
    out = capsys.readouterr().out
    assert "2 steps counted, 2 recorded, 20 blocks" in out
    assert "aten operators per block and recorded step: " in out and "not measured (--device cpu)" in out


def test_the_probe_as_a_multiple_of_the_floor(overhead):
    bare = [[1.0] * 4] * 2
    probe = overhead.Result("default", bare, [[1.5] * 4] * 2, blocks=2, recorded=1.0)
    floor = overhead.Result("floor", bare, [[1.1] * 4] * 2, blocks=2, recorded=1.0)
    assert overhead.floor_text(probe, floor) == "probe/floor 1.364; (probe - bare)/(floor - bare) 5.00"
    # a floor within the control band leaves only probe/floor: its overhead is noise-sized
    thin = overhead.Result("floor", bare, [[1.02] * 4] * 2, blocks=2, recorded=1.0)
    assert "is within the control band" in overhead.floor_text(probe, thin)
    noisy = overhead.Result("floor", [[1.0] * 4, [1.2] * 4], [[1.1] * 4] * 2, blocks=2, recorded=1.0)
    assert overhead.floor_text(probe, noisy).startswith("refused")


def test_the_accelerator_path_reads_the_host_once_per_recorded_step_in_few_launches(capsys):
    # The counts of the path a GPU takes, run on the CPU: one host read (the step's one transfer)
    # and at most 15 kernel-launching operators per block and recorded step.
    import gradprobe.metrics

    reads_host = gradprobe.metrics.reads_host
    profile = _load("profile_probe")
    profile.main(["--steps", "10", "--as-accelerator"])
    out = capsys.readouterr().out
    assert gradprobe.metrics.reads_host is reads_host  # put back
    assert "the accelerator path (--as-accelerator)" in out
    assert "host reads per recorded step: 1 (" in out
    launching = float(out.split("launching operators per block and recorded step: ")[1].split()[0])
    assert launching <= 15


def test_parts_times_each_part_of_the_probe_and_puts_the_originals_back(capsys):
    from gradprobe import probe, taps

    before = (taps.Taps.pre_hook, probe.Probe._close_step)
    parts = _load("parts")
    parts.main(["--steps", "3"])
    out = capsys.readouterr().out
    assert (taps.Taps.pre_hook, probe.Probe._close_step) == before
    assert "µs per block and recorded step more" in out
    for _, _, what in parts.PARTS:
        assert what in out


def test_the_accelerator_path_reads_the_host_once_per_recorded_step_with_a_grad_scaler(monkeypatch):
    # The loss scale travels with the step's statistics (rows.loss_scale), so a GradScaler adds no
    # host read: three recorded steps, three reads more than bare (each the close of a step).
    import torch

    import gradprobe
    import gradprobe.metrics

    profile = _load("profile_probe")
    overhead = _load("overhead")
    torch.manual_seed(0)
    work = overhead.build("mlp", None, torch.device("cpu"))
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")

    def step(i):
        opt.zero_grad(set_to_none=True)
        scaler.scale(work.loss(model, work.batches[i % len(work.batches)])).backward()
        scaler.step(opt)
        scaler.update()

    def reads():
        with profile.count_host_reads() as counts:
            for i in range(3):
                step(i)
        return sum(counts.values())

    for i in range(2):
        step(i)
    bare = reads()
    monkeypatch.setattr(gradprobe.metrics, "reads_host", lambda t: False)
    with gradprobe.attach(model, scaler=scaler):
        for i in range(2):
            step(i)
        probed = reads()
    assert probed - bare == 3
