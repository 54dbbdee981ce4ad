"""Statistics to rows: one step's raw statistics (tensors) become one row per block. Pure.

The probe's hooks reduce each block call to a few 0-d/1-d tensors (:mod:`gradprobe.metrics`);
at the end of a recorded step :func:`step_rows` takes all of them together, copies them to
the host in one transfer per device (one sync per step keeps a GPU pipeline intact), pools
the calls of each block and turns the sums into the columns of
:data:`gradprobe.records.FRAME_COLUMNS`. Nothing here needs a hook or a model, so it is
tested on hand-made statistics. :class:`ParamSnapshots` keeps the parameter copies that
``update_ratio`` needs between recorded steps; with sharded (``DTensor``) parameters its
statistics are this rank's shards summed over the ranks (one collective,
:mod:`gradprobe.sharding`).

>>> import torch
>>> f, g, b = ([torch.tensor(v) for v in vs] for vs in ([4.0, 4.0, 1.0, 4.0], [1.0], [4.0, 1.0, 1.0]))
>>> call = CallStats("b", fwd=tuple(f), numel_x=4, numel_y=4, gyy=g[0], bwd_x=tuple(b))
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

from . import metrics, sharding
from .records import FRAME_COLUMNS, SIGNAL_COLUMNS

Row = dict[str, Any]


@dataclass(eq=False)
class Slot:
    """A statistic reduced later with those of other calls (:mod:`gradprobe.batching`): element
    ``k`` of ``batch`` (flattened) once the batch is reduced; NaN while ``batch`` is None (a held
    tensor that changed in place before its batch ran).

    >>> s = Slot(); s.batch, s.k = torch.tensor([[1.0, 2.0]]), 1; s.tensor().item()
    2.0
    """

    batch: torch.Tensor | None = None
    k: int = 0

    def tensor(self) -> torch.Tensor | None:
        """The statistic as a 0-d tensor (None before its batch ran)."""
        return None if self.batch is None else self.batch.reshape(-1)[self.k]


#: One statistic of one call: a 0-d tensor, a :class:`Slot` of a batch, or None (NaN in the frame).
Stat = metrics.Stat | Slot


def _tensor(s: Stat) -> metrics.Stat:
    return s.tensor() if isinstance(s, Slot) else s


def _add(a: Stat, b: Stat) -> metrics.Stat:
    """Two passes' statistic summed (None if either is missing: a NaN in any pass stays NaN)."""
    ta, tb = _tensor(a), _tensor(b)
    return None if ta is None or tb is None else ta + tb


@dataclass
class CallStats:
    """Statistics of one call of one block within a step (0-d tensors without a graph, None where a
    statistic does not exist; the step's are stacked and copied to the host together)."""

    block: str
    fwd: tuple[Stat, ...] | None = None  # metrics.forward_stats: |x|^2, |y|^2, |y - r|^2, |r|^2
    # per-channel moments of y and y - r: row ``i`` of a (n, 2, 3, C) batch (metrics.signal_many)
    sig: tuple[torch.Tensor, int] | None = None
    numel_x: int = 0
    numel_y: int = 0
    gyy: Stat = None  # metrics.grad_out_stats of the backward passes' summed g_y
    bwd_x: tuple[Stat, ...] | None = None  # metrics.grad_in_stats of the summed g_x (and g_y)
    # GradScaler's loss scale (squared gradient statistics carry scale**2); a 1-element tensor
    # until the step's transfer to the host (see loss_scale)
    scale: float | torch.Tensor = 1.0
    # Several backward passes through one call add their gradients as vectors, as ``.grad`` adds
    # them: the first pass's g_y and g_x are held (references, no copy) where the caller allows,
    # and a second pass replaces them by the sums. Without them (not held) later passes pool as
    # sums of squares and ``squares`` says so.
    gy_sum: torch.Tensor | None = None
    gx_sum: torch.Tensor | None = None
    passes_y: int = 0
    passes_x: int = 0
    squares: bool = False

    def add_forward(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor | None:
        """The forward statistics of the call (``ref``: the tensor ``y - ref`` is the residual of);
        returns that residual for the signal moments (:func:`metrics.call_stats`)."""
        with torch.no_grad(), full_precision(y.device.type):
            self.fwd, residual = metrics.call_stats(x, y, ref)
            self.numel_x, self.numel_y = x.numel(), y.numel()
        return residual

    def add_grad_out(self, g_y: torch.Tensor, hold: bool = False, defer: Any = None) -> torch.Tensor:
        """Add one backward pass's ``g_y``; returns the g_y its ``g_x`` pairs with (the sum so far).
        ``hold``: keep the first pass's ``g_y`` should another pass come. ``defer``: a
        :class:`gradprobe.batching.SignalQueue` that may reduce the first pass's with others."""
        g_y = g_y.detach() if g_y.requires_grad else g_y  # (a create_graph pass's has a graph)
        slot = defer.grad_out(self, g_y) if defer is not None and self.passes_y == 0 else None
        if slot is not None:  # reduced later with other calls' (the common path: no work now)
            self.gyy, self.gy_sum = slot, (g_y if hold else None)
            self.passes_y += 1
            return g_y
        with _no_grad(), full_precision(g_y.device.type):
            if self.passes_y == 0:
                self.gyy = metrics.grad_out_stat(g_y)
                self.gy_sum = g_y if hold else None
            elif self.gy_sum is not None and self.gy_sum.shape == g_y.shape:
                self.gy_sum = self.gy_sum + g_y
                self.gyy = metrics.grad_out_stat(self.gy_sum)
            else:
                stat = metrics.grad_out_stat(g_y)
                self.gyy = stat if self.gyy is None else _add(self.gyy, stat)
                self.gy_sum, self.squares = None, True
        self.passes_y += 1
        return g_y if self.gy_sum is None else self.gy_sum

    def add_grad_in(
        self, g_x: torch.Tensor, g_y: torch.Tensor | None, hold: bool = False, defer: Any = None
    ) -> None:
        """Add one backward pass's ``g_x``; ``g_y``: what :meth:`add_grad_out` returned in this pass
        (None: shapes differ). ``hold``: keep the first pass's ``g_x`` should another pass come;
        ``defer`` as in :meth:`add_grad_out`."""
        g_x = g_x.detach() if g_x.requires_grad else g_x
        slots = defer.grad_in(self, g_x, g_y) if defer is not None and self.passes_x == 0 else None
        if slots is not None:  # reduced later with other calls' (or by a fused kernel)
            self.bwd_x, self.gx_sum = slots, (g_x if hold else None)
            self.passes_x += 1
            return
        with _no_grad(), full_precision(g_x.device.type):
            paired = self.passes_y == self.passes_x + 1  # this pass's g_y arrived (and only it)
            if self.passes_x == 0:
                self.bwd_x = metrics.grad_in_stat(g_x, g_y)
                self.gx_sum = g_x if hold else None
            elif (
                self.gx_sum is not None
                and self.gx_sum.shape == g_x.shape
                and paired
                and (g_y is None or g_y is self.gy_sum)
            ):
                self.gx_sum = self.gx_sum + g_x
                self.bwd_x = metrics.grad_in_stat(self.gx_sum, g_y)
            else:
                stats: tuple[Stat, ...] = metrics.grad_in_stat(g_x, g_y)
                if self.bwd_x is not None:  # a NaN (None) in any pass stays NaN
                    stats = tuple(_add(a, b) for a, b in zip(self.bwd_x, stats, strict=True))
                self.bwd_x = stats
                self.gx_sum, self.squares = None, True
        self.passes_x += 1

    def held_bytes(self) -> int:
        """Bytes of the gradients held for a later pass."""
        return sum(t.numel() * t.element_size() for t in (self.gy_sum, self.gx_sum) if t is not None)

    def drop_held(self) -> None:
        """Release the held gradients (a later pass then pools as sums of squares)."""
        self.gy_sum = self.gx_sum = None


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


def to_host(tensors: Sequence[torch.Tensor]) -> dict[int, Any]:
    """``{id(tensor): float64 values}``, each device's tensors leaving it in one transfer: a list
    for 0-d and 1-d tensors, a flat numpy array for larger ones (moments of many channels).

    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor(3.0)
    >>> values = to_host([a, b])
    >>> values[id(a)], values[id(b)]
    ([1.0, 2.0], [3.0])
    """
    # Per device: one stack of the 0-d tensors and one cat per dtype, each converted to float64
    # on the device (a float32 value converts exactly: the per-tensor .double() of every value,
    # in a few ops instead of one per statistic), then one cat and one copy to the host: one
    # synchronisation per device and step.
    by_device: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = {}
    for t in tensors:
        by_device.setdefault(t.device, {}).setdefault(t.dtype, []).append(t)
    out: dict[int, Any] = {}
    for kinds in by_device.values():
        head: list[torch.Tensor] = []  # 0-d and 1-d, as lists
        tail: list[torch.Tensor] = []  # larger, as arrays
        listed: list[torch.Tensor] = []
        arrays: list[torch.Tensor] = []
        for same in kinds.values():
            scalars = [t for t in same if t.dim() == 0]
            vectors = [t for t in same if t.dim() == 1]
            larger = [t for t in same if t.dim() > 1]
            chunk = ([torch.stack(scalars)] if scalars else []) + vectors
            if chunk:
                head.append((chunk[0] if len(chunk) == 1 else torch.cat(chunk)).double())
            if larger:
                tail.append(torch.cat([t.reshape(-1) for t in larger]).double())
            listed += scalars + vectors
            arrays += larger
        parts = head + tail
        flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().numpy()
        i = sum(t.numel() for t in listed)
        values = flat[:i].tolist()
        i = 0
        for t in listed:
            n = t.numel()
            out[id(t)] = values[i : i + n]
            i += n
        for t in arrays:
            n = t.numel()
            out[id(t)] = flat[i : i + n]
            i += n
    return out


def param_columns(psq: float, gsq: float, dsq: float) -> Row:
    """``param_norm``, ``param_grad_norm`` and ``update_ratio`` of squared sums (metrics.block_param_stats).

    >>> param_columns(4.0, 9.0, 1.0)
    {'param_norm': 2.0, 'param_grad_norm': 3.0, 'update_ratio': 0.5}
    """
    cols = metrics.param_columns_many(np.array([[psq, gsq, dsq]], dtype=np.float64))
    return {k: float(v[0]) for k, v in cols.items()}


#: The statistics of a call, one column each in :func:`_call_matrix`.
_FWD, _GYY, _BWD = slice(0, 4), 4, slice(5, 8)


def _call_matrix(calls: Sequence[CallStats], values: Mapping[int, Any]) -> np.ndarray:
    """``(calls, 8)``: each call's forward statistics, ``|g_y|^2`` and input-gradient statistics
    (:mod:`gradprobe.metrics`), the gradient ones divided by the square of the call's loss
    scale; NaN where a statistic is missing."""
    nan = math.nan
    none4, none3 = (None,) * 4, (None,) * 3
    flat: list[float] = []
    scale: list[float] = []
    for c in calls:
        for t in (*(c.fwd or none4), c.gyy, *(c.bwd_x or none3)):
            if isinstance(t, Slot):
                flat.append(nan if t.batch is None else values[id(t.batch)][t.k])
            else:
                flat.append(nan if t is None else values[id(t)][0])
        scale.append(values[id(c.scale)][0] if isinstance(c.scale, torch.Tensor) else c.scale)
    m = np.array(flat, dtype=np.float64).reshape(len(calls), 8)
    s = np.array(scale, dtype=np.float64)
    m[:, 4:] /= (s * s)[:, None]  # squared statistics carry scale**2 (GradScaler)
    return m


def _signal_values(values: Mapping[int, Any], sig: tuple[torch.Tensor, int] | None) -> Any:
    """One call's row of a signal moments batch (``[]``: none, which pools to NaN)."""
    if sig is None:
        return []
    batch, i = sig
    width = batch.numel() // batch.shape[0]
    return values[id(batch)][i * width : (i + 1) * width]


def _signal_columns(moments: Sequence[Any]) -> dict[str, list[float]]:
    """The signal columns of every block (pooled moments or None), all blocks with moments of one
    shape in one numpy pass."""
    out = {k: [math.nan] * len(moments) for k in SIGNAL_COLUMNS}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(moments):
        if m is not None and m.shape[-1]:
            by_shape.setdefault(m.shape, []).append(i)
    for members in by_shape.values():
        cols = metrics.signal_columns_many(np.stack([moments[i] for i in members]))
        for k, column in cols.items():
            for i, v in zip(members, column.tolist(), strict=True):
                out[k][i] = v
    return out


#: A block's ``[|theta|^2, |grad|^2, |delta|^2]``: a 3-element tensor, or row ``i`` of an ``(n, 3)``
#: tensor of every block's (:meth:`ParamSnapshots.stats`: no per-block kernel to slice it).
ParamStat = torch.Tensor | tuple[torch.Tensor, int]


def _param_batch(p: ParamStat) -> torch.Tensor:
    return p[0] if isinstance(p, tuple) else p


def _param_values(values: Mapping[int, Any], p: ParamStat) -> Any:
    if isinstance(p, tuple):
        return values[id(p[0])][3 * p[1] : 3 * p[1] + 3]
    return values[id(p)]


def step_rows(
    step: int,
    calls: Sequence[CallStats],
    params: Mapping[str, ParamStat],
    jacobian: Mapping[str, Mapping[str, float]],
    index: Mapping[str, int],
    stacks: Callable[[list[str]], Mapping[str, str]],
) -> list[Row]:
    """One row per block of one step, in forward order, with every column of ``FRAME_COLUMNS``.

    ``params``: ``{block: [|theta|^2, |grad|^2, |delta|^2]}`` (:data:`ParamStat`); ``jacobian``: the
    Jacobian columns of the blocks that have them; ``index``: forward position of each block;
    ``stacks(names)``: ``{block: stack name}``. Every statistic, of every block, is copied to
    the host in one transfer per device. The calls of a block are pooled by adding their
    statistics (calls without a backward pass are left out when others have one); every
    column is then computed for all blocks at once. Missing values are NaN.
    """
    by_block: dict[str, list[int]] = {}
    for i, call in enumerate(calls):
        by_block.setdefault(call.block, []).append(i)
    if not by_block:
        return []
    # Each statistic once (|r|^2 is |x|^2 itself where r is x), one entry per moments batch.
    tensors: dict[int, torch.Tensor] = {}
    for c in calls:
        for t in (*(c.fwd or ()), c.gyy, *(c.bwd_x or ())):
            t = t.batch if isinstance(t, Slot) else t  # a whole batch travels once
            if t is not None:
                tensors[id(t)] = t
    tensors.update((id(c.sig[0]), c.sig[0]) for c in calls if c.sig is not None)
    tensors.update((id(c.scale), c.scale) for c in calls if isinstance(c.scale, torch.Tensor))
    tensors.update((id(_param_batch(p)), _param_batch(p)) for p in params.values())
    values = to_host(list(tensors.values()))
    matrix = _call_matrix(calls, values)

    # Rows in forward order; pooled sums start from 0.0 and add the calls in order (np.add.at
    # is unbuffered), as Python's sum does.
    names = sorted(by_block, key=lambda n: index.get(n, -1))
    owner: list[int] = []
    members: list[int] = []
    moments = []
    for b, name in enumerate(names):
        idx = by_block[name]
        complete = [i for i in idx if calls[i].gyy is not None] or idx
        owner += [b] * len(complete)
        members += complete
        moments.append(metrics.pool_moments([_signal_values(values, calls[i].sig) for i in complete]))
    n = len(names)
    sums = np.zeros((n, 8))
    np.add.at(sums, owner, matrix[members])
    numel = np.zeros((n, 2), dtype=np.int64)
    np.add.at(numel, owner, np.array([(calls[i].numel_x, calls[i].numel_y) for i in members], dtype=np.int64))
    cols: dict[str, Any] = {
        k: v.tolist()
        for k, v in metrics.finalize_many(
            sums[:, _FWD], numel[:, 0], numel[:, 1], sums[:, _GYY], sums[:, _BWD]
        ).items()
    }
    cols["calls"] = np.bincount(owner, minlength=n).tolist()
    cols.update(_signal_columns(moments))
    nan3 = [math.nan] * 3
    p = np.array([_param_values(values, params[b]) if b in params else nan3 for b in names], dtype=np.float64)
    cols.update({k: v.tolist() for k, v in metrics.param_columns_many(p.reshape(n, 3)).items()})
    # cum_gain: grad_in over grad_out of the last block (in forward order) of the row's stack.
    stack_of = stacks(names)
    cols["stack"] = [stack_of[b] for b in names]
    last_out = dict(zip(cols["stack"], cols["grad_out"], strict=True))  # the last row of a stack wins
    cols["cum_gain"] = [
        metrics.cum_gain(g, last_out[s]) for g, s in zip(cols["grad_in"], cols["stack"], strict=True)
    ]
    cols.update(step=[step] * n, block=names, index=[index.get(b, -1) for b in names])
    for k in FRAME_COLUMNS:
        if k not in cols:
            cols[k] = [math.nan] * n
    for i, name in enumerate(names):
        for k, v in jacobian.get(name, {}).items():
            if k in cols:
                cols[k][i] = v
    return [
        dict(zip(FRAME_COLUMNS, row, strict=True))
        for row in zip(*(cols[k] for k in FRAME_COLUMNS), strict=True)
    ]


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

    def stats(self, names: Sequence[str], groups: Sequence[Sequence[torch.Tensor]]) -> dict[str, ParamStat]:
        """``{block: [|theta|^2, |grad|^2, |theta - previous|^2]}`` of every block, in one pass: rows of
        one ``(blocks, 3)`` tensor."""
        with torch.no_grad():
            grads = None
            if sharding.any_sharded(groups):  # FSDP2, tensor parallel: this rank's shards, then a sum
                groups, grads = sharding.local_groups(groups)
            stats = metrics.block_param_stats(groups, [self.previous.get(n) for n in names], grads)
            if grads is not None:
                stats = sharding.sum_over_ranks(stats)
        return {n: (stats, i) for i, n in enumerate(names)}

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
        if sharding.any_sharded(groups):  # copies of this rank's shards (what stats compares)
            groups = sharding.local_groups(groups)[0]
        for n, params in zip(names, groups, strict=False):
            old = taken.get(n) or self.spare.pop(n, None)
            if old is None or len(old) != len(params):
                old = [torch.empty_like(p) for p in params]
            dst += old
            src += params  # (copied under no_grad below: no graph, no detach needed)
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
