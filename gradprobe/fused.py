"""Fused statistics kernels: the statistics of a large block call in one pass over its tensors.

Taken eagerly, the forward statistics and signal moments of a call read the block's input and
output about fourteen times (a difference, three sums of squares, a shifted copy, sums and
norms per channel), and the input-gradient statistics about eight. On a convolutional net
those passes over activations of megabytes are the probe's cost. With ``attach(...,
fused=True)`` the statistics of calls whose tensors are too large to be batched
(:data:`gradprobe.batching.CPU_DEFER_BYTES` on the CPU, :data:`gradprobe.batching.DEFER_BYTES`
elsewhere; smaller ones are batched instead) are taken by two
kernels compiled with ``torch.compile``: one reads ``x`` and ``y`` once for ``|x|^2``,
``|y|^2``, ``|y - x|^2`` and the signal moments of ``y`` and ``y - x``; one reads ``g_x`` and
``g_y`` once for ``|g_x|^2``, ``|g_x - g_y|^2`` and ``<g_x - g_y, g_y>``. Both accumulate in
float64 (no under- or overflow, and the residuals are exact) and compile once for all shapes
(``dynamic=True``). The first call compiles them: seconds, once per machine and torch version
with inductor's on-disk cache. Where compiling or running a kernel fails (no C++ compiler for
the CPU, no Triton for a GPU) the probe warns once and takes the eager path from then on;
inside a model that is itself being compiled, the eager path is taken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

#: The compiled kernels, made at their first use (one compilation per process, for all probes).
_KERNELS: dict[str, Callable[..., Any]] = {}
_RAN: set[str] = set()  # kernels that ran once (compiled) in this process


def _forward_kernel(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[|x|^2, |y|^2, |y - x|^2]`` and the per-channel moments ``(1, 2, 3, C)`` (count, mean, M2 of
    ``y`` and of ``y - x``, as :func:`gradprobe.metrics.moments`) of ``(B, C, R)`` tensors."""
    xd, yd = x.double(), y.double()
    d = yd - xd  # exact: the difference of two float32 values is a float64 value
    count = y.shape[0] * y.shape[2]
    moments = []
    for v in (yd, d):
        shift = v[:1, :, :1]  # each channel's first value: no cancellation for a large mean
        s = v - shift
        s1 = s.sum((0, 2))
        s2 = (s * s).sum((0, 2))
        offset = s1 / count
        m2 = (s2 - count * offset * offset).clamp(min=0.0)
        moments.append(torch.stack([torch.full_like(offset, count), shift.reshape(-1) + offset, m2]))
    totals = torch.stack([(xd * xd).sum(), (yd * yd).sum(), (d * d).sum()])
    return totals, torch.stack(moments).unsqueeze(0)


def _grad_kernel(g_x: torch.Tensor, g_y: torch.Tensor) -> torch.Tensor:
    """``[|g_x|^2, |g_x - g_y|^2, <g_x - g_y, g_y>]`` of flat tensors, accumulated in float64."""
    a, y = g_x.double(), g_y.double()
    b = a - y
    return torch.stack([(a * a).sum(), (b * b).sum(), (b * y).sum()])


def _kernel(name: str) -> Callable[..., Any]:
    kernel = _KERNELS.get(name)
    if kernel is None:
        fn = _forward_kernel if name == "forward" else _grad_kernel
        kernel = _KERNELS[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return kernel


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def channel_view(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``t`` as ``(B, C, R)``: the axes before the channel axis, the channel axis, the ones after
    (no channel axis: ``(numel, 1, 1)``).

    >>> channel_view(torch.zeros(2, 3, 4, 5), 1).shape, channel_view(torch.zeros(6, 7), 1).shape
    (torch.Size([2, 3, 20]), torch.Size([6, 7, 1]))
    """
    if axis is None:
        return t.reshape(-1, 1, 1)
    shape = t.shape
    return t.view(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


class Fused:
    """The fused kernels of one probe: ``warn_once(key, message)`` says once that they failed."""

    def __init__(self, warn_once: Callable[[str, str], None]) -> None:
        self._warn_once = warn_once
        self.failed = False

    def _run(self, name: str, *args: torch.Tensor) -> Any:
        if self.failed or _compiling():
            return None
        try:
            with torch.no_grad():  # one grad mode for every call: no recompilation for it
                if name in _RAN:
                    return _kernel(name)(*args)
                with warnings.catch_warnings():  # torch's own notes while it compiles, once
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.* is deprecated")
                    got = _kernel(name)(*args)
                _RAN.add(name)
                return got
        except Exception as exc:
            self.failed = True
            self._warn_once(
                "fused",
                f"gradprobe: fused=True could not compile or run its statistics kernels "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the probe "
                "takes its statistics eagerly from now on (the same columns, at the eager cost).",
            )
            return None

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, axis: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``[|x|^2, |y|^2, |y - x|^2]`` and the signal moments (None without a channel axis) of a
        call of a block read as ``y = x + F(x)``, or None (take them eagerly)."""
        got = self._run("forward", channel_view(x, axis), channel_view(y, axis))
        if got is None:
            return None
        totals, moments = got
        return totals, (moments if axis is not None else None)

    def grad_in(self, g_x: torch.Tensor, g_y: torch.Tensor) -> torch.Tensor | None:
        """``[|g_x|^2, |g_x - g_y|^2, <g_x - g_y, g_y>]``, or None (take them eagerly)."""
        return self._run("grad", g_x.reshape(-1), g_y.reshape(-1))
