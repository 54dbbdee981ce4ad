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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from . import data as _data
from . import models as _models
from ._version import __version__
from .records import MODEL_COLUMNS, Run, check_destination, new_run_id

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULTS", "DEFAULT_MODELS", "ModelSpec", "build_model", "compare", "parse_spec", "summary"]

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

_SPEC = re.compile(r"^(?P<kind>plain|resnet|residual)(?:-(?P<family>cnn|mlp))?-(?P<depth>\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    """A reference model named by a spec string such as ``"plain-56"`` or ``"resnet-mlp-30"``.

    >>> parse_spec("resnet-mlp-30")
    ModelSpec(family='mlp', depth=30, residual=True)
    """

    family: Literal["cnn", "mlp"]
    depth: int
    residual: bool

    @property
    def name(self) -> str:
        """The canonical spec string."""
        kind = "resnet" if self.residual else "plain"
        return f"{kind}-{self.depth}" if self.family == "cnn" else f"{kind}-mlp-{self.depth}"


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``plain-N``/``resnet-N`` (CIFAR ResNet, N = 6n+2) or ``plain-mlp-N``/``resnet-mlp-N``.

    >>> parse_spec("plain-56")
    ModelSpec(family='cnn', depth=56, residual=False)
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"unknown model spec {spec!r}: use plain-DEPTH or resnet-DEPTH for the CIFAR ResNet "
            "(depth 6n+2: 20, 32, 44, 56, 110) and plain-mlp-DEPTH or resnet-mlp-DEPTH for the MLP"
        )
    family: Literal["cnn", "mlp"] = "mlp" if match["family"] == "mlp" else "cnn"
    depth = int(match["depth"])
    if family == "cnn" and (depth < 8 or (depth - 2) % 6):
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
    if parsed.family == "cnn":
        if len(dataset.input_shape) != 3:
            raise ValueError(
                f"{parsed.name} is a CNN and needs image inputs (C, H, W); {dataset.name} has inputs of "
                f"shape {dataset.input_shape}. Use an MLP spec "
                f"({'resnet' if parsed.residual else 'plain'}-mlp-DEPTH)."
            )
        return _models.resnet_cifar(
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


def compare(
    models: str | Sequence[str] | Mapping[str, nn.Module] = DEFAULT_MODELS,
    data: str | _data.Dataset = "digits",
    *,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    seed: int = 0,
    every: int = 1,
    jacobian: bool | int = False,
    out: str | os.PathLike[str] | None = None,
    momentum: float = DEFAULTS["momentum"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int = DEFAULTS["warmup"],
    schedule: Literal["cosine", "constant"] = DEFAULTS["schedule"],
    zero_init_residual: bool = DEFAULTS["zero_init_residual"],
    width: int | None = None,
    blocks: Any = "auto",
    jacobian_options: Mapping[str, Any] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    command: str | None = None,
    callback: Callable[[str, nn.Module], None] | None = None,
    tensorboard: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    paths: bool | int = True,
) -> Run:
    """Train plain and residual nets on the same data with a probe attached; return their tables as a Run.

    Args:
        models: spec strings (``"plain-56"``, ``"resnet-56"``, ``"plain-mlp-30"``,
            ``"resnet-mlp-30"``; see :func:`parse_spec`) or a dict name -> module.
        data: ``"digits"`` (default), ``"synthetic"``, ``"cifar10"`` (with ``data_root``
            or as ``"cifar10:FOLDER"``) or a :class:`gradprobe.data.Dataset`.
        epochs, batch_size, lr, momentum, weight_decay: SGD with momentum on the
            cross-entropy loss. The learning rate warms up linearly over ``warmup``
            steps, then follows ``schedule`` (cosine decay to 0, or constant).
        seed: seeds the weights of spec models and the data order (the same for every model).
        every: record every ``every``-th step (see :func:`gradprobe.attach`).
        jacobian: add the Jacobian columns. ``True``: at the first and the last recorded
            step of each model (initialisation and end of training), spectral columns
            included; an int N: every N-th recorded step, with the defaults of
            :func:`gradprobe.attach` (spectral columns on every 20th of those steps).
        jacobian_options: passed to :func:`gradprobe.attach` (``probes``, ``prod_spec``, ...).
        out: save the run into this folder (read it back with :func:`gradprobe.load`). It is
            checked before training (a writable folder, not holding another run unless
            ``overwrite=True``), so a bad ``out`` never costs a training run.
        zero_init_residual: zero the last BN scale of each residual branch of spec
            models, so every identity block starts as exactly the identity.
        width: width of spec models (default 16 channels for CNNs, 128 units for MLPs).
        blocks: which blocks to probe (``blocks=`` of :func:`gradprobe.attach`).
        progress: show a tqdm progress bar per model (epoch, loss, ETA) on stderr.
        command: the command line stored in the run's metadata (default: ``sys.argv``).
        callback: called as ``callback(name, model)`` after each model has trained.
        tensorboard: stream each model's ``gradprobe/<column>/<block>`` scalars (``cum_gain``,
            ``gain``, ``res_ratio``), summaries and training curves into this TensorBoard log
            folder while it trains, one subfolder per model (see :mod:`gradprobe.export`).
        paths: the path-length decomposition (:func:`gradprobe.paths`, on the Jacobian
            sub-batch): ``True`` (default) at the first and the last recorded step of each
            model, an int N every N-th recorded step, ``False`` never. ``run.paths()`` holds it.

    The run's ``frame()`` is the probes' frames with ``model``, ``depth`` and
    ``residual`` columns first; ``scalars()`` has one row per step with model,
    depth, residual, step, epoch, train_loss and train_acc (of the step's batch, in
    training mode), test_acc (measured after the last step of each epoch, NaN
    elsewhere) and lr. Dict models keep their own weights (and are trained in
    place), get the inputs in the dataset's own shape (images for digits), and take
    ``depth``/``residual`` from the model's attributes of those names, else the
    number of probed blocks and whether the name starts with "plain".

    >>> run = compare(["plain-mlp-4", "resnet-mlp-4"], "synthetic", epochs=1, progress=False)
    >>> run.models, sorted(run.frame()["block"].unique())
    (['plain-mlp-4', 'resnet-mlp-4'], ['blocks.0', 'blocks.1'])
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .probe import attach

    if isinstance(models, str):
        models = [models]
    if isinstance(models, Mapping):
        entries: list[tuple[str, ModelSpec | None, nn.Module | None]] = []
        for name, module in models.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"models[{name!r}] is a {type(module).__name__}, not a torch.nn.Module")
            entries.append((str(name), None, module))
    else:
        specs = [parse_spec(s) for s in models]
        entries = [(s.name, s, None) for s in specs]
    if not entries:
        raise ValueError("compare() needs at least one model")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    for name, value, minimum in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("every", every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a number of steps >= 0, got {warmup!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if isinstance(jacobian, int) and not isinstance(jacobian, bool) and jacobian < 1:
        raise ValueError(f"jacobian must be True, False or a positive int, got {jacobian!r}")
    if isinstance(paths, int) and not isinstance(paths, bool) and paths < 1:
        raise ValueError(f"paths must be True, False or a positive int, got {paths!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int (or None for the default), got {width!r}")
    run_id = new_run_id()
    if out is not None:  # before training: a bad folder must not cost the results
        check_destination(out, run_id, overwrite=overwrite)

    dev = torch.device(device)
    # the split stays fixed (seed 0) whatever the training seed: seeds vary training, not the data
    image_data = _data.load(data, root=data_root)
    flat_data = image_data.flat()
    started = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    frames: list[pd.DataFrame] = []
    scalar_frames: list[pd.DataFrame] = []
    per_model: dict[str, dict[str, Any]] = {}
    path_frames: list[pd.DataFrame] = []

    for name, spec, given in entries:
        ds = flat_data if spec is not None and spec.family == "mlp" else image_data
        if given is None:
            assert spec is not None
            model = build_model(spec, ds, seed=seed, zero_init_residual=zero_init_residual, width=width)
        else:
            model = given
        model.to(dev).train()
        # the same data order for every model, so the comparison differs only in the model
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        n = ds.n_train
        steps_per_epoch = len(_batches(n, batch_size, torch.arange(n)))
        total = epochs * steps_per_epoch
        recorded = len(range(0, total, every))
        jac: bool | int = max(1, recorded - 1) if jacobian is True else jacobian
        pth: bool | int = max(1, recorded - 1) if paths is True else paths
        test_acc: dict[int, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            total=total, desc=f"{name:>14}", unit="step", disable=not progress, leave=True, dynamic_ncols=True
        )
        stream = _tensorboard_stream(tensorboard, name)
        try:
            options = dict(jacobian_options or {})
            if jacobian is True:
                # Two Jacobian steps only (initialisation, end): both get the spectral columns,
                # not just the first as under the probe's every-20th-Jacobian-step default.
                options.setdefault("spec", True)
            probes = options.pop("probes", 4)
            with attach(
                model,
                blocks,
                every=every,
                jacobian=jac,
                probes=probes,
                jacobian_options=options or None,
                paths=pth,
            ) as probe:
                step = 0
                for epoch in range(epochs):
                    perm = torch.randperm(n, generator=order)
                    epoch_loss = 0.0
                    last_step = step
                    for idx in _batches(n, batch_size, perm):
                        rate = _lr_at(step, lr=lr, warmup=warmup, total=total, schedule=schedule)
                        for group in optimizer.param_groups:
                            group["lr"] = rate
                        xb, yb = ds.x_train[idx].to(dev), ds.y_train[idx].to(dev)
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
                    test_acc[last_step] = _accuracy(model, ds.x_test, ds.y_test, 512, dev)
                    if stream is not None:
                        stream.scalars(last_step, test_acc=test_acc[last_step])
                    bar.set_postfix_str(
                        f"epoch {epoch + 1}/{epochs} loss {epoch_loss / steps_per_epoch:.4f} "
                        f"test acc {test_acc[last_step]:.3f}"
                    )
                frame = probe.frame()
                scalars = probe.scalars()
                path_frame = probe.paths_frame()
                block_names = probe.blocks
                if stream is not None:
                    stream.update(probe)
        finally:
            bar.close()
            if stream is not None:
                stream.close()
        seconds = time.perf_counter() - t0
        depth, residual = _describe(name, model, spec, len(block_names))
        scalars["test_acc"] = scalars["step"].map(test_acc).astype("float64")
        scalars = scalars[["step", "epoch", "train_loss", "train_acc", "test_acc", "lr"]]
        for table in (frame, scalars, path_frame):
            table.insert(0, "model", name)
            table.insert(1, "depth", int(depth))
            table.insert(2, "residual", bool(residual))
        frames.append(frame)
        scalar_frames.append(scalars)
        path_frames.append(path_frame)
        per_model[name] = {
            "depth": int(depth),
            "residual": bool(residual),
            "blocks": block_names,
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "spec": spec.name if spec is not None else None,
            "seconds": round(seconds, 2),
        }
        if callback is not None:
            callback(name, model)

    frame = pd.concat(frames, ignore_index=True)
    scalars = pd.concat(scalar_frames, ignore_index=True)
    frame = frame.astype({"model": "object", "depth": "int64", "residual": "bool"})
    scalars = scalars.astype({"model": "object", "depth": "int64", "residual": "bool", "epoch": "int64"})
    meta = {
        "kind": "compare",
        "run_id": run_id,
        "gradprobe_version": __version__,
        "torch_version": torch.__version__,
        "created": created,
        "seed": seed,
        "command": command if command is not None else _command_line(),
        "models": names,
        "model_info": per_model,
        "data": image_data.name,
        "data_shape": list(image_data.input_shape),
        "n_train": image_data.n_train,
        "n_test": image_data.n_test,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "schedule": schedule,
        "zero_init_residual": zero_init_residual,
        "width": width,
        "every": every,
        "jacobian": jacobian,
        "paths": paths,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    path_table = pd.concat(path_frames, ignore_index=True) if paths else None
    run = Run(frame, scalars, meta, paths=path_table)
    if out is not None:
        run.save(out, overwrite=overwrite)
    return run


def _tensorboard_stream(logdir: str | os.PathLike[str] | None, name: str) -> Any:
    """A :class:`gradprobe.export.TensorBoardStream` into ``logdir/<name>``, or None."""
    if logdir is None:
        return None
    from .export import TensorBoardStream, model_folder

    return TensorBoardStream(os.path.join(logdir, model_folder(name)))


def summary(run: Run) -> pd.DataFrame:
    """One row per model of a compare run: the numbers that tell the story.

    Columns: model, depth, residual; ``train_loss`` (mean training loss of the
    last epoch), ``test_acc`` (after the last epoch); ``cum_gain_init`` and
    ``cum_gain_end`` (``cum_gain`` of the first block at the first and the last
    recorded step: how much the gradient reaching the input end is amplified
    (>1) or shrunk (<1) relative to the output end); ``res_ratio_init`` and
    ``res_ratio_end`` (largest ``res_ratio`` over the blocks whose input and
    output have the same shape, at the first and last recorded step; 0 means
    every such block is exactly the identity); ``effective_length_init`` and
    ``effective_length_end`` (the share-weighted mean path length of the gradient,
    :func:`gradprobe.paths`, of the stack with the most branching blocks, at the first and
    the last step with a decomposition; NaN without one).

    >>> run = compare(["resnet-mlp-4"], "synthetic", epochs=1, progress=False)
    >>> list(summary(run).columns)[:5]
    ['model', 'depth', 'residual', 'train_loss', 'test_acc']
    """
    import pandas as pd

    frame, scalars = run.frame(), run.scalars()
    rows = []
    for model in run.models:
        part = frame[frame["model"] == model]
        logged = scalars[scalars["model"] == model] if "model" in scalars.columns else scalars.iloc[0:0]
        row: dict[str, Any] = {"model": model}
        for col in MODEL_COLUMNS[1:]:
            row[col] = part[col].iloc[0] if len(part) else math.nan
        if len(logged) and "epoch" in logged.columns:
            last = logged[logged["epoch"] == logged["epoch"].max()]
            row["train_loss"] = float(last["train_loss"].mean())
            acc = logged["test_acc"].dropna()
            row["test_acc"] = float(acc.iloc[-1]) if len(acc) else math.nan
        else:
            row["train_loss"] = row["test_acc"] = math.nan
        first_block = part[part["index"] == part["index"].min()] if len(part) else part
        steps = sorted(part["step"].unique())
        for tag, step in (("init", steps[0] if steps else None), ("end", steps[-1] if steps else None)):
            at = first_block[first_block["step"] == step]
            row[f"cum_gain_{tag}"] = float(at["cum_gain"].iloc[0]) if len(at) else math.nan
        identity = part[part["skip_grad"].notna()] if len(part) else part
        for tag, step in (("init", steps[0] if steps else None), ("end", steps[-1] if steps else None)):
            at = identity[identity["step"] == step]["res_ratio"]
            row[f"res_ratio_{tag}"] = float(at.max()) if len(at) else math.nan
        row.update(_effective_lengths(run.paths(), model))
        rows.append(row)
    return pd.DataFrame(rows)


def _effective_lengths(table: pd.DataFrame, model: str) -> dict[str, float]:
    """``effective_length`` of a model's main stack at its first and last decomposed step."""
    from .path_lengths import paths_summary as path_summary

    part = table[table["model"] == model] if "model" in table.columns else table.iloc[0:0]
    if not len(part):
        return {"effective_length_init": math.nan, "effective_length_end": math.nan}
    lengths = path_summary(part).sort_values(["step", "branching"], ascending=[True, False], kind="stable")
    main = lengths.drop_duplicates("step")  # per step, the stack with the most branching blocks
    return {
        "effective_length_init": float(main["effective_length"].iloc[0]),
        "effective_length_end": float(main["effective_length"].iloc[-1]),
    }
