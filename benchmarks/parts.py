"""Where a recorded step's cost per block goes: the probe's hooks and its end-of-step work, timed.

On the 20-block MLP of ``overhead.py`` (or ResNet-56 with ``--model resnet56``) every part of
the probe is wrapped in a ``time.perf_counter`` timer for a run of recorded steps: the
forward pre-hook and forward hook of each block call, the two gradient hooks, the end of
the backward pass (the batched statistics of held calls, the parameter statistics and
snapshot) and the step's close (its rows). Printed per block and recorded step, beside the
whole step's time; the timers themselves cost about a microsecond each.

    python benchmarks/parts.py
    python benchmarks/parts.py --model resnet56 --batch 32 --steps 5

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import build  # a script beside this one, not a package

import gradprobe
from gradprobe import probe as probe_module
from gradprobe import rows, taps

#: (owner, attribute, what it is) of each timed part; nested parts are timed inside their parents.
PARTS = (
    (taps.Taps, "pre_hook", "forward pre-hook (input alias, its gradient hook)"),
    (taps.Taps, "post_hook", "forward hook (statistics held or taken, output hook)"),
    (taps.Taps, "_grad_y_hook", "output gradient hook"),
    (taps.Taps, "_grad_x_alias_hook", "input gradient hook"),
    (probe_module.Probe, "_backward_ended", "end of the backward pass, of which:"),
    (taps.Taps, "flush_signal", "  batched statistics of the held calls"),
    (rows.ParamSnapshots, "stats", "  parameter statistics"),
    (rows.ParamSnapshots, "take", "  parameter snapshot (update_ratio)"),
    (probe_module.Probe, "_close_step", "the step's close (its rows)"),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["mlp", "resnet56"], default="mlp")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fused", action="store_true", help="attach(..., fused=True)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = build(args.model, args.batch, torch.device("cpu"))
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        work.loss(model, work.batches[i % len(work.batches)]).backward()
        opt.step()

    spent: defaultdict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    originals: list[tuple[Any, str, Callable[..., Any]]] = []
    for owner, name, _ in PARTS:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*a: Any, _original: Callable[..., Any] = original, _name: str = name, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - start
                calls[_name] += 1

        setattr(owner, name, timed)
    try:
        probe = gradprobe.attach(model, fused=args.fused)
        try:
            for i in range(5):
                step(i)
            spent.clear()
            calls.clear()
            start = time.perf_counter()
            for i in range(args.steps):
                step(i)
            total = time.perf_counter() - start
            blocks = len(probe.blocks)
        finally:
            probe.detach()
        bare_start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        bare = time.perf_counter() - bare_start
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    per = args.steps * blocks
    print(
        f"{args.model}, batch {work.batch}, {blocks} blocks, {args.steps} recorded steps, 1 thread, "
        f"torch {torch.__version__}{', fused=True' if args.fused else ''}"
    )
    print(
        f"  step {1e3 * total / args.steps:.2f} ms probed, {1e3 * bare / args.steps:.2f} ms bare: "
        f"{1e6 * (total - bare) / per:.0f} µs per block and recorded step more"
    )
    for _, name, what in PARTS:
        print(f"  {1e6 * spent[name] / per:7.1f} µs  {what} ({calls[name] / args.steps:g} a step)")


if __name__ == "__main__":
    main()
