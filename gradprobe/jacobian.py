"""Jacobian probes: block Jacobian norms, distance from identity, the product and its spectrum.

Definitions
-----------
For a block with input x and output y (its first output tensor), **J = dy/dx** is
the Jacobian of the whole output batch tensor with respect to the whole input
batch tensor, evaluated at the recorded batch, exactly as the autograd graph of
the forward pass defines it. So a BatchNorm layer in training mode contributes
its batch-statistics coupling (one sample's output depends on every sample's
input through the batch mean and variance), dropout contributes the mask that was
drawn in that forward pass, and a block in eval mode is the per-sample map. With
n = number of output elements:

* ``jac_fro`` = |J|_F / sqrt(n): the root-mean-square singular value (1 for the
  identity). Hutchinson estimate: E|J^T u|^2 = |J|_F^2 for a random u with
  identity covariance (Rademacher here: |u|^2 = n exactly, and the variance is
  lower than with Gaussian vectors).
* ``jac_spec``: the largest singular value, from Golub-Kahan-Lanczos
  bidiagonalisation (Lanczos on J^T J), started at the combination of the probe
  vectors with the largest |J^T u|. Every Lanczos value is a lower bound that
  increases to the true value; it stops when the Ritz residual is below
  ``tol`` times the value (or after ``power_iters`` steps).
* ``jac_id`` = |J - I|_F / sqrt(n) = RMS of dF/dx with F(x) := y - x, from the same
  probes ((J - I)^T u = J^T u - u); NaN when x and y have different shapes.
* ``prod_fro``, ``prod_spec``: the same two norms for the product Jacobian
  dy_last/dx_i of the actual graph from block i's input to the last block's
  output (anything between the blocks, such as ReLUs or pooling, included),
  n = number of elements of y_last. For the last block they equal ``jac_fro``
  and ``jac_spec`` (the estimator shares its vectors so they are equal exactly).

Which batch
-----------
During training the probe takes the columns on a **sub-batch** by default
(``jacobian_options={"sub_batch": 32}``): :func:`sub_batch_captures` runs the
model a second time on the first k samples, with BatchNorm buffers swapped for
clones (``torch.func.functional_call``) and the global RNG forked, so nothing the
training run sees changes; J is then the Jacobian of that k-sample forward pass
(its own batch statistics, fresh dropout masks), and ``jac_batch`` = k. A batch
of at most k samples, or a call that cannot be re-run safely (an argument that is
not a tensor, a plain value or a container of those, such as a key/value cache
object; a second pass that fails or runs other blocks), uses the training graph
itself, the whole batch: ``jac_batch`` = batch. ``analyze`` always does. Where
that graph cannot be differentiated again (a ``torch.compile``d backward frees
its buffers), the whole batch runs a second time instead, eagerly.

How it is computed
------------------
:func:`jacobian_columns` never runs a block again (re-running has side effects:
BatchNorm running statistics, new dropout masks, key/value caches). It only
uses the graph it is given -- the training forward pass's, or the sub-batch pass's:

* vector-Jacobian products J^T u: ``torch.autograd.grad(y, x, u, retain_graph=True)``;
* Jacobian-vector products J v by the double-backward trick: g(w) = J^T w is built
  once with ``create_graph=True``; it is linear in w, so the gradient of <g, v>
  with respect to w is J v, for any v, reusing that one graph;
* ``prod_fro`` for every block comes from the same ``probes`` cotangents pushed back
  from y_last, one backward pass each (one ``autograd.grad(y_last, [x_0..x_L], u)``
  returns dy_last/dx_i^T u for every i at once);
* ``prod_spec`` (``prod_spec="each"``, the default) runs one Lanczos per block on
  dy_last/dx_i, with J v from one double-backward graph of the whole chain and J^T u
  from backward passes that stop at x_i: exact to ``tol``, but the cost grows with
  the square of the depth. ``prod_spec="shared"`` is the cheap approximation: one
  subspace Q of y_last's space serves all blocks; each step adds the vector
  sum_i A_i r_i / s_i^2 (A_i = dy_last/dx_i, r_i the current top right Ritz vector of
  block i, s_i its Ritz value) -- one double-backward pass for all blocks -- and one
  backward pass returns A_i^T q of the new vector q for every block; each block takes
  the top singular value of A_i^T Q, a lower bound (on small test nets 2-10% low
  after 8-16 steps; it relies on the top left singular vectors of long products
  being alike).

Nothing accumulates into ``.grad``, the global RNG is never used (probe vectors
come from the caller's ``torch.Generator``), and every tensor created here is
released on return.

Cost (CIFAR ResNet-56, 27 blocks, train-mode BatchNorm, CPU, one thread, in units of
one training step at the same batch; ``benchmarks/jacobian_accuracy.py``): each
probe costs two input-only backward passes (block-local and product), about 0.75
step at batch 32 and 1.05 steps at batch 128; each Lanczos step of ``jac_spec``
costs about 2 steps (a Jacobian-vector product by double backward costs ~3
vector-Jacobian products; PyTorch's BatchNorm double backward is slow), and the
same again for ``prod_spec="shared"``; ``prod_spec="each"`` costs about depth/2
times that. At scale one probe is already precise (relative spread over seeds
0.1-0.3% for ``jac_fro``, ~1% for ``prod_fro`` at batch 32). Hence the probe's
training defaults (``probe.TRAINING_JACOBIAN_OPTIONS``): a sub-batch of 32
samples, and the spectral columns on every 20th Jacobian step only.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._tensors import in_backward
from .capture import (
    DEFAULT,
    Pending,
    Rule,
    alias_pinned,
    continues,
    find_output,
    gradient_edge,
    locate_input,
    replace_input,
    stack_labels,
    swap_input,
)

__all__ = [
    "ACCURATE_SPECTRA",
    "MAX_DENSE_ENTRIES",
    "BlockCapture",
    "batch_size",
    "capture_blocks",
    "dense_jacobian",
    "differentiable_twice",
    "exact_columns",
    "jacobian_columns",
    "spectrum",
    "sub_batch_captures",
]

#: Largest n_in * n_out for which ``spectrum(k=None)`` builds the dense Jacobian
#: (n_out backward passes and an SVD of a 4M-entry float64 matrix, 32 MB, seconds).
MAX_DENSE_ENTRIES = 1 << 22

Tensor = torch.Tensor
# What autograd accepts as an input or output: a tensor, or a GradientEdge pinned before an in-place op.
GradNode = Tensor | Any

_NAN = float("nan")
_COLUMNS = ("jac_fro", "jac_spec", "jac_id", "prod_fro", "prod_spec")


def _breakdown(dtype: torch.dtype) -> float:
    # Relative size below which a vector left after orthogonalisation is rounding noise:
    # the subspace is invariant (or a new probe was dependent on the others).
    return 100 * torch.finfo(dtype).eps


@dataclass
class BlockCapture:
    """One block's input and output, as seen inside the live forward graph.

    ``x`` is an alias of the block's input created right before the block ran
    (``x.view_as(x)``, or a fresh leaf requiring grad for an input that does not),
    so gradients with respect to it flow through this block only; ``y`` is the
    block's first output tensor. ``x_edge`` and ``y_edge``, when given
    (``torch.autograd.graph.get_gradient_edge(t)``), are used by autograd instead
    of the tensors, which matters when an in-place operation modifies them:

    * ``y_edge``: the edge of y taken when the block returned; it stays right when
      y is modified in place afterwards (a ``ReLU(inplace=True)`` after the block).
    * ``x_edge``: if the block modified its input in place (``relu_`` as its first
      op; the alias' version counter changed), autograd rebases the graph around
      the alias' view node and no gradient reaches it any more; pass the edge of
      the tensor the alias was made from (taken before the block ran) instead.
      :func:`capture_blocks` does exactly this.

    >>> x = torch.randn(2, 3, requires_grad=True)
    >>> cap = BlockCapture("b", x, 2 * x, same_shape=True)
    >>> cap.name, cap.same_shape
    ('b', True)
    """

    name: str
    x: Tensor
    y: Tensor
    same_shape: bool
    x_edge: Any = None
    y_edge: Any = None
    stack: str = ""  # the chain the block belongs to: products run to the last capture of its stack

    @property
    def input(self) -> GradNode:
        """What autograd differentiates with respect to: ``x_edge`` if given, else ``x``."""
        return self.x if self.x_edge is None else self.x_edge

    @property
    def output(self) -> GradNode:
        """What autograd differentiates: ``y_edge`` if given, else ``y``."""
        return self.y if self.y_edge is None else self.y_edge


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
    # Classical Gram-Schmidt twice ("twice is enough"): keeps the Lanczos bases
    # orthonormal to working precision, so every Ritz value stays a lower bound.
    for _ in range(2):
        for q in basis:
            z = z - _dot(q, z) * q
    return z


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
    largest singular value of A_i^T Q: a lower bound that only grows with Q.
    """
    # Orthonormalise the probes, transforming their VJPs the same way (A^T is linear).
    qs: list[Tensor] = []
    ps: list[list[Tensor]] = [[] for _ in range(nb)]
    for u, pv in zip(us, probe_vjps, strict=True):
        z, pz = u.clone(), [p.clone() for p in pv]
        for _ in range(2):
            for j, q in enumerate(qs):
                c = _dot(q, z)
                z -= c * q
                for i in range(nb):
                    pz[i] -= c * ps[i][j]
        nz = math.sqrt(_sqnorm(z))
        if not nz > _breakdown(u.dtype) * math.sqrt(_sqnorm(u)):
            continue
        qs.append(z / nz)
        for i in range(nb):
            ps[i].append(pz[i] / nz)
    grams = [np.array([[_dot(a, b) for b in ps[i]] for a in ps[i]]) for i in range(nb)]
    est = [_top_ritz(gm) for gm in grams]
    sig = [math.sqrt(e[0]) for e in est]
    for _ in range(power_iters):
        if not all(math.isfinite(s) for s in sig):
            break
        tangents: list[Tensor | None] = []
        for i in range(nb):
            s2 = est[i][0]
            if s2 <= 0:
                tangents.append(None)
                continue
            r = ps[i][0] * float(est[i][1][0])
            for cf, p in zip(est[i][1][1:], ps[i][1:], strict=True):
                r = r + float(cf) * p
            tangents.append(r / s2)
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
            row = np.array([_dot(a, new_p[i]) for a in ps[i]] + [_sqnorm(new_p[i])])
            gm = np.empty((len(row), len(row)))
            gm[:-1, :-1] = grams[i]
            gm[-1, :] = row
            gm[:, -1] = row
            grams[i] = gm
            ps[i].append(new_p[i])
        est = [_top_ritz(gm) for gm in grams]
        new = [math.sqrt(e[0]) if math.isfinite(e[0]) else _NAN for e in est]
        converged = all(abs(a - b) <= tol * a for a, b in zip(new, sig, strict=True))
        sig = new
        if converged:
            break
    return sig


#: The accurate spectral settings, ``jacobian_columns``' defaults and ``analyze``'s (spectral
#: columns within 2% of exact in the tests); the probe trains with cheaper ones.
ACCURATE_SPECTRA: dict[str, Any] = {"power_iters": 20, "tol": 1e-3, "prod_spec": "each"}


def jacobian_columns(
    captures: Sequence[BlockCapture],
    *,
    probes: int = 4,
    power_iters: int = ACCURATE_SPECTRA["power_iters"],
    generator: torch.Generator,
    prod: bool = True,
    spec: bool = True,
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

    Knobs (costs on a CIFAR ResNet-56, in training steps at the same batch size; see
    the module docstring):

    * ``probes``: Hutchinson vectors, one block-local and one product VJP pass each
      (~0.75-1 step per probe). The relative error of a squared norm is
      sqrt(2 (|C|_F^2 - sum_i C_ii^2) / probes) / tr C with C = J J^T, about
      sqrt(2 / (probes * r)) for an effective rank r: on large tensors even
      ``probes=1`` is within ~1%, on small or nearly low-rank ones it shrinks like
      1/sqrt(probes).
    * ``power_iters``: at most this many Lanczos steps per spectral estimate, each one
      JVP pass and one VJP pass (~2 steps for ``jac_spec`` of all blocks); ``tol``
      stops earlier once the Ritz residual is at most ``tol`` times the estimate.
      ``spec=False`` or ``power_iters=0`` skip ``jac_spec`` and ``prod_spec`` (NaN)
      and make the call VJP-only.
    * ``prod=False`` skips the product columns. ``prod_spec="each"`` runs a Lanczos per
      block (exact to ``tol``, about depth/2 times the cost of ``jac_spec``);
      ``"shared"`` estimates all blocks from one subspace (the cost of one Lanczos
      run; a lower bound, 5-15% low after 4-8 steps on small test nets); ``"none"``
      skips it.

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
    iters = power_iters if spec else 0
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
                got, lasts[label] = _prod_columns(members, probes, iters, tol, generator, prod_spec)
                pcols.update(got)
        ends = {members[-1].name for members in stacks.values()}
        for c in (c for members in stacks.values() for c in members):
            # A stack's last block's product is the block itself: it reuses the product's probes and VJPs.
            given = lasts.get(c.stack) if c.name in ends else None
            cols = _block_columns(c, probes, iters, tol, generator, given)
            cols.update(pcols.get(c.name, {"prod_fro": _NAN, "prod_spec": _NAN}))
            result[c.name] = cols
        if prod:
            for name in ends:
                end = result[name]
                # One matrix, two lower bounds of its largest singular value: keep the better one for both.
                both = [v for v in (end["jac_spec"], end["prod_spec"]) if math.isfinite(v)]
                if both:
                    end["jac_spec"] = max(both)
                    if prod_spec != "none":
                        end["prod_spec"] = max(both)
    return result


# ---------------------------------------------------------------------- exact references
def dense_jacobian(
    y: GradNode, x: GradNode, *, y_like: Tensor | None = None, x_like: Tensor | None = None
) -> Tensor:
    """The dense Jacobian dy/dx (n_out x n_in, y's dtype) of a live graph, one VJP per row.

    ``y`` and ``x`` are tensors of one graph (or ``GradientEdge``s, then pass
    ``y_like``/``x_like`` for the shapes). The graph is kept; nothing accumulates
    into ``.grad``. Meant for small tensors (tests, ``spectrum(k=None)``).

    >>> x = torch.randn(3, requires_grad=True)
    >>> dense_jacobian(2 * x, x)
    tensor([[2., 0., 0.],
            [0., 2., 0.],
            [0., 0., 2.]])
    """
    yl = y if y_like is None else y_like
    xl = x if x_like is None else x_like
    if not isinstance(yl, Tensor) or not isinstance(xl, Tensor):
        raise TypeError(
            "dense_jacobian needs tensors, or y_like= and x_like= tensors when passing GradientEdges"
        )
    n_out, n_in = yl.numel(), xl.numel()
    rows = torch.zeros(n_out, n_in, dtype=yl.dtype, device=xl.device)
    eye = torch.zeros(n_out, dtype=yl.dtype, device=yl.device)
    with torch.enable_grad():
        for j in range(n_out):
            eye[j] = 1
            (g,) = torch.autograd.grad([y], [x], [eye.view_as(yl)], retain_graph=True, allow_unused=True)
            eye[j] = 0
            if g is not None:
                rows[j] = g.reshape(-1).to(yl.dtype)
    return rows


def exact_columns(captures: Sequence[BlockCapture]) -> dict[str, dict[str, float]]:
    """Exact values of the Jacobian columns from dense Jacobians (float64 SVD), for tests and benchmarks.

    Costs one VJP per output element per block: small nets only.

    >>> x = torch.randn(4, 2, requires_grad=True)
    >>> exact_columns([BlockCapture("b", x, 3 * x, same_shape=True)])["b"]["jac_spec"]
    3.0
    """
    caps = list(captures)
    out: dict[str, dict[str, float]] = {}
    if not caps:
        return out
    last_of = {c.stack: c for c in caps}  # products end at the last capture of each stack
    for c in caps:
        last = last_of[c.stack]
        j = dense_jacobian(c.output, c.input, y_like=c.y, x_like=c.x).double()
        jp = dense_jacobian(last.output, c.input, y_like=last.y, x_like=c.x).double()
        n, n_last = j.shape[0], jp.shape[0]
        eye = torch.eye(n, dtype=torch.float64) if c.same_shape else None
        out[c.name] = {
            "jac_fro": float(torch.linalg.matrix_norm(j)) / math.sqrt(n),
            "jac_spec": float(torch.linalg.svdvals(j)[0]),
            "jac_id": _NAN if eye is None else float(torch.linalg.matrix_norm(j - eye)) / math.sqrt(n),
            "prod_fro": float(torch.linalg.matrix_norm(jp)) / math.sqrt(n_last),
            "prod_spec": float(torch.linalg.svdvals(jp)[0]),
        }
    return out


# ---------------------------------------------------------------------- capturing blocks
class _StopForward(BaseException):
    """Raised in the end block's forward hook: nothing after it is needed.

    A BaseException, so that a model's own ``except Exception`` cannot swallow it.
    """


def _call(model: nn.Module, inputs: Any) -> Callable[[], Any]:
    """The forward call ``model(*inputs)`` (``inputs``: a tuple of arguments or one tensor)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return lambda: model(*args)


def _run_capturing(
    forward: Callable[[], Any],
    named: Sequence[tuple[str, nn.Module]],
    *,
    start: str | None = None,
    stop_after: str | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> tuple[Any, list[BlockCapture]]:
    """Run ``forward()`` once; capture (input alias, output) of each named block's first call.

    Every hook is gone on return, so a checkpointed block cannot be recomputed from these
    captures; :func:`_capturing` keeps the recomputation alike while it is open.
    """
    with _capturing(forward, named, start=start, stop_after=stop_after, rules=rules) as got:
        return got


@contextmanager
def _capturing(
    forward: Callable[[], Any],
    named: Sequence[tuple[str, nn.Module]],
    *,
    start: str | None = None,
    stop_after: str | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> Iterator[tuple[Any, list[BlockCapture]]]:
    """Run ``forward()`` once; yield (output, captures of each named block's first call).

    Inputs and outputs are found by :mod:`gradprobe.capture` (``rules``: per-block
    overrides, as the probe's ``input=``/``output=``). With ``start``, only that block's
    input is replaced (the first block called if ``start`` is ``"*first*"``), later
    blocks keep their graph inputs (their captured x is then the plain input). With
    ``stop_after``, the forward is aborted once that block has returned (output
    ``None``). Until the block closes, a block that activation checkpointing recomputes
    during a backward pass gets its input replaced the same way again:
    ``torch.utils.checkpoint`` insists on the same graph.
    """
    caps: dict[str, BlockCapture] = {}
    pending: dict[str, Pending] = {}
    order: list[str] = []
    handles = []
    replaced: set[str] = set()  # blocks whose input this pass replaced by an alias
    state = {"started": start is None}
    rule = dict(rules or {})
    linked: dict[str, bool] = {}  # stacks, as the probe detects them (capture.continues)

    def pre(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in caps or name in pending:
            return None  # weight sharing: the first call only
        found = locate_input(args, kwargs, rule.get(name, DEFAULT).input, module)
        if found is None:
            return None
        x, where = found
        if order and caps[order[-1]].y_edge is not None:
            linked[name] = continues(x, caps[order[-1]].y_edge.node)
        if start is not None and not state["started"]:
            if start not in ("*first*", name):
                return None
            state["started"] = True
        elif start is not None:
            edge = gradient_edge(x) if x.requires_grad else x
            pending[name] = Pending(x, edge, edge, x._version)
            return None
        pending[name] = got = alias_pinned(x)
        replaced.add(name)
        return replace_input(args, kwargs, where, got.x)

    def post(name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if name not in pending:
            return
        got = pending.pop(name)
        y = find_output(output, rule.get(name, DEFAULT).output)
        if y is None:
            return
        caps[name] = BlockCapture(
            name,
            got.x,
            y,
            same_shape=got.x.shape == y.shape,
            x_edge=got.input_edge(),
            y_edge=gradient_edge(y) if y.requires_grad else None,
        )
        order.append(name)
        if name == stop_after:
            raise _StopForward

    for name, module in named:
        handles.append(module.register_forward_pre_hook(partial(pre, name), with_kwargs=True))
        handles.append(module.register_forward_hook(partial(post, name), with_kwargs=True))
    output = None
    try:
        output = forward()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    handles.clear()
    for name, label in stack_labels(order, linked).items():
        caps[name].stack = label

    def again(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name not in replaced or not in_backward() or not torch.is_grad_enabled():
            return None
        return swap_input(args, kwargs, lambda x: alias_pinned(x).x, rule.get(name, DEFAULT).input, module)

    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(partial(again, name), with_kwargs=True))
        yield output, [caps[n] for n in order]
    finally:
        for h in handles:
            h.remove()


def capture_blocks(
    model: nn.Module, inputs: Any, blocks: Any = "auto", *, input: Any = None, output: Any = None
) -> tuple[Any, list[BlockCapture]]:
    """Run ``model(*inputs)`` once and capture every selected block's input alias and output.

    This is what the probe does during training: each block's input is replaced by
    an alias (``x.view_as(x)``, or a leaf requiring grad when x does not), so the
    captures are ready for :func:`jacobian_columns`. The forward pass is an ordinary
    one (BatchNorm running statistics update, dropout draws from the global RNG);
    hooks are removed before returning. Returns (model output, captures in forward
    order); a block called twice is captured at its first call. ``input=``/``output=``
    override the capture rule as in :func:`gradprobe.attach` (:mod:`gradprobe.capture`).

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    >>> out, caps = capture_blocks(net, torch.randn(2, 3), blocks=["0", "2"])
    >>> [c.name for c in caps], caps[0].same_shape
    (['0', '2'], True)
    """
    from .blocks import select_blocks
    from .capture import rules

    named = select_blocks(model, blocks)
    given = rules([n for n, _ in named], input, output)
    with torch.enable_grad():
        return _run_capturing(_call(model, inputs), named, rules=given)


@contextmanager
def _seeded_rng(cuda: Sequence[int], seed: int) -> Iterator[None]:
    """Seed the global CPU RNG and these CUDA devices' RNGs inside; restore every one of them after."""
    with torch.random.fork_rng(devices=list(cuda)):
        # Not torch.manual_seed: it would also reseed CUDA devices that fork_rng does not restore.
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


@contextmanager
def differentiable_twice() -> Iterator[None]:
    """Scaled-dot-product attention through its plain math kernel inside this block.

    The fused kernels (flash, memory-efficient, and the CPU flash kernel) have no double
    backward, which the Jacobian-vector products of the spectral columns need; the math
    kernel is made of ordinary differentiable ops. Use it around forward passes that this
    module runs itself (never around the user's training forward).

    >>> with differentiable_twice():
    ...     q = torch.randn(1, 1, 3, 4, requires_grad=True)
    ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    >>> (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    >>> torch.autograd.grad(g.pow(2).sum(), q)[0].shape
    torch.Size([1, 1, 3, 4])
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _cuda_devices(tensors: Iterator[Tensor] | Sequence[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


# ---------------------------------------------------------------------- sub-batch pass
# Values that a forward call's arguments may hold besides tensors and plain containers of
# them. Anything else (a key/value cache object, a user's stateful helper) may be mutated by
# the forward pass, so a call that carries one is never re-run.
_PLAIN_VALUES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


class _Unsliceable(Exception):
    pass


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The leading dimension of the first tensor argument (positional first), or None.

    >>> batch_size((None, torch.zeros(8, 3)), {"mask": torch.ones(8)})
    8
    """
    return _leading_size((args, kwargs))


def _leading_size(obj: Any) -> int | None:
    """The leading dimension of the first tensor with one, searching args/kwargs depth-first."""
    if isinstance(obj, Tensor):
        return int(obj.shape[0]) if obj.dim() >= 1 else None
    if isinstance(obj, (tuple, list)):
        items: Any = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for item in items:
        size = _leading_size(item)
        if size is not None:
            return size
    return None


def _slice_batch(obj: Any, batch: int, k: int) -> Any:
    """``obj`` with every tensor whose leading dimension is ``batch`` cut to its first ``k`` rows.

    Sliced tensors are detached copies, so that a forward pass that modifies its input in place
    cannot reach the caller's tensor. Raises ``_Unsliceable`` on a value that is neither a
    tensor, a plain value nor a tuple/list/dict of them.
    """
    if isinstance(obj, Tensor):
        if obj.dim() >= 1 and obj.shape[0] == batch:
            return obj[:k].detach().clone()
        return obj
    if isinstance(obj, _PLAIN_VALUES):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_slice_batch(o, batch, k) for o in obj))
    if type(obj) in (tuple, list):
        return type(obj)(_slice_batch(o, batch, k) for o in obj)
    if type(obj) is dict:
        return {key: _slice_batch(v, batch, k) for key, v in obj.items()}
    raise _Unsliceable(f"an argument of type {type(obj).__name__}")


def sub_batch_forward(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], k: int
) -> tuple[Callable[[], Any], list[int]] | None:
    """The training call ``model(*args, **kwargs)`` on its first ``k`` samples, as a thunk that
    leaves the model untouched (``functional_call`` with cloned buffers: BatchNorm running
    statistics stay as they are), and the CUDA devices whose RNG its dropout draws from.
    None when an argument is neither a tensor, a plain value nor a tuple/list/dict of those.
    Shared by the Jacobian sub-batch (:func:`sub_batch_captures`) and ``attach(paths=N)``.

    >>> net = torch.nn.Linear(3, 2)
    >>> forward, cuda = sub_batch_forward(net, (torch.randn(8, 3),), {}, 2)
    >>> tuple(forward().shape), cuda
    ((2, 2), [])
    """
    from torch.func import functional_call

    batch = batch_size(args, kwargs)
    if batch is None:
        return None
    try:
        s_args, s_kwargs = _slice_batch(args, batch, k), _slice_batch(kwargs, batch, k)
    except _Unsliceable:
        return None
    # Never re-enter a (Distributed)DataParallel wrapper: its forward drives the gradient
    # reducer and collectives. Nor torch.compile's wrapper: a compiled graph's backward frees
    # ("donates") its buffers, so it cannot be differentiated with retain_graph. The wrapped
    # module computes the same function, eagerly.
    target = model
    while True:
        inner = getattr(target, "_orig_mod", None)  # torch.compile(module)
        if isinstance(target, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = target.module
        if not isinstance(inner, nn.Module):
            break
        target = inner
    buffers = {name: b.detach().clone() for name, b in target.named_buffers()}
    cuda = _cuda_devices([*target.parameters(), *target.buffers()])

    def forward() -> Any:
        return functional_call(target, buffers, s_args, s_kwargs, tie_weights=True, strict=False)

    return forward, cuda


def sub_batch_captures(
    model: nn.Module,
    named: Sequence[tuple[str, nn.Module]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    k: int,
    seed: int,
    twice: bool = False,
    rules: Mapping[str, Rule] | None = None,
) -> list[BlockCapture] | None:
    """Re-run ``model(*args, **kwargs)`` on the first ``k`` samples and capture the named blocks.

    The sub-batch route of the probe's Jacobian columns: a second forward pass on a slice
    of the batch, so that the Jacobian passes cost about k/batch of the full-batch graph
    route. It changes nothing the training run can see: BatchNorm running statistics are
    updated on clones (``torch.func.functional_call``), dropout draws from the global RNG
    inside ``fork_rng`` seeded with ``seed`` (fresh masks, not the training ones), and
    no ``.grad`` is written. Returns the captures in forward order, or ``None`` when the
    call cannot be re-run safely: no tensor argument, or an argument that is neither a
    tensor, a plain value nor a tuple/list/dict of those (a key/value cache object, say,
    which a second forward pass would extend). The caller then uses the training graph
    itself. The batch size is the leading dimension of the first tensor argument; with
    ``k`` at least that, the whole batch runs again (for a training graph that cannot be
    differentiated twice, such as a compiled one). ``twice``: the graph will be differentiated
    twice (spectral columns), so attention runs through :func:`differentiable_twice`.

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    >>> caps = sub_batch_captures(net, [("0", net[0]), ("2", net[2])], (torch.randn(8, 3),), {}, 2, 0)
    >>> [(c.name, tuple(c.x.shape)) for c in caps]
    [('0', (2, 3)), ('2', (2, 3))]
    """
    rerun = sub_batch_forward(model, args, kwargs, k)
    if rerun is None:
        return None
    forward, cuda = rerun
    kernels = differentiable_twice() if twice else nullcontext()
    with _seeded_rng(cuda, seed), torch.enable_grad(), kernels:
        _, caps = _run_capturing(forward, named, rules=rules)
    return caps


# ---------------------------------------------------------------------- spectrum
@contextmanager
def _untouched(model: nn.Module, inputs: Any, seed: int) -> Iterator[None]:
    """Restore every buffer (BatchNorm running stats, counters) and the global RNG afterwards."""
    saved = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in (inputs if isinstance(inputs, tuple) else (inputs,)) if isinstance(t, Tensor)]
    cuda = _cuda_devices(tensors)
    try:
        # dropout masks (train mode) come from the seed, so the spectrum is reproducible
        with _seeded_rng(cuda, seed):
            yield
    finally:
        with torch.no_grad():
            for m, name, b, copy in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                b.copy_(copy)


def spectrum(
    model: nn.Module,
    inputs: Any,
    *,
    start: str | None = None,
    end: str | None = None,
    k: int | None = None,
    seed: int = 0,
    blocks: Any = "auto",
    input: Any = None,
    output: Any = None,
) -> np.ndarray:
    """Singular values (descending) of the Jacobian of block ``end``'s output w.r.t. block ``start``'s input.

    That is the product of the block Jacobians from ``start`` to ``end`` (the blocks
    and everything between them), on the batch ``inputs`` (a tensor or a tuple of
    positional arguments), with the whole batch as one vector: J has shape
    (numel of end's output) x (numel of start's input). ``start``/``end`` are names of
    any modules of ``model`` (as in ``model.named_modules()``); ``blocks=`` only sets the
    defaults: the first and the last selected block called. Their input and output tensors
    are found by the capture rule of :mod:`gradprobe.capture`; ``input=``/``output=``
    override it as in :func:`gradprobe.attach`.

    The model runs as it is: in training mode BatchNorm uses batch statistics, so J
    includes the coupling between samples, and dropout masks are drawn from the
    global RNG seeded with ``seed`` (call ``model.eval()`` first for the inference
    Jacobian). Nothing changes: buffers (BatchNorm running statistics) are restored,
    the global RNG state is restored, no ``.grad`` is written, the training flag and
    hooks stay as they were. The forward pass stops after ``end``.

    * ``k=None``: all min(n_in, n_out) values exactly, from the dense Jacobian (one
      backward pass per output element), when n_in * n_out <= ``MAX_DENSE_ENTRIES``
      (2**22); otherwise a ``ValueError`` asks for ``k``.
    * ``k`` an int: the top k values matrix-free, ``scipy.sparse.linalg.svds`` on a
      ``LinearOperator`` whose matvec is a Jacobian-vector product (double backward)
      and rmatvec a vector-Jacobian product; ``seed`` also fixes its start vector.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(3)])
    >>> with torch.no_grad():
    ...     for layer in net:
    ...         _ = nn.init.orthogonal_(layer.weight).mul_(0.5)
    >>> spectrum(net, torch.randn(2, 4)).round(6).tolist()  # 0.5**3 for all 8 values
    [0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125]
    """
    from .blocks import select_blocks

    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be None (all singular values) or a positive int, got {k!r}")
    modules = dict(model.named_modules())
    for label, value in (("start", start), ("end", end)):
        if value is not None and value not in modules:
            close = (
                [n for n in modules if n and (value in n or n in value)][:8] if isinstance(value, str) else []
            )
            raise ValueError(
                f"{label}={value!r} is not a module of the model (names as in model.named_modules()"
                + (f"; similar: {close}" if close else "")
                + ")"
            )
    named = [] if start is not None and end is not None else select_blocks(model, blocks)
    for value in (start, end):
        if value is not None and all(n != value for n, _ in named):
            named.append((value, modules[value]))
    names = [n for n, _ in named]
    from .capture import rules as capture_rules

    given = capture_rules(names, input, output)
    # _capturing stays open while the Jacobian passes run: checkpointed blocks recompute alike.
    capturing = _capturing(_call(model, inputs), named, start=start or "*first*", stop_after=end, rules=given)
    with _untouched(model, inputs, seed), torch.enable_grad(), differentiable_twice(), capturing as (_, caps):
        return _spectrum_of(caps, names, start, end, k, seed)


def _spectrum_of(
    caps: list[BlockCapture], names: list[str], start: str | None, end: str | None, k: int | None, seed: int
) -> np.ndarray:
    if not caps:
        raise ValueError(
            f"start={start or names[0]!r} was not called with a floating-point or complex tensor input "
            "during the forward pass (see gradprobe.capture for the rule; pass input= to name it)"
        )
    first = caps[0]
    if end is not None and caps[-1].name != end:
        raise ValueError(
            f"end={end!r} did not run after start={first.name!r} in the forward pass (forward order: "
            f"{[c.name for c in caps]}); pick an end block that runs after start"
        )
    last = caps[-1]
    if last.y_edge is None:
        raise ValueError(f"the output of {last.name!r} does not depend on the input of {first.name!r}")
    if first.x.is_complex() or last.y.is_complex():
        raise ValueError(
            f"the input of {first.name!r} or the output of {last.name!r} is complex: spectrum computes "
            "singular values of real Jacobians only"
        )
    x, y = first.x, last.y
    n_in, n_out = x.numel(), y.numel()
    if k is None:
        if n_in * n_out > MAX_DENSE_ENTRIES:
            raise ValueError(
                f"the Jacobian from the input of {first.name!r} ({n_in} elements) to the output of "
                f"{last.name!r} ({n_out} elements) has {n_in * n_out:,} entries, more than the dense "
                f"limit MAX_DENSE_ENTRIES = {MAX_DENSE_ENTRIES:,}; pass k=10 (or any k < "
                f"{min(n_in, n_out)}) for the top k singular values matrix-free, or a smaller batch"
            )
        j = dense_jacobian(last.output, first.input, y_like=y, x_like=x)
        return torch.linalg.svdvals(j.double()).cpu().numpy()
    if k >= min(n_in, n_out):
        raise ValueError(
            f"k={k} must be less than min(n_in, n_out) = {min(n_in, n_out)} for the matrix-free solver; "
            "pass k=None for all singular values"
        )
    return _top_k(last, first, k, seed)


def _top_k(last: BlockCapture, first: BlockCapture, k: int, seed: int) -> np.ndarray:
    from scipy.sparse.linalg import LinearOperator, svds

    x, y = first.x, last.y
    lin = _Linear(last.output, y, [first.input], [x], f"the product from {first.name!r} to {last.name!r}")

    def to_tensor(a: np.ndarray, like: Tensor) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64).reshape(-1)).to(like.device, lin.wd)

    def matvec(v: np.ndarray) -> np.ndarray:
        return lin.jvp([to_tensor(v, x)]).double().cpu().numpy().reshape(-1)

    def rmatvec(u: np.ndarray) -> np.ndarray:
        return lin.vjp(to_tensor(u, y))[0].double().cpu().numpy().reshape(-1)

    op = LinearOperator((y.numel(), x.numel()), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(min(op.shape))
    try:
        vals = svds(op, k=k, v0=v0, return_singular_vectors=False)
    except _NoJVP as exc:
        raise RuntimeError(
            f"{exc}; the matrix-free spectrum needs it. Pass k=None for the dense route (backward passes "
            "only)"
        ) from exc
    finally:
        lin.release()
    return np.sort(np.asarray(vals, dtype=np.float64))[::-1].copy()
