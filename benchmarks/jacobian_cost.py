"""Cost of the training steps that carry Jacobian columns, by kind, and over a whole spectral cycle.

On one model instance (``overhead.build``: ResNet-56, 32x32 inputs, SGD with momentum) it
times, interleaved in rounds, single training steps of four kinds: bare; recorded without
Jacobian columns (``attach(model)``); a Frobenius Jacobian step (``jacobian_options``
``spec=False``); a spectral one (``spec=True``). Each probed step runs with the probe
attached just for it, after one untimed step. It also times the first two Jacobian steps
of a fresh ``attach(model, jacobian=10)`` (recorded steps 0 and 10: the first one of a run
and the cycle's spectral one).

Times are the thread CPU time of the training step (``time.thread_time``, one torch
thread), which a loaded machine inflates less than wall time; the figure per kind is the
median over ``--rounds``. From them, the total of one spectral cycle of ``jacobian=10``
at the default ``spec=20`` (200 recorded steps: 19 Frobenius steps, 1 spectral step, 180
recorded steps without Jacobian columns), relative to 200 bare steps, is::

    (180 * recorded + 19 * frobenius + spectral) / (200 * bare)

and the Jacobian columns' own share of it (the same with ``recorded`` in place of ``bare``).

    python benchmarks/jacobian_cost.py --batch 128
    python benchmarks/jacobian_cost.py --batch 32 --rounds 3

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import build  # a script beside this one, not a package

import gradprobe
from gradprobe.config import JacobianOptions

KINDS: dict[str, dict[str, Any] | None] = {
    "bare": None,
    "recorded": {},
    "frobenius": {"jacobian": 1, "jacobian_options": {"spec": False}},
    "spectral": {"jacobian": 1, "jacobian_options": {"spec": True}},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = build(args.model, args.batch, torch.device("cpu"))
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    counter = [0]

    def step() -> float:
        xy = work.batches[counter[0] % len(work.batches)]
        counter[0] += 1
        t = time.thread_time()
        opt.zero_grad(set_to_none=True)
        work.loss(model, xy).backward()
        opt.step()
        return time.thread_time() - t

    def timed(kind: str) -> float:
        kwargs = KINDS[kind]
        if kwargs is None:
            step()
            return step()
        with gradprobe.attach(model, **kwargs):
            step()  # untimed: the probe's first step
            return step()

    for _ in range(2):  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    first: list[tuple[float, float]] = []
    for r in range(args.rounds):
        for kind in KINDS:
            times[kind].append(timed(kind))
        if r < 2:
            with gradprobe.attach(model, jacobian=10):
                got = [step() for _ in range(11)]
            first.append((got[0], got[10]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["bare"]
    spec = JacobianOptions().spec
    assert isinstance(spec, int) and not isinstance(spec, bool)
    n = 10 * spec
    print(
        f"\n{args.model}, batch {args.batch}, 1 torch thread, thread CPU time per training step "
        f"(median of {args.rounds}), default jacobian_options {JacobianOptions().as_dict()}"
    )
    for kind, v in med.items():
        each = ", ".join(f"{t:.3f}" for t in times[kind])
        print(f"  {kind:10s} {v:7.3f} s  {v / bare:5.2f} bare steps   (all: {each})")
    for i, (a, b) in enumerate(first):
        print(
            f"  fresh attach(jacobian=10), run {i + 1}: first Jacobian step {a:.3f} s ({a / bare:.2f} bare), "
            f"second {b:.3f} s ({b / bare:.2f} bare)"
        )
    total = (n - spec) * med["recorded"] + (spec - 1) * med["frobenius"] + med["spectral"]
    print(
        f"  one spectral cycle of jacobian=10 ({n} recorded steps: {spec - 1} Frobenius, 1 spectral): "
        f"{total / (n * bare):.3f}x bare in total, {total / (n * med['recorded']):.3f}x the probe without "
        "Jacobian columns"
    )


if __name__ == "__main__":
    main()
