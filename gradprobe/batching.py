"""Statistics of many block calls, reduced together at the end of a backward pass.

On small blocks the probe's cost is the number of kernels per call, not the size of its tensors.
So the tensors of a call of at most ``DEFER_BYTES`` each are held, by reference, until
:meth:`SignalQueue.flush` (which the probe calls when a backward pass ends, and when a step
closes), and the held tensors of one shape and dtype are reduced in one batch for all calls:

* a block's input and output (same shape, the block read as ``y = x + F(x)``): ``|x|^2``,
  ``|y|^2``, ``|y - x|^2`` and the signal moments of ``y`` and ``y - x``;
* the first backward pass's ``g_y`` (``|g_y|^2``), and ``g_x`` with the ``g_y`` it pairs with
  (``|g_x|^2``, ``|g_x - g_y|^2``, ``<g_x - g_y, g_y>``);
* the block outputs whose forward statistics were taken at once (their signal moments).

On accelerators the batches are widened to float64 (their sums neither under- nor overflow);
on the CPU float32 batches are reduced in float32 and the rows whose values say that float32
may have under- or overflowed are redone in float64 (a host read costs nothing there, and
widening costs memory traffic). Either way no statistic reads the host per call. Larger
tensors are reduced at once (their memory traffic, not their kernels, is the cost), and so is
everything once ``BUDGET_BYTES`` are held: what is held stays small.

Holding is safe only if nothing changes a held tensor in place before the batch runs (the next
block's ``ReLU(inplace=True)`` would). So a block's outputs are first reduced at once and
watched (their version counters) until the backward pass ends; only a block whose outputs
were left alone is held from its next recorded step on, and one whose outputs changed never
is. Should a held tensor change after all, that call gets NaN for what it would have given
(never a wrong number) and :meth:`SignalQueue.flush` names its block, so that the caller warns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import metrics
from .rows import CallStats, Slot, full_precision

#: Tensors up to this size are held for a batch (1 MiB: a GPT-2 block at width 128, sequence 64,
#: batch 16 is 512 KiB); larger ones cost more in memory traffic than in kernel launches.
DEFER_BYTES = 1 << 20
#: On the CPU, tensors up to this size (64 KiB): past it, copying a tensor into a batch costs more
#: than the kernels the batch saves (the fused kernels, where enabled, take the larger ones).
CPU_DEFER_BYTES = 64 << 10
#: At most this much is held (all kinds together); past it, tensors are reduced at once.
BUDGET_BYTES = 64 << 20


@dataclass
class _Held:
    call: CallStats
    y: torch.Tensor
    version: int
    residual: torch.Tensor | None
    axis: int


#: Dtypes whose calls are batched (others, complex and half types among them, are reduced at once).
_BATCHED = frozenset({torch.float32, torch.float64})


@dataclass(eq=False)
class _Forward:
    """A call's input and output, held for its forward statistics (and signal moments)."""

    call: CallStats
    x: torch.Tensor
    y: torch.Tensor
    versions: tuple[int, int]
    axis: int | None
    slots: tuple[Slot, Slot, Slot]  # |x|^2 (also |r|^2), |y|^2, |y - x|^2


@dataclass(eq=False)
class _Grad:
    """A first backward pass's gradient (``g_y``, or ``g_x`` with the ``g_y`` it pairs with)."""

    call: CallStats
    g: torch.Tensor
    pair: torch.Tensor | None
    versions: tuple[int, int]
    slots: tuple[Slot, ...]


class SignalQueue:
    """Block outputs waiting for their signal propagation moments (``call.sig``).

    >>> queue, y = SignalQueue(), torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    >>> first, second = CallStats("b"), CallStats("b")
    >>> queue.add(first, y, None, 1)  # a new block: reduced at once, and watched
    >>> first.sig is None, queue.flush()
    (False, [])
    >>> queue.add(second, y, None, 1)  # its output was left alone: now held
    >>> second.sig is None, queue.flush(), second.sig[0].shape
    (True, [], torch.Size([1, 2, 3, 2]))
    """

    def __init__(self, defer_bytes: int | None = None, budget: int | None = None, fused: Any = None) -> None:
        self.defer_bytes = DEFER_BYTES if defer_bytes is None else defer_bytes
        self.cpu_defer_bytes = (
            self.defer_bytes if defer_bytes is not None else min(DEFER_BYTES, CPU_DEFER_BYTES)
        )
        self.budget = BUDGET_BYTES if budget is None else budget
        self.fused = fused  # a gradprobe.fused.Fused for the large calls, or None (eager)
        self._held: list[_Held] = []
        self._forward: list[_Forward] = []
        self._grads: list[_Grad] = []
        self._watched: list[tuple[str, torch.Tensor, int]] = []
        self._bytes = 0  # held and watched: never more than the budget
        self._hold: set[str] = set()  # blocks whose outputs were left alone until a flush
        self._never: set[str] = set()  # blocks whose outputs something changed in place

    def __len__(self) -> int:
        """Calls whose tensors are held or watched now."""
        return len(self._held) + len(self._watched) + len(self._forward) + len(self._grads)

    def _room(self, tensors: Sequence[torch.Tensor]) -> int | None:
        """The bytes of ``tensors`` if they can be held for a batch (small, contiguous, float32 or
        float64 on one device, within the budget), else None."""
        first = tensors[0]
        size = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            if n > self._limit(t) or t.dtype not in _BATCHED or not t.is_contiguous():
                return None
            if t.dtype != first.dtype or t.device != first.device:
                return None
            size += n
        return size if self._bytes + size <= self.budget else None

    def _limit(self, t: torch.Tensor) -> int:
        """The largest tensor held for a batch: smaller on the CPU, where a batch's copies cost more
        than the kernels they save once a tensor is past a cache's size."""
        return self.cpu_defer_bytes if metrics.reads_host(t) else self.defer_bytes

    def _large(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether same-dtype contiguous float32/float64 tensors are too large to be held (the fused
        kernels' calls)."""
        first = tensors[0]
        return (
            first.numel() * first.element_size() > self._limit(first)
            and first.dtype in _BATCHED
            and all(
                t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors
            )
        )

    def forward(self, call: CallStats, x: torch.Tensor, y: torch.Tensor, axis: int | None) -> bool:
        """Hold the input and output of a call of a block read as ``y = x + F(x)`` for its forward
        statistics and signal moments (``axis``: the channel axis, None for none); False when the
        caller is to take them now (a block whose outputs were not yet seen left alone, large or
        strided tensors, other dtypes, a full budget)."""
        if x.shape != y.shape:
            return False
        if self.fused is not None and self._large((x, y)):
            got = self.fused.forward(x, y, axis)
            if got is not None:
                totals, moments = got
                xx = Slot(totals, 0)
                call.fwd = (xx, Slot(totals, 1), Slot(totals, 2), xx)
                call.numel_x = call.numel_y = y.numel()
                if moments is not None:
                    call.sig = (moments, 0)
                return True
        if call.block not in self._hold:
            return False
        size = self._room((x, y))
        if size is None:
            return False
        # Held as they are (a detach per tensor is an op more per call): a held tensor keeps its
        # graph alive only until the flush, which comes at the end of the backward pass, or before
        # the next forward pass (Taps.prune) where no backward pass came.
        slots = (Slot(), Slot(), Slot())
        call.fwd = (slots[0], slots[1], slots[2], slots[0])  # |r|^2 is |x|^2: r is x
        call.numel_x = call.numel_y = y.numel()
        self._forward.append(_Forward(call, x, y, (x._version, y._version), axis, slots))
        self._bytes += 2 * size  # (the batch widens and stacks them)
        return True

    def grad_out(self, call: CallStats, g_y: torch.Tensor) -> Slot | None:
        """Hold a first pass's ``g_y`` for ``|g_y|^2``; None when the caller is to take it now."""
        size = None if call.block in self._never else self._room((g_y,))
        if size is None:
            return None
        slot = Slot()
        self._grads.append(_Grad(call, g_y, None, (g_y._version, 0), (slot,)))
        self._bytes += size
        return slot

    def grad_in(
        self, call: CallStats, g_x: torch.Tensor, g_y: torch.Tensor | None
    ) -> tuple[Slot, Slot | None, Slot | None] | None:
        """Hold a first pass's ``g_x`` (and the same-shape ``g_y`` it pairs with) for ``|g_x|^2``,
        ``|g_x - g_y|^2`` and ``<g_x - g_y, g_y>``; None when the caller is to take them now."""
        pair = g_y if g_y is not None and g_y.shape == g_x.shape else None
        if pair is not None and self.fused is not None and self._large((g_x, pair)):
            stats = self.fused.grad_in(g_x, pair)
            if stats is not None:
                return Slot(stats, 0), Slot(stats, 1), Slot(stats, 2)
        size = None if call.block in self._never else self._room((g_x,) if pair is None else (g_x, pair))
        if size is None:
            return None
        if pair is None:
            slot = Slot()
            self._grads.append(_Grad(call, g_x, None, (g_x._version, 0), (slot,)))
            self._bytes += size
            return slot, None, None
        slots = (Slot(), Slot(), Slot())
        self._grads.append(_Grad(call, g_x, pair, (g_x._version, pair._version), slots))
        self._bytes += size
        return slots

    def add(self, call: CallStats, y: torch.Tensor, residual: torch.Tensor | None, axis: int) -> None:
        """Queue the moments of ``y`` (and ``residual``) for ``call``, or reduce them at once."""
        block = call.block
        size = y.numel() * y.element_size()
        held = size + (0 if residual is None else residual.numel() * residual.element_size())
        # Stacking makes tensors contiguous, which would change the order of a strided
        # tensor's reductions (and its last bits): those are reduced alone, in their layout.
        strided = not y.is_contiguous() or (residual is not None and not residual.is_contiguous())
        full = self._bytes + held > self.budget
        if strided or size > self._limit(y) or block in self._never or full:
            _reduce([_Held(call, y, 0, residual, axis)])
            return
        # Detached: a held output must not keep its graph (and the saved tensors) alive.
        if block not in self._hold:
            _reduce([_Held(call, y, 0, residual, axis)])
            self._watched.append((block, y.detach(), y._version))
            self._bytes += size
            return
        self._held.append(_Held(call, y.detach(), y._version, residual, axis))
        self._bytes += held

    def flush(self) -> list[str]:
        """End of a backward pass: judge the watched outputs and reduce the held ones; the blocks
        whose held output changed in place meanwhile (no moments)."""
        held, self._held = self._held, []
        watched, self._watched = self._watched, []
        self._bytes = 0
        for block, y, version in watched:
            if y._version != version:
                self._never.add(block)
            elif block not in self._never:
                self._hold.add(block)
        changed = [h.call.block for h in held if h.y._version != h.version]
        forward, self._forward = self._forward, []
        kept: list[_Forward] = []
        for f in forward:
            if (f.x._version, f.y._version) == f.versions:
                kept.append(f)
            else:  # its slots stay empty: NaN
                changed.append(f.call.block)
        grads, self._grads = self._grads, []
        fresh = []
        for g in grads:
            if (g.g._version, 0 if g.pair is None else g.pair._version) == g.versions:
                fresh.append(g)
            else:  # its slots stay empty: NaN
                changed.append(g.call.block)
        self._never.update(changed)
        self._hold.difference_update(self._never)
        _reduce([h for h in held if h.y._version == h.version])
        _reduce_forward(kept)
        _reduce_grads(fresh)
        return list(dict.fromkeys(changed))

    def clear(self) -> None:
        """Drop what is held (on detach)."""
        self._held, self._watched, self._bytes = [], [], 0
        self._forward, self._grads = [], []


def _reduce(held: Sequence[_Held]) -> None:
    groups: dict[tuple[Any, ...], list[_Held]] = {}
    for h in held:
        r = h.residual
        key = (h.y.shape, h.y.dtype, h.y.device, h.axis, None if r is None else (r.shape, r.dtype))
        groups.setdefault(key, []).append(h)
    for group in groups.values():
        y = group[0].y
        with torch.no_grad(), full_precision(y.device.type):
            sig = metrics.signal_many([h.y for h in group], [h.residual for h in group], group[0].axis)
        for i, h in enumerate(group):
            h.call.sig = (sig, i)


def _groups(items: Sequence[Any], key: Any) -> list[list[Any]]:
    out: dict[Any, list[Any]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return list(out.values())


def _reduce_forward(held: Sequence[_Forward]) -> None:
    """Forward statistics (and signal moments) of held calls, one batch per shape and dtype."""
    for group in _groups(held, lambda f: (f.y.shape, f.y.dtype, f.y.device, f.axis)):
        n, y = len(group), group[0].y
        with torch.no_grad(), full_precision(y.device.type):
            both = metrics.stacked_rows([f.x for f in group] + [f.y for f in group]).view(2, n, -1)
            d = both[1] - both[0]  # in the tensors' dtype, as the statistics taken at once
            rows3 = torch.cat([both.view(2 * n, -1), d])  # x of each call, then y, then y - x
            sq = metrics.row_squares(rows3)
            for i, f in enumerate(group):
                for j, slot in enumerate(f.slots):
                    slot.batch, slot.k = sq, j * n + i
            axis = group[0].axis
            if axis is None:
                continue
            c, rows = y.shape[axis], math.prod(y.shape[axis + 1 :])
            # the rows of y and y - x are scratch now: the moments shift them in place
            both_moments = metrics.moments(rows3[n:].reshape(2 * n, -1, c, rows), scratch=True)
            sig = both_moments.view(2, n, 3, c).transpose(0, 1)  # (n, 2, 3, C): y's, then y - x's
        for i, f in enumerate(group):
            f.call.sig = (sig, i)


def _reduce_grads(held: Sequence[_Grad]) -> None:
    """Gradient statistics of held first passes, one batch per kind, shape and dtype."""
    for group in _groups(held, lambda g: (g.pair is None, g.g.shape, g.g.dtype, g.g.device)):
        n, g = len(group), group[0].g
        with torch.no_grad(), full_precision(g.device.type):
            if group[0].pair is None:
                sq = metrics.row_squares(metrics.stacked_rows([h.g for h in group]))
                for i, h in enumerate(group):
                    h.slots[0].batch, h.slots[0].k = sq, i
                continue
            both = metrics.stacked_rows([h.g for h in group] + [h.pair for h in group]).view(2, n, -1)
            if not metrics.host_checked(both):
                both = both.double()  # then b is exact for float32 gradients
            b = both[0] - both[1]  # g_x - g_y
            sq = metrics.row_squares(torch.cat([both[0], b, both[1]]))  # |g_x|^2, |b|^2, |g_y|^2
            bg = metrics.row_dots(b, both[1], sq[n : 2 * n], sq[2 * n :])
            stats = torch.cat([sq[: 2 * n], bg])  # |g_x|^2 of each call, then |b|^2, then <b, g_y>
        for i, h in enumerate(group):
            for j, slot in enumerate(h.slots):
                slot.batch, slot.k = stats, j * n + i
