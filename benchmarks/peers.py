"""gradprobe beside other gradient recorders: one process, one model, the harness of overhead.py.

Each tool gets its own run of alternating bare and instrumented chunks on the
same model instance, with the bare-vs-bare control of ``overhead.py`` printed
beside every ratio (a ratio is refused when its control is outside 0.97-1.03).

Tools:

* ``gradprobe``: ``gradprobe.attach(model)`` at its defaults (every metric, every step);
* ``naive``: what users write by hand, ``register_full_backward_hook`` on every block
  recording ``|grad_output|`` and ``|grad_input|`` with ``.item()``;
* ``backpack``: BackPACK's ``BatchL2Grad`` (per-sample squared gradient norms of every
  parameter) inside ``with backpack(...)``, the model ``extend``-ed for the chunk;
* ``cockpit-economy``: Cockpit's ``"economy"`` configuration (alpha, distance, 1-D
  gradient histogram, gradient norm, inner-product/norm/orthogonality tests, loss,
  update size), tracked on every step;
* ``cockpit-gradnorm``: Cockpit with its ``GradNorm`` quantity alone.

BackPACK and Cockpit cannot extend a model with BatchNorm in training mode (their
per-sample quantities are undefined there), so no tool runs on the BatchNorm
ResNet-56 of ``overhead.py``. The models here are BackPACK-compatible and used for
every tool: ``mlp`` (the 20-block residual MLP of ``overhead.py``, width 64, batch 32)
and ``cnn`` (ResNet-56's layout, 27 residual blocks of 3x3 convolutions, with every
BatchNorm replaced by the identity and each block's last convolution zeroed so that
training starts stable; batch 32 by default, 32x32 inputs).

BackPACK's ``extend`` leaves its hooks on the model; they are removed after each
instrumented chunk (``backpack.context.CTX.remove_hooks``) together with the
attributes it sets, so the bare chunks run the plain model.

The peers are an optional extra, never needed by the package or its tests::

    pip install torch==2.13.0 && pip install -e ".[bench]"
    python benchmarks/peers.py --model mlp --pairs 10
    python benchmarks/peers.py --model cnn --pairs 4 --tools gradprobe backpack
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import (  # a script beside this one, not a package
    BATCHES,
    ProbeTool,
    Result,
    Tool,
    Workload,
    build,
    measure_tool,
)

from gradprobe.blocks import select_blocks

WHAT = {
    "gradprobe": "per block: 17 gradient/identity/signal columns (norms, gain, residual ratio, "
    "cosines, parameter and update norms, channel moments) on every step",
    "naive": "per block: norms of grad_output and grad_input (full backward hooks, .item() each)",
    "backpack": "per parameter: per-sample squared gradient norms (BatchL2Grad)",
    "cockpit-economy": "per parameter group: economy quantities (alpha, distance, gradient histogram, "
    "gradient norm, inner-product/norm/orthogonality tests, loss, update size)",
    "cockpit-gradnorm": "per parameter: gradient norm (GradNorm)",
}


class Naive(Tool):
    """A hand-written recorder: full backward hooks on the blocks, one ``.item()`` per norm."""

    name = "naive"

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.rows: list[tuple[str, float, float]] = []

    def attach(self, model: nn.Module) -> None:
        blocks = select_blocks(model, "auto")
        self.blocks = len(blocks)
        self.recorded = 1.0

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
                g_in = grad_input[0]
                self.rows.append(
                    (
                        name,
                        grad_output[0].norm().item(),
                        g_in.norm().item() if g_in is not None else float("nan"),
                    )
                )

            return record

        self.handles = [m.register_full_backward_hook(hook(n)) for n, m in blocks]

    def detach(self, model: nn.Module, chunk: int) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.rows.clear()


def _unextend(model: nn.Module, *more: nn.Module) -> None:
    """Remove what ``backpack.extend`` put on the modules: its hooks and its attributes."""
    from backpack import memory_cleanup
    from backpack.context import CTX

    CTX.remove_hooks()
    for root in (model, *more):
        for module in root.modules():
            memory_cleanup(module)
            if hasattr(module, "_backpack_extend"):
                delattr(module, "_backpack_extend")
    for p in model.parameters():
        for field in ("batch_l2", "grad_batch", "sum_grad_squared", "variance"):
            if hasattr(p, field):
                delattr(p, field)


class BackPACK(Tool):
    name = "backpack"

    def attach(self, model: nn.Module) -> None:
        from backpack import extend

        extend(model)
        self.recorded = 1.0

    def backward(self, loss: torch.Tensor, step: int, info: dict[str, Any]) -> None:
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        with backpack(BatchL2Grad()):
            loss.backward()

    def detach(self, model: nn.Module, chunk: int) -> None:
        _unextend(model)


class Cockpit(Tool):
    """Cockpit tracking every step; the loss is recomputed through an extended loss module."""

    def __init__(self, name: str, quantities: str) -> None:
        self.name = name
        self.kind = quantities
        self.cockpit: Any = None
        self.lossfunc: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        from backpack import extend
        from cockpit import Cockpit as CockpitCls
        from cockpit import quantities
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration

        extend(model)
        self.lossfunc = extend(nn.CrossEntropyLoss(reduction="mean"))
        every = schedules.linear(interval=1)
        quants = (
            configuration("economy", track_schedule=every)
            if self.kind == "economy"
            else [quantities.GradNorm(track_schedule=every)]
        )
        self.cockpit = CockpitCls(model.parameters(), quantities=quants)
        self.recorded = 1.0

    def loss(self, work: Workload, xy: tuple[Any, ...], info: dict[str, Any]) -> torch.Tensor:
        # Cockpit wants the loss from an extended loss module and the per-sample losses.
        assert self.lossfunc is not None
        logits = work.model(xy[0])
        info["individual_losses"] = nn.functional.cross_entropy(logits, xy[1], reduction="none")
        loss: torch.Tensor = self.lossfunc(logits, xy[1])
        return loss

    def backward(self, loss: torch.Tensor, step: int, info: dict[str, Any]) -> None:
        ctx = {
            "batch_size": info["batch_size"],
            "individual_losses": info["individual_losses"],
            "loss": loss,
            "optimizer": info["optimizer"],
        }
        with self.cockpit(step, info=ctx):
            loss.backward(create_graph=self.cockpit.create_graph(step))

    def detach(self, model: nn.Module, chunk: int) -> None:
        assert self.lossfunc is not None
        _unextend(model, self.lossfunc)
        self.cockpit = None


def cnn_workload(batch: int | None, device: torch.device, seed: int = 0) -> Workload:
    """ResNet-56's layout without BatchNorm (BackPACK-compatible), each block's last conv zeroed."""
    from gradprobe.models import resnet_cifar

    model = resnet_cifar(56, generator=torch.Generator().manual_seed(seed))
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, nn.Identity())
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("conv2") and isinstance(module, nn.Conv2d):
                module.weight.zero_()
    b = batch or 32
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(b, 3, 32, 32, generator=gen), torch.randint(0, 10, (b,), generator=gen))
        for _ in range(BATCHES)
    ]
    model = model.to(device).train()
    batches = [tuple(t.to(device) for t in xy) for xy in batches]

    def loss(m: nn.Module, xy: tuple[Any, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(xy[0]), xy[1])

    return Workload("cnn", model, batches, loss, b)


def make_tool(name: str) -> Tool:
    if name == "gradprobe":
        return ProbeTool("gradprobe")
    if name == "naive":
        return Naive()
    if name == "backpack":
        return BackPACK()
    if name == "cockpit-economy":
        return Cockpit(name, "economy")
    if name == "cockpit-gradnorm":
        return Cockpit(name, "gradnorm")
    raise ValueError(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--tools", nargs="+", choices=list(WHAT), default=list(WHAT))
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=11)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    # BackPACK warns once per container module that holds parameters (a residual block): noise here.
    warnings.filterwarnings("ignore", message="Extension saving to", category=UserWarning)
    if args.pairs < 2 or args.chunk < 9:
        parser.error("--pairs must be at least 2 and --chunk at least 9")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = cnn_workload(args.batch, device) if args.model == "cnn" else build("mlp", args.batch, device)
    load_start = os.getloadavg()[0]
    print(
        f"{args.model}, batch {work.batch}, device {device}, CPU threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.pairs} chunk pairs of {args.chunk} steps, "
        f"load average {load_start:.2f} at the start"
    )
    results: list[tuple[str, Result | str]] = []
    for name in args.tools:
        try:
            tool = make_tool(name)
            r = measure_tool(work, tool, args.pairs, args.chunk, device)
        except ImportError as exc:
            results.append((name, f"not installed ({exc.name}): pip install -e '.[bench]'"))
            print(f"{name:<17} {results[-1][1]}")
            continue
        except Exception as exc:  # a peer that cannot run this model says so in the table
            results.append((name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            print(f"{name:<17} {results[-1][1]}")
            continue
        results.append((name, r))
        print(
            f"{name:<17} bare {1e3 * statistics.median(r.bare_steps):8.2f} ms  "
            f"instrumented {1e3 * statistics.median(r.probed_steps):8.2f} ms  "
            f"median ratio {r.median_text()}  "
            f"total ratio {r.total_text()}"
        )
    load_end = os.getloadavg()[0]
    print(f"load average {load_end:.2f} at the end")
    print()
    print("| tool | what it records | median ratio to bare (control) | total ratio (control) |")
    print("|---|---|---|---|")
    for name, r in results:
        if isinstance(r, str):
            print(f"| {name} | {WHAT[name]} | {r} | |")
        else:
            print(f"| {name} | {WHAT[name]} | {r.median_text()} | {r.total_text()} |")
    print(
        f"\n({args.model}, batch {work.batch}, {torch.get_num_threads()} threads, {args.pairs}x{args.chunk} "
        f"chunks, load {load_start:.2f}/{load_end:.2f}; a ratio outside a 0.97-1.03 control is refused)"
    )


if __name__ == "__main__":
    main()
