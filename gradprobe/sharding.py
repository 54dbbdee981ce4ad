"""Sharded parameters (FSDP2, tensor parallel): each rank's part of a block's parameter norms.

A ``DTensor`` parameter (``torch.distributed.fsdp.fully_shard``, tensor parallelism) lives
on a device mesh, each rank holding a shard. Its squared norm is the sum over ranks of the
squared norms of the local shards, where a shard replicated along a mesh dimension counts
once (only the rank at coordinate 0 of each ``Replicate`` dimension contributes). So the
probe reduces each rank's local shards (:func:`local_groups`) and sums the ``(blocks, 3)``
squared sums of the step over the ranks in one ``all_reduce`` (:func:`sum_over_ranks`).
Plain tensors beside sharded ones are whole on every rank: rank 0 counts them.

FSDP1 (``FullyShardedDataParallel``) hides the blocks' parameters in flat parameters:
:func:`refuse_fsdp1` says so in one line.

The Jacobian columns differentiate a block's graph twice (the spectral ones); FSDP2 frees
the unsharded parameters at the end of each backward pass, the first of the two included,
so :func:`fsdp_kept_unsharded` keeps them until the probe's passes are done.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` where this torch build has it (None otherwise)."""
    try:
        import torch.distributed as dist

        if not dist.is_available():
            return None
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support
        return None
    return DTensor


def _fsdp2_type() -> type | None:
    """``torch.distributed.fsdp.FSDPModule`` where this torch build has it (None otherwise)."""
    if _dtensor_type() is None:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def is_sharded(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated parameter of a device mesh).

    >>> is_sharded(torch.zeros(2))
    False
    """
    if t is None or type(t) is torch.Tensor or type(t) is nn.Parameter:  # the common case, cheaply
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_sharded(groups: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether any parameter of any block is a ``DTensor``."""
    return any(is_sharded(p) for g in groups for p in g)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` for a sum of squares over the ranks: the local shard, empty
    where another rank holds the same values (a ``Replicate`` mesh dimension at a coordinate
    other than 0). A ``Partial`` placement (unreduced values) is reduced first (a collective)."""
    from torch.distributed.tensor import Replicate

    mesh = t.device_mesh  # type: ignore[attr-defined]
    world = torch.distributed.get_world_size()
    if mesh.size() != world:
        raise ValueError(
            f"a parameter lives on a device mesh of {mesh.size()} ranks in a world of {world}: its "
            "shards cannot be summed over the world (put every sharded parameter on a mesh of all ranks)"
        )
    placements = t.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        t = t.redistribute(mesh, [Replicate() if p.is_partial() else p for p in placements])  # type: ignore[attr-defined]
        placements = t.placements  # type: ignore[attr-defined]
    local = t.to_local().detach()  # type: ignore[attr-defined]
    coords = mesh.get_coordinate()
    if coords is None or any(p.is_replicate() and c != 0 for p, c in zip(placements, coords, strict=True)):
        return local.reshape(-1)[:0]
    return local


def local_groups(
    groups: Sequence[Sequence[torch.Tensor]],
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor | None]]]:
    """Each block's parameters and gradients as this rank's parts (see :func:`_local`), for
    :func:`gradprobe.metrics.block_param_stats` and a sum over ranks. Plain tensors are counted
    by rank 0 only (they are whole, and equal, on every rank)."""
    import torch.distributed as dist

    first = dist.get_rank() == 0
    params: list[list[torch.Tensor]] = []
    grads: list[list[torch.Tensor | None]] = []
    for group in groups:
        ps: list[torch.Tensor] = []
        gs: list[torch.Tensor | None] = []
        for p in group:
            g = p.grad
            if is_sharded(p):
                ps.append(_local(p))
                gs.append(None if g is None else _local(g) if is_sharded(g) else g.detach())
            else:
                ps.append(p.detach() if first else p.detach().reshape(-1)[:0])
                gs.append(None if g is None else g if first else g.reshape(-1)[:0])
        params.append(ps)
        grads.append(gs)
    return params, grads


def sum_over_ranks(stats: torch.Tensor) -> torch.Tensor:
    """``stats`` summed over every rank: one ``all_reduce`` (a collective: every rank calls it
    once per recorded step, with the same shape). NaN (a block without a gradient) stays NaN."""
    import torch.distributed as dist

    out = stats.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise a one-line ``ValueError`` for a model wrapped in FSDP1 (``FullyShardedDataParallel``)."""
    for m in model.modules():
        cls = type(m)
        if cls.__name__ == "FullyShardedDataParallel" and cls.__module__.startswith("torch.distributed.fsdp"):
            raise ValueError(
                "gradprobe does not probe FullyShardedDataParallel (FSDP1): its flat parameters hide "
                "the blocks' own; shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
            )


@contextmanager
def fsdp_kept_unsharded(model: nn.Module) -> Iterator[None]:
    """Inside: the FSDP2 (``fully_shard``) parameter groups of ``model`` keep their unsharded
    parameters after a backward pass, so that a graph can be differentiated twice (FSDP2
    frees them at the end of each pass, and the second pass needs the weights the first one
    saved). After: each group's setting is restored, and a group that was sharded on entry
    is sharded again. Values and gradients are unchanged; nothing happens without FSDP2."""
    groups: list[Any] = []
    fsdp_module = _fsdp2_type()
    if fsdp_module is not None:
        for m in model.modules():
            if isinstance(m, fsdp_module):
                state = m._get_fsdp_state()  # type: ignore[operator]
                groups.extend(getattr(state, "_fsdp_param_groups", ()))
    saved = [(g, g.reshard_after_backward, g.is_unsharded) for g in groups]
    for g, _, _ in saved:
        g.reshard_after_backward = False
    try:
        yield
    finally:
        for g, flag, was_unsharded in saved:
            g.reshard_after_backward = flag
            if not was_unsharded and g.is_unsharded:
                g.reshard()
