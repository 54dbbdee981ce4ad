"""Memory of long runs: resident-set growth with a sink, and bytes per in-memory row without one.

A net of 50 tiny residual blocks trains for ``--steps`` real steps with a probe
(every metric, every step). With ``sink=`` the rows stream to disk in chunks
and the resident memory must stay flat (target: under 50 MB of growth over
100,000 steps); without a sink the probe's in-memory store is measured in
bytes per (step, block) row (target: about 200 bytes or less).

    python benchmarks/memory.py                 # 100,000 steps, 50 blocks (several minutes)
    python benchmarks/memory.py --steps 5000    # a quick look
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradprobe


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.tanh(self.lin(x))


def rss_mb() -> float:
    """Current resident set size in MB (from /proc, so it can go down as well as up)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(steps: int, blocks: int, sink: Path | None, report_every: int) -> dict[str, float]:
    torch.manual_seed(0)
    net = nn.Sequential(*[Tiny() for _ in range(blocks)])
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(2, 4)
    probe = gradprobe.attach(net, sink=sink, sink_options={"chunk_rows": 50_000})
    start_rss = None
    # Start measuring after the first chunk reached the disk: writing it imports and
    # warms pyarrow's allocator, a one-off cost, not growth.
    warm = min(steps - 1, 50_000 // blocks + 200) if sink is not None else min(steps - 1, 200)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            net(x).pow(2).mean().backward()
            opt.step()
            probe.log(loss=0.0)
            if step == warm:  # after warm-up: allocator pools, lazy imports, the first chunk written
                gc.collect()
                start_rss = rss_mb()
            if report_every and step and step % report_every == 0:
                print(
                    f"  step {step:>7}: rss {rss_mb():8.1f} MB, {time.perf_counter() - t0:6.0f} s", flush=True
                )
    finally:
        probe.detach()
    gc.collect()
    end_rss = rss_mb()
    rows = steps * blocks
    return {
        "rows": float(rows),
        "rss_growth_mb": end_rss - (start_rss or end_rss),
        "store_bytes_per_row": probe._out.store.nbytes / rows if sink is None else 0.0,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument(
        "--no-sink-steps", type=int, default=10_000, help="steps of the in-memory measurement"
    )
    parser.add_argument("--report-every", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.steps, args.blocks, Path(tmp) / "run", args.report_every)
        on_disk = sum(f.stat().st_size for f in (Path(tmp) / "run").iterdir()) / 1e6
        print(
            f"with sink:    {args.steps} steps x {args.blocks} blocks = {r['rows']:.0f} rows, "
            f"RSS growth {r['rss_growth_mb']:.1f} MB, {on_disk:.1f} MB on disk, {r['seconds']:.0f} s"
        )
    r = run(args.no_sink_steps, args.blocks, None, 0)
    print(
        f"without sink: {args.no_sink_steps} steps x {args.blocks} blocks = {r['rows']:.0f} rows, "
        f"store {r['store_bytes_per_row']:.0f} bytes/row, RSS growth {r['rss_growth_mb']:.1f} MB "
        f"({1e6 * r['rss_growth_mb'] / r['rows']:.0f} bytes/row including Python overhead)"
    )


if __name__ == "__main__":
    main()
