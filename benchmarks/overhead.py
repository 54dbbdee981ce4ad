"""Time cost of a probe: bare training steps against probed ones, in one process.

Two identical copies of a CIFAR-style ResNet train on the same batches; their
steps alternate (bare, probed, bare, probed, ...) so that drifts in machine
load hit both alike, and the script prints the median of the per-pair ratios
probed/bare. Each configuration gets its own probed copy.

    python benchmarks/overhead.py                       # ResNet-56, batch 128, 32x32
    python benchmarks/overhead.py --depth 20 --steps 10 --configs every1 every10 jac10

Configurations: ``every1`` (every metric on every step), ``every10``
(``every=10``), ``jac10`` (Jacobian columns on every 10th step at the default
knobs: 4 probes, a sub-batch of 32 samples, spectral columns on every 20th
Jacobian step, i.e. every 200th step -- run ``--steps 200`` to cover a whole
cycle), ``jac10fro`` (the Frobenius columns alone), ``jac10p2`` / ``jac10p1``
(the same with 2 or 1 probe vectors), ``jac10sb64`` (a sub-batch of 64),
``jac10full`` (the whole batch, through the training graph), ``jac10spec``
(spectral columns on every Jacobian step), ``paths50`` (the path-length decomposition
every 50th step on a sub-batch of 32; run ``--steps 100``). For these configurations read the
total ratio: the cost sits in one step of ten, which a median of pairs would hide.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import gradprobe
from gradprobe.models import resnet_cifar

CONFIGS = {
    "every1": {"every": 1},
    "every10": {"every": 10},
    "jac10": {"every": 1, "jacobian": 10},
    "jac10fro": {"every": 1, "jacobian": 10, "jacobian_options": {"spec": False}},
    "jac10p2": {"every": 1, "jacobian": 10, "probes": 2, "jacobian_options": {"spec": False}},
    "jac10p1": {"every": 1, "jacobian": 10, "probes": 1, "jacobian_options": {"spec": False}},
    "jac10sb64": {"every": 1, "jacobian": 10, "jacobian_options": {"sub_batch": 64, "spec": False}},
    "jac10full": {"every": 1, "jacobian": 10, "jacobian_options": {"sub_batch": None, "spec": False}},
    "jac10spec": {"every": 1, "jacobian": 10, "jacobian_options": {"spec": True}},
    "paths50": {"every": 1, "paths": 50},
}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def measure(depth: int, batch: int, steps: int, warmup: int, config: dict, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    bare = resnet_cifar(depth, generator=torch.Generator().manual_seed(seed))
    probed = copy.deepcopy(bare)
    opt_bare = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)
    opt_probed = torch.optim.SGD(probed.parameters(), lr=0.01, momentum=0.9)
    ratios, t_bare, t_probed = [], [], []
    with gradprobe.attach(probed, **config) as probe:
        for i in range(warmup + steps):
            x = torch.randn(batch, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (batch,), generator=gen)
            # alternate which goes first so neither always runs on a warmer cache
            if i % 2 == 0:
                tb = train_step(bare, opt_bare, x, y)
                tp = train_step(probed, opt_probed, x, y)
            else:
                tp = train_step(probed, opt_probed, x, y)
                tb = train_step(bare, opt_bare, x, y)
            if i >= warmup:
                ratios.append(tp / tb)
                t_bare.append(tb)
                t_probed.append(tp)
    frame = probe.frame()
    # Ratio of sums over whole every-10 cycles is the honest figure for schedules;
    # the median pair ratio is robust to load spikes. Report both.
    return {
        "median_ratio": statistics.median(ratios),
        "total_ratio": sum(t_probed) / sum(t_bare),
        "bare_ms": 1e3 * statistics.median(t_bare),
        "probed_ms": 1e3 * statistics.median(t_probed),
        "recorded_rows": float(len(frame)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="measured step pairs per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"ResNet-{args.depth}, batch {args.batch}, 32x32, CPU threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.steps} step pairs"
    )
    print(f"{'config':<10} {'median ratio':>12} {'total ratio':>12} {'bare ms':>9} {'probed ms':>10}")
    for name in args.configs:
        r = measure(args.depth, args.batch, args.steps, args.warmup, CONFIGS[name])
        print(
            f"{name:<10} {r['median_ratio']:>12.3f} {r['total_ratio']:>12.3f} {r['bare_ms']:>9.0f} "
            f"{r['probed_ms']:>10.0f}"
        )


if __name__ == "__main__":
    main()
