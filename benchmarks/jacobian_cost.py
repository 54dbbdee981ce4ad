"""Cost of the training steps that carry Jacobian columns, by kind, and over a whole spectral cycle.

On one model instance (``overhead.build``: ResNet-56, 32x32 inputs, SGD with momentum) it
times, interleaved in rounds, single training steps: bare; recorded without Jacobian
columns (``attach(model)``, after one untimed step); and the first four steps of a fresh
``attach(model, jacobian=1)`` at the default options, which are the four kinds of
Jacobian step: the first of a run (a Frobenius one), the one with ``jac_spec``, the one
with ``prod_spec``, and a Frobenius one.

Times are the thread CPU time of the training step (``time.thread_time``, one torch
thread), which a loaded machine inflates less than wall time; the figure per kind is the
median over ``--rounds``. From them, the total of one spectral cycle of ``jacobian=10``
at the default ``spec=20`` (200 recorded steps: 20 with Jacobian columns, of which one
with ``jac_spec``, one with ``prod_spec``, 18 Frobenius ones), relative to 200 bare
steps, is::

    (180 * recorded + 18 * frobenius + jac_spec + prod_spec) / (200 * bare)

and the Jacobian columns' own share of it (the same with ``recorded`` in place of ``bare``).

    python benchmarks/jacobian_cost.py --batch 128
    python benchmarks/jacobian_cost.py --batch 32 --rounds 3
    python benchmarks/jacobian_cost.py --batch 128 --fused     # attach(..., fused=True)

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import build  # a script beside this one, not a package

import gradprobe
from gradprobe.config import JacobianOptions

JACOBIAN_KINDS = ("first Jacobian step", "jac_spec step", "prod_spec step", "frobenius step")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--fused", action="store_true", help="attach(..., fused=True): large calls by the compiled kernels"
    )
    args = parser.parse_args(argv)
    extra = {"fused": True} if args.fused else {}
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

    options = JacobianOptions()
    spec = options.spec
    assert isinstance(spec, int) and not isinstance(spec, bool) and spec > 2
    for _ in range(2):  # warm-up
        step()
    if args.fused:  # compiled (or read from inductor's cache) before anything is timed
        with gradprobe.attach(model, **extra):
            step()
    times: dict[str, list[float]] = {k: [] for k in ("bare", "recorded", *JACOBIAN_KINDS)}
    for r in range(args.rounds):
        step()
        times["bare"].append(step())
        with gradprobe.attach(model, **extra):
            step()  # untimed: the probe's first step
            times["recorded"].append(step())
        with gradprobe.attach(model, jacobian=1, **extra):
            for kind in JACOBIAN_KINDS:
                times[kind].append(step())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["bare"]
    n = 10 * spec
    print(
        f"\n{args.model}, batch {args.batch}, 1 torch thread, thread CPU time per training step "
        f"(median of {args.rounds}), default jacobian_options {options.as_dict()}"
        + (", fused=True" if args.fused else "")
    )
    for kind, v in med.items():
        each = ", ".join(f"{t:.3f}" for t in times[kind])
        print(f"  {kind:20s} {v:7.3f} s  {v / bare:5.2f} bare steps   (all: {each})")
    total = (
        (n - spec) * med["recorded"]
        + (spec - 2) * med["frobenius step"]
        + med["jac_spec step"]
        + med["prod_spec step"]
    )
    print(
        f"  one spectral cycle of jacobian=10 ({n} recorded steps, {spec} with Jacobian columns): "
        f"{total / (n * bare):.3f}x bare in total, {total / (n * med['recorded']):.3f}x the probe without "
        "Jacobian columns"
    )


if __name__ == "__main__":
    main()
