"""The floor: the cheapest pass that still reads each probed block's x, y, g_y and g_x once.

A probe has to see, for every block it probes, the block's input ``x``, its output
``y`` and the gradients ``g_y`` and ``g_x`` flowing back through them. The floor is
the cost of doing exactly that and nothing more, in the harness of ``overhead.py``
(one model instance, bare and instrumented chunks alternating, bare-vs-bare control):

* the blocks are the ones ``gradprobe.attach(model)`` probes (``blocks="auto"``);
* a forward pre-hook swaps the block's input for an alias (``x.view_as(x)``, or a
  leaf that requires grad when ``x`` does not), as gradprobe does, so that the
  gradient reaching the alias is the one through this block only;
* a forward hook reduces ``x`` and ``y`` (one ``torch.linalg.vector_norm`` each,
  under ``no_grad``) and registers a tensor hook on ``y`` and on the alias, each
  reducing its gradient (``g_y``, ``g_x``) the same way;
* each result is written into its own slot of one buffer (``out=`` a 0-d view made
  once per attach), which stays on the device until the step's ``backward()``
  returns, then reaches the host at once: one ``.tolist()`` per step (the first
  step of an attach, dropped by the harness, stacks its values and makes the slots);
* every hook is removed when the chunk ends.

That is four reductions per block and one host read per step: no statistics beyond
one norm per tensor, no rows, no frame, no schedule.

    python benchmarks/floor.py --model resnet56            # ResNet-56, batch 128
    python benchmarks/floor.py --model mlp --threads 1     # the 20-block MLP, batch 32

``python benchmarks/overhead.py --floor`` measures the floor beside gradprobe in the
same run and prints the probe's overhead as a multiple of the floor's.

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import Tool, add_run_options, build, measure_tool, parse_run_options  # a script beside this one

from gradprobe.blocks import select_blocks


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


class FloorTool(Tool):
    """One fused reduction per tensor (x, y, g_y, g_x) of each probed block, one host read a step."""

    name = "floor"
    recorded = 1.0

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._buf: torch.Tensor | None = None  # one slot per value of a step, read at once
        self._slots: list[torch.Tensor] = []  # 0-d views of _buf, made once (not per step)
        self._n = 0  # values of this step so far
        self._extra: list[torch.Tensor] = []  # values beyond the slots (the first step of an attach)
        self.read: list[float] = []  # the last step's values, as the host got them

    def attach(self, model: nn.Module) -> None:
        named = select_blocks(model)
        self.blocks = len(named)
        try:
            for _, module in named:
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(self._post))
        except BaseException:
            self._remove()
            raise

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if not x.requires_grad and not any(p.requires_grad for p in module.parameters()):
            return None  # a frozen block on an input without grad: no gradient to read
        alias = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        return (alias, *args[1:])

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        y = _first_tensor(output)
        with torch.no_grad():  # the reductions are no part of the training graph
            for t in (x, y):
                if t is not None:
                    self._put(t)
        for t in (x, y):
            if t is not None and t.requires_grad:
                t.register_hook(self._grad)

    def _grad(self, g: torch.Tensor) -> None:
        self._put(g)

    def _put(self, t: torch.Tensor) -> None:
        """One reduction of ``t``, written into its slot of the step's buffer (no stack, no copy)."""
        k, self._n = self._n, self._n + 1
        dtype = None if t.dtype is torch.float32 else torch.float32
        if k < len(self._slots):
            torch.linalg.vector_norm(t, dtype=dtype, out=self._slots[k])
        else:
            self._extra.append(torch.linalg.vector_norm(t, dtype=dtype))

    def backward(self, loss: torch.Tensor, step: int, info: dict[str, Any]) -> None:
        loss.backward()
        n, self._n = self._n, 0
        if self._extra:  # more values than slots: read them this once, and make slots for the next steps
            parts = ([self._buf[: len(self._slots)]] if self._slots and self._buf is not None else []) + [
                torch.stack(self._extra)
            ]
            self.read = torch.cat(parts).tolist()
            self._buf = torch.empty(n, device=self._extra[0].device)
            self._slots = list(self._buf.unbind())
            self._extra.clear()
        elif self._buf is not None and n:
            self.read = (self._buf if n == len(self._slots) else self._buf[:n]).tolist()  # one host read

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buf, self._slots, self._n = None, [], 0
        self._extra.clear()

    def detach(self, model: nn.Module, chunk: int) -> None:
        self._remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["resnet56", "mlp", "gpt2"], default="resnet56")
    parser.add_argument("--pairs", type=int, default=10, help="bare+floor chunk pairs (at least 2)")
    parser.add_argument("--chunk", type=int, default=11, help="steps per chunk, the first one dropped")
    add_run_options(parser)
    args = parse_run_options(parser, argv)
    if args.chunk < 3:
        parser.error("--chunk must be at least 3: the first step of a chunk is dropped")
    device = torch.device(args.device)
    work = build(args.model, args.batch, device)
    load_start = os.getloadavg()[0]
    print(
        f"floor on {args.model}, batch {work.batch}, device {device}, CPU threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.pairs} chunk pairs of {args.chunk} steps (first dropped), "
        f"load average {load_start:.2f} at the start"
    )
    tool = FloorTool()
    r = measure_tool(work, tool, args.pairs, args.chunk, device)
    us = f"{r.us_per_block():.1f} us" if r.us_valid() else "refused"
    print(
        f"floor      bare {1e3 * statistics.median(r.bare_steps):8.2f} ms  "
        f"floor {1e3 * statistics.median(r.probed_steps):8.2f} ms  "
        f"median ratio {r.median_text()}  total ratio {r.total_text()}  "
        f"per block per step {us}  ({r.blocks} blocks, {len(tool.read)} values read per step)"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
