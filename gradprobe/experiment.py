"""The reference experiment: train plain and residual nets side by side with a probe attached.

:func:`compare` trains each model on the same data, in the same order, from the
same seed, with a :func:`gradprobe.attach` probe on its blocks, and gathers the
probes' tables into one :class:`gradprobe.records.Run` with ``model``, ``depth``
and ``residual`` columns. Everything random (weights, data order) is drawn from
``torch.Generator`` objects seeded with ``seed``, so a run is reproducible
number for number on the same machine, and the global RNG is never touched.

The defaults are tuned so that the run shows the facts of He et al. 2016 on the
bundled digits data in about 90 seconds on one CPU core (see :data:`DEFAULTS`):
plain-56 trains worse than plain-20 (degradation), resnet-56 trains better than
plain-56, the gradient reaching the first block is amplified by orders of
magnitude in plain-56 and stays within a decade in resnet-56, and
zero-initialised residual blocks start as the identity and move away from it.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from . import data as _data
from . import models as _models
from ._version import __version__
from .records import Run, check_destination, new_run_id

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULTS",
    "DEFAULT_MODELS",
    "ModelSpec",
    "TrainConfig",
    "build_model",
    "compare",
    "parse_spec",
    "summary",
    "train_one",
]

#: The models of ``gradprobe compare`` without arguments.
DEFAULT_MODELS: tuple[str, ...] = ("plain-20", "plain-56", "resnet-20", "resnet-56")

#: Training defaults of :func:`compare` and ``gradprobe compare``.
#:
#: Tuned on digits (12 steps of 128 per epoch) for plain/residual 20/56, seeds 0-2, lr 0.02
#: to 0.1, 15 and 20 epochs. lr 0.1 (He et al.'s CIFAR value, with 30x more steps per
#: epoch) leaves plain-56 at chance level: a dead net shows nothing. Zero-initialised
#: residual branches start slowly at lr 0.02 (resnet-20 still at loss 0.4 after 15 epochs).
#: lr 0.05 for 20 epochs gives the paper's ordering on every seed tried: final train loss
#: ~0.006 resnet-56 < ~0.01 resnet-20 ~ plain-20 << ~1.4-1.7 plain-56. The warm-up (He et
#: al. warm up their 110-layer net) keeps the first steps of the deep plain net from
#: wrecking its early layers; the cosine decay lets the trainable nets settle, so the
#: final losses compare converged nets with a stuck one rather than noisy snapshots.
DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "lr": 0.05,
    "batch_size": 128,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "warmup": 24,  # steps: two epochs of digits
    "schedule": "cosine",
    "zero_init_residual": True,
}

_SPEC = re.compile(r"^(?P<kind>plain|resnet|residual)(?:-(?P<family>cnn|preact|mlp))?-(?P<depth>\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    """A reference model named by a spec string such as ``"plain-56"`` or ``"resnet-mlp-30"``.

    >>> parse_spec("resnet-mlp-30")
    ModelSpec(family='mlp', depth=30, residual=True)
    """

    family: Literal["cnn", "preact", "mlp"]
    depth: int
    residual: bool

    @property
    def name(self) -> str:
        """The canonical spec string."""
        kind = "resnet" if self.residual else "plain"
        return f"{kind}-{self.depth}" if self.family == "cnn" else f"{kind}-{self.family}-{self.depth}"


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``plain-N``/``resnet-N`` (CIFAR ResNet, N = 6n+2), ``plain-preact-N``/``resnet-preact-N``
    (the pre-activation CIFAR ResNet) or ``plain-mlp-N``/``resnet-mlp-N``.

    >>> parse_spec("plain-56")
    ModelSpec(family='cnn', depth=56, residual=False)
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"unknown model spec {spec!r}: use plain-DEPTH or resnet-DEPTH for the CIFAR ResNet "
            "(depth 6n+2: 20, 32, 44, 56, 110), plain-preact-DEPTH or resnet-preact-DEPTH for the "
            "pre-activation ResNet, and plain-mlp-DEPTH or resnet-mlp-DEPTH for the MLP"
        )
    family: Literal["cnn", "preact", "mlp"] = (
        "mlp" if match["family"] == "mlp" else "preact" if match["family"] == "preact" else "cnn"
    )
    depth = int(match["depth"])
    if family != "mlp" and (depth < 8 or (depth - 2) % 6):
        raise ValueError(f"model spec {spec!r}: the CIFAR ResNet needs depth 6n+2 (20, 32, 44, 56, 110, ...)")
    if family == "mlp" and depth < 3:
        raise ValueError(f"model spec {spec!r}: an MLP needs depth >= 3 (stem, at least one block, head)")
    return ModelSpec(family, depth, match["kind"] != "plain")


def build_model(
    spec: str | ModelSpec,
    dataset: _data.Dataset,
    *,
    seed: int = 0,
    zero_init_residual: bool = False,
    width: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build the reference model of ``spec`` for ``dataset``'s input shape and classes, seeded by ``seed``.

    Extra keyword arguments go to :func:`gradprobe.models.resnet_cifar` or
    :func:`gradprobe.models.mlp` (``shortcut=``, ``norm=``, ...).

    >>> ds = _data.synthetic(shape=(1, 8, 8), num_classes=3)
    >>> build_model("plain-20", ds).residual
    False
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    gen = torch.Generator().manual_seed(seed)
    if parsed.family in ("cnn", "preact"):
        if len(dataset.input_shape) != 3:
            raise ValueError(
                f"{parsed.name} is a CNN and needs image inputs (C, H, W); {dataset.name} has inputs of "
                f"shape {dataset.input_shape}. Use an MLP spec "
                f"({'resnet' if parsed.residual else 'plain'}-mlp-DEPTH)."
            )
        build = _models.resnet_cifar if parsed.family == "cnn" else _models.preact_resnet_cifar
        return build(
            parsed.depth,
            residual=parsed.residual,
            width=width or 16,
            in_channels=dataset.in_channels,
            num_classes=dataset.num_classes,
            zero_init_residual=zero_init_residual,
            generator=gen,
            **options,
        )
    return _models.mlp(
        parsed.depth,
        residual=parsed.residual,
        width=width or 128,
        in_features=dataset.in_features,
        num_classes=dataset.num_classes,
        zero_init_residual=zero_init_residual,
        generator=gen,
        **options,
    )


def _lr_at(step: int, *, lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up from lr/warmup to lr over ``warmup`` steps, then constant or cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    was_training = model.training
    model.eval()  # BN running statistics; the probe does not record eval-mode passes
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(x))


def _batches(n: int, batch_size: int, perm: torch.Tensor) -> list[torch.Tensor]:
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        # BatchNorm cannot normalise a batch of one in training mode: fold it into the previous batch
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def _describe(name: str, model: nn.Module, spec: ModelSpec | None, blocks: int) -> tuple[int, bool]:
    """``depth`` and ``residual`` of a model: from its spec, else its attributes, else its name."""
    if spec is not None:
        return spec.depth, spec.residual
    depth = getattr(model, "depth", None)
    residual = getattr(model, "residual", None)
    if not isinstance(depth, int) or isinstance(depth, bool):
        depth = blocks
    if not isinstance(residual, bool):
        residual = not name.lower().startswith("plain")
    return depth, residual


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]])


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`compare` and :func:`train_one` train each model: checked once, when it is built.

    SGD with momentum on the cross-entropy loss; the learning rate warms up linearly over
    ``warmup`` steps to ``lr``, then follows ``schedule`` (cosine decay to 0, or constant).
    Defaults: :data:`DEFAULTS`.

    Attributes:
        epochs, batch_size, lr, momentum, weight_decay, warmup, schedule: the optimisation.
        seed: seeds the weights of spec models and the data order (the same for every model).
        zero_init_residual: zero the last BN scale of each residual branch of spec
            models, so every identity block starts as exactly the identity.
        width: width of spec models (default 16 channels for CNNs, 128 units for MLPs).
        every: record every ``every``-th step (see :func:`gradprobe.attach`).
        blocks: which blocks to probe (``blocks=`` of :func:`gradprobe.attach`).
        jacobian: add the Jacobian columns. ``True``: at the first and the last recorded
            step of each model (initialisation and end of training), spectral columns
            included; an int N: every N-th recorded step, with the defaults of
            :func:`gradprobe.attach` (spectral columns once in 20 of those steps).
        jacobian_options: passed to :func:`gradprobe.attach` (``probes``, ``prod_spec``, ...).
        paths: the path-length decomposition (:func:`gradprobe.paths`, on its sub-batch,
            ``jacobian_options["paths_sub_batch"]``): ``True`` at the first and the last
            recorded step of each model, an int N every N-th recorded step, ``False`` never.
        device: where the models train.
        progress: show progress on stderr: a tqdm bar per model (epoch, loss, ETA) on a
            terminal or in a notebook, else one plain line per model and epoch (see
            :func:`progress_bars`).
        tensorboard: stream each model's ``gradprobe/<column>/<block>`` scalars (``cum_gain``,
            ``gain``, ``res_ratio``), summaries and training curves into this TensorBoard log
            folder while it trains, one subfolder per model (see :mod:`gradprobe.export`).
        lesion: after training, delete each block in turn and k = 1 .. ``LESION_K`` random
            blocks (``LESION_SAMPLES`` subsets each) on the test split (:func:`gradprobe.lesion`);
            the run keeps the table in ``meta["lesions"]`` (:func:`lesions`).

    >>> TrainConfig(epochs=2, lr=0.1).batch_size
    128
    >>> TrainConfig(schedule="step")
    Traceback (most recent call last):
    ...
    ValueError: schedule must be 'cosine' or 'constant', got 'step'
    """

    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    warmup: int = DEFAULTS["warmup"]
    schedule: Literal["cosine", "constant"] = DEFAULTS["schedule"]
    seed: int = 0
    zero_init_residual: bool = DEFAULTS["zero_init_residual"]
    width: int | None = None
    every: int = 1
    blocks: Any = "auto"
    jacobian: bool | int = False
    jacobian_options: Mapping[str, Any] | None = None
    paths: bool | int = True
    device: str | torch.device = "cpu"
    progress: bool = True
    tensorboard: str | os.PathLike[str] | None = None
    lesion: bool = True

    def __post_init__(self) -> None:
        for name, value, minimum in (
            ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 1),
            ("every", self.every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a number of steps >= 0, got {self.warmup!r}")
        for name, number in (
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
        ):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"{name} must be a finite number, got {number!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(
                f"momentum and weight_decay must be >= 0, got {self.momentum} and {self.weight_decay}"
            )
        for name, value in (("jacobian", self.jacobian), ("paths", self.paths)):
            if not isinstance(value, int) or (not isinstance(value, bool) and value < 1):
                raise ValueError(f"{name} must be True, False or a positive int, got {value!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.width is not None and (
            isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1
        ):
            raise ValueError(f"width must be a positive int (or None for the default), got {self.width!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int from 0 to 2**63 - 1 (a torch seed), got {self.seed!r}")
        if self.tensorboard is not None:
            logdir = Path(self.tensorboard)
            if not str(self.tensorboard) or (logdir.exists() and not logdir.is_dir()):
                raise ValueError(
                    f"tensorboard={os.fspath(self.tensorboard)!r} is not a folder"
                    "; TensorBoard logs go into a folder"
                )
        if self.jacobian_options is not None and not isinstance(self.jacobian_options, Mapping):
            raise ValueError(
                f"jacobian_options must be a mapping, got {type(self.jacobian_options).__name__}"
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {self.device!r} is not a torch device ({exc})") from None

    @classmethod
    def of(cls, config: TrainConfig | None = None, **options: Any) -> TrainConfig:
        """``config`` (default: the defaults) with ``options`` replaced; unknown names are a TypeError.

        >>> TrainConfig.of(TrainConfig(epochs=3), lr=0.1).epochs
        3
        """
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(
                f"unknown training options {unknown}; the options are the fields of TrainConfig: "
                f"{', '.join(f.name for f in fields(cls))}"
            )
        return replace(config or cls(), **options)

    def probe_options(self, total: int) -> dict[str, Any]:
        """Keyword arguments of :func:`gradprobe.attach` for a run of ``total`` steps.

        ``True`` for ``jacobian``/``paths`` becomes "every (recorded steps - 1)-th recorded step":
        the first and the last one.

        >>> TrainConfig(jacobian=True, paths=False).probe_options(10)["jacobian"]
        9
        """
        recorded = len(range(0, total, self.every))
        options = dict(self.jacobian_options or {})
        if self.jacobian is True:
            # Two Jacobian steps only (initialisation, end): both get the spectral columns,
            # which the probe's once-in-20-Jacobian-steps default would not give them.
            options.setdefault("spec", True)
        return {
            "every": self.every,
            "jacobian": max(1, recorded - 1) if self.jacobian is True else self.jacobian,
            "probes": options.pop("probes", 4),
            "jacobian_options": options or None,
            "paths": max(1, recorded - 1) if self.paths is True else self.paths,
        }


def _entries(
    models: str | Sequence[str] | Mapping[str, nn.Module],
) -> list[tuple[str, ModelSpec | None, nn.Module | None]]:
    """(name, spec, given module) per model of :func:`compare`'s ``models``, checked."""
    if isinstance(models, str):
        models = [models]
    if isinstance(models, Mapping):
        entries: list[tuple[str, ModelSpec | None, nn.Module | None]] = []
        for name, module in models.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"models[{name!r}] is a {type(module).__name__}, not a torch.nn.Module")
            entries.append((str(name), None, module))
    else:
        entries = [(s.name, s, None) for s in map(parse_spec, models)]
    if not entries:
        raise ValueError("compare() needs at least one model")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return entries


def train_one(
    model: nn.Module, data: _data.Dataset, config: TrainConfig | None = None, *, name: str = "model"
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Train ``model`` on ``data`` as ``config`` says, with a probe attached; return its tables.

    The model is trained in place, in training mode, on ``data`` as it is (flatten it with
    :meth:`gradprobe.data.Dataset.flat` for an MLP). The data order is drawn from a generator
    seeded with ``config.seed``; the global RNG is never touched.

    Returns ``(frame, scalars, info)``: the probe's frame; one row per step with step, epoch,
    train_loss and train_acc (of the step's batch, in training mode), test_acc (after the last
    step of each epoch, NaN elsewhere) and lr; and a dict with ``blocks`` (probed block names),
    ``parameters``, ``model_class``, ``seconds`` and ``paths`` (the probe's path-length table).
    ``name`` labels the progress bar and the TensorBoard subfolder.

    >>> ds = _data.synthetic(shape=(6,), num_classes=3)
    >>> model = build_model("resnet-mlp-4", ds)
    >>> frame, scalars, info = train_one(model, ds, TrainConfig(epochs=1, progress=False))
    >>> info["blocks"], len(scalars), frame["step"].nunique()
    (['blocks.0', 'blocks.1'], 2, 2)
    """
    from tqdm.auto import tqdm

    from .probe import attach

    config = config or TrainConfig()
    dev = torch.device(config.device)
    model.to(dev).train()
    # the same data order for every model, so a comparison differs only in the model
    order = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    n, epochs = data.n_train, config.epochs
    steps_per_epoch = len(_batches(n, config.batch_size, torch.arange(n)))
    total = epochs * steps_per_epoch
    test_acc: dict[int, float] = {}
    t0 = time.perf_counter()
    bars = config.progress and progress_bars()
    bar = tqdm(
        total=total,
        desc=f"{name:>14}",
        unit="step",
        disable=not bars,
        leave=True,
        dynamic_ncols=True,
    )
    stream = _tensorboard_stream(config.tensorboard, name)
    try:
        with attach(model, config.blocks, **config.probe_options(total)) as probe:
            step = 0
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=order)
                epoch_loss = 0.0
                last_step = step
                for idx in _batches(n, config.batch_size, perm):
                    rate = _lr_at(
                        step, lr=config.lr, warmup=config.warmup, total=total, schedule=config.schedule
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = rate
                    xb, yb = data.x_train[idx].to(dev), data.y_train[idx].to(dev)
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                    last_step = probe.current_step
                    loss_value = float(loss.detach())
                    probe.log(
                        epoch=epoch,
                        train_loss=loss_value,
                        train_acc=float((logits.detach().argmax(1) == yb).float().mean()),
                        lr=rate,
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if stream is not None:
                        stream.update(probe)
                        stream.scalars(last_step, train_loss=loss_value, lr=rate)
                    epoch_loss += loss_value
                    step += 1
                    bar.update(1)
                test_acc[last_step] = _accuracy(model, data.x_test, data.y_test, 512, dev)
                if stream is not None:
                    stream.scalars(last_step, test_acc=test_acc[last_step])
                status = (
                    f"epoch {epoch + 1}/{epochs} loss {epoch_loss / steps_per_epoch:.4f} "
                    f"test acc {test_acc[last_step]:.3f}"
                )
                if bars:
                    bar.set_postfix_str(status)
                elif config.progress:  # a log file or a pipe: one plain line per epoch, no \r
                    print(
                        f"{name:>14} {status} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
                    )
            frame, scalars, path_frame, block_names = (
                probe.frame(),
                probe.scalars(),
                probe.paths_frame(),
                probe.blocks,
            )
            if stream is not None:
                stream.update(probe)
    finally:
        bar.close()
        if stream is not None:
            stream.close()
    scalars["test_acc"] = scalars["step"].map(test_acc).astype("float64")
    scalars = scalars[["step", "epoch", "train_loss", "train_acc", "test_acc", "lr"]]
    info: dict[str, Any] = {
        "blocks": block_names,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "seconds": round(time.perf_counter() - t0, 2),
        "paths": path_frame,
    }
    return frame, scalars, info


def progress_bars() -> bool:
    """Whether progress shows as tqdm bars: on a terminal (stderr) or in a notebook.

    Elsewhere (stderr redirected to a file or a pipe) a bar would be redrawn with carriage
    returns into one long line, so the runner prints one plain line per model and epoch instead.
    """
    import tqdm.autonotebook
    import tqdm.std

    if tqdm.autonotebook.tqdm is not tqdm.std.tqdm:  # a notebook: tqdm.auto draws widgets
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _label(table: pd.DataFrame, name: str, depth: int, residual: bool) -> pd.DataFrame:
    """``table`` with the ``model``, ``depth`` and ``residual`` columns first."""
    table.insert(0, "model", name)
    table.insert(1, "depth", int(depth))
    table.insert(2, "residual", bool(residual))
    return table


def _train_entry(
    name: str, spec: ModelSpec | None, given: nn.Module | None, data: _data.Dataset, config: TrainConfig
) -> tuple[nn.Module, tuple[pd.DataFrame, ...], dict[str, Any]]:
    """Build (or take) one model of :func:`compare` and train it: the model, its labelled tables, its info."""
    from .lesions import lesion

    if given is None:
        assert spec is not None
        model = build_model(
            spec, data, seed=config.seed, zero_init_residual=config.zero_init_residual, width=config.width
        )
    else:
        model = given
    frame, scalars, info = train_one(model, data, config, name=name)
    depth, residual = _describe(name, model, spec, len(info["blocks"]))
    parts = [frame, scalars, info.pop("paths")]
    if config.lesion:
        parts.append(
            lesion(model, data, blocks=config.blocks, k=LESION_K, samples=LESION_SAMPLES, seed=config.seed)
        )
    tables = tuple(_label(t, name, depth, residual) for t in parts)
    seconds = info.pop("seconds")
    spec_name = spec.name if spec is not None else None
    return (
        model,
        tables,
        {"depth": depth, "residual": residual, **info, "spec": spec_name, "seconds": seconds},
    )


def _gather(tables: Sequence[tuple[pd.DataFrame, ...]]) -> tuple[pd.DataFrame, ...]:
    """One frame, scalars and paths table from the labelled tables of each model."""
    import pandas as pd

    frame, scalars, paths, *rest = (
        pd.concat(parts, ignore_index=True) for parts in zip(*tables, strict=True)
    )
    frame = frame.astype({"model": "object", "depth": "int64", "residual": "bool"})
    scalars = scalars.astype({"model": "object", "depth": "int64", "residual": "bool", "epoch": "int64"})
    return frame, scalars, paths, *rest


def _run_meta(
    config: TrainConfig,
    data: _data.Dataset,
    model_info: dict[str, dict[str, Any]],
    *,
    run_id: str,
    created: str,
    started: float,
    command: str | None,
) -> dict[str, Any]:
    """The ``meta`` of a compare run: what ran, on what, how, and how long."""
    return {
        "kind": "compare",
        "run_id": run_id,
        "gradprobe_version": __version__,
        "torch_version": torch.__version__,
        "created": created,
        "seed": config.seed,
        "command": command if command is not None else _command_line(),
        "models": list(model_info),
        "model_info": model_info,
        "data": data.name,
        "data_shape": list(data.input_shape),
        "n_train": data.n_train,
        "n_test": data.n_test,
        **{key: getattr(config, key) for key in _META_OPTIONS},
        "device": str(torch.device(config.device)),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 2),
    }


#: The TrainConfig fields a compare run records in its meta, in this order.
_META_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "warmup",
    "schedule",
    "zero_init_residual",
    "width",
    "every",
    "jacobian",
    "paths",
    "lesion",
)

#: The lesions of a compare run: random deletions of k = 1 .. LESION_K blocks, LESION_SAMPLES
#: subsets each (single deletions of every block come on top). On digits' 360 test images
#: this adds a few seconds per model.
LESION_K = 5
LESION_SAMPLES = 4


def lesions(run: Run) -> pd.DataFrame | None:
    """The block-lesion table of a compare run (:func:`gradprobe.lesion` of each model after
    training, with ``model``, ``depth`` and ``residual`` first), or None when it has none.

    >>> run = compare(["resnet-mlp-4"], "synthetic", epochs=1, progress=False)
    >>> lesions(run)[["kind", "block"]].head(2).values.tolist()
    [['none', nan], ['single', 'blocks.0']]
    """
    from .summary import lesion_table

    return lesion_table(run.meta.get("lesions"))


def compare(
    models: str | Sequence[str] | Mapping[str, nn.Module] = DEFAULT_MODELS,
    data: str | _data.Dataset = "digits",
    *,
    config: TrainConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    data_root: str | os.PathLike[str] | None = None,
    command: str | None = None,
    callback: Callable[[str, nn.Module], None] | None = None,
    **options: Any,
) -> Run:
    """Train plain and residual nets on the same data with a probe attached; return their tables as a Run.

    Every model is built (spec strings) or taken as given (a dict name -> module, trained in
    place), then trained by :func:`train_one` as ``config`` (default :class:`TrainConfig`)
    says, with ``options`` (its fields: ``epochs=``, ``lr=``, ``jacobian=``, ...) replacing
    its values. Spec models (:func:`parse_spec`) are seeded with ``config.seed``, and MLPs get
    flattened inputs; given models take ``depth``/``residual`` from their attributes of those
    names, else the number of probed blocks and whether the name starts with "plain".
    ``data`` is ``"digits"``, ``"synthetic"``, ``"cifar10"`` (with ``data_root`` or as
    ``"cifar10:FOLDER"``) or a :class:`gradprobe.data.Dataset`. The run's tables are those of
    :func:`train_one`, with ``model``, ``depth`` and ``residual`` columns first. ``out``: save
    the run there, checked before training, so a bad ``out`` never costs a training run: a
    writable folder that is new, empty or holds an earlier compare run (which is replaced);
    anything else (another kind of run, files gradprobe did not write) needs ``overwrite=True``,
    and files gradprobe did not write are kept even then. ``command`` (default
    ``sys.argv``) goes into the run's metadata; ``callback(name, model)`` runs after each model.

    >>> run = compare(["plain-mlp-4", "resnet-mlp-4"], "synthetic", epochs=1, progress=False)
    >>> run.models, sorted(run.frame()["block"].unique())
    (['plain-mlp-4', 'resnet-mlp-4'], ['blocks.0', 'blocks.1'])
    """
    entries = _entries(models)
    config = TrainConfig.of(config, **options)
    run_id = new_run_id()
    if out is not None:  # before training: a bad folder must not cost the results
        check_destination(out, run_id, overwrite=overwrite, kind="compare", name=f"out={os.fspath(out)!r}")
    # the split stays fixed (seed 0) whatever the training seed: seeds vary training, not the data
    image_data = _data.load(data, root=data_root)
    flat_data = image_data.flat()
    started = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tables: list[tuple[pd.DataFrame, ...]] = []
    model_info: dict[str, dict[str, Any]] = {}
    for name, spec, given in entries:
        ds = flat_data if spec is not None and spec.family == "mlp" else image_data
        model, labelled, model_info[name] = _train_entry(name, spec, given, ds, config)
        tables.append(labelled)
        if callback is not None:
            callback(name, model)
    frame, scalars, path_table, *lesion_part = _gather(tables)
    meta = _run_meta(
        config, image_data, model_info, run_id=run_id, created=created, started=started, command=command
    )
    if lesion_part:
        from .summary import lesion_records

        lesion_part[0].attrs = {"k": LESION_K, "samples": LESION_SAMPLES, "seed": config.seed}
        meta["lesions"] = lesion_records(lesion_part[0])
    run = Run(frame, scalars, meta, paths=path_table if config.paths else None)
    if out is not None:
        # Asked again: the folder may have changed while the models trained. An earlier compare run
        # there is replaced (its files gradprobe did not write stay), anything else needs overwrite.
        check_destination(out, run_id, overwrite=overwrite, kind="compare", name=f"out={os.fspath(out)!r}")
        run.save(out, overwrite=True)
    return run


def _tensorboard_stream(logdir: str | os.PathLike[str] | None, name: str) -> Any:
    """A :class:`gradprobe.export.TensorBoardStream` into ``logdir/<name>``, or None."""
    if logdir is None:
        return None
    from .export import TensorBoardStream, model_folder

    return TensorBoardStream(os.path.join(logdir, model_folder(name)))


def summary(run: Run) -> pd.DataFrame:
    """One row per model of a compare run: :func:`gradprobe.summary.summary` of its tables.

    Among its columns: model, depth, residual; ``train_loss`` (mean training loss of the
    last epoch), ``test_acc`` (after the last epoch); ``cum_gain_init`` and
    ``cum_gain_end`` (``cum_gain`` of the first block at the first and the last
    recorded step); ``res_ratio_init`` and ``res_ratio_end``; ``effective_length_init``
    and ``effective_length_end`` (NaN without a path-length decomposition).

    >>> run = compare(["resnet-mlp-4"], "synthetic", epochs=1, progress=False)
    >>> list(summary(run).columns)[:5]
    ['model', 'depth', 'residual', 'blocks', 'steps']
    """
    from .summary import summary as model_summary

    return model_summary(run.frame(), run.scalars(), run.paths(), lesion=lesions(run))
