"""Time cost of a probe, measured on one model instance with a bare-vs-bare control.

One model trains on a fixed cycle of batches. Steps come in *chunks*: a bare
chunk, a probed chunk (the probe attached for the whole chunk, detached after
it), a bare chunk, a probed chunk, ... The first step of every chunk is dropped:
it pays for attaching and for warm-up after the switch. A leading bare and probed
chunk (at most 11 steps each) are discarded as warm-up.

Schedules and whole cycles. ``every10``, ``jacobian10`` and ``paths50`` have
expensive steps: the recorded step under ``every=10``, the Jacobian steps (and
the spectral ones: ``jac_spec`` on the second and ``prod_spec`` on the third of
every 20 Jacobian steps) under ``jacobian=10``, the path-length decomposition
under ``paths=50``. For these the
probe runs a shifted schedule (``every=`` a callable), so that the dropped first
step is an ordinary, unrecorded one, and the measured steps hold whole *cycles*:

* ``every10``: 10 steps (one recorded step). The schedule records steps 1, 2, 12,
  22, ...: two steps are dropped, the unrecorded step 0 and step 1, the attach's
  first recorded step, which also checks which blocks run (a check a run makes
  once, costing on the MLP about as much again as the recorded step itself);
* ``jacobian10``: 200 steps (20 Jacobian steps, two of them spectral). Every step
  from step 1 is recorded; the first recorded step is the first Jacobian step, and
  is measured;
* ``paths50``: 50 steps (one decomposition, on the first recorded step, step 1).

``--cycles K`` puts K cycles in each such chunk (default: as many as ``--chunk``
rounds to, at least one). The counts of recorded, Jacobian, spectral and
decomposition steps per chunk are read back from the probe and printed, so a
chunk that does not hold what it should shows. What an attach pays once (the
probe's check of which blocks run, on its first recorded step; any set-up of the
first Jacobian step) is paid once a chunk under ``jacobian10`` and ``paths50``,
where a training run pays it once.

Printed for each configuration:

* the **figure**: for the scheduled configurations the ratio of **summed** step
  times probed/bare over the whole cycles (``total``); the ratio of per-step
  medians is printed beside it, labelled supplementary (a median does not see the
  one expensive step in N), and so is the dearest measured step in median bare
  steps (under ``jacobian10`` a spectral step). For ``default`` (every step
  alike) the figure is the ratio of medians, with the total beside it;
* beside each ratio, the **control**: the same ratio between the even-numbered
  and the odd-numbered bare chunks of the same run. Two sets of bare steps
  should read 1.00; how far they are from it is the noise of this machine now.
  The same between even and odd probed chunks is printed as ``probed`` (noise
  that hit only the probed chunks shows there). When a control lies outside
  0.97-1.03 the ratio next to it is **refused** (the machine is too noisy for
  it to mean anything); run again on a quieter machine or with more ``--pairs``.
  When every step is alike (``default``), the median and the total ratio must also
  agree within 3%, or both are refused;
* the fixed cost in microseconds per probed block per recorded step (from means
  for the scheduled configurations), and the 1-minute load average at the start
  and the end;
* with ``--floor``, for ``default``: the floor of ``floor.py`` (one reduction per
  x, y, g_y, g_x of each block, one host read a step) measured in the same run,
  its ratio over bare, and the probe's overhead as a multiple of the floor's
  ((probe - bare)/(floor - bare)) and probe/floor;
* a markdown table row, ready to paste into the docs' performance page.

    python benchmarks/overhead.py                                  # ResNet-56, batch 128, default and every10
    python benchmarks/overhead.py --model mlp --config default every10 --pairs 20
    python benchmarks/overhead.py --model mlp --config jacobian10 --cycles 1 --pairs 4
    python benchmarks/overhead.py --model resnet56 --batch 32 --config jacobian10 --pairs 2
    python benchmarks/overhead.py --model resnet56 --config default --floor
    python benchmarks/overhead.py --model gpt2 --device cuda

Models: ``resnet56`` (``gradprobe.models.resnet_cifar(56)``, 32x32 inputs, batch
128), ``mlp`` (20 residual blocks ``x + fc(relu(x))`` of width 64, batch 32:
the probe's fixed cost per block dominates there), ``gpt2`` (Hugging Face
``GPT2LMHeadModel`` built from a config, no weights: 6 layers, width 128, 4
heads, a vocabulary of 1024, sequence 64, batch 16, dropout off). Training is
SGD with momentum; the loss is cross-entropy (next-token loss for GPT-2). The
first line printed names the model and the batch used.

Configurations: ``default`` (``attach(model)``: every metric on every step),
``every10`` (``every=10``), ``fused`` and ``fused-every10`` (the same with ``fused=True``: the
statistics of large calls by compiled kernels, compiled in the warm-up chunk),
``jacobian10`` (``jacobian=10``: Jacobian columns
every 10th step at the default options), ``paths50`` (``paths=50``). A
``jacobian10`` cycle is 200 steps: on ResNet-56 at batch 128 on a CPU a chunk pair
takes minutes, so it is not in the default ``--config`` list; name it, or measure
it on the MLP or at a smaller ``--batch`` (and say which).
``benchmarks/jacobian_cost.py`` times each kind of Jacobian step (``jac_spec`` comes on
the second Jacobian step of every 20, ``prod_spec`` on the third) and sums them over a whole
spectral cycle.

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradprobe
from gradprobe.config import JacobianOptions

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "every10": {"every": 10},
    "jacobian10": {"jacobian": 10},
    "paths50": {"paths": 50},  # the path-length decomposition every 50th step (total ratio)
    "fused": {"fused": True},  # every step, large calls by the compiled kernels (gradprobe.fused)
    "fused-every10": {"fused": True, "every": 10},
}

#: The configurations ``--config`` runs unless told (``jacobian10``'s cycle is 200 steps).
DEFAULT_CONFIGS = ["default", "every10"]


def cycle_steps(config: str) -> int:
    """Steps of one whole schedule cycle of ``config``: after it the pattern of expensive steps repeats.

    ``every`` steps per recorded step, times the recorded steps until the Jacobian schedule
    (a Jacobian step every ``jacobian`` recorded steps, a spectral one every ``spec``-th of
    those, ``gradprobe.jacobian.schedule.JacobianSchedule``) and the decomposition schedule
    (every ``paths`` recorded steps) both start over.
    """
    kwargs = CONFIGS[config]
    every = int(kwargs.get("every", 1))
    recorded = 1
    jacobian = int(kwargs.get("jacobian", 0))
    if jacobian:
        spec = JacobianOptions.from_mapping(kwargs.get("jacobian_options", {})).spec
        recorded = math.lcm(recorded, jacobian * (1 if isinstance(spec, bool) else spec))
    paths = int(kwargs.get("paths", 0))
    if paths:
        recorded = math.lcm(recorded, paths)
    return every * recorded


def is_scheduled(config: str) -> bool:
    """Whether ``config`` has expensive steps one in N: its figure is the total over whole cycles."""
    return cycle_steps(config) > 1


def lead_steps(config: str) -> int:
    """Steps dropped at the start of a chunk of ``config``.

    One (an ordinary step: warm-up after the switch) for all; a second one, the chunk's
    first recorded step, for a schedule of recorded steps alone (``every10``): an attach's
    first recorded step also checks which blocks run, once a run (on the MLP it costs
    about as much again as a recorded step's metrics), and with one recorded step in ten
    that check would otherwise weigh on every measured recorded step. Under ``jacobian10``
    and ``paths50`` the first recorded step is the first Jacobian step or the
    first decomposition, both counted from the first recorded step: it is measured, and
    pays that check once a chunk.
    """
    kwargs = CONFIGS.get(config, {})
    if is_scheduled(config) and not kwargs.get("jacobian") and not kwargs.get("paths"):
        return 2
    return 1


def shifted_every(every: int, lead: int = 1) -> Callable[[int], bool]:
    """A schedule that records steps ``lead``, ``lead + every``, ... of an attach, and step 1
    when ``lead`` is 2; never step 0.

    Step 0 of a chunk is the dropped warm-up step: under this schedule it is an ordinary,
    unrecorded one. With ``lead`` 2 step 1, also dropped, is a recorded one that takes the
    attach's first-recorded-step check out of the measured steps. The measured steps start
    with a recorded one (with the first Jacobian step and the first decomposition, both
    counted from the first recorded step).
    """

    def schedule(step: int) -> bool:
        return step >= 1 if step < lead else (step - lead) % every == 0

    schedule.__name__ = f"every_{every}_from_{lead}"
    return schedule


def probe_kwargs(config: str) -> dict[str, Any]:
    """``attach`` keyword arguments of ``config``; scheduled ones shifted (:func:`shifted_every`)."""
    kwargs = dict(CONFIGS[config])
    if is_scheduled(config):
        kwargs["every"] = shifted_every(int(kwargs.get("every", 1)), lead_steps(config))
    return kwargs


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
    counts: str = ""  # what the measured steps of a probed chunk held (recorded, Jacobian, ...)

    @property
    def scheduled(self) -> bool:
        """Expensive steps one in N: the total over whole cycles is the figure, not the median."""
        return (self.config in CONFIGS and is_scheduled(self.config)) or self.recorded < 1.0

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
        if self.scheduled:
            return True
        return abs(self.median_ratio() / self.total_ratio() - 1.0) <= CONTROL_RANGE[1] - 1.0

    def median_text(self) -> str:
        text = ratio_text(self.median_ratio(), self.median_control(), self.median_probed_control())
        return text if self.consistent() else _disagree(self)

    def total_text(self) -> str:
        text = ratio_text(self.total_ratio(), self.total_control(), self.total_probed_control())
        return text if self.consistent() else _disagree(self)

    def figure_text(self) -> str:
        """The figure: the total ratio for a scheduled configuration, else the median ratio."""
        return f"total {self.total_text()}" if self.scheduled else f"median {self.median_text()}"

    def supplementary_text(self) -> str:
        """The other ratio, labelled; for a scheduled configuration also its dearest step."""
        if self.scheduled:
            return (
                f"median {self.median_text()} (supplementary: a median misses the one expensive step in N); "
                f"dearest step {self.dearest():.1f} bare steps"
            )
        return f"total {self.total_text()}"

    def dearest(self) -> float:
        """The dearest measured step of the instrumented chunks, in median bare steps."""
        return max(self.probed_steps) / statistics.median(self.bare_steps)

    def us_valid(self) -> bool:
        if not self.consistent():
            return False
        if not self.scheduled:
            return in_range(self.median_control()) and in_range(self.median_probed_control())
        return in_range(self.total_control()) and in_range(self.total_probed_control())

    def us_per_block(self) -> float:
        """Extra microseconds per probed block per recorded step.

        From the medians when every step is alike (robust to load spikes), from the means
        for a scheduled configuration (the median of a schedule with one recorded or one
        Jacobian step in ten would not see that step at all).
        """
        if not self.scheduled:
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

    lead = 1  # steps dropped at the start of a chunk

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

    lead = 1  # steps dropped at the start of a chunk

    def __init__(self, name: str, lead: int = 1, **kwargs: Any) -> None:
        self.name = name
        self.lead = lead
        self.kwargs = kwargs
        self.probe: gradprobe.Probe | None = None
        self.counts: list[str] = []  # what each measured chunk held

    def attach(self, model: nn.Module) -> None:
        self.probe = gradprobe.attach(model, **self.kwargs)

    def detach(self, model: nn.Module, chunk: int) -> None:
        assert self.probe is not None
        probe, self.probe = self.probe, None
        probe.detach()
        frame = probe.frame()
        self.blocks = len(probe.blocks)
        kept = frame.loc[frame["step"] >= self.lead]  # the measured steps
        recorded = int(kept["step"].nunique())
        self.recorded = recorded / (chunk - self.lead)
        parts = [f"{chunk - self.lead} measured steps: {recorded} recorded"]
        if self.kwargs.get("jacobian"):
            parts.append(f"{int(kept.loc[kept['jac_fro'].notna(), 'step'].nunique())} Jacobian")
            parts.append(f"{int(kept.loc[kept['jac_spec'].notna(), 'step'].nunique())} spectral")
        if self.kwargs.get("paths"):
            paths = probe.paths_frame()
            done = int(paths.loc[paths["step"] >= self.lead, "step"].nunique()) if len(paths) else 0
            parts.append(f"{done} decomposition{'s' if done != 1 else ''}")
        self.counts.append(", ".join(parts))


def measure_tools(
    work: Workload, tools: list[Tool], pairs: int, chunk: int, device: torch.device, warm: int = 11
) -> list[Result]:
    """Bare chunks and a chunk of each of ``tools`` in turn on ``work.model``, ``pairs`` rounds,
    after a discarded round of chunks of at most ``warm`` steps; one Result per tool, all
    against the same bare chunks."""
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cuda = device.type == "cuda"
    bare_tool = Tool()
    lead = max(t.lead for t in tools)  # the bare chunks drop as many steps as the tools do
    k = 0

    def chunk_times(current: Tool, steps: int) -> list[float]:
        nonlocal k
        times: list[float] = []
        current.attach(model)
        try:
            for step in range(steps):
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
            current.detach(model, steps)
        return times[current.lead if current is not bare_tool else lead :]  # see lead_steps

    # warm-up, discarded: short (a cycle of 200 steps needs no 200 steps of warm-up), but long
    # enough for a shifted schedule to reach its first recorded, Jacobian and spectral step
    for current in (bare_tool, *tools):
        chunk_times(current, min(chunk, max(warm, lead + 2)))
    for tool in tools:
        if isinstance(tool, ProbeTool):
            tool.counts.clear()
    bare: list[list[float]] = []
    probed: list[list[list[float]]] = [[] for _ in tools]
    for _ in range(pairs):
        bare.append(chunk_times(bare_tool, chunk))
        for i, tool in enumerate(tools):
            probed[i].append(chunk_times(tool, chunk))
    results = []
    for tool, times in zip(tools, probed, strict=True):
        counts = "; ".join(dict.fromkeys(tool.counts)) if isinstance(tool, ProbeTool) else ""
        results.append(Result(tool.name, bare, times, tool.blocks, tool.recorded, counts))
    return results


def measure_tool(work: Workload, tool: Tool, pairs: int, chunk: int, device: torch.device) -> Result:
    """Bare and ``tool`` chunks alternating on ``work.model``, after a discarded pair of each."""
    return measure_tools(work, [tool], pairs, chunk, device)[0]


def chunk_for(config: str, chunk: int, cycles: int | None = None) -> int:
    """Steps per chunk: the dropped lead (:func:`lead_steps`) + whole cycles of a scheduled
    configuration.

    ``cycles`` cycles when given, else as many as ``chunk - 1`` rounds to (at least one);
    ``chunk`` as is for a configuration without a schedule.
    """
    n = cycle_steps(config)
    if n == 1:
        return chunk
    return lead_steps(config) + n * (cycles if cycles else max(1, round((chunk - 1) / n)))


def measure(
    work: Workload,
    config: str,
    pairs: int,
    chunk: int,
    device: torch.device,
    cycles: int | None = None,
    extra: list[Tool] | None = None,
) -> list[Result]:
    """gradprobe in configuration ``config`` (and ``extra`` tools, in the same rounds) against
    bare training on the same model; the probe's Result first."""
    tools: list[Tool] = [ProbeTool(config, lead_steps(config), **probe_kwargs(config)), *(extra or [])]
    return measure_tools(work, tools, pairs, chunk_for(config, chunk, cycles), device)


def floor_text(probe: Result, floor: Result) -> str:
    """The probe's overhead as a multiple of the floor's, and probe/floor, from the medians
    (every step alike) of chunks measured in the same rounds against the same bare chunks."""
    if not (probe.us_valid() and floor.us_valid()):
        return "refused (a control is outside its band)"
    bare = statistics.median(probe.bare_steps)
    p, f = statistics.median(probe.probed_steps), statistics.median(floor.probed_steps)
    text = f"probe/floor {p / f:.3f}"
    if f - bare <= (CONTROL_RANGE[1] - 1.0) * bare:
        return (
            f"{text}; the floor's overhead ({100 * (f / bare - 1):.1f}%) is within the control band, "
            "so (probe - bare)/(floor - bare) is not printed"
        )
    return f"{text}; (probe - bare)/(floor - bare) {(p - bare) / (f - bare):.2f}"


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


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every script of this harness takes beside ``--model`` and ``--pairs``."""
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the model's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")


def parse_run_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, refuse fewer than two chunk pairs, and set the torch threads."""
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error("--pairs must be at least 2: the control compares alternate bare chunks")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["resnet56", "mlp", "gpt2"], default="resnet56")
    parser.add_argument("--config", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--pairs", type=int, default=10, help="bare+probed chunk pairs (at least 2)")
    parser.add_argument("--chunk", type=int, default=11, help="steps per chunk, the first one dropped")
    parser.add_argument(
        "--cycles",
        type=int,
        default=None,
        help="whole schedule cycles per chunk of every10/jacobian10/paths50 (default: as --chunk rounds)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure floor.py's floor in the same rounds (configurations recording every step)",
    )
    add_run_options(parser)
    args = parse_run_options(parser, argv)
    if args.chunk < 9:
        parser.error("--chunk must be at least 9: a probe stays attached for at least 8 measured steps")
    if args.cycles is not None and args.cycles < 1:
        parser.error("--cycles must be at least 1")
    device = torch.device(args.device)
    work = build(args.model, args.batch, device)
    load_start = os.getloadavg()[0]
    chunks = ", ".join(f"{c} {chunk_for(c, args.chunk, args.cycles)}" for c in args.config)
    print(
        f"{args.model}, batch {work.batch}, device {device}, CPU threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.pairs} chunk pairs; steps per chunk, the first dropped: {chunks} "
        "(every10: 2 dropped + whole cycles of 10; jacobian10/paths50: 1 dropped + whole cycles of "
        f"200/50; the dropped first step is unrecorded), load average {load_start:.2f} at the start"
    )
    results = []
    floors: dict[str, tuple[Result, str]] = {}
    for config in args.config:
        extra: list[Tool] = []
        if args.floor and not is_scheduled(config):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from floor import FloorTool  # a script beside this one; it imports this module

            extra.append(FloorTool())
        r, *rest = measure(work, config, args.pairs, args.chunk, device, args.cycles, extra)
        results.append(r)
        us = f"{r.us_per_block():.0f} us" if r.us_valid() else "refused"
        print(
            f"{config:<10} bare {1e3 * statistics.median(r.bare_steps):8.2f} ms  "
            f"probed {1e3 * statistics.median(r.probed_steps):8.2f} ms (medians)  "
            f"ratio: {r.figure_text()}  [{r.supplementary_text()}]  "
            f"per block per recorded step {us}  ({r.blocks} blocks, {r.recorded:.2f} recorded per step)"
        )
        if r.counts:
            print(f"{'':<10} each probed chunk held: {r.counts}")
        if any(t.startswith("refused") for t in (r.median_text(), r.total_text())):
            print(
                f"{'':<10} the machine is too noisy: a control (bare-vs-bare or probed-vs-probed) outside "
                f"{CONTROL_RANGE[0]}-{CONTROL_RANGE[1]}; that ratio is not printed"
            )
        for f in rest:
            floors[config] = (f, floor_text(r, f))
            fus = f"{f.us_per_block():.1f} us" if f.us_valid() else "refused"
            print(
                f"{'floor':<10} floor  {1e3 * statistics.median(f.probed_steps):8.2f} ms (median)  "
                f"ratio: median {f.median_text()}  [total {f.total_text()}]  per block per step {fus}"
            )
            print(f"{'':<10} the probe against the floor: {floors[config][1]}")
        if args.floor and is_scheduled(config):
            print(f"{'':<10} (no floor for a scheduled configuration: the floor reads every step)")
    load_end = os.getloadavg()[0]
    print(f"load average {load_end:.2f} at the end")
    print()
    print(
        "| model | config | batch | threads | chunks | bare ms | figure: ratio (control) "
        "| supplementary ratio | µs per block per recorded step | load start/end |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        us = f"{r.us_per_block():.0f}" if r.us_valid() else "refused"
        print(
            f"| {args.model} | {r.config} | {work.batch} | {torch.get_num_threads()} | "
            f"{args.pairs}x{chunk_for(r.config, args.chunk, args.cycles)} | "
            f"{1e3 * statistics.median(r.bare_steps):.2f} | {r.figure_text()} | {r.supplementary_text()} | "
            f"{us} | {load_start:.2f}/{load_end:.2f} |"
        )
    for config, (f, text) in floors.items():
        print(
            f"| {args.model} | floor (beside {config}) | {work.batch} | {torch.get_num_threads()} | "
            f"{args.pairs}x{args.chunk} | {1e3 * statistics.median(f.bare_steps):.2f} | "
            f"median {f.median_text()} | {text} | "
            f"{f'{f.us_per_block():.1f}' if f.us_valid() else 'refused'} | {load_start:.2f}/{load_end:.2f} |"
        )


if __name__ == "__main__":
    main()
