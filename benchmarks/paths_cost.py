"""Cost of the path-length decomposition (gradprobe.paths) and of the signal propagation statistics.

    python benchmarks/paths_cost.py --depths 56 110 --batch 128        # paths() against a training step
    python benchmarks/paths_cost.py --depths 56 --batch 32 --batched    # 16 VJPs per autograd call
    python benchmarks/paths_cost.py --signal --depths 56                # signal_stats vs forward_stats

``paths``: for each depth, the median time of a bare training step (forward, cross-entropy,
backward, SGD) and of ``gradprobe.paths`` on the same batch, the number of block VJPs it ran
(sum over blocks of the coefficients alive there, about L^2/2), and the ratio. Under a
``attach(..., paths=N)`` schedule the decomposition runs on the Jacobian sub-batch (32
samples) once every N recorded steps, so its share of training time is
``t_paths(batch 32) / (N * t_step(batch 128))``: run ``--batch 32`` for that numerator.

``--signal``: the per-step cost that the three signal propagation columns add to the probe
engine: :func:`gradprobe.metrics.signal_stats` on every block output of one forward pass,
against :func:`gradprobe.metrics.forward_stats` on the same tensors (what the probe already
computed) and against a training step, timed in the same process so that machine load hits
all three alike.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from torch import nn

import gradprobe
from gradprobe import metrics
from gradprobe.models import resnet_cifar


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as they are
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_paths(depth: int, batch: int, repeats: int, batched: bool) -> None:
    paths_module = importlib.import_module("gradprobe.path_lengths")
    gen = torch.Generator().manual_seed(0)
    model = resnet_cifar(depth, generator=torch.Generator().manual_seed(0))
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    t_step = step_time(model, x, y, repeats)
    paths_module.BATCH_VJPS = 16 if batched else 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        frame = gradprobe.paths(model, x)
        times.append(time.perf_counter() - start)
    t_paths = statistics.median(times)
    (info,) = frame.attrs["stacks"]
    blocks = len(info["blocks"])
    vjps = sum(min(i, blocks) for i in range(1, blocks + 1))  # coefficients alive at each block
    sub = x[:32]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gradprobe.paths(model, sub)
        times.append(time.perf_counter() - start)
    t_sub = statistics.median(times)
    print(
        f"  on a sub-batch of 32: paths {t_sub:.2f} s; attach(paths=50) adds about "
        f"{100 * t_sub / (50 * t_step):.1f}% to training at batch {batch} (one decomposition per 50 steps)"
    )
    print(
        f"ResNet-{depth:<4} batch {batch:<4} blocks {blocks:<3} VJPs {vjps:<5} step {t_step:7.2f} s  "
        f"paths {t_paths:8.2f} s  = {t_paths / t_step:6.1f} steps  "
        f"({'batched' if batched else 'one VJP per call'}; "
        f"effective length {frame.attrs['effective_length']:.2f}, "
        f"remainder/|g| {info['remainder'] / info['grad_norm']:.1e})"
    )


def measure_signal(depth: int, batch: int, repeats: int) -> None:
    model = resnet_cifar(depth, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    outs: list[tuple[torch.Tensor, torch.Tensor]] = []
    blocks = gradprobe.select_blocks(model)
    handles = [
        m.register_forward_hook(lambda m, a, o: outs.append((a[0].detach(), o.detach()))) for _, m in blocks
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    pairs = [(xi, yi) for xi, yi in outs if xi.shape == yi.shape]

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                for xi, yi in pairs:
                    fn(xi, yi)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_fwd = timed(lambda a, b: metrics.forward_stats(a, b, a))
    t_sig = timed(lambda a, b: metrics.signal_stats(b, a))
    t_step = step_time(model, x, y, repeats)
    print(
        f"ResNet-{depth}, batch {batch}, {len(pairs)} same-shape blocks: forward_stats {1e3 * t_fwd:.1f} ms, "
        f"signal_stats {1e3 * t_sig:.1f} ms per step; training step {1e3 * t_step:.0f} ms; signal_stats adds "
        f"{100 * t_sig / t_step:.2f}% of a step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[56, 110])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batched", action="store_true", help="16 VJPs per autograd call (is_grads_batched)")
    parser.add_argument("--signal", action="store_true", help="time the signal propagation statistics")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for depth in args.depths:
        if args.signal:
            measure_signal(depth, args.batch, args.repeats)
        else:
            measure_paths(depth, args.batch, args.repeats, args.batched)


if __name__ == "__main__":
    main()
