"""Path-length decomposition of the gradient (Veit, Wilber and Belongie, NeurIPS 2016).

The decomposition over captured blocks, which the probe records during training
(:func:`sub_batch_decomposition`) and the one-shot :func:`gradprobe.paths` runs
(:mod:`gradprobe.analysis`), and :func:`paths_summary` of its frame.

Definition
----------
Read every branching block of a *stack* (a chain of blocks, each one's input computed
from the previous one's output) as y = s(x) + F(x), with s the identity for a same-shape
block (or the block's shortcut module when it has one) and F := H - s, H the whole block.
Put a formal variable t on every branch F. Going backward through the stack from
g_L = dL/dy_last, with the Jacobians of the live forward graph,

    g_{i-1}(t) = (ds_i/dx)^T g_i(t) + t (dF_i/dx)^T g_i(t),
    (dF_i/dx)^T u = (dH_i/dx)^T u - (ds_i/dx)^T u,

(ds/dx = I for an identity skip). The gradient at the stack's first input is the
polynomial sum_k t^k c_k: the vector ``c_k`` is the gradient carried by all the paths
through exactly k branches, so sum_k c_k is the true gradient (the exactness tests check
this to rounding). A shape-changing block without a known shortcut does not branch: its
whole Jacobian is applied to every c_k (it is named in ``attrs["stacks"]``). Anything
between two blocks of a stack (a reshape, a dropout, ...) is applied to every c_k alike.

The coefficients are kept as a list c_0..c_m of tensors shaped like the block input; each
block costs one vector-Jacobian product per coefficient (two through a shortcut module),
``torch.autograd.grad(y, x, c, retain_graph=True)`` through the one forward graph (one
coefficient per call by default, see :data:`BATCH_VJPS`): about L^2/2 block VJPs for a stack
of L blocks. ``max_length`` drops the
coefficients beyond it as soon as they appear; what they carried is reported as the
``remainder``: |g - sum_{k <= max_length} c_k|, with g the autograd gradient at the stack
input (without truncation the remainder is the rounding error of the decomposition).

Columns of :func:`gradprobe.paths`, one row per (stack, length):

* ``stack``: the stack's name, as in the probe's frame (the blocks' longest common dotted
  prefix, see :func:`gradprobe.stacking.stack_labels`), ``length`` = k;
* ``path_grad`` = |c_k| (Euclidean norm over the whole batch tensor), ``share`` =
  |c_k| / sum_j |c_j|, ``cum_share`` its running sum over k;
* ``n_paths`` = C(L_s, k), L_s the number of branching blocks of the stack, and
  ``per_path`` = |c_k| / n_paths, the average norm of one path of that length.

``attrs``: ``effective_length`` (share-weighted mean length of the stack with the most
branching blocks), ``central_90`` (the lengths that carry the central 90% of its share:
the first k where ``cum_share`` reaches 5% and 95%), and ``stacks``, one dict per stack with
those numbers plus its blocks, the blocks that do not branch, ``grad_norm`` (|g|) and
``remainder``, ``residual`` = |g_chain - sum_k c_k| (g_chain: the gradient carried through
the chain of the stack's blocks with their whole Jacobians; rounding, grown by cancellation,
and with ``max_length`` the paths left out) and ``bypass`` = |g - g_chain| / |g|, the share of
the gradient that reaches the stack's input around its blocks (a long skip: a U-Net's, the
outer residual of nested blocks; 0 within rounding). A block called several times in the
pass (weight sharing) is a branching point at each call. :func:`paths_summary` computes the
same numbers from any frame with these columns (a loaded one included, where attrs are gone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .capture import BlockCapture, capturing
from .passes import projection_loss
from .stacking import nesting, node_continues, stack_labels

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PATH_COLUMNS",
    "captured_decomposition",
    "decompose",
    "group_stacks",
    "paths_summary",
    "sub_batch_decomposition",
]

Tensor = torch.Tensor

#: Columns of the frame :func:`gradprobe.paths` returns (``probe.paths_frame()`` puts ``step`` first).
PATH_COLUMNS: tuple[str, ...] = ("stack", "length", "path_grad", "share", "n_paths", "per_path", "cum_share")

#: Coefficient vectors pushed back through a block per autograd call. Above 1, several go in
#: one call with ``is_grads_batched=True`` (vmap over the backward pass; falls back to one per
#: call where an op has no batching rule). On CPU that was 1.64x *slower* than one call per
#: vector (ResNet-20, batch 32, 1 thread), hence 1; it may pay off on a GPU (not measured).
BATCH_VJPS = 1

#: Rounding allowance of the bypass check, in units of the dtype's epsilon times the gradient norm:
#: the gradient through the chain and autograd's gradient add the same terms in other orders.
_BYPASS_ULPS = 1000

# Suffix of the capture name of a block's shortcut module (a NUL cannot occur in module names).
_SHORTCUT = "\x00shortcut"


# ---------------------------------------------------------------------- stacks
def group_stacks(caps: Sequence[BlockCapture]) -> list[list[BlockCapture]]:
    """Group the captured blocks of one forward pass (in forward order) into chains.

    Block i continues block i-1's stack when its input is reachable in the autograd graph
    from block i-1's output (:func:`gradprobe.stacking.continues`, the probe's rule);
    otherwise it starts a new stack (an encoder and a decoder are two stacks). Blocks whose
    output has no graph are left out.

    >>> x = torch.randn(2, 3, requires_grad=True)
    >>> a = BlockCapture("a", x, 2 * x, same_shape=True)
    >>> b = BlockCapture("b", a.y, a.y + 1, same_shape=True)
    >>> c = BlockCapture("c", x, x * 3, same_shape=True)
    >>> [[cap.name for cap in s] for s in group_stacks([a, b, c])]
    [['a', 'b'], ['c']]
    """
    stacks: list[list[BlockCapture]] = []
    nest = nesting([c.name for c in caps])  # nested blocks: stacks of their own level
    current: dict[str, list[BlockCapture]] = {}
    for cap in caps:
        if cap.y_edge is None and not cap.y.requires_grad:
            continue
        # the probe's stack rule (stacking.continues): a graph too large to tell continues the stack
        here = current.get(nest[cap.name])
        if here is not None and node_continues(_node(cap.input), _node(here[-1].output)):
            here.append(cap)
        else:
            current[nest[cap.name]] = [cap]
            stacks.append(current[nest[cap.name]])
    return stacks


def _node(t: Any) -> Any:
    return t.node if hasattr(t, "node") else t.grad_fn


# ---------------------------------------------------------------------- VJPs
def _vjp(out: Any, inp: Any, cots: Sequence[Tensor], like: Tensor, batched: list[bool]) -> list[Tensor]:
    """[J^T c for c in cots], J = d out / d inp, through the live graph (kept for later calls).

    ``batched`` is a one-element flag shared by a whole decomposition: once a batched call
    fails (an op without a batching rule for its backward), later calls go one by one.
    """
    if not cots:
        return []

    def fix(g: Tensor | None, n: int) -> list[Tensor]:
        if g is None:  # the output does not depend on this input
            return [torch.zeros_like(like) for _ in range(n)]
        return list(g.detach().unbind(0)) if n > 1 else [g.detach().reshape(like.shape)]

    out_list: list[Tensor] = []
    i = 0
    while i < len(cots):
        chunk = cots[i : i + BATCH_VJPS] if batched[0] else cots[i : i + 1]
        if len(chunk) > 1:
            try:
                (g,) = torch.autograd.grad(
                    [out], [inp], [torch.stack(list(chunk))], retain_graph=True, allow_unused=True,
                    is_grads_batched=True,
                )  # fmt: skip
                out_list += fix(g, len(chunk))
                i += len(chunk)
                continue
            except RuntimeError:
                batched[0] = False  # no batching rule somewhere: one call per vector from now on
                chunk = chunk[:1]
        (g,) = torch.autograd.grad([out], [inp], [chunk[0]], retain_graph=True, allow_unused=True)
        out_list += fix(g, 1)
        i += 1
    return out_list


def _direct(cap: BlockCapture, prev: BlockCapture) -> bool:
    # The block's input is an alias of the previous block's output itself: nothing in between.
    return cap.x._base is prev.y and cap.x.shape == prev.y.shape


# ---------------------------------------------------------------------- the decomposition
def decompose(
    caps: Sequence[BlockCapture],
    loss: Tensor,
    *,
    shortcuts: Mapping[str, BlockCapture | Sequence[BlockCapture]] | None = None,
    max_length: int | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The path-length decomposition of ``loss``'s gradient over captured blocks.

    ``caps``: the blocks of one forward pass in forward order (from the capture machinery of
    :mod:`gradprobe.jacobian`); ``shortcuts``: block name -> capture of its shortcut module
    in the same pass; ``loss``: a scalar of that pass's graph (kept: ``retain_graph``).
    Returns the frame of :func:`gradprobe.paths` (without attrs) and one dict per stack.

    >>> x = torch.randn(3, 2, requires_grad=True)
    >>> a = BlockCapture("a", x, 1.5 * x, same_shape=True)  # y = x + 0.5 x
    >>> frame, info = decompose([a], a.y.sum())
    >>> frame["path_grad"].round(4).tolist(), info[0]["branching"]
    ([2.4495, 1.2247], 1)
    """
    import pandas as pd

    if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
        raise ValueError(f"max_length must be None or a non-negative int, got {max_length!r}")
    shortcuts = dict(shortcuts or {})
    calls: dict[int, int] = {}  # id(capture) -> its call number among the captures of its block
    seen: dict[str, int] = {}
    for cap in caps:
        calls[id(cap)] = seen.get(cap.name, 0)
        seen[cap.name] = calls[id(cap)] + 1

    def shortcut_of(cap: BlockCapture) -> BlockCapture | None:
        sc = shortcuts.get(cap.name)
        if isinstance(sc, Sequence):  # a shared block's shortcut, captured at each call
            return sc[calls[id(cap)]] if calls[id(cap)] < len(sc) else None
        return sc

    stacks = group_stacks(caps)
    rows: list[dict[str, Any]] = []
    info: list[dict[str, Any]] = []
    if not stacks:
        return pd.DataFrame({c: [] for c in PATH_COLUMNS}), info
    grads = torch.autograd.grad([loss], [s[-1].output for s in stacks], retain_graph=True, allow_unused=True)
    batched = [True]
    # stacks named as in the probe's frame (its ``stack`` column): common dotted prefix of the blocks
    labels = stack_labels([c.name for s in stacks for c in s], {s[0].name: False for s in stacks})
    for stack, g in zip(stacks, grads, strict=True):
        number = labels[stack[0].name]
        if g is None:
            g = torch.zeros_like(stack[-1].y)
        coeffs, branching, still, whole = _propagate(stack, g.detach(), shortcut_of, max_length, batched)
        first = stack[0]
        (true,) = torch.autograd.grad(
            [stack[-1].output], [first.input], [g], retain_graph=True, allow_unused=True
        )
        true = torch.zeros_like(first.x) if true is None else true.detach()
        total = torch.stack(coeffs).sum(0) if coeffs else torch.zeros_like(true)
        grad_norm = float(torch.linalg.vector_norm(true.double()))
        # What reaches the stack's input without passing through its blocks (a long skip around
        # them: a U-Net's, an outer residual's); rounding alone leaves a few ulps of the norms.
        bypass = float(torch.linalg.vector_norm((true - whole).double()))
        rounding = _BYPASS_ULPS * torch.finfo(true.dtype).eps * max(grad_norm, float(whole.norm()))
        norms = [float(torch.linalg.vector_norm(c.double())) for c in coeffs]
        denom = sum(norms)
        cum = 0.0
        for k, norm in enumerate(norms):
            share = norm / denom if denom > 0 else math.nan
            cum += share
            n_paths = float(math.comb(branching, k))
            rows.append(
                {
                    "stack": number,
                    "length": k,
                    "path_grad": norm,
                    "share": share,
                    "n_paths": n_paths,
                    "per_path": norm / n_paths,
                    "cum_share": cum,
                }
            )
        info.append(
            {
                "stack": number,
                "blocks": [c.name for c in stack],
                "branching": branching,
                "no_branch": still,
                "grad_norm": grad_norm,
                "remainder": float(torch.linalg.vector_norm((true - total).double())),
                # |g - (the gradient through the chain of blocks)| / |g|: the share of the gradient that
                # bypasses the blocks (0 up to rounding where every path runs through them)
                "bypass": bypass / grad_norm if grad_norm > 0 and bypass > rounding else 0.0,
                # |(the gradient through the chain) - sum_k c_k|: the decomposition's own error
                # (rounding, grown by cancellation; with max_length also the paths left out)
                "residual": float(torch.linalg.vector_norm((whole - total).double())),
                # sum_k |c_k| / |g|: how much the lengths cancel (1: none). Each |c_k| is exact to the
                # rounding of its own size, but their sum only to about this factor times that.
                "cancellation": denom / float(torch.linalg.vector_norm(true.double())),
                "max_length": max_length,
            }
        )
    frame = pd.DataFrame.from_records(rows, columns=list(PATH_COLUMNS))
    frame = frame.astype({"stack": "object", "length": "int64"})
    for item, (_, part) in zip(info, frame.groupby("stack", sort=False), strict=True):
        item.update(_stack_summary(part["length"].to_numpy(), part["share"].to_numpy()))
    return frame, info


def _propagate(
    stack: Sequence[BlockCapture],
    g: Tensor,
    shortcut_of: Callable[[BlockCapture], BlockCapture | None],
    max_length: int | None,
    batched: list[bool],
) -> tuple[list[Tensor], int, list[str], Tensor]:
    """Coefficients c_0..c_m at the stack input, the number of branching blocks, the blocks that
    do not branch (shape-changing without a known shortcut), and the whole gradient carried
    through the chain of blocks (their full Jacobians: sum_k c_k without truncation)."""
    coeffs = [g]
    whole = g
    branching = 0
    still: list[str] = []
    for i in range(len(stack) - 1, -1, -1):
        cap = stack[i]
        *full, whole = _vjp(cap.output, cap.input, [*coeffs, whole], cap.x, batched)  # (dH/dx)^T c_k
        sc = shortcut_of(cap)
        if sc is not None:
            skip = _vjp(sc.output, cap.input, coeffs, cap.x, batched)  # (ds/dx)^T c_k
        elif cap.same_shape:
            skip = list(coeffs)
        else:
            skip = None
        if skip is None:
            still.append(cap.name)
            coeffs = full
        else:
            branching += 1
            branch = [f - s for f, s in zip(full, skip, strict=True)]
            new = [skip[0]] + [skip[k] + branch[k - 1] for k in range(1, len(coeffs))] + [branch[-1]]
            coeffs = new if max_length is None else new[: max_length + 1]
        if i > 0 and not _direct(cap, stack[i - 1]):
            prev = stack[i - 1]
            *coeffs, whole = _vjp(cap.input, prev.output, [*coeffs, whole], prev.y, batched)
    return coeffs, branching, still[::-1], whole


# ---------------------------------------------------------------------- summary
def _stack_summary(lengths: Any, shares: Any) -> dict[str, float]:
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    shares = np.asarray(shares, dtype=np.float64)
    if not len(shares) or not np.all(np.isfinite(shares)) or shares.sum() <= 0:
        return {"effective_length": math.nan, "length_lo": math.nan, "length_hi": math.nan}
    order = np.argsort(lengths)
    lengths, shares = lengths[order], shares[order] / shares.sum()
    cum = np.cumsum(shares)
    # rounding may leave the last cumulative share a hair below 0.95 or 1
    lo = lengths[min(int(np.searchsorted(cum, 0.05 - 1e-12)), len(cum) - 1)]
    hi = lengths[min(int(np.searchsorted(cum, 0.95 - 1e-12)), len(cum) - 1)]
    return {
        "effective_length": float((lengths * shares).sum()),
        "length_lo": float(lo),
        "length_hi": float(hi),
    }


def paths_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """The summary of a paths frame (:func:`gradprobe.paths`, ``probe.paths_frame()``, ``run.paths()``).

    Per stack (and per ``model``/``step`` where the frame has them): ``effective_length``,
    the share-weighted mean length, and ``length_lo``/``length_hi``, the lengths that carry
    the central 90% of the share (the first lengths where the cumulative share reaches 5% and
    95%), plus ``branching``, the number of branching blocks.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"stack": "layer1", "length": [0, 1, 2], "share": [0.25, 0.5, 0.25],
    ...                   "n_paths": [1.0, 2.0, 1.0]})
    >>> paths_summary(f)[["effective_length", "length_lo", "length_hi", "branching"]].values.tolist()
    [[1.0, 0.0, 2.0, 2.0]]
    """
    import pandas as pd

    keys = [c for c in ("model", "step", "stack") if c in frame.columns]
    out = []
    for key, part in frame.groupby(keys, sort=False) if keys else [((), frame)]:
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row.update(_stack_summary(part["length"].to_numpy(), part["share"].to_numpy()))
        # n_paths at length 1 is C(L_s, 1) = L_s, truncated or not
        ones = part.loc[part["length"] == 1, "n_paths"].tolist() if "n_paths" in part.columns else []
        row["branching"] = float(ones[0]) if ones else (0.0 if len(part) else math.nan)
        out.append(row)
    return pd.DataFrame(out, columns=[*keys, "effective_length", "length_lo", "length_hi", "branching"])


# ---------------------------------------------------------------------- one captured pass
def captured_decomposition(
    forward: Callable[[], Any],
    named: Sequence[tuple[str, nn.Module]],
    shortcut_of: Mapping[str, nn.Module],
    loss_of: Callable[[Any], Tensor],
    max_length: int | None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Run ``forward()`` once with the blocks and their shortcut modules captured, and decompose
    ``loss_of(output)``. The caller provides the no-side-effect guarantees around it."""
    extra = [(name + _SHORTCUT, module) for name, module in shortcut_of.items()]
    with torch.enable_grad(), capturing(forward, [*named, *extra], every_call=True) as (output, got):
        # every call of a shared block is a branching point of its own (and so is its shortcut's)
        blocks = [c for c in got if not c.name.endswith(_SHORTCUT)]
        shortcuts: dict[str, list[BlockCapture]] = {}
        for c in got:
            if c.name.endswith(_SHORTCUT):
                shortcuts.setdefault(c.name[: -len(_SHORTCUT)], []).append(c)
        loss = loss_of(output)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on the blocks' outputs (it has no autograd graph)")
        return decompose(blocks, loss.reshape(()), shortcuts=shortcuts, max_length=max_length)


# ---------------------------------------------------------------------- during training
def sub_batch_decomposition(
    model: nn.Module,
    named: Sequence[tuple[str, nn.Module]],
    shortcut_of: Mapping[str, nn.Module],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    k: int | None,
    seed: int,
    *,
    max_length: int | None = None,
) -> pd.DataFrame | None:
    """The decomposition that ``attach(..., paths=N)`` records: a second forward pass of the
    training call on its first ``k`` samples (all of them with ``k=None`` or a smaller batch),
    the probe's Jacobian sub-batch, with the same guarantees as :func:`gradprobe.jacobian.
    sub_batch_captures`: BatchNorm buffers swapped for clones, dropout from a forked global RNG
    seeded with ``seed``, no ``.grad`` written. The loss is the projection of the model's first
    output onto a fixed direction drawn from ``seed`` (:func:`gradprobe.passes.projection_loss`),
    so that steps are comparable. Returns None when the call cannot be re-run safely (an
    argument that is not a tensor, a plain value or a container of those).
    """
    from .jacobian.rerun import _seeded_rng, batch_size, sub_batch_forward

    batch = batch_size(args, kwargs)
    if batch is None:
        return None
    rerun = sub_batch_forward(model, args, kwargs, batch if k is None else min(k, batch))
    if rerun is None:
        return None
    forward, cuda = rerun
    with _seeded_rng(cuda, seed):
        frame, _ = captured_decomposition(
            forward, named, shortcut_of, lambda out: projection_loss(out, seed), max_length
        )
    return frame
