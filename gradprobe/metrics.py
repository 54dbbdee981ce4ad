"""Metric definitions: the one place where a reader learns what each column means.

A probe sees, for every call of a block, its input ``x``, its output ``y``, and
in backward ``g_y = dL/dy`` and ``g_x = dL/dx`` (through this block only). It
reduces them at once to a handful of *sufficient statistics* (sums of squares
and dot products, in float32 or wider), because that is all the metrics need
and because statistics of several calls (weight sharing, gradient
accumulation micro-batches) pool exactly by adding them up: the pooled metric
equals the metric of the concatenated tensors.

``finalize`` turns pooled statistics into the columns of ``Probe.frame()``:

* ``grad_out = |g_y|``, ``grad_in = |g_x|``, ``gain = grad_in / grad_out``
* ``cum_gain = grad_in / grad_out(last block)``  (set by the probe, needs all blocks)
* same-shape blocks are read as ``y = x + F(x)``, so ``g_x = g_y + (dF/dx)^T g_y``:
  ``skip_grad = |g_y|``, ``branch_grad = |g_x - g_y|``,
  ``branch_cos = cos(g_y, g_x - g_y)``
* ``res_ratio = |y - r| / |r|`` and ``cos_xy = cos(r, y)`` with ``r = x``, or the
  shortcut's output when the block changes shape and has a shortcut
* ``in_rms = |x| / sqrt(numel x)``, ``out_rms = |y| / sqrt(numel y)``
* ``param_norm``, ``param_grad_norm``, ``update_ratio = |theta - theta_prev| / |theta|``

Norms are Euclidean over the whole batch tensor. Non-finite values propagate
as nan/inf; nothing here raises on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NAN = math.nan

# Layout of the statistics tensors (indices into the 1-D tensors below).
FWD_FIELDS = ("xx", "yy", "dd", "rr")  # |x|^2, |y|^2, |y - r|^2, |r|^2
BWD_Y_FIELDS = ("gyy",)  # |g_y|^2
BWD_X_FIELDS = ("gxx", "bb", "bg")  # |g_x|^2, |g_x - g_y|^2, <g_x - g_y, g_y>


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the tensor's own dtype when it is float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(-1).to(accumulation_dtype(t.dtype))


def _sq(a: torch.Tensor) -> torch.Tensor:
    # torch.dot is a single BLAS reduction: about twice as fast as vector_norm on CPU.
    return torch.dot(a, a)


def forward_stats(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``[|x|^2, |y|^2, |y - r|^2, |r|^2]`` for one call; ``r`` is ``ref`` (NaN entries if None).

    ``ref`` is the block input for shape-preserving blocks, the shortcut's
    output for projection blocks, or ``None`` when there is nothing to compare.

    >>> x = torch.ones(4); forward_stats(x, 2 * x, x).tolist()
    [4.0, 16.0, 4.0, 4.0]
    """
    fx, fy = _flat(x), _flat(y)
    xx, yy = _sq(fx), _sq(fy)
    if ref is None or ref.shape != y.shape:
        nan = torch.full((), NAN, dtype=xx.dtype, device=xx.device)
        return torch.stack([xx, yy, nan, nan])
    fr = fx if ref is x else _flat(ref)
    rr = xx if ref is x else _sq(fr)
    # The difference is formed explicitly, not as |y|^2 + |r|^2 - 2<y, r>: near the
    # identity that expansion cancels catastrophically (res_ratio would read 1e-4
    # for a block that is exactly the identity).
    d = fy.to(torch.promote_types(fy.dtype, fr.dtype)) - fr
    return torch.stack([xx, yy, _sq(d), rr.to(xx.dtype)])


def grad_out_stats(g_y: torch.Tensor) -> torch.Tensor:
    """``[|g_y|^2]`` for one call."""
    return _sq(_flat(g_y)).reshape(1)


def grad_in_stats(g_x: torch.Tensor, g_y: torch.Tensor | None) -> torch.Tensor:
    """``[|g_x|^2, |g_x - g_y|^2, <g_x - g_y, g_y>]``; the last two NaN without a same-shape ``g_y``."""
    fx = _flat(g_x)
    gxx = _sq(fx)
    if g_y is None or g_y.shape != g_x.shape:
        nan = torch.full((), NAN, dtype=gxx.dtype, device=gxx.device)
        return torch.stack([gxx, nan, nan])
    fy = _flat(g_y)
    b = fx - fy.to(fx.dtype)
    return torch.stack([gxx, _sq(b), torch.dot(b, fy.to(fx.dtype))])


def _div(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return NAN
    if b == 0.0:
        return NAN if a == 0.0 else math.copysign(math.inf, a)
    if math.isinf(a) and math.isinf(b):
        return NAN
    return a / b


def _sqrt(a: float) -> float:
    if math.isnan(a) or a < 0.0:
        return NAN
    return math.sqrt(a)


def finalize(
    fwd: Sequence[float],
    numel_x: int,
    numel_y: int,
    gyy: float,
    bwd_x: Sequence[float],
) -> dict[str, float]:
    """Columns of one (step, block) row from pooled statistics.

    ``fwd`` is the sum of :func:`forward_stats`, ``gyy`` of :func:`grad_out_stats`,
    ``bwd_x`` of :func:`grad_in_stats` (NaN when no gradient arrived).

    >>> row = finalize([4.0, 16.0, 4.0, 4.0], 4, 4, 1.0, [4.0, 1.0, 1.0])
    >>> row["gain"], row["res_ratio"], row["branch_cos"]
    (2.0, 1.0, 1.0)
    """
    xx, yy, dd, rr = fwd
    gxx, bb, bg = bwd_x
    grad_out, grad_in = _sqrt(gyy), _sqrt(gxx)
    branch = _sqrt(bb)
    same_shape = not math.isnan(bb)
    return {
        "grad_out": grad_out,
        "grad_in": grad_in,
        "gain": _div(grad_in, grad_out),
        "skip_grad": grad_out if same_shape else NAN,
        "branch_grad": branch,
        "branch_cos": _div(bg, branch * grad_out),
        "res_ratio": _div(_sqrt(dd), _sqrt(rr)),
        # <r, y> = (|r|^2 + |y|^2 - |y - r|^2) / 2: no extra pass over the tensors.
        "cos_xy": _div(0.5 * (rr + yy - dd), _sqrt(rr) * _sqrt(yy)),
        "in_rms": _sqrt(_div(xx, float(numel_x))),
        "out_rms": _sqrt(_div(yy, float(numel_y))),
    }


def cum_gain(grad_in: float, grad_out_last: float) -> float:
    """``grad_in`` of a block over ``grad_out`` of the last block: the product of the gains between them."""
    return _div(grad_in, grad_out_last)


def param_stats(
    params: Sequence[torch.Tensor], previous: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared ``[|theta|^2]``, ``[|grad theta|^2]`` and ``[|theta - previous|^2]`` as 0-d tensors.

    Parameters without a gradient count as zero gradient; with no parameter
    gradient at all the gradient entry is NaN. ``previous`` None gives NaN.
    """
    if not params:
        nan = torch.tensor(NAN)
        return nan, nan, nan
    device = params[0].device
    acc = accumulation_dtype(params[0].dtype)
    sq = torch.stack([_sq(_flat(p)).to(device=device, dtype=acc) for p in params]).sum()
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        gsq = torch.stack([_sq(_flat(g)).to(device=device, dtype=acc) for g in grads]).sum()
    else:
        gsq = torch.tensor(NAN, device=device, dtype=acc)
    if previous is None:
        dsq = torch.tensor(NAN, device=device, dtype=acc)
    else:
        dsq = torch.stack(
            [
                _sq(_flat(p) - _flat(q).to(device)).to(device=device, dtype=acc)
                for p, q in zip(params, previous, strict=False)
            ]
        ).sum()
    return sq, gsq, dsq
