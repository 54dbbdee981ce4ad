"""Block lesions (Veit, Wilber and Belongie 2016): delete blocks of a trained net at test time.

:func:`lesion` evaluates the model with one block, then k random blocks, replaced by their
shortcut (the identity, or the shortcut module of a downsampling block), and returns the
test loss and accuracy of each lesion as a frame. A residual net behaves like an ensemble of
paths when deleting one block barely changes its error; a plain net has no path around a
block and collapses.

The replacement is a forward hook on the block that returns ``shortcut(x)`` (or ``x``)
instead of the block's output, registered for that one evaluation and removed in
``finally``. The model is left as it was: weights, buffers, train/eval modes, hooks and
the global RNG.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .blocks import BlockSpec, select_blocks, shortcut_modules
from .passes import preserved

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LESION_COLUMNS", "classification_metric", "lesion"]

#: The fixed columns of a lesion frame; each metric adds ``<name>`` and ``<name>_std``.
LESION_COLUMNS: tuple[str, ...] = (
    "kind",
    "k",
    "block",
    "position",
    "downsampling",
    "removable",
    "samples",
)

Metric = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]


def classification_metric(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The default metric: mean cross-entropy ``loss`` and ``acc`` (top-1 accuracy) of logits.

    >>> classification_metric(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))["acc"]
    0.5
    """
    return {
        "loss": float(F.cross_entropy(output.double(), target)),
        "acc": float((output.argmax(1) == target).double().mean()),
    }


def _split(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "x_test") and hasattr(data, "y_test"):
        x, y = data.x_test, data.y_test
    else:
        raise TypeError(
            "lesion() takes data as (inputs, targets) tensors or a gradprobe.data.Dataset "
            f"(its test split); got {type(data).__name__}"
        )
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"lesion() needs tensors for inputs and targets, got {type(x).__name__}, {type(y).__name__}"
        )
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"lesion() needs as many targets as inputs (at least one), got {len(x)} and {len(y)}"
        )
    return x, y


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def lesion(
    model: nn.Module,
    data: Any,
    *,
    blocks: BlockSpec = "auto",
    k: int = 1,
    samples: int = 8,
    metric: Metric | None = None,
    seed: int = 0,
    batch_size: int = 512,
    shortcuts: Mapping[str, str | nn.Module | None] | None = None,
) -> pd.DataFrame:
    """Test loss and accuracy of ``model`` with blocks deleted, one at a time and k at random.

    ``data`` is ``(inputs, targets)`` tensors or a :class:`gradprobe.data.Dataset` (its test
    split). ``blocks`` selects the blocks as :func:`gradprobe.attach` does; ``shortcuts`` names
    their shortcut modules as there (default: a child named ``shortcut`` or ``downsample``).
    Deleting a block replaces its output by its shortcut applied to its input: the input itself
    when the block keeps the shape, else the shortcut module's output. A block that changes the
    shape and has no shortcut (a plain net's downsampling block) is not removable: its row has
    ``removable`` False and NaN metrics, and random deletions never pick it.

    ``metric(output, targets)`` returns a mapping of named numbers over the whole set (default
    :func:`classification_metric`: ``loss`` and ``acc``). Evaluation is in eval mode
    (BatchNorm uses its running statistics) under ``torch.no_grad``, in batches of
    ``batch_size``. Random subsets come from a numpy Generator seeded by ``seed``; where there
    are at most ``samples`` subsets of size k, every one is evaluated instead.

    Rows (columns :data:`LESION_COLUMNS`, then each metric and ``<metric>_std``):

    - ``kind="none"``: the intact model (``k`` 0, ``block`` None, ``position`` -1);
    - ``kind="single"``: one per block, ``block`` its name, ``position`` its index in
      forward order, ``downsampling`` whether it changes the shape, ``removable``;
    - ``kind="random"``: for ``k`` = 1 .. ``k``, the mean (``<metric>``) and standard deviation
      (``<metric>_std``, ddof 0) over ``samples`` random subsets of k removable blocks.

    ``attrs``: ``blocks`` (names in forward order), ``not_removable``, ``n`` (examples),
    ``seed``, ``samples``, ``metrics`` (metric names) and ``baseline`` (the intact metrics).

    >>> import torch, torch.nn as nn, gradprobe
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> net = nn.Sequential(*[Res() for _ in range(3)])
    >>> x, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    >>> frame = gradprobe.lesion(net, (x, y), k=2, samples=2)
    >>> frame["kind"].tolist(), frame["k"].tolist()
    (['none', 'single', 'single', 'single', 'random', 'random'], [0, 1, 1, 1, 1, 2])
    """
    import pandas as pd

    if not isinstance(model, nn.Module):
        raise TypeError(f"lesion() needs a torch.nn.Module, got {type(model).__name__}")
    _check_int("k", k, 0)
    _check_int("samples", samples, 1)
    _check_int("batch_size", batch_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    x, y = _split(data)
    metric = metric or classification_metric
    named = select_blocks(model, blocks)
    short = shortcut_modules(named, shortcuts)
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device

    def evaluate(deleted: Sequence[int] = ()) -> dict[str, float]:
        handles = []
        try:
            for i in deleted:
                name, module = named[i]
                handles.append(module.register_forward_hook(_replacement(short.get(name))))
            outputs = [
                model(x[start : start + batch_size].to(device)) for start in range(0, len(x), batch_size)
            ]
        finally:
            for handle in handles:
                handle.remove()
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise TypeError("lesion() needs a model that returns a tensor (logits); pass metric= for others")
        values = metric(torch.cat(outputs), y.to(device))
        return {str(key): float(value) for key, value in values.items()}

    modes = [(m, m.training) for m in model.modules()]
    with preserved(model), torch.no_grad():
        try:
            model.eval()
            shapes = _shapes(model, named, x[:batch_size].to(device))
            base = evaluate()
            removable = [
                i
                for i, ((name, _), shape) in enumerate(zip(named, shapes, strict=True))
                if shape is not None and (shape[0] == shape[1] or name in short)
            ]
            names = list(base)
            rows: list[dict[str, Any]] = [_row("none", 0, None, -1, False, True, 1, base, None)]
            for i, (name, _) in enumerate(named):
                shape = shapes[i]
                down = shape is not None and shape[0] != shape[1]
                values = evaluate([i]) if i in removable else dict.fromkeys(names, math.nan)
                rows.append(_row("single", 1, name, i, down, i in removable, 1, values, None))
            gen = np.random.default_rng(seed)
            for size in range(1, min(k, len(removable)) + 1):
                if math.comb(len(removable), size) <= samples:
                    subsets = [list(c) for c in itertools.combinations(removable, size)]
                else:
                    subsets = [
                        sorted(int(j) for j in gen.choice(removable, size, replace=False))
                        for _ in range(samples)
                    ]
                results = [evaluate(s) for s in subsets]
                mean = {n: float(np.mean([r[n] for r in results])) for n in names}
                std = {n: float(np.std([r[n] for r in results])) for n in names}
                rows.append(_row("random", size, None, -1, False, True, len(subsets), mean, std))
        finally:
            for module, mode in modes:
                module.training = mode
    columns = [*LESION_COLUMNS, *(c for n in names for c in (n, f"{n}_std"))]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {"k": "int64", "position": "int64", "samples": "int64", "downsampling": "bool", "removable": "bool"}
    )
    frame.attrs.update(
        blocks=[n for n, _ in named],
        not_removable=[named[i][0] for i in range(len(named)) if i not in removable],
        n=len(x),
        seed=seed,
        samples=samples,
        metrics=names,
        baseline=base,
    )
    return frame


def _row(
    kind: str,
    k: int,
    block: str | None,
    position: int,
    down: bool,
    removable: bool,
    samples: int,
    values: Mapping[str, float],
    std: Mapping[str, float] | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": kind,
        "k": k,
        "block": block,
        "position": position,
        "downsampling": down,
        "removable": removable,
        "samples": samples,
    }
    for name, value in values.items():
        row[name] = value
        row[f"{name}_std"] = math.nan if std is None else std[name]
    return row


def _replacement(shortcut: nn.Module | None) -> Callable[..., Any]:
    """A forward hook that replaces a block's output by its shortcut applied to the block's input."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0]
        return x if shortcut is None else shortcut(x)

    return hook


def _shapes(
    model: nn.Module, named: Sequence[tuple[str, nn.Module]], x: torch.Tensor
) -> list[tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """Each block's (input shape, output shape) on one forward pass; None where either is not a tensor."""
    found: dict[int, tuple[tuple[int, ...], tuple[int, ...]] | None] = {}

    def record(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if i in found:
                return  # a block called twice: its first call decides
            ok = bool(args) and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
            found[i] = (tuple(args[0].shape), tuple(output.shape)) if ok else None

        return hook

    handles = []
    try:
        for i, (_, module) in enumerate(named):
            handles.append(module.register_forward_hook(record(i)))
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [found.get(i) for i in range(len(named))]
