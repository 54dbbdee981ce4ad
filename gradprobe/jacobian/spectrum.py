"""``spectrum``: the singular values of the Jacobian between two blocks, dense or matrix-free.

The dense route builds J by one vector-Jacobian product per output element
(:func:`dense_jacobian`) and takes all its singular values; the matrix-free route hands
``scipy.sparse.linalg.svds`` Jacobian-vector and vector-Jacobian products of the live
graph. The model is left untouched (buffers and global RNG restored).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture import BlockCapture, GradNode, capturing, forward_call
from .estimate import _Linear, _NoJVP
from .rerun import _untouched, differentiable_twice

Tensor = torch.Tensor

#: Largest n_in * n_out for which ``spectrum(k=None)`` builds the dense Jacobian
#: (n_out backward passes and an SVD of a 4M-entry float64 matrix, 32 MB, seconds).
MAX_DENSE_ENTRIES = 1 << 22


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
    from ..blocks import select_blocks

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
    from ..capture import rules as capture_rules

    given = capture_rules(names, input, output)
    # capturing stays open while the Jacobian passes run: checkpointed blocks recompute alike.
    captured = capturing(
        forward_call(model, inputs), named, start=start or "*first*", stop_after=end, rules=given
    )
    with _untouched(model, inputs, seed), torch.enable_grad(), differentiable_twice(), captured as (_, caps):
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
