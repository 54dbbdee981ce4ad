"""When and on what a probe takes the Jacobian columns and the path-length decomposition.

The probe collects a :class:`~gradprobe.jacobian.BlockCapture` per block during a recorded
training forward pass; at the end of that pass (the model's forward hook)
:meth:`JacobianSchedule.columns` estimates the columns, by default on a second forward pass
over a sub-batch (:func:`gradprobe.jacobian.sub_batch_captures`), falling back to the
training graph when that pass cannot run, and to an eager re-run of the whole batch when
the training graph refuses a second differentiation. The spectral columns come once in
``spec`` Jacobian steps, ``jac_spec`` and ``prod_spec`` on two different steps
(:meth:`gradprobe.config.JacobianOptions.spectral_now`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._tensors import mute
from ..capture import BlockCapture
from ..config import JacobianOptions
from ..path_lengths import sub_batch_decomposition
from ..sharding import fsdp_kept_unsharded
from .estimate import jacobian_columns
from .rerun import batch_size, differentiable_twice, model_batch_dim, sub_batch_captures

Columns = dict[str, dict[str, float]]


def block_capture(
    name: str, x: torch.Tensor, y: torch.Tensor, x_version: int, x_node: Any, x_output_nr: int
) -> BlockCapture:
    """A capture of one block call, with its gradient edges pinned now.

    Pinning matters with in-place ops: the output edge taken here stays right when y is
    later modified in place (a ReLU(inplace=True) after the block); if the block modified
    its input in place (``x._version`` moved past ``x_version``), the alias's own node left
    the graph, and the edge of the tensor it was made from (``x_node``, taken before the
    block ran) stands in for it.
    """
    from torch.autograd.graph import GradientEdge, get_gradient_edge

    if x._version == x_version:
        x_edge = get_gradient_edge(x)
    elif x_node is not None:
        x_edge = GradientEdge(x_node, x_output_nr)
    else:
        x_edge = None
    return BlockCapture(
        name=name,
        x=x,
        y=y,
        same_shape=x.shape == y.shape,
        x_edge=x_edge,
        y_edge=get_gradient_edge(y) if y.requires_grad else None,
    )


class JacobianSchedule:
    """The Jacobian columns of a probe: which recorded steps get them, and how they are taken.

    ``warn_once(key, message)`` reports a fallback once; ``strict`` raises instead.
    """

    def __init__(
        self,
        every: int,
        probes: int,
        options: JacobianOptions,
        strict: bool,
        warn_once: Callable[[str, str], None],
    ) -> None:
        self.every = every
        self.probes = probes
        self.options = options
        self._strict = strict
        self._warn_once = warn_once
        self._generator: torch.Generator | None = None
        self._calls = 0  # steps that got Jacobian columns so far (the spectral schedule)

    def due(self, recorded_steps: int) -> bool:
        """Whether the recorded step after ``recorded_steps`` recorded ones gets Jacobian columns."""
        return bool(self.every) and recorded_steps % self.every == 0

    def columns(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        captures: list[BlockCapture],
        call: tuple[tuple[Any, ...], dict[str, Any]],
        rules: Mapping[str, Any],
        stack_names: Callable[[list[str]], Mapping[str, str]],
    ) -> Columns:
        """The Jacobian columns (``jac_batch`` included) of the blocks captured in one forward
        pass of ``model`` called with ``call = (args, kwargs)``; captures in forward order."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.options.seed)
        seen: set[str] = set()
        caps: list[BlockCapture] = []
        for cap in captures:
            if cap.name not in seen:  # weight sharing: the first call of each block
                seen.add(cap.name)
                caps.append(cap)
        stacks = stack_names([c.name for c in caps])
        for cap in caps:
            cap.stack = stacks[cap.name]
        spec_now = self.options.spectral_now(self._calls)
        self._calls += 1
        kwargs = self.options.columns_kwargs(spec_now)
        generator = self._generator
        twice = bool(spec_now)  # Jacobian-vector products by double backward

        def estimate(captured: list[BlockCapture]) -> Columns:
            # A pass of our own (sub-batch, whole-batch rerun) ran attention through the math
            # kernel when twice; activation checkpointing recomputes its blocks while the
            # Jacobian passes run, and must pick the same kernel, or the recomputed tensors
            # differ from the saved ones (CheckpointError). The training graph's recomputation
            # keeps the training kernel.
            own = twice and captured is not caps
            with differentiable_twice() if own else contextlib.nullcontext():
                return jacobian_columns(captured, probes=self.probes, generator=generator, **kwargs)

        dim = self.batch_dim(model)
        rerun = _Rerun(model, modules, rules, caps, call, generator, twice, dim or 0)
        with mute(), fsdp_kept_unsharded(model):
            used = (self._sub_batch(rerun, whole=False) if dim is not None else None) or caps
            try:
                cols = estimate(used)
            except RuntimeError:
                # The training graph may refuse a second differentiation (a compiled backward
                # frees its "donated" buffers): run the whole batch again, eagerly, instead.
                if used is not caps:
                    raise
                whole = self._sub_batch(rerun, whole=True) if dim is not None else None
                if whole is None:
                    raise
                used, cols = whole, estimate(whole)
        for cap in used:
            if dim is None:  # the whole batch, of a size that cannot be told
                cols[cap.name]["jac_batch"] = float("nan")
            else:
                cols[cap.name]["jac_batch"] = float(cap.x.shape[dim]) if cap.x.dim() > dim else 1.0
        return cols

    def batch_dim(self, model: nn.Module) -> int | None:
        """The batch axis the sub-batch slices (``options.batch_dim``, else told from the model's
        ``batch_first`` flags); None where it cannot be told (warned once: the training graph,
        the whole batch, is used instead of a sub-batch that might cut the sequence axis)."""
        if self.options.batch_dim is not None:
            return self.options.batch_dim
        dim = model_batch_dim(model)
        if dim is None and self.options.sub_batch is not None:
            self._warn_once(
                "batch_dim",
                "gradprobe: the model has submodules with batch_first=True and others with "
                "batch_first=False, so the batch axis of its tensors cannot be told: the Jacobian "
                "columns use the training graph (the whole batch) instead of a sub-batch that might "
                "slice the sequence axis. Pass jacobian_options={'batch_dim': 0 or 1}.",
            )
        return dim

    def _sub_batch(self, rerun: _Rerun, whole: bool) -> list[BlockCapture] | None:
        """Captures of a second pass over the first ``sub_batch`` samples (``whole``: all of
        them, the fallback for a training graph that refuses a second differentiation).

        None: use the training graph (no sub-batch asked for, a batch no larger than it, or a
        call that cannot be re-run safely).
        """
        k = self.options.sub_batch
        batch = batch_size(*rerun.call, dim=rerun.dim)
        if batch is None:
            return None
        if whole:
            k = batch
        elif k is None or batch <= k:
            return None  # the training graph already is the batch asked for, at no extra forward
        try:
            return rerun(k)
        except Exception as exc:
            if self._strict:
                raise
            self._warn_once(
                "sub_batch",
                f"gradprobe: the sub-batch forward pass for the Jacobian columns failed "
                f"({type(exc).__name__}: {exc}); using the training graph (the whole batch) instead. "
                "Pass jacobian_options={'sub_batch': None} to always use it.",
            )
            return None


class _Rerun:
    """A second forward pass of one training call over its first ``k`` samples, capturing the
    same blocks as the training pass did (side-effect free: see ``jacobian.sub_batch_forward``)."""

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        rules: Mapping[str, Any],
        caps: list[BlockCapture],
        call: tuple[tuple[Any, ...], dict[str, Any]],
        generator: torch.Generator,
        twice: bool,
        dim: int = 0,
    ) -> None:
        self.model, self.modules, self.rules, self.caps = model, modules, rules, caps
        self.call, self.generator, self.twice, self.dim = call, generator, twice, dim

    def __call__(self, k: int) -> list[BlockCapture] | None:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        named = [(c.name, self.modules[c.name]) for c in self.caps]
        args, kwargs = self.call
        rerun = sub_batch_captures(
            self.model, named, args, kwargs, k, seed, twice=self.twice, rules=self.rules, dim=self.dim
        )
        if rerun is None:
            return None
        got = [c.name for c in rerun if c.y_edge is not None]
        want = [c.name for c in self.caps]
        if got != want:
            raise RuntimeError(f"it ran the blocks {got} with a graph, the training pass {want}")
        for cap, mine in zip(rerun, self.caps, strict=True):
            cap.stack = mine.stack
        return rerun


def paths_decomposition(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    shortcut_modules: Mapping[str, nn.Module],
    call: tuple[tuple[Any, ...], dict[str, Any]],
    options: JacobianOptions,
) -> Any:
    """The path-length decomposition (a frame) of one training call, on its sub-batch
    (``options.paths_sub_batch``) in a second forward pass of its own (the training graph is
    not used)."""
    args, kwargs = call
    dim = options.batch_dim if options.batch_dim is not None else model_batch_dim(model)
    if dim != 0:
        raise RuntimeError(
            "the path-length decomposition slices its sub-batch along the leading axis, and this "
            "model's batch axis is not the leading one (batch_first=False, or jacobian_options "
            "batch_dim) or cannot be told: it would cut the sequence axis; it is not taken"
        )
    with mute():
        frame = sub_batch_decomposition(
            model, named, shortcut_modules, tuple(args), dict(kwargs), options.paths_sub_batch, options.seed
        )
    if frame is None:
        raise RuntimeError(
            "the forward call cannot be re-run safely (an argument that is neither a tensor nor a "
            "plain value)"
        )
    return frame
