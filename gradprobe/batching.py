"""Signal propagation moments of many block calls, reduced together at the end of a backward pass.

The per-channel moments (:func:`gradprobe.metrics.signal_many`) take about twenty kernels per
call whatever the tensor's size; on small blocks that fixed cost was half of the probe's. So
a block output of at most ``DEFER_BYTES`` is held (detached, with the residual ``y - r`` the
forward statistics formed anyway) until :meth:`SignalQueue.flush`, which the probe calls when
a backward pass ends, and all held outputs of one shape and dtype are reduced in one batch.
Larger outputs are reduced at once, as a batch of one, and so is every output once
``BUDGET_BYTES`` are held: what is held stays small. The values are the same bits either way.

Holding is safe only if nothing changes the output in place before the batch runs (the next
block's ``ReLU(inplace=True)`` would). So a block's outputs are first reduced at once and
watched (their version counters) until the backward pass ends; only a block whose outputs
were left alone is held from its next recorded step on, and one whose outputs changed never
is. Should a held output change after all, that call gets no moments (NaN, never a wrong
number) and :meth:`SignalQueue.flush` names its block, so that the caller warns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import metrics
from .rows import CallStats, full_precision

#: Outputs up to this size are held for a batch (1 MiB: a GPT-2 block at width 128, sequence 64,
#: batch 16 is 512 KiB); larger ones cost more in memory traffic than in kernel launches.
DEFER_BYTES = 1 << 20
#: At most this much is held (outputs and residuals); past it, outputs are reduced at once.
BUDGET_BYTES = 64 << 20


@dataclass
class _Held:
    call: CallStats
    y: torch.Tensor
    version: int
    residual: torch.Tensor | None
    axis: int


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

    def __init__(self, defer_bytes: int | None = None, budget: int | None = None) -> None:
        self.defer_bytes = DEFER_BYTES if defer_bytes is None else defer_bytes
        self.budget = BUDGET_BYTES if budget is None else budget
        self._held: list[_Held] = []
        self._watched: list[tuple[str, torch.Tensor, int]] = []
        self._bytes = 0  # held and watched: never more than the budget
        self._hold: set[str] = set()  # blocks whose outputs were left alone until a flush
        self._never: set[str] = set()  # blocks whose outputs something changed in place

    def __len__(self) -> int:
        """Outputs held or watched now."""
        return len(self._held) + len(self._watched)

    def add(self, call: CallStats, y: torch.Tensor, residual: torch.Tensor | None, axis: int) -> None:
        """Queue the moments of ``y`` (and ``residual``) for ``call``, or reduce them at once."""
        block = call.block
        size = y.numel() * y.element_size()
        held = size + (0 if residual is None else residual.numel() * residual.element_size())
        # Stacking makes tensors contiguous, which would change the order of a strided
        # tensor's reductions (and its last bits): those are reduced alone, in their layout.
        strided = not y.is_contiguous() or (residual is not None and not residual.is_contiguous())
        full = self._bytes + held > self.budget
        if strided or size > self.defer_bytes or block in self._never or full:
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
        self._never.update(changed)
        self._hold.difference_update(self._never)
        _reduce([h for h in held if h.y._version == h.version])
        return changed

    def clear(self) -> None:
        """Drop what is held (on detach)."""
        self._held, self._watched, self._bytes = [], [], 0


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
