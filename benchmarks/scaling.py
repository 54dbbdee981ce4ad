"""How the probe's cost grows with the number of blocks: attach time and cost per block at 50 to 2,000.

A deep residual MLP (:func:`gradprobe.models.mlp` without a norm: an ``nn.Sequential`` of N
blocks ``x + fc(relu(x))``, width 32, zero-initialised branches, batch 16) at N = 50, 250,
1,000 and 2,000 blocks. For each N it prints:

* **attach**: the time of ``gradprobe.attach(model)`` split into the ``blocks="auto"``
  selection (:func:`gradprobe.blocks.auto_blocks` alone) and the rest of ``Probe.__init__``,
  and the first recorded step (forward, backward, optimizer step and the step's close, with
  the one-off hooks of that step) beside a bare step;
* **µs per block**: the probe's extra cost per block per recorded step, measured on the same
  model instance in alternating bare and probed chunks (``overhead.py``'s harness), with its
  bare-vs-bare and probed-vs-probed controls (a control far from 1.00 means the machine was
  too noisy for the figure; it is printed anyway, marked);
* **CPU µs per block**: the same extra cost in this thread's CPU time (means of probed and
  bare steps, the garbage collector's collections included), which a loaded machine inflates
  less than the wall clock;
* **aten operators and Python calls per block** and recorded step beyond a bare step
  (``torch.profiler`` and ``cProfile``): counts that do not depend on the machine's load, so
  a cost that grows faster than the number of blocks shows there without timing noise.

A flat column from 50 to 2,000 blocks is linear scaling. Each depth runs in a process of its
own, so that no depth inherits what the ones before it left (memory, collector state).

    python benchmarks/scaling.py
    python benchmarks/scaling.py --blocks 50 250 --pairs 3

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import ProbeTool, Workload, in_range, measure_tool  # a script beside this one, not a package

import gradprobe
from gradprobe.blocks import auto_blocks
from gradprobe.models import mlp

WIDTH, BATCH = 32, 16


def build(blocks: int, seed: int = 0) -> Workload:
    """The residual MLP with ``blocks`` blocks, a few fixed batches and its loss."""
    gen = torch.Generator().manual_seed(seed)
    model = mlp(
        blocks + 2,  # a stem and a head around the blocks
        in_features=WIDTH,
        num_classes=10,
        width=WIDTH,
        norm=None,
        zero_init_residual=True,
        generator=torch.Generator().manual_seed(seed),
    ).train()
    batches: list[tuple[Any, ...]] = [
        (torch.randn(BATCH, WIDTH, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
        for _ in range(4)
    ]

    def loss(m: nn.Module, xy: tuple[Any, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(xy[0]), xy[1])

    return Workload(f"mlp{blocks}", model, batches, loss, BATCH)


def _stepper(work: Workload) -> Any:
    opt = torch.optim.SGD(work.model.parameters(), lr=1e-3, momentum=0.9)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        work.loss(work.model, work.batches[i % len(work.batches)]).backward()
        opt.step()

    return step


def attach_times(work: Workload) -> dict[str, float]:
    """Seconds: auto selection, the rest of attach, the first recorded step (closed), a bare step."""
    step = _stepper(work)
    step(0)  # warm-up, bare
    start = time.perf_counter()
    step(1)
    bare = time.perf_counter() - start
    start = time.perf_counter()
    auto_blocks(work.model)
    auto = time.perf_counter() - start
    start = time.perf_counter()
    probe = gradprobe.attach(work.model)
    total = time.perf_counter() - start
    try:
        start = time.perf_counter()
        step(2)
        probe.last_rows()  # closes the step
        first = time.perf_counter() - start
    finally:
        probe.detach()
    return {"auto": auto, "rest": total - auto, "attach": total, "first": first, "bare": bare}


def cpu_per_block(work: Workload, steps: int) -> float:
    """Extra CPU µs (this thread's time, which other processes inflate less than the wall clock) per
    block and recorded step: the mean of ``steps`` probed steps (each closed) over the mean of as
    many bare ones, collections of the cyclic garbage collector included."""
    step = _stepper(work)

    def mean(probed: bool) -> float:
        probe = gradprobe.attach(work.model) if probed else None
        try:
            for i in range(2):  # past the first recorded step's one-off work
                step(i)
            total = 0.0
            for i in range(steps):
                start = time.thread_time()
                step(i)
                if probe is not None:
                    probe.last_rows()  # closes the step
                total += time.thread_time() - start
            return total / steps
        finally:
            if probe is not None:
                probe.detach()

    bare = mean(False)
    return 1e6 * (mean(True) - bare) / len(work.model.blocks)  # type: ignore[arg-type]


def counts(work: Workload, steps: int) -> tuple[float, float]:
    """Extra aten operator calls and Python function calls per block and recorded step."""
    step = _stepper(work)
    blocks = len(work.model.blocks)  # type: ignore[arg-type]

    def measure(probed: bool) -> tuple[int, int]:
        probe = gradprobe.attach(work.model) if probed else None
        try:
            for i in range(2):  # past the first recorded step's one-off work
                step(i)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for i in range(steps):
                    step(i)
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(steps):
                step(i)
            if probe is not None:
                probe.last_rows()  # the last step's close is part of its cost
            profiler.disable()
            stats: Any = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            calls = sum(v[1] for v in stats.values())
            return ops, calls
        finally:
            if probe is not None:
                probe.detach()

    bare_ops, bare_calls = measure(False)
    ops, calls = measure(True)
    return (ops - bare_ops) / (steps * blocks), (calls - bare_calls) / (steps * blocks)


def row(n: int, pairs: int, chunk: int, count_steps: int) -> str:
    """The table row of ``n`` blocks (``chunk`` 0: 1 + 2000/n steps, at least 9)."""
    attach_times(build(2))  # the first attach of a process pays for imports
    work = build(n)
    chunk = chunk or max(9, 1 + 2000 // n)
    t = attach_times(work)
    r = measure_tool(work, ProbeTool("default"), pairs, chunk, torch.device("cpu"))
    control, probed = r.median_control(), r.median_probed_control()
    noisy = "" if in_range(control) and in_range(probed) else " noisy"
    cpu = cpu_per_block(work, chunk - 1)
    ops, calls = counts(work, count_steps)
    bare_us = 1e6 * statistics.median(r.bare_steps) / n
    return (
        f"| {n} | {t['auto']:.3f} | {t['rest']:.3f} | {t['first']:.3f} ({t['bare']:.3f}) | "
        f"{r.us_per_block():.0f} ({control:.3f}, {probed:.3f}{noisy}) | {cpu:.0f} | {bare_us:.0f} | "
        f"{ops:.1f} | {calls:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[50, 250, 1000, 2000])
    parser.add_argument("--pairs", type=int, default=2, help="bare+probed chunk pairs (at least 2)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="steps per chunk, the first one dropped (0: 1 + 2000/N, at least 9)",
    )
    parser.add_argument("--count-steps", type=int, default=2, help="steps counted by the profilers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # one depth, its row only
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs must be at least 2: the control compares alternate bare chunks")
    torch.set_num_threads(args.threads)
    if args.row:
        print(row(args.blocks[0], args.pairs, args.chunk, args.count_steps), flush=True)
        return
    print(
        f"residual MLP x + fc(relu(x)), width {WIDTH}, batch {BATCH}, torch {torch.__version__}, "
        f"{args.threads} CPU thread(s), {args.pairs} chunk pairs of 1 + 2000/N steps "
        "(at least 9, first dropped), "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )
    print(
        "| blocks | auto s | rest of attach s | first step s (bare) | µs per block per step "
        "(control, probed) | CPU µs per block per step | bare µs per block | aten ops per block "
        "| Python calls per block |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    # the children import the gradprobe this process imported
    package_root = str(Path(gradprobe.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    for n in args.blocks:
        # Each depth in a process of its own: one that ran the smaller depths first (their
        # profilers, their probes) took three times as long for the first step of 2,000 blocks.
        options = ["--pairs", str(args.pairs), "--chunk", str(args.chunk), "--threads", str(args.threads)]
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--row",
                "--blocks",
                str(n),
                *options,
                "--count-steps",
                str(args.count_steps),
            ],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        rows = [line for line in child.stdout.splitlines() if line.startswith(f"| {n} |")]
        print(
            rows[0] if child.returncode == 0 and rows else f"| {n} | failed: {child.stderr.strip()[-300:]} |"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
