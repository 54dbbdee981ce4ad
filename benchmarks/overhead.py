"""Time cost of a probe, measured on one model instance with a bare-vs-bare control.

One model trains on a fixed cycle of batches. Steps come in *chunks*: a bare
chunk, a probed chunk (the probe attached for the whole chunk, detached after
it), a bare chunk, a probed chunk, ... The first step of every chunk is dropped
(it pays for attaching, for the probe's first recorded step, and for warm-up
after the switch). A leading bare and probed chunk are discarded as warm-up.

Printed for each configuration:

* the ratio of per-step **medians** probed/bare, and the ratio of **summed**
  step times (the figure to read when the cost sits in one step of ten:
  ``every10``, ``jacobian10``);
* beside each ratio, the **control**: the same ratio between the even-numbered
  and the odd-numbered bare chunks of the same run. Two sets of bare steps
  should read 1.00; how far they are from it is the noise of this machine now.
  The same between even and odd probed chunks is printed as ``probed`` (noise
  that hit only the probed chunks shows there). When a control lies outside
  0.97-1.03 the ratio next to it is **refused** (the machine is too noisy for
  it to mean anything); run again on a quieter machine or with more ``--pairs``.
  When every step is recorded, the median and the total ratio must also agree
  within 3%, or both are refused;
* the fixed cost in microseconds per probed block per recorded step, and the
  1-minute load average at the start and the end;
* a markdown table row, ready to paste into the README's Performance table.

    python benchmarks/overhead.py                                  # ResNet-56, batch 128, default probe
    python benchmarks/overhead.py --model mlp --config default every10 --pairs 20
    python benchmarks/overhead.py --model gpt2 --device cuda

Models: ``resnet56`` (``gradprobe.models.resnet_cifar(56)``, 32x32 inputs, batch
128), ``mlp`` (20 residual blocks ``x + fc(relu(x))`` of width 64, batch 32:
the probe's fixed cost per block dominates there), ``gpt2`` (Hugging Face
``GPT2LMHeadModel`` built from a config, no weights: 6 layers, width 128, 4
heads, a vocabulary of 1024, sequence 64, batch 16, dropout off). Training is
SGD with momentum; the loss is cross-entropy (next-token loss for GPT-2).

Configurations: ``default`` (``attach(model)``: every metric on every step),
``every10`` (``every=10``), ``jacobian10`` (``jacobian=10``: Jacobian columns
every 10th step at the default options). Chunks hold ``--chunk`` steps (11 by
default: 10 measured, one of them recorded under ``every10`` and one with
Jacobian columns under ``jacobian10``; for these two the chunk is rounded to
1 + a multiple of 10, so that the measured steps hold whole cycles). The spectral Jacobian columns come once
in 20 Jacobian steps (``jac_spec`` on the second, ``prod_spec`` on the third), so a
chunk holds a spectral step only now and then: ``benchmarks/jacobian_cost.py`` gives
each kind of Jacobian step's cost and their total over a whole spectral cycle.

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradprobe

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "every10": {"every": 10},
    "jacobian10": {"jacobian": 10},
    "paths50": {"paths": 50},  # the path-length decomposition every 50th step (total ratio)
}

#: A control outside this range means the machine is too noisy for a ratio to mean anything.
CONTROL_RANGE = (0.97, 1.03)

BATCHES = 4  # distinct batches, cycled


@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[tuple[Any, ...]]
    loss: Callable[[nn.Module, tuple[Any, ...]], torch.Tensor]
    batch: int


def build(name: str, batch: int | None, device: torch.device, seed: int = 0) -> Workload:
    """The model, a few fixed batches and the loss of one workload."""
    gen = torch.Generator().manual_seed(seed)
    if name == "resnet56":
        from gradprobe.models import resnet_cifar

        b = batch or 128
        model: nn.Module = resnet_cifar(56, generator=torch.Generator().manual_seed(seed))
        batches = [
            (torch.randn(b, 3, 32, 32, generator=gen), torch.randint(0, 10, (b,), generator=gen))
            for _ in range(BATCHES)
        ]

        def loss(m: nn.Module, xy: tuple[Any, ...]) -> torch.Tensor:
            return nn.functional.cross_entropy(m(xy[0]), xy[1])

    elif name == "mlp":
        from gradprobe.models import mlp

        b = batch or 32
        # depth counts the stem and the head: 20 residual blocks of width 64, no norm
        # (the zero-initialised branches keep the activations bounded without one).
        model = mlp(
            22,
            in_features=64,
            num_classes=10,
            width=64,
            norm=None,
            zero_init_residual=True,
            generator=torch.Generator().manual_seed(seed),
        )
        batches = [
            (torch.randn(b, 64, generator=gen), torch.randint(0, 10, (b,), generator=gen))
            for _ in range(BATCHES)
        ]

        def loss(m: nn.Module, xy: tuple[Any, ...]) -> torch.Tensor:
            return nn.functional.cross_entropy(m(xy[0]), xy[1])

    elif name == "gpt2":
        import transformers

        b = batch or 16
        cfg = transformers.GPT2Config(
            n_layer=6,
            n_embd=128,
            n_head=4,
            n_positions=64,
            vocab_size=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = transformers.GPT2LMHeadModel(cfg)
        batches = [(torch.randint(0, 1024, (b, 64), generator=gen),) for _ in range(BATCHES)]

        def loss(m: nn.Module, xy: tuple[Any, ...]) -> torch.Tensor:
            return m(input_ids=xy[0], labels=xy[0]).loss

    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device).train()
    batches = [tuple(t.to(device) for t in xy) for xy in batches]
    return Workload(name, model, batches, loss, b)


@dataclass
class Result:
    config: str
    bare: list[list[float]]  # kept step times of each bare chunk (seconds)
    probed: list[list[float]]
    blocks: int
    recorded: float  # recorded steps per kept probed step

    @staticmethod
    def _flat(chunks: list[list[float]]) -> list[float]:
        return [t for c in chunks for t in c]

    @property
    def bare_steps(self) -> list[float]:
        return self._flat(self.bare)

    @property
    def probed_steps(self) -> list[float]:
        return self._flat(self.probed)

    def median_ratio(self) -> float:
        return statistics.median(self.probed_steps) / statistics.median(self.bare_steps)

    def total_ratio(self) -> float:
        return sum(self.probed_steps) / sum(self.bare_steps)

    def median_control(self) -> float:
        even, odd = self._flat(self.bare[0::2]), self._flat(self.bare[1::2])
        return statistics.median(even) / statistics.median(odd)

    def total_control(self) -> float:
        even, odd = self._flat(self.bare[0::2]), self._flat(self.bare[1::2])
        return (sum(even) / len(even)) / (sum(odd) / len(odd))

    def median_probed_control(self) -> float:
        """The same between even and odd instrumented chunks: noise that hit only those."""
        even, odd = self._flat(self.probed[0::2]), self._flat(self.probed[1::2])
        return statistics.median(even) / statistics.median(odd)

    def total_probed_control(self) -> float:
        even, odd = self._flat(self.probed[0::2]), self._flat(self.probed[1::2])
        return (sum(even) / len(even)) / (sum(odd) / len(odd))

    def consistent(self) -> bool:
        """When every step costs the same (``default``), the median and the total ratio must
        agree within 3%.

        (Under a schedule, or with Jacobian columns or paths on one step in N, they differ by
        design: one expensive step in N moves the total, not the median.) On a loaded machine
        both controls can pass while the two ratios of the same chunks disagree wildly: then
        neither is printed.
        """
        if self.recorded < 1.0 or self.config in PERIODIC:
            return True
        return abs(self.median_ratio() / self.total_ratio() - 1.0) <= CONTROL_RANGE[1] - 1.0

    def median_text(self) -> str:
        text = ratio_text(self.median_ratio(), self.median_control(), self.median_probed_control())
        return text if self.consistent() else _disagree(self)

    def total_text(self) -> str:
        text = ratio_text(self.total_ratio(), self.total_control(), self.total_probed_control())
        return text if self.consistent() else _disagree(self)

    def us_valid(self) -> bool:
        if not self.consistent():
            return False
        if self.recorded >= 1.0:
            return in_range(self.median_control()) and in_range(self.median_probed_control())
        return in_range(self.total_control()) and in_range(self.total_probed_control())

    def us_per_block(self) -> float:
        """Extra microseconds per probed block per recorded step.

        From the medians when every step is recorded (robust to load spikes), from the
        means otherwise (the median of a schedule with one recorded step in ten would
        not see the recorded step at all).
        """
        if self.recorded >= 1.0:
            extra = statistics.median(self.probed_steps) - statistics.median(self.bare_steps)
        else:
            extra = statistics.fmean(self.probed_steps) - statistics.fmean(self.bare_steps)
        if not self.recorded:
            return math.nan
        return 1e6 * extra / max(self.blocks, 1) / self.recorded


def _disagree(r: Result) -> str:
    # the controls too: they may pass while the two ratios of the same chunks still disagree
    return (
        f"refused (median {r.median_ratio():.3f} and total {r.total_ratio():.3f} disagree; "
        f"control {r.median_control():.3f}, probed {r.median_probed_control():.3f})"
    )


def in_range(control: float) -> bool:
    return CONTROL_RANGE[0] <= control <= CONTROL_RANGE[1]


class Tool:
    """What a probed chunk runs: ``attach`` before it, ``backward`` in each step, ``detach`` after.

    The bare chunks use this base class as is (plain ``loss.backward()``, nothing attached).
    ``peers.py`` subclasses it for other recorders; ``ProbeTool`` is gradprobe.
    """

    name = "bare"
    blocks = 0  # probed blocks (for the cost per block)
    recorded = 0.0  # recorded steps per measured step

    def attach(self, model: nn.Module) -> None:
        pass

    def loss(self, work: Workload, xy: tuple[Any, ...], info: dict[str, Any]) -> torch.Tensor:
        return work.loss(work.model, xy)

    def backward(self, loss: torch.Tensor, step: int, info: dict[str, Any]) -> None:
        loss.backward()

    def detach(self, model: nn.Module, chunk: int) -> None:
        pass


class ProbeTool(Tool):
    """gradprobe attached with the keyword arguments of a configuration."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.kwargs = kwargs
        self.probe: gradprobe.Probe | None = None

    def attach(self, model: nn.Module) -> None:
        self.probe = gradprobe.attach(model, **self.kwargs)

    def detach(self, model: nn.Module, chunk: int) -> None:
        assert self.probe is not None
        self.probe.detach()
        frame = self.probe.frame()
        self.blocks = len(self.probe.blocks)
        self.recorded = float(frame.loc[frame["step"] >= 1, "step"].nunique()) / (chunk - 1)
        self.probe = None


def measure_tool(work: Workload, tool: Tool, pairs: int, chunk: int, device: torch.device) -> Result:
    """Bare and ``tool`` chunks alternating on ``work.model``, after a discarded pair of each."""
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cuda = device.type == "cuda"
    bare_tool = Tool()
    k = 0

    def chunk_times(current: Tool) -> list[float]:
        nonlocal k
        times: list[float] = []
        current.attach(model)
        try:
            for step in range(chunk):
                xy = work.batches[k % len(work.batches)]
                k += 1
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                info: dict[str, Any] = {"batch": xy, "optimizer": opt, "batch_size": work.batch}
                current.backward(current.loss(work, xy, info), step, info)
                opt.step()
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        finally:
            current.detach(model, chunk)
        return times[1:]  # the first step of a chunk is dropped

    chunk_times(bare_tool)  # warm-up, discarded
    chunk_times(tool)
    bare: list[list[float]] = []
    probed: list[list[float]] = []
    for _ in range(pairs):
        bare.append(chunk_times(bare_tool))
        probed.append(chunk_times(tool))
    return Result(tool.name, bare, probed, tool.blocks, tool.recorded)


def chunk_for(config: str, chunk: int) -> int:
    """Steps per chunk: schedules of one step in ten get whole cycles of measured steps (1 + 10k)."""
    if config in ("every10", "jacobian10"):
        return 1 + 10 * max(1, round((chunk - 1) / 10))
    if config == "paths50":  # one decomposition per chunk, measured (not on the dropped first step)
        return 1 + 50 * max(1, round((chunk - 1) / 50))
    return chunk


#: Configurations with one expensive step in N by design (Jacobian columns, path decomposition).
PERIODIC = frozenset({"jacobian10", "paths50"})


def measure(work: Workload, config: str, pairs: int, chunk: int, device: torch.device) -> Result:
    """gradprobe in configuration ``config`` against bare training on the same model."""
    return measure_tool(work, ProbeTool(config, **CONFIGS[config]), pairs, chunk_for(config, chunk), device)


def ratio_text(value: float, control: float, probed_control: float = 1.0) -> str:
    """``value (control c)``, or ``refused (...)`` when a control is outside its band.

    ``control`` is bare-vs-bare (even against odd bare chunks); ``probed_control`` the same
    between instrumented chunks (printed as ``probed``): noise that hits only one kind of
    chunk shows there.
    """
    controls = f"control {control:.3f}" + (f", probed {probed_control:.3f}" if probed_control != 1.0 else "")
    if in_range(control) and in_range(probed_control):
        return f"{value:.3f} ({controls})"
    return f"refused ({controls})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["resnet56", "mlp", "gpt2"], default="resnet56")
    parser.add_argument("--config", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--pairs", type=int, default=10, help="bare+probed chunk pairs (at least 2)")
    parser.add_argument("--chunk", type=int, default=11, help="steps per chunk, the first one dropped")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the model's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs must be at least 2: the control compares alternate bare chunks")
    if args.chunk < 9:
        parser.error("--chunk must be at least 9: a probe stays attached for at least 8 measured steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = build(args.model, args.batch, device)
    load_start = os.getloadavg()[0]
    print(
        f"{args.model}, batch {work.batch}, device {device}, CPU threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.pairs} chunk pairs of {args.chunk} steps (first dropped; "
        "every10/jacobian10 round to 1 + 10k, paths50 to 1 + 50k), "
        f"load average {load_start:.2f} at the start"
    )
    results = []
    for config in args.config:
        r = measure(work, config, args.pairs, args.chunk, device)
        results.append(r)
        us = f"{r.us_per_block():.0f} us" if r.us_valid() else "refused"
        print(
            f"{config:<10} bare {1e3 * statistics.median(r.bare_steps):8.2f} ms  "
            f"probed {1e3 * statistics.median(r.probed_steps):8.2f} ms  "
            f"median ratio {r.median_text()}  "
            f"total ratio {r.total_text()}  "
            f"per block per recorded step {us}  ({r.blocks} blocks, {r.recorded:.2f} recorded per step)"
        )
        if any(t.startswith("refused") for t in (r.median_text(), r.total_text())):
            print(
                f"{'':<10} the machine is too noisy: a control (bare-vs-bare or probed-vs-probed) outside "
                f"{CONTROL_RANGE[0]}-{CONTROL_RANGE[1]}; that ratio is not printed"
            )
    load_end = os.getloadavg()[0]
    print(f"load average {load_end:.2f} at the end")
    print()
    print(
        "| model | config | batch | threads | chunks | bare ms | median ratio (control) "
        "| total ratio (control) | µs per block per recorded step | load start/end |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        us = f"{r.us_per_block():.0f}" if r.us_valid() else "refused"
        print(
            f"| {args.model} | {r.config} | {work.batch} | {torch.get_num_threads()} | "
            f"{args.pairs}x{chunk_for(r.config, args.chunk)} | {1e3 * statistics.median(r.bare_steps):.2f} | "
            f"{r.median_text()} | "
            f"{r.total_text()} | {us} | {load_start:.2f}/{load_end:.2f} |"
        )


if __name__ == "__main__":
    main()
