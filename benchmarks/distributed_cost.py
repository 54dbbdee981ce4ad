"""The cost of probing an FSDP2 model: steps with and without the probe, and the probe's collective.

Spawns ``--world`` gloo processes on 127.0.0.1 (CPU), shards a stack of residual MLP blocks
with ``fully_shard`` per block, and times training steps without the probe and with it
(every step recorded), alternating, then the probe's one collective per recorded step
alone: an ``all_reduce`` of a ``(blocks, 3)`` float64 tensor. Prints one line from rank 0.

    python benchmarks/distributed_cost.py --world 2 --blocks 8 --width 256 --batch 32
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import gradprobe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = nn.Sequential(*[Block(args.width) for _ in range(args.blocks)])
        for block in net:
            fully_shard(block)
        fully_shard(net)
        x = torch.randn(args.batch, args.width)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def per_step(n: int) -> float:
            t = time.perf_counter()
            for _ in range(n):
                opt.zero_grad()
                (net(x) ** 2).mean().backward()
                opt.step()
            return (time.perf_counter() - t) / n

        per_step(3)  # warm-up
        bare, probed = [], []
        for _ in range(args.repeats):
            bare.append(per_step(args.steps))
            with gradprobe.attach(net):
                probed.append(per_step(args.steps))
        stats = torch.zeros(args.blocks, 3, dtype=torch.float64)
        t = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(stats)
        collective = (time.perf_counter() - t) / 200
        if rank == 0:
            ms = lambda v: f"{1e3 * statistics.median(v):.1f} ms"  # noqa: E731
            print(
                f"world {args.world}, {args.blocks} blocks of width {args.width}, "
                f"batch {args.batch} per rank: "
                f"step {ms(bare)} without the probe, {ms(probed)} with it (median of {args.repeats}); "
                f"all_reduce of ({args.blocks}, 3) float64: {1e3 * collective:.2f} ms"
            )
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
