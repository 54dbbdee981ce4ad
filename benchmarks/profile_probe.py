"""Where the probe's fixed cost per block goes, in counts that do not depend on the machine's load.

On the 20-block residual MLP of ``overhead.py`` (width 64, batch 32) it prints,
per probed block and recorded step, the extra aten operator calls
(``torch.profiler``) and Python function calls (``cProfile``) of a probed step
over a bare one, the extra CPU time of the step (10th percentile of thread time,
which a loaded machine still inflates), and with ``--top N`` the functions and
operators that account for the difference.

    python benchmarks/profile_probe.py
    python benchmarks/profile_probe.py --top 25 --config every10
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import CONFIGS, build  # a script beside this one, not a package

import gradprobe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=list(CONFIGS), default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=0, help="show the N largest differences")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = build("mlp", None, torch.device("cpu"))
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        work.loss(model, work.batches[i % len(work.batches)]).backward()
        opt.step()

    def measure(probed: bool) -> tuple[Counter[str], Counter[str], float]:
        probe = gradprobe.attach(model, **CONFIGS[args.config]) if probed else None
        try:
            for i in range(3):
                step(i)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for i in range(args.steps):
                    step(i)
            ops: Counter[str] = Counter({e.key: e.count for e in prof.key_averages()})
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(args.steps):
                step(i)
            profiler.disable()
            stats: Any = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            calls: Counter[str] = Counter(
                {f"{Path(k[0]).name}:{k[1]}({k[2]})": v[1] for k, v in stats.items()}
            )
            times = []
            for i in range(10 * args.steps):
                start = time.thread_time()
                step(i)
                times.append(time.thread_time() - start)
            return ops, calls, statistics.quantiles(times, n=10)[0]
        finally:
            if probe is not None:
                probe.detach()

    bare_ops, bare_calls, bare_t = measure(False)
    ops, calls, t = measure(True)
    per = args.steps * len(model.blocks)  # type: ignore[arg-type]
    aten = sum(v for k, v in ops.items() if k.startswith("aten::")) - sum(
        v for k, v in bare_ops.items() if k.startswith("aten::")
    )
    py = sum(calls.values()) - sum(bare_calls.values())
    print(f"20-block MLP, width 64, batch 32, config {args.config}, torch {torch.__version__}, 1 thread")
    print(f"per block and step: {aten / per:.1f} aten calls, {py / per:.1f} Python calls more than bare")
    print(
        f"extra CPU time: {1e6 * (t - bare_t) / len(model.blocks):.0f} µs per block and step (bare step "  # type: ignore[arg-type]
        f"{1e6 * bare_t:.0f} µs; a loaded machine inflates this)"
    )
    if args.top:
        for title, new, old in (("aten operators", ops, bare_ops), ("Python functions", calls, bare_calls)):
            diff = {k: (new[k] - old.get(k, 0)) / per for k in new if new[k] != old.get(k, 0)}
            print(f"\n{title}, extra calls per block and step:")
            for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {v:7.2f}  {k}")


if __name__ == "__main__":
    main()
