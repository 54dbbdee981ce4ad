"""Child process of tests/test_faults.py: sinked runs killed at random and at injected points.

Importing torch costs seconds, so this process imports it once and forks a grandchild
per kill point. Each grandchild records a small deterministic run; the child kills it
with SIGKILL at a random time (or the grandchild ``os._exit``s at an injected point of a
write), and prints one JSON line per kill point for the test to check. ``--reference``
runs the same training without a sink and saves it, the frame every kill point must
match. Run as ``python tests/fault_child.py OUT_FOLDER``; ``--signal FOLDER MODE`` records until
a termination signal (:func:`signal_run`), ``--fork FOLDER`` forks a recording process (:func:`fork_run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

import gradprobe
from gradprobe import records

STEPS = 12
BLOCKS = 3


def patch_records(name: str, value: object) -> None:
    """Replace ``gradprobe.records.<name>`` in every module of the records package that holds it
    (each one calls its own binding), so that every write of a run goes through ``value``."""
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("gradprobe.records") and hasattr(module, name):
            setattr(module, name, value)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(BLOCKS)]).double()


def train(probe: gradprobe.Probe, net: nn.Module, report: int | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(STEPS):
        x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe.log(loss=loss.item())
        probe.step()  # closes the step: its rows and scalars reach the sink (and maybe a chunk on disk)
        if report is not None:
            sink = probe._out.sink
            assert sink is not None
            os.write(report, f"{step} {sink._seq}\n".encode())
    probe.detach()


def grandchild(folder: Path, fmt: str, report: int) -> None:
    net = make_net()
    probe = gradprobe.attach(
        net, sink=folder, sink_options={"fmt": fmt, "chunk_rows": 2 * BLOCKS, "flush_seconds": 3600}
    )
    train(probe, net, report)


def fork(target, *args) -> tuple[int, int]:
    """Run ``target(*args, write_end)`` in a forked grandchild; return (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # grandchild
        os.close(r)
        code = 0
        try:
            target(*args, w)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def collect(pid: int, r: int) -> tuple[list[tuple[int, int]], int]:
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    lines = [tuple(map(int, line.split())) for line in data.decode().splitlines() if line.strip()]
    return lines, status  # type: ignore[return-value]


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def random_kills(out: Path, fmt: str, n: int, rng: random.Random, batch: int = 4) -> None:
    """``n`` runs killed at random points, ``batch`` at a time (the runs wait on fsync more than
    they compute). Each kill point is a random step of the run plus a random delay of up to one
    step's time, so it lands inside the run (not after its end) whatever the machine's load,
    and anywhere within a step: between writes, inside a chunk write or inside meta.json's."""
    start = time.perf_counter()
    calibration = [fork(grandchild, out / f"calibrate-{fmt}-{i}", fmt) for i in range(batch)]
    for pid, r in calibration:
        lines, status = collect(pid, r)
    step_time = (time.perf_counter() - start) / STEPS
    emit(kind="calibrate", fmt=fmt, seconds=step_time * STEPS, lines=lines, status=status)
    for first in range(0, n, batch):
        runs = []
        for k in range(first, min(first + batch, n)):
            folder = out / f"kill-{fmt}-{k:02d}"
            pid, r = fork(grandchild, folder, fmt)
            runs.append((pid, r, folder, rng.randrange(-1, STEPS - 1), rng.uniform(0.0, step_time)))
        results: dict[int, tuple[list[tuple[int, int]], int]] = {}

        def kill_after(pid: int, r: int, step: int, delay: float, results=results) -> None:
            # Read the run's progress lines; once it reports `step` (-1: at once), wait `delay`
            # and kill it. A run that ends first is collected unkilled.
            data = b""
            if step >= 0:
                while f"\n{step} ".encode() not in b"\n" + data and (chunk := os.read(r, 65536)):
                    data += chunk
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while chunk := os.read(r, 65536):
                data += chunk
            os.close(r)
            _, status = os.waitpid(pid, 0)
            lines = [tuple(map(int, line.split())) for line in data.decode().splitlines() if line.strip()]
            results[pid] = (lines, status)  # type: ignore[assignment]

        threads = [
            threading.Thread(target=kill_after, args=(pid, r, step, delay)) for pid, r, _, step, delay in runs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for pid, _, folder, _, _ in runs:
            lines, status = results[pid]
            emit(kind="kill", fmt=fmt, folder=str(folder), lines=lines, status=status)


def injected(folder: Path, fmt: str, point: str, nth: int, report: int) -> None:
    """A grandchild that dies at the ``nth`` write of kind ``point``."""
    calls = {"n": 0}
    atomic_write = records.atomic_write

    def dying_write(path, write):
        name = Path(path).name
        hit = (
            (point == "chunk" and name.startswith("frame-"))
            or (point == "between" and name.startswith("scalars-"))
            or (point == "meta" and name == "meta.json")
        )
        if hit:
            calls["n"] += 1
            if calls["n"] == nth:
                tmp = Path(path).with_name(f".{name}.{os.getpid()}-dying.tmp")
                if point in ("chunk", "meta"):  # die inside the write: half a temporary file
                    write(tmp)
                    data = tmp.read_bytes()
                    tmp.write_bytes(data[: len(data) // 2])
                os._exit(9)
        return atomic_write(path, write)

    patch_records("atomic_write", dying_write)
    grandchild(folder, fmt, report)


def report_kill(folder: Path, nth: int, report: int) -> None:
    """Save a run, then die at the ``nth`` file written by a report into that run's folder."""
    import gradprobe.reporting as report_module

    calls = {"n": 0}
    atomic_write = records.atomic_write

    def dying_write(path, write):
        calls["n"] += 1
        if calls["n"] == nth:
            os._exit(9)
        return atomic_write(path, write)

    patch_records("atomic_write", dying_write)
    report_module.report(folder, progress=False, figures=["highway", "gain"])
    os.write(report, b"0 0\n")


def full_disk(folder: Path, bound: int, report: int) -> None:
    """A sink whose files may not exceed 2 kB (RLIMIT_FSIZE): every chunk write fails."""
    import resource
    import warnings

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    attempts = {"n": 0}
    write_table = records.files._write_table

    def counted(frame, file, fmt):
        attempts["n"] += 1
        return write_table(frame, file, fmt)

    patch_records("_write_table", counted)
    net = make_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = gradprobe.attach(
            net,
            sink=folder,
            sink_options={
                "fmt": "parquet",
                "chunk_rows": BLOCKS,
                "flush_seconds": 0,
                "max_buffer_rows": bound,
            },
        )
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        steps = 100
        started = time.perf_counter()
        x = torch.randn(5, 6, dtype=torch.float64)
        for _ in range(steps):
            net(x).pow(2).mean().backward()
        seconds = time.perf_counter() - started
        frame = probe.frame()  # must not raise
        probe.detach()  # must not raise
    sink_warnings = [str(w.message) for w in caught if "sink folder" in str(w.message)]
    result = {
        "rows": len(frame),
        "steps": int(frame["step"].nunique()),
        "write_attempts": attempts["n"],
        "seconds_per_step": seconds / steps,
        "warnings": sink_warnings,
    }
    os.write(report, (json.dumps(result) + "\n").encode())


def exit_without_detach(folder: Path, report: int) -> None:
    """A script that ends without detach(): what is buffered is written at interpreter exit."""
    import atexit

    net = make_net()
    probe = gradprobe.attach(net, sink=folder, sink_options={"flush_seconds": 3600})
    x = torch.randn(5, 6, dtype=torch.float64)
    for _ in range(3):
        net(x).pow(2).mean().backward()
        probe.step()
    os.write(report, b"3 0\n")
    atexit._run_exitfuncs()  # what a normal interpreter exit runs (a forked child skips it)


def signal_run(folder: Path, mode: str) -> None:
    """Record steps until a signal ends the process, printing each step once it is closed.

    ``mode`` ``"default"``: the signal's default action; ``"chained"``: a handler installed
    before the probe, which the sink's handler must call (it prints ``chained`` and exits 3)."""
    if mode == "chained":

        def handler(signum, frame):
            print("chained", flush=True)
            sys.exit(3)

        signal.signal(signal.SIGTERM, handler)
    net = make_net()
    probe = gradprobe.attach(
        net, sink=folder, sink_options={"fmt": "csv", "flush_seconds": 3600, "chunk_rows": 10**6}
    )
    x = torch.randn(5, 6, dtype=torch.float64)
    for step in range(100_000):
        net(x).pow(2).mean().backward()
        probe.log(loss=float(step))
        probe.step()
        print(step, flush=True)
    probe.detach()


def fork_run(folder: Path) -> None:
    """A parent records into a sink and forks; the child records a few steps into the inherited
    probe, detaches and exits normally (atexit, finalizers). Prints what the parent saw as JSON."""
    net = make_net()
    probe = gradprobe.attach(net, sink=folder, sink_options={"flush_seconds": 0})
    train_steps(probe, net, 2)
    lock = (folder / records.LOCK_FILE).read_text()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: ends like a normal script
        os.close(r)
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_steps(probe, net, 3)
            probe.detach()
        os.write(w, json.dumps([str(c.message) for c in caught]).encode())
        os.close(w)
        sys.exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    _, status = os.waitpid(pid, 0)
    lock_after_child = (
        (folder / records.LOCK_FILE).read_text() if (folder / records.LOCK_FILE).exists() else None
    )
    names_after_child = sorted(p.name for p in folder.iterdir())
    train_steps(probe, net, 2)
    probe.detach()
    emit(
        status=status,
        child_warnings=json.loads(data or b"[]"),
        lock_kept=lock_after_child == lock,
        names_after_child=names_after_child,
        lock_left=(folder / records.LOCK_FILE).exists(),
    )


def train_steps(probe: gradprobe.Probe, net: nn.Module, steps: int) -> None:
    x = torch.randn(5, 6, dtype=torch.float64)
    for _ in range(steps):
        net(x).pow(2).mean().backward()
        probe.step()


def main() -> None:
    if sys.argv[1] == "--signal":
        signal_run(Path(sys.argv[2]), sys.argv[3])
        return
    if sys.argv[1] == "--fork":
        torch.set_num_threads(1)
        fork_run(Path(sys.argv[2]))
        return
    # imported once here, not in every grandchild
    import matplotlib.pyplot  # noqa: F401
    import seaborn  # noqa: F401

    import gradprobe.reporting

    torch.set_num_threads(1)  # before any work: forked grandchildren must not inherit a thread pool
    out = Path(sys.argv[1])
    stamp = time.perf_counter()
    rng = random.Random(12)
    # the reference: the same training without a sink
    net = make_net()
    probe = gradprobe.attach(net)
    train(probe, net)
    probe.save(out / "reference")
    for fmt in ("parquet", "csv"):
        random_kills(out, fmt, 16, rng)
    emit(kind="time", phase="kills", seconds=time.perf_counter() - stamp)
    for point, nths in (("chunk", (1, 3)), ("between", (1, 4)), ("meta", (1, 2, 5))):
        for fmt in ("parquet", "csv"):
            for nth in nths:
                folder = out / f"inject-{point}-{fmt}-{nth}"
                pid, r = fork(injected, folder, fmt, point, nth)
                lines, status = collect(pid, r)
                emit(
                    kind="inject",
                    point=point,
                    fmt=fmt,
                    nth=nth,
                    folder=str(folder),
                    lines=lines,
                    status=status,
                )
    emit(kind="time", phase="injected", seconds=time.perf_counter() - stamp)
    for nth in (1, 2, 3):
        folder = out / f"report-{nth}"
        saved = records.load(out / "reference")
        records.Run(saved.frame(), saved.scalars(), saved.meta).save(folder)
        pid, r = fork(report_kill, folder, nth)
        lines, status = collect(pid, r)
        emit(kind="report", nth=nth, folder=str(folder), status=status, finished=bool(lines))
    emit(kind="time", phase="reports", seconds=time.perf_counter() - stamp)
    pid, r = fork(exit_without_detach, out / "no-detach")
    lines, status = collect(pid, r)
    emit(kind="exit", folder=str(out / "no-detach"), lines=lines, status=status)
    for bound in (10**6, 5 * BLOCKS):
        folder = out / f"full-{bound}"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                full_disk(folder, bound, w)
            finally:
                os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        emit(kind="full", bound=bound, folder=str(folder), result=json.loads(data or b"null"))
    emit(kind="time", phase="full", seconds=time.perf_counter() - stamp)


if __name__ == "__main__":
    main()
