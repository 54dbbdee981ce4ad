"""Statistics to rows: one step's raw statistics (tensors) become one row per block. Pure.

The probe's hooks reduce each block call to a few 0-d/1-d tensors (:mod:`gradprobe.metrics`);
at the end of a recorded step :func:`step_rows` takes all of them together, copies them to
the host in one transfer per device (one sync per step keeps a GPU pipeline intact), pools
the calls of each block and turns the sums into the columns of
:data:`gradprobe.records.FRAME_COLUMNS`. Nothing here needs a hook or a model, so it is
tested on hand-made statistics. :class:`ParamSnapshots` keeps the parameter copies that
``update_ratio`` needs between recorded steps.

>>> import torch
>>> call = CallStats("b", fwd=torch.tensor([4.0, 4.0, 1.0, 4.0]), numel_x=4, numel_y=4,
...                  gyy=torch.tensor(1.0), bwd_x=torch.tensor([4.0, 1.0, 1.0]))
>>> row = step_rows(0, [call], {}, {}, {"b": 0}, lambda names: dict.fromkeys(names, "s"))[0]
>>> row["gain"], row["res_ratio"], row["in_rms"]
(2.0, 0.5, 1.0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import metrics
from .records import FRAME_COLUMNS

Row = dict[str, Any]


@dataclass
class CallStats:
    """Statistics of one call of one block within a step (tensors without a graph)."""

    block: str
    fwd: torch.Tensor | None = None  # metrics.forward_stats: |x|^2, |y|^2, |y - r|^2, |r|^2
    sig: torch.Tensor | None = None  # per-channel moments of y and y - r (metrics.signal_stats)
    numel_x: int = 0
    numel_y: int = 0
    gyy: torch.Tensor | None = None  # metrics.grad_out_stats, summed over backward passes
    bwd_x: torch.Tensor | None = None  # metrics.grad_in_stats, summed over backward passes
    # GradScaler's loss scale (squared gradient statistics carry scale**2); a 1-element tensor
    # until the step's transfer to the host (see loss_scale)
    scale: float | torch.Tensor = 1.0

    def add_forward(
        self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None, channel_dim: int | None
    ) -> None:
        """The forward statistics of the call (``ref``: the tensor ``y - ref`` is the residual of)."""
        with torch.no_grad(), full_precision(y.device.type):
            self.fwd, self.sig = metrics.call_stats(x, y, ref, channel_dim)
            self.numel_x, self.numel_y = x.numel(), y.numel()

    def add_grad_out(self, g_y: torch.Tensor) -> None:
        """Add one backward pass's ``|g_y|^2``."""
        with _no_grad(), full_precision(g_y.device.type):
            stats = metrics.grad_out_stats(g_y)
            self.gyy = stats if self.gyy is None else self.gyy + stats

    def add_grad_in(self, g_x: torch.Tensor, g_y: torch.Tensor | None) -> None:
        """Add one backward pass's input-gradient statistics (``g_y`` None: shapes differ)."""
        with _no_grad(), full_precision(g_x.device.type):
            stats = metrics.grad_in_stats(g_x, g_y)
            self.bwd_x = stats if self.bwd_x is None else self.bwd_x + stats


_NULL = contextlib.nullcontext()  # reusable: nothing allocated per hook call
# A private but long-standing torch function, with a safe fallback should it disappear.
_any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def full_precision(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Statistics in full precision even inside ``torch.autocast`` (which would run dot in bf16)."""
    if _any_autocast() and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NULL


def _no_grad() -> contextlib.AbstractContextManager[Any]:
    """Grad mode off where it is on (a gradient hook runs with it off already: nothing to do)."""
    return torch.no_grad() if torch.is_grad_enabled() else _NULL


def loss_scale(scaler: Any) -> float | torch.Tensor:
    """A ``torch.amp.GradScaler``'s scale now, without a device-to-host sync where possible.

    ``get_scale()`` calls ``.item()``: one sync per backward pass on a GPU. A copy of the
    scale tensor instead travels with the step's statistics in their one transfer (a copy:
    ``scaler.update()`` changes the tensor in place before the step closes).

    >>> scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    >>> loss_scale(scaler)  # before its first scale(): the initial scale
    8.0
    >>> _ = scaler.scale(torch.ones(()))
    >>> loss_scale(scaler)
    tensor([8.])
    """
    get_async = getattr(scaler, "_get_scale_async", None)
    if getattr(scaler, "_enabled", False) and get_async is not None:
        scale = get_async()
        if isinstance(scale, torch.Tensor):
            return scale.detach().reshape(-1).clone()
    return float(scaler.get_scale())


def to_host(tensors: Sequence[torch.Tensor]) -> dict[int, list[float]]:
    """``{id(tensor): float64 values}``, each device's tensors leaving it in one transfer.

    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor(3.0)
    >>> values = to_host([a, b])
    >>> values[id(a)], values[id(b)]
    ([1.0, 2.0], [3.0])
    """
    # One cat per (device, dtype) and one conversion to float64 for each: a float32 value
    # converts exactly, so this is the per-tensor .double() of every value, in fewer ops.
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    out: dict[int, list[float]] = {}
    for group in by_kind.values():
        flat = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in group]).double().tolist()
        i = 0
        for t in group:
            n = t.numel()
            out[id(t)] = flat[i : i + n]
            i += n
    return out


def scaled(values: Mapping[int, list[float]], t: torch.Tensor | None, scale: float) -> list[float] | None:
    """The squared gradient statistics of ``t`` divided by ``scale**2`` (a GradScaler's loss scale).

    >>> t = torch.tensor([8.0])
    >>> scaled(to_host([t]), t, 2.0)
    [2.0]
    """
    if t is None:
        return None
    return [v / scale**2 for v in values[id(t)]]


def pooled(parts: Sequence[Sequence[float] | None], width: int) -> list[float]:
    """Element-wise sum over calls; NaN when any call lacks the statistic.

    >>> pooled([[1.0, 2.0], [3.0, 4.0]], 2), pooled([[1.0], None], 1)
    ([4.0, 6.0], [nan])
    """
    if not parts or any(p is None for p in parts):
        return [math.nan] * width
    return [sum(col) for col in zip(*parts, strict=True)]


def param_columns(psq: float, gsq: float, dsq: float) -> Row:
    """``param_norm``, ``param_grad_norm`` and ``update_ratio`` of squared sums (metrics.block_param_stats).

    >>> param_columns(4.0, 9.0, 1.0)
    {'param_norm': 2.0, 'param_grad_norm': 3.0, 'update_ratio': 0.5}
    """
    norm = metrics.safe_sqrt(psq)
    return {
        "param_norm": norm,
        "param_grad_norm": metrics.safe_sqrt(gsq),
        "update_ratio": metrics.safe_div(metrics.safe_sqrt(dsq), norm),
    }


def _pooled_block(calls: Sequence[CallStats], values: Mapping[int, list[float]]) -> tuple[Any, ...]:
    """One block's calls pooled: (calls, fwd, numel_x, numel_y, gyy, bwd_x, signal moments); calls
    without a backward pass are left out when others have one."""
    complete = [c for c in calls if c.gyy is not None] or list(calls)
    fwd = pooled([values[id(c.fwd)] if c.fwd is not None else None for c in complete], 4)
    scales = [values[id(c.scale)][0] if isinstance(c.scale, torch.Tensor) else c.scale for c in complete]
    gyy = pooled([scaled(values, c.gyy, k) for c, k in zip(complete, scales, strict=True)], 1)
    bwd = pooled([scaled(values, c.bwd_x, k) for c, k in zip(complete, scales, strict=True)], 3)
    sig = metrics.pool_moments([values[id(c.sig)] if c.sig is not None else [] for c in complete])
    numel_x = sum(c.numel_x for c in complete)
    numel_y = sum(c.numel_y for c in complete)
    return len(complete), fwd, numel_x, numel_y, gyy[0], bwd, sig


def _metric_rows(pooled_blocks: Sequence[tuple[Any, ...]]) -> list[Row]:
    """The metric columns of every block of a step, finalized together (one numpy pass)."""
    calls, fwd, numel_x, numel_y, gyy, bwd, sig = zip(*pooled_blocks, strict=True)
    cols = metrics.finalize_many(
        np.array(fwd), np.array(numel_x), np.array(numel_y), np.array(gyy), np.array(bwd)
    )
    values = {k: v.tolist() for k, v in cols.items()}
    rows = [{"calls": n} for n in calls]
    for k, column in values.items():
        for row, v in zip(rows, column, strict=True):
            row[k] = v
    for row, moments in zip(rows, sig, strict=True):
        row.update(metrics.signal_columns(moments))
    return rows


def step_rows(
    step: int,
    calls: Sequence[CallStats],
    params: Mapping[str, torch.Tensor],
    jacobian: Mapping[str, Mapping[str, float]],
    index: Mapping[str, int],
    stacks: Callable[[list[str]], Mapping[str, str]],
) -> list[Row]:
    """One row per block of one step, in forward order, with every column of ``FRAME_COLUMNS``.

    ``params``: ``{block: [|theta|^2, |grad|^2, |delta|^2]}`` tensors; ``jacobian``: the
    Jacobian columns of the blocks that have them; ``index``: forward position of each block;
    ``stacks(names)``: ``{block: stack name}``. Every statistic, of every block, is copied to
    the host in one transfer per device. Missing values are NaN.
    """
    by_block: dict[str, list[CallStats]] = {}
    for call in calls:
        by_block.setdefault(call.block, []).append(call)
    if not by_block:
        return []
    stats = [t for c in calls for t in (c.fwd, c.sig, c.gyy, c.bwd_x) if t is not None]
    scales = {id(c.scale): c.scale for c in calls if isinstance(c.scale, torch.Tensor)}
    values = to_host(stats + list(params.values()) + list(scales.values()))
    rows = _metric_rows([_pooled_block(block_calls, values) for block_calls in by_block.values()])
    for name, row in zip(by_block, rows, strict=True):
        row.update(step=step, block=name, index=index.get(name, -1))
        p = params.get(name)
        row.update(param_columns(*(values[id(p)] if p is not None else (math.nan,) * 3)))
        row.update(jacobian.get(name, {}))
    rows.sort(key=lambda r: r["index"])
    names = stacks([r["block"] for r in rows])
    last_out: dict[str, float] = {}
    for row in rows:  # in forward order: the last row of a stack wins
        row["stack"] = names[row["block"]]
        last_out[row["stack"]] = row["grad_out"]
    for row in rows:
        row["cum_gain"] = metrics.cum_gain(row["grad_in"], last_out[row["stack"]])
    return [{c: r.get(c, math.nan) for c in FRAME_COLUMNS} for r in rows]


FINITE_COLUMNS = ("in_rms", "out_rms", "grad_out", "grad_in")


def non_finite(step: int, rows: Sequence[Row], excused: Callable[[str], bool]) -> str | None:
    """The warning for the first row with nan/inf in a basic column (None: all finite).

    ``excused(block)``: the block's NaN is by design (a capture warning said why).

    >>> non_finite(3, [{"block": "b", "index": 0, "in_rms": 1.0, "out_rms": float("nan"),
    ...                 "grad_out": 1.0, "grad_in": 1.0}], lambda b: False)[:49]
    'gradprobe: non-finite out_rms at step 3, block b '
    """
    for row in rows:
        if excused(row["block"]):
            continue
        bad = [c for c in FINITE_COLUMNS if not math.isfinite(row[c])]
        if bad:
            return (
                f"gradprobe: non-finite {', '.join(bad)} at step {step}, block {row['block']} "
                f"(index {row['index']}); recorded as is. Check the data and the loss for nan/inf "
                "(gradprobe.testing.assert_finite_gradients names the block)."
            )
    return None


@dataclass
class ParamSnapshots:
    """Copies of the probed parameters as of the last recorded step, for ``update_ratio``.

    ``taken`` (this step's copies, made at the end of each of its backward passes) becomes
    ``previous`` when the step closes; the copies it replaces are reused as buffers.
    ``enabled=False`` keeps no copy (``update_ratio`` is NaN).
    """

    enabled: bool = True
    previous: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    spare: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def held(self) -> int:
        """Parameter copies held between steps (0 with ``enabled=False``)."""
        return sum(len(v) for v in self.previous.values()) + sum(len(v) for v in self.spare.values())

    def stats(
        self, names: Sequence[str], groups: Sequence[Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """``{block: [|theta|^2, |grad|^2, |theta - previous|^2]}`` of every block, in one fused pass."""
        with torch.no_grad():
            stats = metrics.block_param_stats(groups, [self.previous.get(n) for n in names])
        return {n: stats[i] for i, n in enumerate(names)}

    def take(
        self,
        names: Sequence[str],
        groups: Sequence[Sequence[torch.Tensor]],
        taken: dict[str, list[torch.Tensor]],
    ) -> None:
        """Copy the parameters now into ``taken`` (reusing its buffers, or spare ones)."""
        if not self.enabled:
            return
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for n, params in zip(names, groups, strict=False):
            old = taken.get(n) or self.spare.pop(n, None)
            if old is None or len(old) != len(params):
                old = [torch.empty_like(p) for p in params]
            dst += old
            src += [p.detach() for p in params]
            taken[n] = old
        if dst:  # one fused copy for every block
            with torch.no_grad():
                torch._foreach_copy_(dst, src)

    def commit(self, taken: Mapping[str, list[torch.Tensor]]) -> None:
        """The copies of a closed recorded step become the ones the next recorded step compares with."""
        for name, snap in taken.items():
            old = self.previous.get(name)
            if old is not None:
                self.spare[name] = old
            self.previous[name] = snap
