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
* signal propagation (Brock, De and Smith, ICLR 2021), per channel c of the block output y
  over every other axis (batch, positions): ``chan_mean_sq = mean_c (mean y_c)^2``,
  ``chan_var = mean_c var(y_c)``, ``branch_var = mean_c var((y - r)_c)``, population
  variances (ddof = 0). The channel axis is dim 1 of tensors with 4 or more dims
  (N, C, H, W), the last dim of 2-d and 3-d ones ((N, C), (N, T, C));
  ``attach(channel_dim=...)`` overrides it. ``chan_var + chan_mean_sq`` is the mean
  squared activation.

Norms are Euclidean over the whole batch tensor. Non-finite values propagate
as nan/inf; nothing here raises on them.

Complex tensors (complex-valued blocks) are vectors of C^n = R^2n: norms are
``sqrt(sum |z|^2)`` and dot products ``Re <a, b>``, so cosines are
``Re <a, b> / (|a| |b|)``; every statistic is real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

NAN = math.nan

# Layout of the statistics tensors (indices into the 1-D tensors below).
FWD_FIELDS = ("xx", "yy", "dd", "rr")  # |x|^2, |y|^2, |y - r|^2, |r|^2
BWD_Y_FIELDS = ("gyy",)  # |g_y|^2
BWD_X_FIELDS = ("gxx", "bb", "bg")  # |g_x|^2, |g_x - g_y|^2, <g_x - g_y, g_y>


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the tensor's own dtype when it is float32 or wider (complex stays complex)."""
    return torch.promote_types(dtype, torch.float32)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of statistics of a tensor of this dtype: float32 or wider, never complex.

    >>> real_dtype(torch.complex128), real_dtype(torch.float16)
    (torch.float64, torch.float32)
    """
    acc = accumulation_dtype(dtype)
    return acc.to_real() if acc.is_complex else acc


#: Dtypes that are their own accumulation dtype: the common case needs no promote_types call.
_WIDE = frozenset({torch.float32, torch.float64, torch.complex64, torch.complex128})


def _detached(t: torch.Tensor) -> torch.Tensor:
    # The probe calls these functions under no_grad, where detach is one more op for nothing.
    return t.detach() if torch.is_grad_enabled() else t


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # ``t.to(dtype)`` with t's own dtype returns t, but still goes through the dispatcher.
    return t if t.dtype == dtype else t.to(dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = _detached(t).reshape(-1)
    return t if t.dtype in _WIDE else _as(t, accumulation_dtype(t.dtype))


def _sq(a: torch.Tensor) -> torch.Tensor:
    if a.is_complex():
        return torch.vdot(a, a).real  # sum |z|^2
    # torch.dot is a single BLAS reduction: about twice as fast as vector_norm on CPU.
    return torch.dot(a, a)


def _re_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re <a, b>``: the real inner product, also of complex vectors (C^n as R^2n)."""
    if a.is_complex() or b.is_complex():
        dtype = torch.promote_types(a.dtype, b.dtype)
        return torch.vdot(_as(a, dtype), _as(b, dtype)).real
    return torch.dot(a, b)


def forward_stats(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``[|x|^2, |y|^2, |y - r|^2, |r|^2]`` for one call; ``r`` is ``ref`` (NaN entries if None).

    ``ref`` is the block input for shape-preserving blocks, the shortcut's
    output for projection blocks, or ``None`` when there is nothing to compare.

    >>> x = torch.ones(4); forward_stats(x, 2 * x, x).tolist()
    [4.0, 16.0, 4.0, 4.0]
    """
    return _forward(x, y, ref)[0]


def _forward(
    x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`forward_stats` and the flat residual ``y - r`` it formed (None without ``r``)."""
    fx, fy = _flat(x), _flat(y)
    xx, yy = _sq(fx), _sq(fy)
    common = xx.dtype if xx.dtype == yy.dtype else torch.promote_types(xx.dtype, yy.dtype)
    if ref is None or ref.shape != y.shape:
        nan = torch.full((), NAN, dtype=common, device=xx.device)
        return torch.stack([_as(xx, common), _as(yy, common), nan, nan]), None
    fr = fx if ref is x else _flat(ref)
    rr = xx if ref is x else _sq(fr)
    # The difference is formed explicitly, not as |y|^2 + |r|^2 - 2<y, r>: near the
    # identity that expansion cancels catastrophically (res_ratio would read 1e-4
    # for a block that is exactly the identity).
    d = (fy if fy.dtype == fr.dtype else fy.to(torch.promote_types(fy.dtype, fr.dtype))) - fr
    dd = _sq(d)
    return torch.stack([_as(xx, common), _as(yy, common), _as(dd, common), _as(rr, common)]), d


def call_stats(
    x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None, channel_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`forward_stats` and :func:`signal_stats` of one call (None for complex ``y``), the
    residual ``y - r`` formed once for both where that gives the same values (one pass fewer
    over the block output).

    >>> fwd, sig = call_stats(torch.ones(2, 2), torch.full((2, 2), 3.0), torch.ones(2, 2))
    >>> fwd.tolist(), sig[1, 2].tolist()  # |y - x|^2 = 16; the residual's M2 per channel
    ([4.0, 36.0, 16.0, 4.0], [0.0, 0.0])
    """
    fwd, d = _forward(x, y, ref)
    if y.is_complex():  # Brock et al.'s channel moments are defined for real activations
        return fwd, None
    # signal_stats forms y - r in y's dtype and layout: the same values as the flat residual
    # only when that dtype is y's and neither tensor needs a copy to be flattened.
    same = d is not None and ref is not None and d.dtype == y.dtype == ref.dtype
    shared = d.view(y.shape) if same and y.is_contiguous() and ref.is_contiguous() else None  # type: ignore[union-attr]
    return fwd, signal_stats(y, ref, channel_dim, residual=shared)


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
    dtype = fx.dtype if fx.dtype == fy.dtype else torch.promote_types(fx.dtype, fy.dtype)
    fy = _as(fy, dtype)
    b = _as(fx, dtype) - fy
    return torch.stack([_as(gxx, b.real.dtype), _sq(b), _re_dot(b, fy)])


def channel_axis(t: torch.Tensor, channel_dim: int | None = None) -> int | None:
    """The channel axis of ``t`` (see the module docstring); None for 0-d and 1-d tensors.

    >>> [channel_axis(torch.zeros(shape)) for shape in [(2, 3, 4, 4), (2, 5, 3), (3,)]]
    [1, 2, None]
    """
    if channel_dim is not None:
        return channel_dim % t.dim() if t.dim() else None
    if t.dim() < 2:
        return None
    return 1 if t.dim() >= 4 else t.dim() - 1


def _channel_moments(t: torch.Tensor, axis: int, scratch: bool = False) -> torch.Tensor:
    """(3, C) float64: count, mean and M2 (sum of squared deviations from the mean) of each channel.

    Shifted sums, not ``torch.var_mean``: over non-inner axes that is ~100x slower than a sum
    and a norm over contiguous rows. Each channel is shifted by one of its own values first, so
    that the variance is not the difference of two large numbers when the mean is large.
    ``scratch``: ``t`` is a temporary of the caller's that may be shifted in place.
    """
    t = _detached(t)
    if t.dtype not in _WIDE:
        t, scratch = t.to(accumulation_dtype(t.dtype)), True
    c = t.shape[axis]
    rows = math.prod(t.shape[axis + 1 :])
    view = t.reshape(-1, c, rows)
    shift = view[0, :, 0].clone().view(1, c, 1)
    d = view.sub_(shift) if scratch and view.data_ptr() == t.data_ptr() else view - shift
    if rows > 1:
        s1 = d.sum(-1).sum(0, dtype=torch.float64)
        s2 = torch.linalg.vector_norm(d, dim=-1).square().sum(0, dtype=torch.float64)
    else:
        flat = d.view(-1, c)
        s1 = flat.sum(0, dtype=torch.float64)
        s2 = torch.linalg.vector_norm(flat, dim=0, dtype=torch.float64).square()
    n = view.shape[0] * rows
    offset = s1 / n
    m2 = (s2 - n * offset * offset).clamp_(min=0.0)
    return torch.stack([torch.full_like(offset, n), shift.view(c).double() + offset, m2])


def signal_stats(
    y: torch.Tensor,
    ref: torch.Tensor | None,
    channel_dim: int | None = None,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Per-channel moments of ``y`` and of ``y - ref``: a ``(2, 3, C)`` tensor (count, mean, M2 for
    each channel), the second half NaN without a ``ref`` of y's shape; None when y has no channel axis.

    >>> signal_stats(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), None)[0].tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 0.0]]
    """
    axis = channel_axis(y, channel_dim)
    if axis is None:
        return None
    own = _channel_moments(y, axis)
    if ref is None or ref.shape != y.shape:
        return torch.stack([own, torch.full_like(own, NAN)])
    # ``residual``: y - ref already formed by the caller, a scratch tensor (shifted in place).
    diff = _detached(y) - _detached(ref) if residual is None else residual
    return torch.stack([own, _channel_moments(diff, axis, scratch=True)])


def pool_moments(parts: Sequence[Sequence[float]]) -> Any:
    """Pool per-call :func:`signal_stats` (flattened) into one ``(2, 3, C)`` array by Chan's parallel
    formula (exact: the moments of the concatenated calls); None if the calls disagree in size.

    >>> pool_moments([[1, 1, 4, 4, 0, 0] + [0.0] * 6, [1, 1, 2, 6, 0, 0] + [0.0] * 6])[0].tolist()
    [[2.0, 2.0], [3.0, 5.0], [2.0, 2.0]]
    """
    import numpy as np

    if not parts or len({len(p) for p in parts}) != 1 or len(parts[0]) % 6:
        return None
    arrays = [np.asarray(p, dtype=np.float64).reshape(2, 3, -1) for p in parts]
    n, mean, m2 = (v.copy() for v in np.moveaxis(arrays[0], 1, 0))
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN halves (no reference) stay NaN
        for other in arrays[1:]:
            nb, mb, m2b = other[:, 0], other[:, 1], other[:, 2]
            total = n + nb
            delta = mb - mean
            mean = mean + delta * nb / total
            m2 = m2 + m2b + delta * delta * n * nb / total
            n = total
    return np.stack([n, mean, m2], axis=1)


def signal_columns(pooled: Any) -> dict[str, float]:
    """``chan_mean_sq``, ``chan_var`` and ``branch_var`` from :func:`pool_moments`' ``(2, 3, C)`` array.

    >>> import numpy as np
    >>> signal_columns(np.array([[[2.0, 2.0], [2.0, 0.0], [2.0, 2.0]], [[2.0, 2.0], [0.0, 0.0], [0.0, 8.0]]]))
    {'chan_mean_sq': 2.0, 'chan_var': 1.0, 'branch_var': 2.0}
    """
    if pooled is None or pooled.shape[-1] == 0:
        return {"chan_mean_sq": NAN, "chan_var": NAN, "branch_var": NAN}
    import numpy as np

    (n, mean, m2), (dn, _, dm2) = pooled
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "chan_mean_sq": float((mean * mean).mean()),
            "chan_var": float((m2 / n).mean()),
            "branch_var": float((dm2 / dn).mean()),
        }


def safe_div(a: float, b: float) -> float:
    """``a / b`` where a ratio exists: NaN for 0/0, inf/inf or a NaN operand, signed inf for x/0.

    >>> safe_div(1.0, 0.0), safe_div(0.0, 0.0)
    (inf, nan)
    """
    if math.isnan(a) or math.isnan(b):
        return NAN
    if b == 0.0:
        return NAN if a == 0.0 else math.copysign(math.inf, a)
    if math.isinf(a) and math.isinf(b):
        return NAN
    return a / b


def safe_sqrt(a: float) -> float:
    """The root of a squared sum; NaN for NaN or a negative value (never an exception).

    >>> safe_sqrt(4.0), safe_sqrt(-1.0)
    (2.0, nan)
    """
    if math.isnan(a) or a < 0.0:
        return NAN
    return math.sqrt(a)


def _div_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise ``a / b``: NaN for 0/0, NaN in and inf/inf; +-inf for x/0 (rounded as ``math``)."""
    out = a / b
    zero = (b == 0.0) & ~np.isnan(a)
    if zero.any():
        out = np.where(zero, np.where(a == 0.0, NAN, np.copysign(np.inf, a)), out)
    return out


def finalize_many(
    fwd: np.ndarray, numel_x: np.ndarray, numel_y: np.ndarray, gyy: np.ndarray, bwd_x: np.ndarray
) -> dict[str, np.ndarray]:
    """The columns of many (step, block) rows at once: ``fwd`` (n, 4), ``bwd_x`` (n, 3), the rest (n,).

    ``fwd`` holds pooled :func:`forward_stats`, ``gyy`` pooled :func:`grad_out_stats`,
    ``bwd_x`` pooled :func:`grad_in_stats` (NaN where no gradient arrived). One numpy
    pass instead of Python work per statistic; :func:`finalize` is the one-row case.

    >>> cols = finalize_many(np.array([[4.0, 16.0, 4.0, 4.0]]), np.array([4]), np.array([4]),
    ...                      np.array([1.0]), np.array([[4.0, 1.0, 1.0]]))
    >>> cols["gain"].tolist(), cols["res_ratio"].tolist(), cols["branch_cos"].tolist()
    ([2.0], [1.0], [1.0])
    """
    with np.errstate(all="ignore"):  # NaN/inf in and out, and sqrt of negatives -> NaN
        xx, yy, dd, rr = np.asarray(fwd, dtype=np.float64).T
        gxx, bb, bg = np.asarray(bwd_x, dtype=np.float64).T
        grad_out, grad_in = np.sqrt(np.asarray(gyy, dtype=np.float64)), np.sqrt(gxx)
        branch, sqrt_rr = np.sqrt(bb), np.sqrt(rr)
        return {
            "grad_out": grad_out,
            "grad_in": grad_in,
            "gain": _div_many(grad_in, grad_out),
            "skip_grad": np.where(np.isnan(bb), NAN, grad_out),  # same-shape blocks only
            "branch_grad": branch,
            "branch_cos": _div_many(bg, branch * grad_out),
            "res_ratio": _div_many(np.sqrt(dd), sqrt_rr),
            # <r, y> = (|r|^2 + |y|^2 - |y - r|^2) / 2: no extra pass over the tensors.
            "cos_xy": _div_many(0.5 * (rr + yy - dd), sqrt_rr * np.sqrt(yy)),
            "in_rms": np.sqrt(_div_many(xx, np.asarray(numel_x, dtype=np.float64))),
            "out_rms": np.sqrt(_div_many(yy, np.asarray(numel_y, dtype=np.float64))),
        }


def finalize(
    fwd: Sequence[float],
    numel_x: int,
    numel_y: int,
    gyy: float,
    bwd_x: Sequence[float],
) -> dict[str, float]:
    """Columns of one (step, block) row from pooled statistics (see :func:`finalize_many`).

    >>> row = finalize([4.0, 16.0, 4.0, 4.0], 4, 4, 1.0, [4.0, 1.0, 1.0])
    >>> row["gain"], row["res_ratio"], row["branch_cos"]
    (2.0, 1.0, 1.0)
    """
    cols = finalize_many(
        np.array([fwd]), np.array([numel_x]), np.array([numel_y]), np.array([gyy]), np.array([bwd_x])
    )
    return {k: float(v[0]) for k, v in cols.items()}


def cum_gain(grad_in: float, grad_out_last: float) -> float:
    """``grad_in`` of a block over ``grad_out`` of the last block: the product of the gains between them."""
    return safe_div(grad_in, grad_out_last)


def _as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as the real tensor of its (re, im) pairs, which has the same norm."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _sum_sq(tensors: Sequence[torch.Tensor], acc: torch.dtype, device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.tensor(NAN, device=device, dtype=acc)
    if all(t.device == device for t in tensors):
        # One fused kernel launch for all tensors instead of one reduction each.
        norms = torch._foreach_norm([_as_real(t.detach()) for t in tensors], 2, dtype=acc)
        return torch.stack(norms).square().sum()
    return torch.stack([_sq(_flat(t)).to(device=device, dtype=acc) for t in tensors]).sum()


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
    acc = real_dtype(params[0].dtype)
    sq = _sum_sq(params, acc, device)
    gsq = _sum_sq([p.grad for p in params if p.grad is not None], acc, device)
    if previous is None:
        dsq = torch.tensor(NAN, device=device, dtype=acc)
    else:
        diffs = torch._foreach_sub(
            [p.detach() for p in params], [q.to(p.device) for p, q in zip(params, previous, strict=False)]
        )
        dsq = _sum_sq(diffs, acc, device)
    return sq, gsq, dsq


def block_param_stats(
    groups: Sequence[Sequence[torch.Tensor]], previous: Sequence[Sequence[torch.Tensor] | None]
) -> torch.Tensor:
    """:func:`param_stats` of many blocks at once: a ``(blocks, 3)`` tensor of squared sums.

    One fused ``_foreach_norm`` over every parameter of every block instead of a
    handful of kernels per block: the per-step cost stays flat as blocks grow.
    """
    flat = [p for g in groups for p in g]
    devices = {p.device for p in flat}
    if len(devices) != 1 or any(
        g and prev is not None and len(prev) != len(g) for g, prev in zip(groups, previous, strict=False)
    ):
        return torch.stack(
            [
                torch.stack(param_stats(g, prev)).cpu().double()
                for g, prev in zip(groups, previous, strict=False)
            ]
        )
    (device,) = devices
    acc = real_dtype(flat[0].dtype)
    n = len(groups)
    # One fused _foreach_norm over parameters, then gradients, then differences to the
    # previous snapshot, summed per block into one (3 * blocks) vector by one index_add_.
    # (Per target the additions run in the same order as one index_add_ per kind: same values.)
    tensors = [_detached(p) for p in flat]
    owner = [i for i, g in enumerate(groups) for _ in g]
    with_grad = [i for i, p in enumerate(flat) if p.grad is not None]
    tensors += [flat[i].grad for i in with_grad]  # type: ignore[misc]
    owner += [n + owner[i] for i in with_grad]
    known = [i for i, prev in enumerate(previous) if prev is not None]
    if known:
        cur = [_detached(p) for i in known for p in groups[i]]
        old = [q for i in known for q in previous[i]]  # type: ignore[union-attr]
        tensors += list(torch._foreach_sub(cur, old))
        owner += [2 * n + i for i in known for _ in groups[i]]
    sums = torch.zeros(3 * n, device=device, dtype=acc)
    if tensors:
        sq = torch.stack(torch._foreach_norm([_as_real(t) for t in tensors], 2, dtype=acc)).square_()
        # Made from a host list and copied without blocking: no device-to-host sync on a GPU.
        sums.index_add_(0, torch.tensor(owner, dtype=torch.long).to(device, non_blocking=True), sq)
    # NaN where a block has no parameter, no gradient, or no previous snapshot.
    has_grad = {owner[i] for i in with_grad}
    has_prev = set(known)
    missing = (
        [not g for g in groups]
        + [i not in has_grad for i in range(n)]
        + [i not in has_prev for i in range(n)]
    )
    if any(missing):
        mask = torch.tensor(missing).to(device, non_blocking=True)
        sums = torch.where(mask, torch.full_like(sums, NAN), sums)
    return sums.view(3, n).t()
