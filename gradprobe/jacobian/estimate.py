"""Hutchinson and Lanczos estimates of the Jacobian columns, on the live forward graph.

``jac_fro``, ``jac_id`` and ``prod_fro`` are Hutchinson estimates (Rademacher vectors);
``jac_spec`` and ``prod_spec`` come from Golub-Kahan-Lanczos bidiagonalisation, started
at the best probe. Nothing here runs a block again (re-running has side effects): vector-
Jacobian products go through the graph the caller captured, Jacobian-vector products by
the double-backward trick. The definitions, knobs and measured costs are in the README
("One-shot analysis, Jacobians and spectra").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from ..capture import BlockCapture, GradNode

Tensor = torch.Tensor

_NAN = float("nan")
_COLUMNS = ("jac_fro", "jac_spec", "jac_id", "prod_fro", "prod_spec")


def _breakdown(dtype: torch.dtype) -> float:
    # Relative size below which a vector left after orthogonalisation is rounding noise:
    # the subspace is invariant (or a new probe was dependent on the others).
    return 100 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------- small helpers
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Lanczos bases and dot products in float32 or wider whatever the model's dtype.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.vdot(a.reshape(-1), b.reshape(-1)))


def _sqnorm(a: Tensor) -> float:
    return _dot(a, a)


def _rademacher(like: Tensor, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Random +-1 tensor shaped like ``like``, drawn on the generator's device, then moved to ``like``'s."""
    r = torch.randint(0, 2, like.shape, generator=generator, device=generator.device, dtype=dtype)
    return r.mul_(2).sub_(1).to(like.device)


class _NoJVP(RuntimeError):
    """The graph between x and y cannot be differentiated twice (custom Function, fused kernel)."""


def _warn_no_jvp(exc: _NoJVP) -> None:
    warnings.warn(
        f"gradprobe: {exc}; the spectral Jacobian columns that need it are NaN (the Frobenius ones are not "
        "affected)",
        RuntimeWarning,
        stacklevel=3,
    )


class _Linear:
    """The Jacobians J_i = d out / d in_i of a live graph, as linear maps.

    ``vjp(u)`` returns J_i^T u for every input (one backward pass, graph kept);
    ``jvp([v_i])`` returns sum_i J_i v_i by the double-backward trick: the first
    ``vjp(u, build=True)`` also records g(w) = J^T w with ``create_graph=True``; g is
    linear in w, so d<g, v>/dw = J v for any v, and that one recorded graph serves
    every later ``jvp``. Results come in float32 or wider. ``release()`` drops the
    recorded graph.
    """

    def __init__(
        self, out: GradNode, out_like: Tensor, ins: Sequence[GradNode], ins_like: Sequence[Tensor], where: str
    ) -> None:
        self.out, self.out_like = out, out_like
        self.ins, self.ins_like = list(ins), list(ins_like)
        self.where = where
        self.wd = _work_dtype(out_like.dtype)
        self._w: Tensor | None = None
        self._g: list[Tensor | None] | None = None
        self._linked: list[bool] = []

    def vjp(self, u: Tensor, *, only: int | None = None, build: bool = False) -> list[Tensor]:
        idx = list(range(len(self.ins))) if only is None else [only]
        cot = u.reshape(self.out_like.shape).to(self.out_like.dtype)
        if build:
            cot = cot.detach().requires_grad_(True)
        got = torch.autograd.grad(
            [self.out],
            [self.ins[i] for i in idx],
            [cot],
            retain_graph=True,
            create_graph=build,
            allow_unused=True,
        )
        if build:
            self._w, self._g = cot, list(got)
            self._linked = _reaches([g for g in got], cot)
        return [
            torch.zeros_like(self.ins_like[i], dtype=self.wd) if g is None else g.detach().to(self.wd)
            for i, g in zip(idx, got, strict=True)
        ]

    def jvp(self, vs: Sequence[Tensor | None]) -> Tensor:
        if self._g is None:
            # Any w works (g is linear in w); a generic deterministic one, so that a nonzero J^T w
            # tells a broken double graph from a zero Jacobian.
            n = self.out_like.numel()
            w = torch.arange(n, dtype=torch.float64).mul_(0.6180339887498949).frac_().sub_(0.5)
            self.vjp(w.to(self.out_like.device), build=True)
        assert self._g is not None and self._w is not None
        outs, tangents = [], []
        padded = [*vs, *[None] * (len(self._g) - len(vs))]  # missing tangents are zero
        for g, v, linked in zip(self._g, padded, self._linked, strict=True):
            if g is None or v is None:
                continue  # J_i = 0 (the output does not depend on input i), or no tangent
            if not linked:
                if bool(g.ne(0).any()):
                    # J^T w is nonzero, so it depends on w, yet its graph does not lead back to w: a
                    # backward that autograd cannot differentiate (a custom autograd Function marked
                    # once_differentiable, or one whose backward runs under no_grad).
                    raise _NoJVP(f"{self.where}: the backward pass cannot be differentiated twice")
                continue
            outs.append(g)
            tangents.append(v.reshape(g.shape).to(g.dtype))
        if not outs:
            return torch.zeros_like(self.out_like, dtype=self.wd)
        try:
            (jv,) = torch.autograd.grad(outs, [self._w], tangents, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:  # once_differentiable, fused attention kernels, ...
            raise _NoJVP(f"{self.where}: double backward failed ({str(exc).splitlines()[0]})") from exc
        return torch.zeros_like(self.out_like, dtype=self.wd) if jv is None else jv.detach().to(self.wd)

    def release(self) -> None:
        self._w = self._g = None


def _reaches(roots: Sequence[Tensor | None], leaf: Tensor) -> list[bool]:
    """For each root, whether its autograd graph leads to ``leaf`` (one traversal, shared nodes once)."""
    memo: dict[Any, bool] = {}

    def visit(start: Any) -> bool:
        stack = [(start, False)]
        while stack:
            node, done = stack.pop()
            if node in memo:
                continue
            children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
            if done:
                memo[node] = getattr(node, "variable", None) is leaf or any(
                    memo.get(c, False) for c in children
                )
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in memo)
        return memo[start]

    return [r is not None and r.grad_fn is not None and visit(r.grad_fn) for r in roots]


def _top_sv_bidiag(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """Top singular value of the square lower-bidiagonal diag(alphas) + subdiag(betas), and the last
    component of its right singular vector (which, times the next beta, is the Ritz residual)."""
    m = len(alphas)
    b = np.zeros((m, m))
    b[np.arange(m), np.arange(m)] = alphas
    if m > 1:
        b[np.arange(1, m), np.arange(m - 1)] = betas[: m - 1]
    if not np.all(np.isfinite(b)):
        return _NAN, _NAN
    _, s, vt = np.linalg.svd(b)
    return float(s[0]), float(vt[0, -1])


def _orthogonalize(z: Tensor, basis: Sequence[Tensor]) -> Tensor:
    # Classical Gram-Schmidt twice ("twice is enough"), each pass two matrix-vector products:
    # keeps the Lanczos bases orthonormal to working precision, so every Ritz value stays a
    # lower bound.
    if not basis:
        return z
    b = torch.stack([q.reshape(-1) for q in basis])
    flat = z.reshape(-1)
    for _ in range(2):
        flat = flat - b.T @ (b @ flat)
    return flat.view(z.shape)


def _lanczos_top(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    u1: Tensor,
    p1: Tensor,
    max_iters: int,
    tol: float,
) -> float:
    """Largest singular value of J by Golub-Kahan-Lanczos bidiagonalisation.

    ``u1`` is a unit start vector in the output space and ``p1 = J^T u1`` (already
    computed by the caller, who used it as a Hutchinson probe). Each step costs one
    ``matvec`` (J v) and one ``rmatvec`` (J^T u). With B = U^T J V the bidiagonal
    matrix so far and (s, x, y) its top singular triple, the Ritz pair obeys
    J^T (U x) = s V y exactly and |J V y - s U x| = |beta * y_last|: some singular value
    of J lies within that residual of s, and s itself is a lower bound of the largest.
    Stops after ``max_iters`` steps or once the residual is at most ``tol * s``.
    """
    alpha = math.sqrt(_sqnorm(p1))
    if not math.isfinite(alpha):
        return _NAN
    if alpha == 0.0 or max_iters <= 0:
        return alpha
    tiny = _breakdown(p1.dtype)
    us, vs = [u1], [p1 / alpha]
    alphas: list[float] = [alpha]
    betas: list[float] = []
    sigma, y_last = alpha, 1.0
    for _ in range(max_iters):
        r = _orthogonalize(matvec(vs[-1]) - alphas[-1] * us[-1], us)
        beta = math.sqrt(_sqnorm(r))
        if not math.isfinite(beta):
            return _NAN
        if beta <= tiny * sigma or abs(beta * y_last) <= tol * sigma:
            break  # invariant subspace (sigma exact), or converged
        us.append(r / beta)
        betas.append(beta)
        p = _orthogonalize(rmatvec(us[-1]) - beta * vs[-1], vs)
        alpha = math.sqrt(_sqnorm(p))
        if not math.isfinite(alpha):
            return _NAN
        if alpha <= tiny * sigma:
            alphas.append(0.0)  # invariant again; the last column of B is just beta
            return _top_sv_bidiag(alphas, betas)[0]
        vs.append(p / alpha)
        alphas.append(alpha)
        sigma, y_last = _top_sv_bidiag(alphas, betas)
    return sigma


def _top_ritz(gram: np.ndarray) -> tuple[float, np.ndarray]:
    if not np.all(np.isfinite(gram)):
        return _NAN, np.zeros(len(gram))
    vals, vecs = np.linalg.eigh(gram)
    return float(max(vals[-1], 0.0)), vecs[:, -1]


# ---------------------------------------------------------------------- the estimators
# The start vector combines at most this many probes (the gain saturates; the eigenproblem stays small).
_START_PROBES = 16


def _gram(vectors: Sequence[Tensor]) -> np.ndarray:
    flat = torch.stack([v.reshape(-1) for v in vectors])
    return (flat @ flat.T).double().cpu().numpy()


def _best_start(us: Sequence[Tensor], vjps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Lanczos start: the unit combination u of the probes that maximises |J^T u|, and J^T u.

    The probes' VJPs are already paid for; the best combination (top eigenvector of
    the generalised problem P^T P c = s^2 U^T U c) is enriched in the top singular
    direction, which makes the Lanczos run less likely to settle on the second value.
    """
    us, vjps = us[:_START_PROBES], vjps[:_START_PROBES]
    if len(us) == 1:
        norm = math.sqrt(_sqnorm(us[0]))
        return us[0] / norm, vjps[0] / norm
    pp, uu = _gram(vjps), _gram(us)
    if not (np.all(np.isfinite(pp)) and np.all(np.isfinite(uu))):
        norm = math.sqrt(_sqnorm(us[0]))
        return us[0] / norm, vjps[0] / norm
    # Whiten with U^T U, dropping the directions in which the probes are dependent (more probes
    # than dimensions) so that rounding noise is not amplified.
    w_vals, w_vecs = np.linalg.eigh(uu)
    keep = w_vals > 1e-5 * w_vals[-1]
    w = w_vecs[:, keep] / np.sqrt(w_vals[keep])
    _, vecs = np.linalg.eigh(w.T @ pp @ w)
    c = w @ vecs[:, -1]
    u = sum(float(ci) * t for ci, t in zip(c, us, strict=True))
    p = sum(float(ci) * t for ci, t in zip(c, vjps, strict=True))
    assert isinstance(u, Tensor) and isinstance(p, Tensor)
    norm = math.sqrt(_sqnorm(u))
    return u / norm, p / norm


def _block_columns(
    cap: BlockCapture,
    probes: int,
    power_iters: int,
    tol: float,
    generator: torch.Generator,
    given: tuple[list[Tensor], list[Tensor]] | None = None,
) -> dict[str, float]:
    """jac_fro, jac_id, jac_spec of one block; ``given`` = (probes, their VJPs) to reuse."""
    y = cap.y
    n = y.numel()
    lin = _Linear(cap.output, y, [cap.input], [cap.x], f"block {cap.name!r}")
    try:
        if given is not None:
            us, vjps = given
        else:
            us = [_rademacher(y, generator, lin.wd) for _ in range(probes)]
            # The first probe's VJP also records the double graph that the Lanczos steps use for J v.
            vjps = [lin.vjp(u, build=k == 0 and power_iters > 0)[0] for k, u in enumerate(us)]
        out = {
            "jac_fro": math.sqrt(sum(_sqnorm(p) for p in vjps) / (len(vjps) * n)),
            "jac_spec": _NAN,
            "jac_id": _NAN,
        }
        if cap.same_shape:
            # (J - I)^T u = J^T u - u: the distance from identity from the same probes
            out["jac_id"] = math.sqrt(
                sum(_sqnorm(p - u.view_as(p)) for p, u in zip(vjps, us, strict=True)) / (len(vjps) * n)
            )
        if power_iters > 0:
            try:
                out["jac_spec"] = _lanczos_top(
                    lambda v: lin.jvp([v]),
                    lambda u: lin.vjp(u)[0],
                    *_best_start(us, vjps),
                    power_iters,
                    tol,
                )
            except _NoJVP as exc:
                _warn_no_jvp(exc)
        return out
    finally:
        lin.release()


def _jvp_one(lin: _Linear, i: int, v: Tensor) -> Tensor:
    return lin.jvp([None] * i + [v])


def _vjp_one(lin: _Linear, i: int, u: Tensor) -> Tensor:
    return lin.vjp(u, only=i)[0]


def _prod_columns(
    caps: Sequence[BlockCapture],
    probes: int,
    power_iters: int,
    tol: float,
    generator: torch.Generator,
    mode: str,
) -> tuple[dict[str, dict[str, float]], tuple[list[Tensor], list[Tensor]]]:
    """prod_fro, prod_spec of every block; also (probes, VJPs) of the last block for reuse."""
    y = caps[-1].y
    n = y.numel()
    nb = len(caps)
    lin = _Linear(
        caps[-1].output, y, [c.input for c in caps], [c.x for c in caps], "the product of the blocks"
    )
    want_spec = mode != "none" and power_iters > 0
    try:
        us = [_rademacher(y, generator, lin.wd) for _ in range(probes)]
        fro2 = [0.0] * nb
        last_vjps: list[Tensor] = []
        # The spectral estimates start from the probes' VJPs, so they are kept (probes vectors per
        # block); without them each pass's VJPs are reduced to norms at once and dropped.
        kept: list[list[Tensor]] = []
        for k, u in enumerate(us):
            # one backward pass per probe gives dy_last/dx_i^T u for every block i at once
            got = lin.vjp(u, build=k == 0 and want_spec)
            for i, p in enumerate(got):
                fro2[i] += _sqnorm(p)
            last_vjps.append(got[-1])
            if want_spec:
                kept.append(got)
            del got
        cols = {}
        for c, f in zip(caps, fro2, strict=True):
            cols[c.name] = {"prod_fro": math.sqrt(f / (probes * n)), "prod_spec": _NAN}
        if not want_spec:
            return cols, (us, last_vjps)
        try:
            if mode == "each":
                for i, c in enumerate(caps):
                    mine = [pv[i] for pv in kept]
                    for pv in kept:
                        pv[i] = mine[0].new_empty(0)  # free block i's probe VJPs once used
                    cols[c.name]["prod_spec"] = _lanczos_top(
                        partial(_jvp_one, lin, i),
                        partial(_vjp_one, lin, i),
                        *_best_start(us, mine),
                        power_iters,
                        tol,
                    )
                    del mine
            else:
                sig = _shared_subspace(lin, nb, us, kept, power_iters, tol)
                for i, c in enumerate(caps):
                    cols[c.name]["prod_spec"] = sig[i]
        except _NoJVP as exc:
            _warn_no_jvp(exc)
        return cols, (us, last_vjps)
    finally:
        lin.release()


def _shared_subspace(
    lin: _Linear,
    nb: int,
    us: list[Tensor],
    probe_vjps: list[list[Tensor]],
    power_iters: int,
    tol: float,
) -> list[float]:
    """Largest singular value of every A_i = dy/dx_i from one subspace Q of y's space.

    Q starts as the orthonormalised probes. Each step adds the part orthogonal to Q
    of sum_i A_i r_i / s_i^2 -- r_i = A_i^T Q c_i the top right Ritz vector of block i
    and s_i = |r_i| its Ritz value, so each block contributes a power step of about
    unit length -- with one double-backward pass for all blocks, and one backward
    pass gives A_i^T q of the new vector q for every block. Block i's estimate is the
    largest singular value of A_i^T Q: a lower bound that only grows with Q. One Q serves
    all blocks because the top left singular vectors of long products are alike.
    """
    # Orthonormalise the probes (Gram-Schmidt twice, dropping dependent ones): Q = U T with a
    # small matrix T, and A_i^T Q = P_i T for the probes' VJPs P_i (A^T is linear), so each
    # block's vectors are transformed by one matrix product instead of vector by vector.
    m = len(us)
    qs: list[Tensor] = []
    cols: list[np.ndarray] = []  # column k of T: q_k in terms of the probes
    for k, u in enumerate(us):
        z, t = u.clone(), np.zeros(m)
        t[k] = 1.0
        for _ in range(2):
            for q, tq in zip(qs, cols, strict=True):
                c = _dot(q, z)
                z -= c * q
                t -= c * tq
        nz = math.sqrt(_sqnorm(z))
        if not nz > _breakdown(u.dtype) * math.sqrt(_sqnorm(u)):
            continue
        qs.append(z / nz)
        cols.append(t / nz)
    if not qs:
        return [_NAN] * nb
    # ps[i]: the rows A_i^T q_k of block i, flattened, with room for one more per power step.
    ps: list[Tensor] = []
    grams: list[np.ndarray] = []
    for i in range(nb):
        raw = torch.stack([pv[i].reshape(-1) for pv in probe_vjps])
        for pv in probe_vjps:
            pv[i] = raw.new_empty(0)  # free the probe's copy once stacked
        buf = raw.new_empty((len(qs) + power_iters, raw.shape[1]))
        torch.mm(torch.as_tensor(np.stack(cols), dtype=raw.dtype, device=raw.device), raw, out=buf[: len(qs)])
        del raw
        ps.append(buf)
        rows = buf[: len(qs)]
        grams.append((rows @ rows.T).double().cpu().numpy())
    est = [_top_ritz(gm) for gm in grams]
    sig = [math.sqrt(e[0]) for e in est]
    for _ in range(power_iters):
        if not all(math.isfinite(s) for s in sig):
            break
        n = len(qs)
        tangents: list[Tensor | None] = []
        for i in range(nb):
            s2 = est[i][0]
            if s2 <= 0:
                tangents.append(None)
                continue
            ritz = torch.as_tensor(est[i][1] / s2, dtype=ps[i].dtype, device=ps[i].device)
            tangents.append(ritz @ ps[i][:n])
        z = lin.jvp(tangents)
        size = math.sqrt(_sqnorm(z))
        z = _orthogonalize(z, qs)
        nz = math.sqrt(_sqnorm(z))
        if not math.isfinite(nz):
            return [_NAN] * nb
        if nz <= _breakdown(z.dtype) * size:
            break  # Q is invariant under every power step: the estimates are exact
        q = z / nz
        qs.append(q)
        new_p = lin.vjp(q)
        for i in range(nb):
            ps[i][n] = new_p[i].reshape(-1)
            row = (ps[i][: n + 1] @ ps[i][n]).double().cpu().numpy()
            gm = np.empty((n + 1, n + 1))
            gm[:-1, :-1] = grams[i]
            gm[-1, :] = row
            gm[:, -1] = row
            grams[i] = gm
        del new_p
        est = [_top_ritz(gm) for gm in grams]
        new = [math.sqrt(e[0]) if math.isfinite(e[0]) else _NAN for e in est]
        converged = all(abs(a - b) <= tol * a for a, b in zip(new, sig, strict=True))
        sig = new
        if converged:
            break
    return sig


#: The accurate spectral settings, ``jacobian_columns``' defaults and ``analyze``'s; the probe
#: trains with cheaper ones (their accuracy and cost: README, "Jacobians and spectra").
ACCURATE_SPECTRA: dict[str, Any] = {"power_iters": 20, "tol": 1e-3, "prod_spec": "each"}


def jacobian_columns(
    captures: Sequence[BlockCapture],
    *,
    probes: int = 4,
    power_iters: int = ACCURATE_SPECTRA["power_iters"],
    generator: torch.Generator,
    prod: bool = True,
    spec: bool | Literal["blocks", "products"] = True,
    prod_spec: Literal["each", "shared", "none"] = ACCURATE_SPECTRA["prod_spec"],
    tol: float = ACCURATE_SPECTRA["tol"],
) -> dict[str, dict[str, float]]:
    """Estimate the Jacobian columns of every captured block from the live forward graph.

    Call it after the forward pass and before the user's backward pass: it needs
    the graph and leaves it alive. ``captures`` are in forward order; the last
    one of each ``stack`` (all captures in one stack by default) is the end of the
    products of that stack's blocks. Returns, for each capture name,
    ``jac_fro``, ``jac_spec``, ``jac_id`` (NaN if the shapes differ), ``prod_fro``,
    ``prod_spec`` (NaN where not computed). See the module docstring for the
    definitions.

    Knobs (their measured accuracy and cost: README, "One-shot analysis, Jacobians and
    spectra"):

    * ``probes``: Hutchinson vectors, one block-local and one product VJP pass each.
      The relative error of a squared norm is
      sqrt(2 (|C|_F^2 - sum_i C_ii^2) / probes) / tr C with C = J J^T, about
      sqrt(2 / (probes * r)) for an effective rank r: small on large tensors, and
      shrinking like 1/sqrt(probes) on small or nearly low-rank ones.
    * ``power_iters``: at most this many Lanczos steps per spectral estimate, each one
      JVP pass and one VJP pass; ``tol``
      stops earlier once the Ritz residual is at most ``tol`` times the estimate.
      ``spec=False`` or ``power_iters=0`` skip ``jac_spec`` and ``prod_spec`` (NaN)
      and make the call VJP-only; ``spec="blocks"`` takes ``jac_spec`` only,
      ``spec="products"`` ``prod_spec`` only (the probe spreads a spectral cycle over two
      steps so).
    * ``prod=False`` skips the product columns. ``prod_spec="each"`` runs a Lanczos per
      block (exact to ``tol``, about depth/2 times the cost of ``jac_spec``);
      ``"shared"`` estimates all blocks from one subspace (the cost of one Lanczos
      run; a lower bound, see :func:`_shared_subspace`); ``"none"`` skips it.

    Memory beyond the graph: VJP-only calls hold a few vectors of one block at a time.
    ``jac_spec`` holds one block's double-backward graph and up to ``power_iters + 1``
    Lanczos vectors of its size; ``prod_spec`` holds the whole chain's double-backward
    graph (about the size of the saved activations) plus ``probes`` input-sized vectors
    per block (``"shared"``: ``probes + power_iters``).

    Where the graph cannot be differentiated twice (a custom autograd Function with
    ``once_differentiable``, some fused kernels), the spectral columns that need it are
    NaN and a ``RuntimeWarning`` says why.

    >>> lin = torch.nn.Linear(3, 3)
    >>> x = torch.randn(5, 3, requires_grad=True)
    >>> cols = jacobian_columns([BlockCapture("b", x, x + lin(x), same_shape=True)],
    ...                         probes=64, generator=torch.Generator().manual_seed(0))
    >>> sorted(cols["b"])
    ['jac_fro', 'jac_id', 'jac_spec', 'prod_fro', 'prod_spec']
    >>> exact = torch.linalg.svdvals(torch.eye(3) + lin.weight.detach())[0].item()
    >>> abs(cols["b"]["jac_spec"] - exact) < 1e-4 * exact
    True
    """
    caps = list(captures)
    if not caps:
        return {}
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    if not isinstance(power_iters, int) or isinstance(power_iters, bool) or power_iters < 0:
        raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if prod_spec not in ("shared", "each", "none"):
        raise ValueError(f"prod_spec must be 'shared', 'each' or 'none', got {prod_spec!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    names = [c.name for c in caps]
    if len(set(names)) != len(names):
        raise ValueError(f"capture names must be unique (one capture per block), got {names}")
    for c in caps:
        if c.y_edge is None and not (c.y.requires_grad and c.y.grad_fn is not None):
            raise ValueError(
                f"block {c.name!r}: its output has no autograd graph; jacobian_columns needs the live graph "
                "of a forward pass run with gradients enabled, before backward frees it"
            )
    if spec not in (True, False, "blocks", "products"):
        raise ValueError(f"spec must be True, False, 'blocks' or 'products', got {spec!r}")
    block_iters = power_iters if spec in (True, "blocks") else 0
    prod_iters = power_iters if spec in (True, "products") else 0
    result: dict[str, dict[str, float]] = {}
    stacks: dict[str, list[BlockCapture]] = {}
    for c in caps:
        stacks.setdefault(c.stack, []).append(c)
    for label, members in list(stacks.items()):
        complex_ = [c.name for c in members if c.x.is_complex() or c.y.is_complex()]
        if complex_:
            # J of a complex block is a real-linear map of C^n = R^2n that autograd's complex
            # vector-Jacobian products (conjugate Wirtinger derivatives) do not give directly;
            # a wrong number is worse than none.
            warnings.warn(
                f"gradprobe: blocks {complex_} have complex inputs or outputs; the Jacobian columns of "
                f"their stack {[c.name for c in members]} are not defined for complex blocks here and are "
                "NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            del stacks[label]
            for c in members:
                result[c.name] = dict.fromkeys(_COLUMNS, _NAN)
    with torch.enable_grad():
        pcols: dict[str, dict[str, float]] = {}
        lasts: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        if prod:
            for label, members in stacks.items():
                got, lasts[label] = _prod_columns(members, probes, prod_iters, tol, generator, prod_spec)
                pcols.update(got)
        ends = {members[-1].name for members in stacks.values()}
        for c in (c for members in stacks.values() for c in members):
            # A stack's last block's product is the block itself: it reuses the product's probes and VJPs.
            given = lasts.get(c.stack) if c.name in ends else None
            cols = _block_columns(c, probes, block_iters, tol, generator, given)
            cols.update(pcols.get(c.name, {"prod_fro": _NAN, "prod_spec": _NAN}))
            result[c.name] = cols
        if prod and spec is True:
            for name in ends:
                end = result[name]
                # One matrix, two lower bounds of its largest singular value: keep the better one for both.
                both = [v for v in (end["jac_spec"], end["prod_spec"]) if math.isfinite(v)]
                if both:
                    end["jac_spec"] = max(both)
                    if prod_spec != "none":
                        end["prod_spec"] = max(both)
    return result
