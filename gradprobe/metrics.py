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

Norms are Euclidean over the whole batch tensor. They neither underflow nor overflow where
the tensor's values are finite: a float32 sum of squares or products that may have lost
terms to float32's range (gradients of 1e-25, activations of 1e18) is taken in float64
(:func:`_sq`), so it reads its true value to float32 precision. Non-finite values in the
tensors propagate as nan/inf; nothing here raises on them.

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


#: The smallest normal and the largest float32: a float32 sum of n squares (or products) at least
#: ``n * _TINY32`` lost under ``2**-24`` of itself to underflow (each term rounds by at most
#: ``2**-150`` in the subnormal range), and one at most ``_MAX32`` did not overflow.
_TINY32 = torch.finfo(torch.float32).tiny
_MAX32 = torch.finfo(torch.float32).max
#: Dtypes whose squares a float32 reduction may under- or overflow (half types come here as float32).
_NARROW = frozenset({torch.float32, torch.complex64})


def _sq64(a: torch.Tensor) -> torch.Tensor:
    """``|a|^2`` accumulated in float64: no float32 under- or overflow in any term."""
    return torch.linalg.vector_norm(_as_real(a), dtype=torch.float64).square()


def _sq(a: torch.Tensor) -> torch.Tensor:
    """``|a|^2`` of a flat tensor, exact to its dtype's precision over float64's range.

    Float32 squares underflow below 1e-23 and overflow above 1.8e19 per element (a loss
    scaled by 1e-25, a deep plain net's vanishing gradient, activations of 1e18). On the
    CPU the float32 reduction runs first (one BLAS call) and is redone in float64 only when
    its value says that it may have under- or overflowed: a host read of a CPU scalar costs
    no synchronisation. Elsewhere (accelerators) it accumulates in float64 at once, in the
    same single pass over the tensor.
    """
    return _sq_read(a)[0]


def _sq_read(a: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """:func:`_sq` and its value where it was read on the host (float32 on the CPU), else None."""
    dtype = a.dtype
    host = reads_host(a)
    if dtype is torch.float32 and host:  # the common case first: one BLAS call, one host read
        # torch.dot is a single BLAS reduction: about twice as fast as vector_norm on CPU.
        s = torch.dot(a, a)
        v = s.item()
        if a.numel() * _TINY32 <= v <= _MAX32:
            return s, v
        n = a.numel()
    elif dtype not in _NARROW:
        return (torch.vdot(a, a).real if a.is_complex() else torch.dot(a, a)), None
    elif not host:
        return _sq64(a), None
    else:
        s = torch.vdot(a, a).real
        v = s.item()
        n = 2 * a.numel()
    if n * _TINY32 <= v <= _MAX32 or math.isnan(v):  # NaN: the tensor holds NaN (float64 agrees)
        return s, v
    if v == 0.0 and not a.any():
        return s, v  # exactly zero, not underflow
    s64 = _sq64(a)
    return s64, s64.item()


def _re_dot(a: torch.Tensor, b: torch.Tensor, narrow: bool = False) -> torch.Tensor:
    """``Re <a, b>``: the real inner product, also of complex vectors (C^n as R^2n).

    Float32 vectors are multiplied in float64 unless ``narrow`` (the caller knows, from
    :func:`narrow_ok`, that float32 products neither under- nor overflow).
    """
    if a.is_complex() or b.is_complex():
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = _as(a, dtype), _as(b, dtype)
    if not narrow and (a.dtype in _NARROW or b.dtype in _NARROW):
        wide = torch.complex128 if a.is_complex() else torch.float64
        a, b = _as(a, wide), _as(b, wide)
    return torch.vdot(a, b).real if a.is_complex() else torch.dot(a, b)


def narrow_ok(n: int, lo: float, hi: float) -> bool:
    """Whether a float32 sum of ``n`` products whose ``|a| |b|`` lies in ``[lo, hi]`` is exact to
    float32 precision: ``|a| |b|`` bounds every partial sum (no overflow up to float32's largest
    value) and the rounding of subnormal products (under ``2**-24`` of it above ``n * tiny``).
    NaN bounds (the tensors hold NaN) are fine: float64 would give NaN too."""
    if math.isnan(lo) or math.isnan(hi) or hi == 0.0:  # NaN, or a zero vector: exact either way
        return True
    return n * _TINY32 <= lo and hi <= _MAX32


def reads_host(t: torch.Tensor) -> bool:
    """Whether the statistics of ``t`` take the CPU's path: values read on the host where that
    saves work (a CPU tensor's values are on the host: no synchronisation). Every such choice
    asks this one function; ``benchmarks/profile_probe.py --as-accelerator`` replaces it to count
    the operators and host reads of the path that accelerators take."""
    return t.is_cpu


def host_checked(t: torch.Tensor) -> bool:
    """Whether a batch is reduced in float32 and its values checked on the host: float32 on the CPU,
    where a host read costs no synchronisation and widening costs memory traffic. Elsewhere the
    batch is widened to float64 at once (no host read; a GPU's cost is its kernels)."""
    return t.dtype == torch.float32 and reads_host(t)


def row_squares(rows: torch.Tensor) -> torch.Tensor:
    """``|row|^2`` of each row of a 2-d tensor, float64, exact to the rows' precision over float64's
    range: float32 rows on the CPU are reduced in float32 and the rows whose value says that
    float32 may have under- or overflowed are redone in float64 (as :func:`_sq`).

    >>> squares = row_squares(torch.tensor([[3.0, 4.0], [2.0**-100, 0.0]]))  # float32 squares underflow
    >>> squares[0].item(), squares[1].item() == 2.0**-200
    (25.0, True)
    """
    if not host_checked(rows):
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).square_()
    out = torch.linalg.vector_norm(rows, dim=1).double().square_()
    low = rows.shape[1] * _TINY32  # a float32 sum of squares above it lost nothing to underflow
    bad = [i for i, v in enumerate(out.tolist()) if not low <= v <= _MAX32 and not math.isnan(v)]
    if bad:
        zero = [i for i in bad if out[i] == 0.0]
        if zero:  # an exact zero row is exact; a zero from underflowed squares is not
            nonzero = rows[zero].ne(0).any(1).tolist()
            bad = [i for i in bad if i not in zero] + [i for i, nz in zip(zero, nonzero, strict=True) if nz]
        if bad:
            out[bad] = torch.linalg.vector_norm(rows[bad].double(), dim=1).square_()
    return out


def row_dots(a: torch.Tensor, b: torch.Tensor, aa: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
    """``<a_i, b_i>`` of each pair of rows, float64; ``aa``, ``bb``: their :func:`row_squares`. Float32
    rows on the CPU are multiplied in float32 where ``|a_i| |b_i|`` shows that float32 neither
    under- nor overflows (:func:`narrow_ok`), the others in float64.

    >>> a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    >>> row_dots(a, b, row_squares(a), row_squares(b)).tolist()
    [11.0]
    """
    if not host_checked(a):
        return torch.linalg.vecdot(a.double(), b.double())
    out = torch.linalg.vecdot(a, b).double()
    n = a.shape[1]
    bounds = (aa * bb).sqrt_().tolist()  # |a_i| |b_i| bounds the partial sums
    bad = [i for i, v in enumerate(bounds) if not narrow_ok(n, v, v)]
    if bad:
        out[bad] = torch.linalg.vecdot(a[bad].double(), b[bad].double())
    return out


#: One statistic of one call: a 0-d tensor, or None where it does not exist (NaN in the frame).
#: The probe keeps them apart and stacks a whole step's at once (one kernel, not one per call).
Stat = torch.Tensor | None


def stacked(stats: Sequence[Stat]) -> torch.Tensor:
    """Statistics as one 1-d tensor of their widest dtype, NaN for the missing ones.

    >>> stacked([torch.tensor(2.0), None]).tolist()
    [2.0, nan]
    """
    present = [s for s in stats if s is not None]
    dtype = present[0].dtype
    for s in present[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    nan = torch.full((), NAN, dtype=dtype, device=present[0].device)
    return torch.stack([nan if s is None else _as(s, dtype) for s in stats])


def forward_stats(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``[|x|^2, |y|^2, |y - r|^2, |r|^2]`` for one call; ``r`` is ``ref`` (NaN entries if None).

    ``ref`` is the block input for shape-preserving blocks, the shortcut's
    output for projection blocks, or ``None`` when there is nothing to compare.

    >>> x = torch.ones(4); forward_stats(x, 2 * x, x).tolist()
    [4.0, 16.0, 4.0, 4.0]
    """
    return stacked(_forward(x, y, ref)[0])


def _forward(
    x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None
) -> tuple[tuple[Stat, ...], torch.Tensor | None]:
    """:func:`forward_stats` as four :data:`Stat`, and the flat residual ``y - r`` it formed (None
    without ``r``)."""
    fx, fy = _flat(x), _flat(y)
    xx, yy = _sq(fx), _sq(fy)
    if ref is None or ref.shape != y.shape:
        return (xx, yy, None, None), None
    fr = fx if ref is x else _flat(ref)
    rr = xx if ref is x else _sq(fr)
    # The difference is formed explicitly, not as |y|^2 + |r|^2 - 2<y, r>: near the
    # identity that expansion cancels catastrophically (res_ratio would read 1e-4
    # for a block that is exactly the identity).
    d = (fy if fy.dtype == fr.dtype else fy.to(torch.promote_types(fy.dtype, fr.dtype))) - fr
    # Each statistic keeps its own dtype (float64 where float32 would have under- or
    # overflowed): the step's statistics reach the host as float64 anyway.
    return (xx, yy, _sq(d), rr), d


def call_stats(
    x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None
) -> tuple[tuple[Stat, ...], torch.Tensor | None]:
    """:func:`forward_stats` of one call (as :data:`Stat`) and the residual ``y - r`` for
    :func:`signal_many`, formed once for both where that gives the same values (one pass fewer
    over the block output); None without a reference of y's shape or for a complex ``y``.

    >>> fwd, d = call_stats(torch.ones(2, 2), torch.full((2, 2), 3.0), torch.ones(2, 2))
    >>> stacked(fwd).tolist(), d.tolist()  # |y - x|^2 = 16
    ([4.0, 36.0, 16.0, 4.0], [2.0, 2.0, 2.0, 2.0])
    """
    fwd, d = _forward(x, y, ref)
    if d is None or ref is None or y.is_complex():  # Brock et al.'s moments are of real activations
        return fwd, None
    # The residual of signal_stats is formed in y - ref's dtype and layout (the reductions' order
    # follows the layout): the flat one above is the same tensor only when that dtype is y's and
    # ref's own and neither needed a copy to be flattened.
    if d.dtype == y.dtype == ref.dtype and y.is_contiguous() and ref.is_contiguous():
        return fwd, d
    return fwd, _detached(y) - _detached(ref)


def grad_out_stats(g_y: torch.Tensor) -> torch.Tensor:
    """``[|g_y|^2]`` for one call."""
    return grad_out_stat(g_y).reshape(1)


def grad_out_stat(g_y: torch.Tensor) -> torch.Tensor:
    """``|g_y|^2`` as a 0-d tensor."""
    return _sq(_flat(g_y))


def grad_in_stats(g_x: torch.Tensor, g_y: torch.Tensor | None) -> torch.Tensor:
    """``[|g_x|^2, |g_x - g_y|^2, <g_x - g_y, g_y>]``; the last two NaN without a same-shape ``g_y``."""
    return stacked(grad_in_stat(g_x, g_y))


def grad_in_stat(g_x: torch.Tensor, g_y: torch.Tensor | None) -> tuple[Stat, Stat, Stat]:
    """:func:`grad_in_stats` as three :data:`Stat` (None without a same-shape ``g_y``)."""
    fx = _flat(g_x)
    gxx, vxx = _sq_read(fx)
    if g_y is None or g_y.shape != g_x.shape:
        return gxx, None, None
    fy = _flat(g_y)
    dtype = fx.dtype if fx.dtype == fy.dtype else torch.promote_types(fx.dtype, fy.dtype)
    fy = _as(fy, dtype)
    b = _as(fx, dtype) - fy
    bb, vbb = _sq_read(b)
    ok = False
    if vxx is not None and vbb is not None and b.dtype in _NARROW:
        # |g_y| = |g_x - b| lies within |g_x| -+ |b|: bounds of |b| |g_y| from the two norms read
        # on the host (CPU scalars, no synchronisation). Elsewhere the product runs in float64.
        nx, nb = math.sqrt(vxx), math.sqrt(vbb)
        n = b.numel() * (2 if b.is_complex() else 1)
        ok = narrow_ok(n, nb * abs(nx - nb), nb * (nx + nb))
    return gxx, bb, _re_dot(b, fy, ok)


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


def moments(v: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """(n, 3, C) float64: count, mean and M2 (sum of squared deviations from the mean) of each
    channel of each of n tensors stacked as ``v`` of shape (n, B, C, rows).

    Shifted sums, not ``torch.var_mean``: over non-inner axes that is ~100x slower than a sum
    and a norm over contiguous rows. Each channel is shifted by one of its own values first, so
    that the variance is not the difference of two large numbers when the mean is large.
    ``scratch``: ``v`` is a temporary of the caller's that may be shifted in place. Every
    reduction runs per tensor along the same axes as for one tensor alone: the moments of a
    tensor are the same bits whether it is reduced alone or stacked with others.
    """
    v = _detached(v)
    if v.dtype not in _WIDE:
        v, scratch = v.to(accumulation_dtype(v.dtype)), True
    n, _, c, rows = v.shape
    shift = v[:, 0, :, 0].clone().view(n, 1, c, 1)
    d = v.sub_(shift) if scratch else v - shift
    if rows > 1:
        s1 = d.sum(-1).sum(1, dtype=torch.float64)
        s2 = torch.linalg.vector_norm(d, dim=-1).square().sum(1, dtype=torch.float64)
    else:
        # Channels last: the reduction runs down a strided axis, where vector_norm is ~5x
        # slower than a sum. Squares of float32 values are exact in float64, so their float64
        # sum is also closer than the squared norm (rounded at its sqrt and at its square).
        flat = d.view(n, -1, c).double()
        s1 = flat.sum(1)
        s2 = flat.square_().sum(1)
    count = v.shape[1] * rows
    offset = s1 / count
    m2 = (s2 - count * offset * offset).clamp_(min=0.0)
    return torch.stack([torch.full_like(offset, count), shift.view(n, c).double() + offset, m2], 1)


def signal_many(
    ys: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor | None], axis: int
) -> torch.Tensor:
    """:func:`signal_stats` of n calls at once: an ``(n, 2, 3, C)`` tensor, one reduction per kind for
    all of them (the per-block cost of small blocks is the number of kernels, not their size).

    ``ys``: block outputs of one shape and dtype; ``residuals``: each one's ``y - r``
    (:func:`call_stats`; y's shape, or flat when y is contiguous), all None (NaN halves) or all
    of one shape, scratch the caller gives up (shifted in place); ``axis``: the channel axis of
    the ys (:func:`channel_axis`). Each row equals
    the call's :func:`signal_stats` bit for bit, for a single tensor in any layout and for
    several contiguous ones (reductions follow the layout, and stacking makes it contiguous).

    >>> y = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    >>> signal_many([y, 2 * y], [None, None], 1)[1, 0].tolist()  # count, mean, M2 per channel
    [[2.0, 2.0], [4.0, 4.0], [8.0, 0.0]]
    """
    first = ys[0]
    c, rows = first.shape[axis], math.prod(first.shape[axis + 1 :])
    n = len(ys)
    # One tensor reduces through a view of itself (a copy only where its layout needs one); many
    # are stacked once into a scratch copy that can be shifted in place.
    v = _detached(first).reshape(1, -1, c, rows) if n == 1 else torch.stack([_detached(y) for y in ys])
    own = moments(v.view(n, -1, c, rows), scratch=n > 1)
    if residuals[0] is None:
        return torch.stack([own, torch.full_like(own, NAN)], 1)
    r = residuals[0].reshape(1, -1, c, rows) if n == 1 else torch.stack(residuals)  # type: ignore[arg-type]
    return torch.stack([own, moments(r.view(n, -1, c, rows), scratch=True)], 1)


def signal_stats(
    y: torch.Tensor,
    ref: torch.Tensor | None,
    channel_dim: int | None = None,
) -> torch.Tensor | None:
    """Per-channel moments of ``y`` and of ``y - ref``: a ``(2, 3, C)`` tensor (count, mean, M2 for
    each channel), the second half NaN without a ``ref`` of y's shape; None when y has no channel axis.

    >>> signal_stats(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), None)[0].tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 0.0]]
    """
    axis = channel_axis(y, channel_dim)
    if axis is None:
        return None
    diff = _detached(y) - _detached(ref) if ref is not None and ref.shape == y.shape else None
    return signal_many([y], [diff], axis)[0]


def pool_moments(parts: Sequence[Sequence[float]]) -> Any:
    """Pool per-call :func:`signal_stats` (flattened) into one ``(2, 3, C)`` array by Chan's parallel
    formula (exact: the moments of the concatenated calls); None if the calls disagree in size.

    >>> pool_moments([[1, 1, 4, 4, 0, 0] + [0.0] * 6, [1, 1, 2, 6, 0, 0] + [0.0] * 6])[0].tolist()
    [[2.0, 2.0], [3.0, 5.0], [2.0, 2.0]]
    """
    if not parts or len({len(p) for p in parts}) != 1 or len(parts[0]) % 6:
        return None
    if len(parts) == 1:  # one call: nothing to pool
        return np.asarray(parts[0], dtype=np.float64).reshape(2, 3, -1)
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
        pooled = np.full((2, 3, 1), NAN)
    return {k: float(v[0]) for k, v in signal_columns_many(pooled[None]).items()}


def signal_columns_many(pooled: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`signal_columns` of n rows at once: ``pooled`` is ``(n, 2, 3, C)``, one numpy pass."""
    n, mean, m2 = pooled[:, 0, 0], pooled[:, 0, 1], pooled[:, 0, 2]
    dn, dm2 = pooled[:, 1, 0], pooled[:, 1, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "chan_mean_sq": (mean * mean).mean(-1),
            "chan_var": (m2 / n).mean(-1),
            "branch_var": (dm2 / dn).mean(-1),
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


def param_columns_many(squares: np.ndarray) -> dict[str, np.ndarray]:
    """``param_norm``, ``param_grad_norm`` and ``update_ratio`` of n blocks from ``(n, 3)`` squared
    sums ``[|theta|^2, |grad theta|^2, |theta - theta_prev|^2]`` (:func:`block_param_stats`).

    >>> param_columns_many(np.array([[4.0, 9.0, 1.0]]))["update_ratio"].tolist()
    [0.5]
    """
    with np.errstate(all="ignore"):  # NaN in, NaN out; the root of a negative sum is NaN
        psq, gsq, dsq = np.asarray(squares, dtype=np.float64).T
        norm = np.sqrt(psq)
        return {
            "param_norm": norm,
            "param_grad_norm": np.sqrt(gsq),
            "update_ratio": _div_many(np.sqrt(dsq), norm),
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
    """``grad_in`` of a block over ``grad_out`` of the last block of its stack (a ratio of two measured
    norms, not the product of the gains between them)."""
    return safe_div(grad_in, grad_out_last)


def _as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as the real tensor of its (re, im) pairs, which has the same norm."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _wide(acc: torch.dtype) -> torch.dtype:
    """The dtype squared norms are kept in: float64 for float32 (whose squares under- and overflow)."""
    return torch.float64 if acc == torch.float32 else acc


def _squared_norms(tensors: Sequence[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """``|t|^2`` of each tensor (all on one device) as one 1-d tensor of :func:`_wide` dtype, from
    one fused ``_foreach_norm``. Float32 norms run in float64 off the CPU; on the CPU in float32
    first, and again in float64 for those whose value says that they may have under- or
    overflowed (as :func:`_sq`; a host read of CPU values costs no synchronisation)."""
    real = [_as_real(_detached(t)) for t in tensors]
    if acc != torch.float32:
        return torch.stack(torch._foreach_norm(real, 2, dtype=acc)).square_()
    if not reads_host(real[0]):
        return torch.stack(torch._foreach_norm(real, 2, dtype=torch.float64)).square_()
    norms = torch.stack(torch._foreach_norm(real, 2, dtype=acc))
    wide = norms.double()
    for i, v in enumerate(norms.tolist()):
        # vector_norm's float32 sum of squares: exact above n * tiny, finite below float32's largest
        safe = real[i].numel() * _TINY32 <= v * v <= _MAX32 or math.isnan(v)
        if not safe and (v != 0.0 or real[i].any()):  # (an exact zero is safe)
            wide[i] = torch.linalg.vector_norm(real[i], dtype=torch.float64)
    return wide.square_()


def _sum_sq(tensors: Sequence[torch.Tensor], acc: torch.dtype, device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.tensor(NAN, device=device, dtype=_wide(acc))
    if all(t.device == device for t in tensors):
        return _squared_norms(tensors, acc).sum()  # one fused kernel for all tensors
    return torch.stack([_sq(_flat(t)).to(device=device, dtype=_wide(acc)) for t in tensors]).sum()


def param_stats(
    params: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor] | None,
    grads: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared ``[|theta|^2]``, ``[|grad theta|^2]`` and ``[|theta - previous|^2]`` as 0-d tensors.

    Parameters without a gradient count as zero gradient; with no parameter
    gradient at all the gradient entry is NaN. ``previous`` None gives NaN. ``grads``: the
    parameters' gradients (default: each one's ``.grad``; the local shards of sharded ones).
    """
    if grads is None:
        grads = [p.grad for p in params]
    if not params:
        nan = torch.tensor(NAN)
        return nan, nan, nan
    device = params[0].device
    acc = real_dtype(params[0].dtype)
    sq = _sum_sq(params, acc, device)
    gsq = _sum_sq([g for g in grads if g is not None], acc, device)
    if previous is None:
        dsq = torch.tensor(NAN, device=device, dtype=_wide(acc))
    else:
        diffs = torch._foreach_sub(
            [p.detach() for p in params], [q.to(p.device) for p, q in zip(params, previous, strict=False)]
        )
        dsq = _sum_sq(diffs, acc, device)
    return sq, gsq, dsq


#: Elements of one concatenated group of parameters (:func:`_block_param_stats_cpu`): bounds the
#: memory its copies take at once.
GROUP_ELEMENTS = 1 << 22


def _block_param_stats_cpu(
    groups: Sequence[Sequence[torch.Tensor]],
    previous: Sequence[Sequence[torch.Tensor] | None],
    flat_grads: Sequence[torch.Tensor | None],
    n: int,
) -> torch.Tensor:
    """:func:`block_param_stats` of float32 parameters on the CPU: the tensors of one shape
    concatenated (in chunks of at most :data:`GROUP_ELEMENTS` elements) and reduced one row per
    tensor in float32 (:func:`row_squares`: rows that float32 may have under- or overflowed redone
    in float64), the rows summed into their blocks by one ``index_add_``. On the CPU the per-tensor
    kernels of ``_foreach_norm`` (a loop there) cost more than the copies."""
    tensors: list[torch.Tensor] = []
    owner: list[int] = []  # the entry of the (3 * blocks) sums: kind * blocks + block
    old: list[torch.Tensor | None] = []
    for i, g in enumerate(groups):
        tensors += [_detached(p) for p in g]
        owner += [i] * len(g)
        old += [None] * len(g)
    for j, grad in enumerate(flat_grads):
        if grad is not None:
            tensors.append(grad)
            owner.append(n + owner[j])
            old.append(None)
    for i, prev in enumerate(previous):
        if prev is not None:
            for p, q in zip(groups[i], prev, strict=True):
                tensors.append(_detached(p))
                owner.append(2 * n + i)
                old.append(q)
    sums = torch.zeros(3 * n, dtype=torch.float64)
    chunks: dict[tuple[Any, ...], list[list[int]]] = {}
    sizes: dict[tuple[Any, ...], int] = {}
    for k, t in enumerate(tensors):
        key = (tuple(t.shape), old[k] is not None)  # one row per tensor: tensors of one shape
        parts = chunks.setdefault(key, [[]])
        if parts[-1] and sizes[key] + t.numel() > GROUP_ELEMENTS:
            parts.append([])
            sizes[key] = 0
        parts[-1].append(k)
        sizes[key] = sizes.get(key, 0) + t.numel()
    for (_, diff), parts in chunks.items():
        for members in parts:
            rows = stacked_rows([tensors[k] for k in members])
            if diff:
                rows = rows - stacked_rows([old[k] for k in members])  # type: ignore[misc]
            index = torch.tensor([owner[k] for k in members])
            sums.index_add_(0, index, row_squares(rows))
    # NaN where a block has no parameter, no gradient, or no previous snapshot.
    has_grad = {owner[k] for k in range(len(owner)) if n <= owner[k] < 2 * n}
    missing = (
        [not g for g in groups]
        + [n + i not in has_grad for i in range(n)]
        + [prev is None for prev in previous]
    )
    if any(missing):
        sums[torch.tensor(missing)] = NAN
    return sums.view(3, n).t()


def stacked_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors of one shape as the rows of one ``(n, numel)`` tensor (a view for one of them)."""
    if len(tensors) == 1:
        return tensors[0].reshape(1, -1)
    if tensors[0].dim() == 0:
        return torch.stack(list(tensors)).reshape(len(tensors), -1)
    return torch.cat(list(tensors)).reshape(len(tensors), -1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor made from a host list, on ``device`` without blocking (no device-to-host sync)."""
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def block_param_stats(
    groups: Sequence[Sequence[torch.Tensor]],
    previous: Sequence[Sequence[torch.Tensor] | None],
    grads: Sequence[Sequence[torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """:func:`param_stats` of many blocks at once: a ``(blocks, 3)`` tensor of squared sums.

    One fused ``_foreach_norm`` over every parameter of every block instead of a
    handful of kernels per block: the per-step cost stays flat as blocks grow. ``grads``:
    each block's parameter gradients (default: their ``.grad``).
    """
    if grads is None:
        grads = [[p.grad for p in g] for g in groups]
    flat = [p for g in groups for p in g]
    flat_grads = [q for g in grads for q in g]
    devices = {p.device for p in flat}
    if len(devices) != 1 or any(
        g and prev is not None and len(prev) != len(g) for g, prev in zip(groups, previous, strict=False)
    ):
        return torch.stack(
            [
                torch.stack(param_stats(g, prev, gr)).cpu().double()
                for g, prev, gr in zip(groups, previous, grads, strict=False)
            ]
        )
    (device,) = devices
    acc = real_dtype(flat[0].dtype)
    n = len(groups)
    if reads_host(flat[0]) and all(p.dtype == torch.float32 for p in flat):
        return _block_param_stats_cpu(groups, previous, flat_grads, n)
    # One fused _foreach_norm over parameters, then gradients, then differences to the
    # previous snapshot, summed per block into one (3 * blocks) vector by one index_add_.
    # (Per target the additions run in the same order as one index_add_ per kind: same values.)
    tensors = [_detached(p) for p in flat]
    owner = [i for i, g in enumerate(groups) for _ in g]
    with_grad = [i for i, g in enumerate(flat_grads) if g is not None]
    tensors += [flat_grads[i] for i in with_grad]  # type: ignore[misc]
    owner += [n + owner[i] for i in with_grad]
    known = [i for i, prev in enumerate(previous) if prev is not None]
    if known:
        cur = [_detached(p) for i in known for p in groups[i]]
        old = [q for i in known for q in previous[i]]  # type: ignore[union-attr]
        tensors += list(torch._foreach_sub(cur, old))
        owner += [2 * n + i for i in known for _ in groups[i]]
    sums = torch.zeros(3 * n, device=device, dtype=_wide(acc))
    if tensors:
        sq = _squared_norms(tensors, acc)
        # Made from a host list and copied without blocking: no device-to-host sync on a GPU.
        sums.index_add_(0, _to_device(torch.tensor(owner, dtype=torch.long), device), sq)
    # NaN where a block has no parameter, no gradient, or no previous snapshot.
    has_grad = {owner[i] for i in with_grad}
    has_prev = set(known)
    missing = (
        [not g for g in groups]
        + [i not in has_grad for i in range(n)]
        + [i not in has_prev for i in range(n)]
    )
    if any(missing):
        mask = _to_device(torch.tensor(missing), device)
        sums = torch.where(mask, torch.full_like(sums, NAN), sums)
    return sums.view(3, n).t()
