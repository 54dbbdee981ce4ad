"""Jacobian columns: estimator accuracy against probes / Lanczos steps, and their cost.

Accuracy: a small CIFAR-style ResNet (BatchNorm in training mode, float64) whose
block and product Jacobians are small enough to build densely; the estimates of
``gradprobe.jacobian.jacobian_columns`` are compared with the exact values
(``exact_columns`` of ``tests/reference.py``: dense Jacobians from the same graph, float64 SVD).

Cost: the time of one ``jacobian_columns`` call on a CIFAR ResNet (default
ResNet-56, float32, training mode) for several settings, next to the time of a
plain training step (forward, backward, SGD step) measured in the same process,
interleaved, best of ``--reps``. "ratio" is call time / training-step time; with
Jacobian columns every 10th step the per-step overhead is ratio / 10.

    python benchmarks/jacobian_accuracy.py                    # both parts
    python benchmarks/jacobian_accuracy.py --part cost --batch 128 32 --depth 56
    python benchmarks/jacobian_accuracy.py --part accuracy
    python benchmarks/jacobian_accuracy.py --part subbatch      # sub-batch against whole batch
    python benchmarks/jacobian_accuracy.py --part lanczos       # Lanczos steps on ResNet-56's sub-batch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradprobe.jacobian import capture_blocks, jacobian_columns
from gradprobe.models import resnet_cifar

# The exact dense references are the tests' oracle; this benchmark reads them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import exact_columns

COST_CONFIGS: dict[str, dict] = {
    "fro, probes=1": {"probes": 1, "spec": False},
    "fro, probes=2": {"probes": 2, "spec": False},
    "fro, probes=4": {"probes": 4, "spec": False},
    "fro p=2 + jac_spec 1 step": {"probes": 2, "power_iters": 1, "prod_spec": "none", "tol": 0.0},
    "fro p=2 + jac_spec 4 steps": {"probes": 2, "power_iters": 4, "prod_spec": "none", "tol": 0.0},
    "fro p=2 + both spec, shared, 4 steps": {
        "probes": 2,
        "power_iters": 4,
        "prod_spec": "shared",
        "tol": 0.0,
    },
}
SLOW_CONFIGS: dict[str, dict] = {
    "fro p=2 + both spec, each, 2 steps": {"probes": 2, "power_iters": 2, "prod_spec": "each", "tol": 0.0},
}


def small_net() -> tuple[nn.Module, torch.Tensor]:
    model = resnet_cifar(14, width=4, generator=torch.Generator().manual_seed(0)).double().train()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def accuracy(seeds: int) -> None:
    model, x = small_net()
    _, caps = capture_blocks(model, x)
    t = time.perf_counter()
    exact = exact_columns(caps)
    print(
        f"small net: CIFAR ResNet-14 width 4, batch 4x3x8x8, float64, train-mode BN, {len(caps)} blocks, "
        f"block outputs {caps[0].y.numel()}..{caps[-1].y.numel()} elements (exact values: "
        f"{time.perf_counter() - t:.1f} s)"
    )
    print(
        "\nFrobenius columns: relative error |est/exact - 1| over blocks and seeds (median / 90th pct / max)"
    )
    print(f"{'probes':>6}  {'jac_fro':>22}  {'jac_id':>22}  {'prod_fro':>22}  {'ms/call':>8}")
    for probes in (1, 2, 4, 8, 16, 64, 256):
        errs: dict[str, list[float]] = {"jac_fro": [], "jac_id": [], "prod_fro": []}
        times = []
        for s in range(seeds):
            t = time.perf_counter()
            est = jacobian_columns(
                caps, probes=probes, spec=False, generator=torch.Generator().manual_seed(s)
            )
            times.append(time.perf_counter() - t)
            for c in caps:
                for col in errs:
                    if np.isfinite(exact[c.name][col]):
                        errs[col].append(abs(est[c.name][col] / exact[c.name][col] - 1))
        cells = [
            f"{np.median(e):.4f} / {np.quantile(e, 0.9):.4f} / {np.max(e):.3f}"
            for e in (errs["jac_fro"], errs["jac_id"], errs["prod_fro"])
        ]
        print(
            f"{probes:>6}  "
            + "  ".join(f"{c:>22}" for c in cells)
            + f"  {1e3 * statistics.median(times):8.1f}"
        )

    print("\nSpectral columns: max relative error over blocks (tol=0: exactly `power_iters` Lanczos steps)")
    print(f"{'steps':>6}  {'jac_spec':>9}  {'prod_spec each':>14}  {'prod_spec shared':>16}  {'ms each':>8}")
    for iters in (1, 2, 4, 8, 16, 32):
        row = []
        ms = 0.0
        for mode in ("each", "shared"):
            t = time.perf_counter()
            est = jacobian_columns(
                caps,
                probes=4,
                power_iters=iters,
                tol=0.0,
                prod_spec=mode,
                generator=torch.Generator().manual_seed(0),
            )
            if mode == "each":
                ms = 1e3 * (time.perf_counter() - t)
                row.append(max(abs(est[c.name]["jac_spec"] / exact[c.name]["jac_spec"] - 1) for c in caps))
            row.append(max(abs(est[c.name]["prod_spec"] / exact[c.name]["prod_spec"] - 1) for c in caps))
        print(f"{iters:>6}  {row[0]:9.4f}  {row[1]:14.4f}  {row[2]:16.4f}  {ms:8.0f}")
    print("\nDefault settings (probes=4, power_iters=20, tol=1e-3, prod_spec='each'): max relative error")
    est = jacobian_columns(caps, generator=torch.Generator().manual_seed(0))
    for col in ("jac_fro", "jac_id", "prod_fro", "jac_spec", "prod_spec"):
        e = [abs(est[c.name][col] / exact[c.name][col] - 1) for c in caps if np.isfinite(exact[c.name][col])]
        print(f"  {col:10s} {max(e):.4f}")


def _clock() -> float:
    # CPU time of this process with --cpu-time (robust on a shared machine with one thread), else wall time
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


CLOCK = "wall"


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t = _clock()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return _clock() - t


def _jacobian_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: dict) -> float:
    out, caps = capture_blocks(model, x)
    loss = nn.functional.cross_entropy(out, y)
    t = _clock()
    jacobian_columns(caps, generator=torch.Generator().manual_seed(0), **config)
    took = _clock() - t
    loss.backward()  # the user's backward still works on the graph
    model.zero_grad(set_to_none=True)
    return took


def cost(depth: int, batches: list[int], reps: int, slow: bool, only: list[str] | None) -> None:
    configs = {**COST_CONFIGS, **(SLOW_CONFIGS if slow else {})}
    if only:
        configs = {k: v for k, v in configs.items() if any(o in k for o in only)}
    threads = torch.get_num_threads()
    print(f"\nCost on CIFAR ResNet-{depth} (float32, train mode, {threads} threads, {CLOCK} time)")
    print("each Jacobian call is timed right after a training step; ratio = median of the per-pair ratios")
    for batch in batches:
        model = resnet_cifar(depth, generator=torch.Generator().manual_seed(0)).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        _train_step(model, opt, x, y)  # warm-up
        steps: list[float] = []
        print(f"\nbatch {batch}")
        print(f"  {'setting':40s} {'best s':>8}  {'ratio to a step':>15}  {'step time, every 10th':>21}")
        results = {}
        for name, config in configs.items():
            times, ratios = [], []
            for _ in range(reps):
                step = _train_step(model, opt, x, y)
                took = _jacobian_step(model, x, y, config)
                steps.append(step)
                times.append(took)
                ratios.append(took / step)
            results[name] = (min(times), statistics.median(ratios))
        print(f"  {'training step (forward+backward+SGD)':40s} {min(steps):8.3f}  {1.0:15.2f}")
        for name, (took, ratio) in results.items():
            print(f"  {name:40s} {took:8.3f}  {ratio:15.2f}  {1 + ratio / 10:20.2f}x")
    noise(depth, batches[-1])


def noise(depth: int, batch: int, seeds: int = 5) -> None:
    """How noisy one probe is at scale: the spread of the Frobenius columns over seeds."""
    model = resnet_cifar(depth, generator=torch.Generator().manual_seed(0)).train()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, caps = capture_blocks(model, x)
    runs = [
        jacobian_columns(caps, probes=1, spec=False, generator=torch.Generator().manual_seed(s))
        for s in range(seeds)
    ]
    print(f"\nnoise at scale (ResNet-{depth}, batch {batch}): relative std over {seeds} seeds at probes=1")
    for col in ("jac_fro", "jac_id", "prod_fro"):
        spread = []
        for c in caps:
            vals = [r[c.name][col] for r in runs]
            if np.all(np.isfinite(vals)):
                spread.append(float(np.std(vals) / np.mean(vals)))
        print(f"  {col:9s} median {np.median(spread):.5f}  max {np.max(spread):.5f}  ({len(spread)} blocks)")


def sub_batch(depth: int, batch: int, sizes: tuple[int, ...] = (8, 16, 32, 64), probes: int = 4) -> None:
    """How far the sub-batch columns (the probe's default route) sit from the whole batch's.

    The same ResNet in training mode, at initialisation and after 30 SGD steps on a fixed
    random batch: the Frobenius columns of the whole batch (training graph) against those
    of a second forward pass on its first k samples (``sub_batch_captures``, what
    ``attach(jacobian=...)`` does by default). The difference is sampling (fewer samples)
    plus BatchNorm statistics of k samples instead of ``batch``.
    """
    from gradprobe.blocks import select_blocks
    from gradprobe.jacobian import sub_batch_captures

    model = resnet_cifar(depth, generator=torch.Generator().manual_seed(0)).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    print(
        f"\nsub-batch against whole batch (ResNet-{depth}, batch {batch}, probes={probes}): relative "
        "difference |sub/full - 1| over blocks, median / max"
    )
    for label, train_steps in (("init", 0), ("after 30 steps", 30)):
        for _ in range(train_steps):
            _train_step(model, opt, x, y)
        named = select_blocks(model, "auto")
        _, caps = capture_blocks(model, x, blocks=[n for n, _ in named])
        t = _clock()
        full = jacobian_columns(caps, probes=probes, spec=False, generator=torch.Generator().manual_seed(0))
        t_full = _clock() - t
        del caps
        print(f"  {label}: whole batch {t_full:.2f} s")
        for k in sizes:
            t = _clock()
            sub_caps = sub_batch_captures(model, named, (x,), {}, k, seed=0)
            assert sub_caps is not None
            gen = torch.Generator().manual_seed(0)
            sub = jacobian_columns(sub_caps, probes=probes, spec=False, generator=gen)
            took = _clock() - t
            cells = []
            for col in ("jac_fro", "jac_id", "prod_fro"):
                d = [abs(sub[n][col] / full[n][col] - 1) for n in full if np.isfinite(full[n][col])]
                cells.append(f"{col} {np.median(d):.4f} / {np.max(d):.4f}")
            print(f"    k={k:<4d} {took:6.2f} s   " + "   ".join(cells))


def lanczos(
    depth: int, batch: int, k: int = 16, probes: int = 4, steps: tuple[int, ...] = (2, 4, 8, 12)
) -> None:
    """How far the spectral columns sit below converged values after a few Lanczos steps, at scale.

    The probe's training route: ResNet-``depth`` in training mode at initialisation, a
    sub-batch pass of ``k`` samples. ``jac_spec``: every block's Lanczos run after n steps
    against the same run after 24; ``prod_spec``: the shared subspace after n steps against
    a Lanczos run per block ("each") of up to 30 steps with ``tol`` 1e-6. Both estimates are
    lower bounds; the figures are how far below.
    """
    from gradprobe.blocks import select_blocks
    from gradprobe.jacobian import estimate as est
    from gradprobe.jacobian import sub_batch_captures

    model = resnet_cifar(depth, generator=torch.Generator().manual_seed(0)).train()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    caps = sub_batch_captures(model, select_blocks(model, "auto"), (x,), {}, k, seed=0, twice=True)
    assert caps is not None
    gen = torch.Generator().manual_seed(0)
    wd = torch.float32
    print(
        f"\nLanczos steps at scale (ResNet-{depth} at initialisation, sub-batch {k} of {batch}, "
        f"probes={probes}): how far below the converged value, median / max over blocks"
    )
    by_steps: dict[int, list[float]] = {n: [] for n in steps}
    for c in caps:
        lin = est._Linear(c.output, c.y, [c.input], [c.x], c.name)
        us = [est._rademacher(c.y, gen, wd) for _ in range(probes)]
        vjps = [lin.vjp(u, build=i == 0)[0] for i, u in enumerate(us)]
        start = est._best_start(us, vjps)

        def run(n: int, lin: est._Linear = lin, start: tuple = start) -> float:
            return est._lanczos_top(lambda v: lin.jvp([v]), lambda w: lin.vjp(w)[0], *start, n, 0.0)

        ref = run(24)
        for n in steps:
            by_steps[n].append(1 - run(n) / ref)
        lin.release()
    for n, errs in by_steps.items():
        print(f"  jac_spec after {n:2d} steps: {np.median(errs):.4f} / {np.max(errs):.4f}")
    last = caps[-1]
    lin = est._Linear(last.output, last.y, [c.input for c in caps], [c.x for c in caps], "product")
    us = [est._rademacher(last.y, gen, wd) for _ in range(probes)]
    kept = [lin.vjp(u, build=i == 0) for i, u in enumerate(us)]
    ref_each = []
    for i in range(len(caps)):
        mine = [pv[i] for pv in kept]
        ref_each.append(
            est._lanczos_top(
                lambda v, i=i: est._jvp_one(lin, i, v),
                lambda u, i=i: est._vjp_one(lin, i, u),
                *est._best_start(us, mine),
                30,
                1e-6,
            )
        )
    for n in steps:
        shared = est._shared_subspace(lin, len(caps), us, [list(pv) for pv in kept], n, 0.0)
        errs = [1 - s / r for s, r in zip(shared, ref_each, strict=True)]
        print(f"  prod_spec ('shared') after {n:2d} steps: {np.median(errs):.4f} / {np.max(errs):.4f}")
    lin.release()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["accuracy", "cost", "subbatch", "lanczos", "both"], default="both")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=10, help="seeds per probes count in the accuracy part")
    parser.add_argument("--slow", action="store_true", help="also time prod_spec='each' (quadratic in depth)")
    parser.add_argument("--only", nargs="*", help="time only the settings whose names contain one of these")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument(
        "--cpu-time", action="store_true", help="process CPU time instead of wall time (use with --threads 1)"
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = "cpu" if args.cpu_time else "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("accuracy", "both"):
        accuracy(args.seeds)
    if args.part in ("cost", "both"):
        cost(args.depth, args.batch, args.reps, args.slow, args.only)
    if args.part in ("subbatch", "both"):
        sub_batch(args.depth, max(args.batch))
    if args.part == "lanczos":
        lanczos(args.depth, max(args.batch))


if __name__ == "__main__":
    main()
