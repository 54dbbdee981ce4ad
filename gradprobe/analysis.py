"""One-shot analysis: one forward and backward pass, without training and without changing the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .blocks import BlockSpec
from .capture import find_output
from .jacobian import ACCURATE_SPECTRA, differentiable_twice
from .probe import attach

if TYPE_CHECKING:
    import pandas as pd


@contextlib.contextmanager
def preserved(model: nn.Module, tensors: tuple[Any, ...] = ()) -> Iterator[None]:
    """Restore on exit what a forward/backward pass may change: buffers (BatchNorm running
    statistics), ``.grad`` of parameters and input tensors, and the global RNG states."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    inputs = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    input_grads = [t.grad for t in inputs]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            for p in params:
                p.grad = None
            for t in inputs:
                t.grad = None
            yield
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            for p, g in zip(params, grads, strict=False):
                p.grad = g
            for t, g in zip(inputs, input_grads, strict=False):
                t.grad = g


def projection_loss(output: Any, seed: int) -> torch.Tensor:
    """The default loss of :func:`analyze`: ``<output, u>`` with u standard normal from ``seed``.

    >>> out = torch.ones(2, 3)
    >>> bool(projection_loss(out, 0) == projection_loss(out, 0))
    True
    """
    out = find_output(output)
    if out is None:
        raise TypeError(
            f"the model returned {type(output).__name__} with no tensor in it; pass loss_fn= "
            "to turn its output into a scalar loss"
        )
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return (out * u).sum()


def analyze(
    model: nn.Module,
    inputs: torch.Tensor | tuple[Any, ...],
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    blocks: BlockSpec = "auto",
    jacobian: bool = True,
    probes: int = 8,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """Per-block metrics of one forward and backward pass on ``inputs``, as a frame with ``step`` = 0.

    ``inputs`` is a tensor or a tuple of positional arguments of ``model``. The loss is
    ``loss_fn(output)``, or with ``loss_fn=None`` the projection ``<output, u>`` of the
    model's first output tensor onto a fixed standard-normal ``u`` drawn from ``seed``:
    a loss whose gradient at the output is a random direction of unit-variance entries,
    independent of the labels. The model is left as it was: parameters, their ``.grad``,
    buffers (BatchNorm running statistics), train/eval mode and the global RNG.
    Extra keyword arguments go to :func:`gradprobe.attach` (``shortcuts=``, ``input=``,
    ``output=``, ``stacks=``, ...) or,
    for Jacobian knobs, to :func:`gradprobe.jacobian.jacobian_columns`.

    >>> import torch, torch.nn as nn, gradprobe
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
    >>> frame = gradprobe.analyze(net, torch.randn(8, 4), jacobian=False)
    >>> frame["step"].unique().tolist(), len(frame)
    ([0], 3)
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    attach_keys = {"shortcuts", "record_eval", "strict", "scaler", "input", "output", "stacks", "channel_dim"}
    attach_kwargs = {k: v for k, v in options.items() if k in attach_keys}
    jac_options = {k: v for k, v in options.items() if k not in attach_keys}
    jac_options.setdefault("seed", seed)
    # One-shot: every Jacobian column, spectral ones included, on the whole batch given, at the
    # accuracy of jacobian_columns' own defaults rather than the probe's cheaper training ones.
    jac_options = {"spec": True, "sub_batch": None, **ACCURATE_SPECTRA, **jac_options}
    with preserved(model, args):
        probe = attach(
            model,
            blocks,
            jacobian=jacobian,
            probes=probes,
            jacobian_options=jac_options,
            record_eval=attach_kwargs.pop("record_eval", True),
            **attach_kwargs,
        )
        try:
            # This forward pass is ours, not a training one: attention may run through the
            # kernel that can be differentiated twice, as the spectral columns need.
            kernels = differentiable_twice() if jacobian and jac_options["spec"] else contextlib.nullcontext()
            with kernels:
                output = model(*args)
            loss = loss_fn(output) if loss_fn is not None else projection_loss(output, seed)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            loss.backward()
        finally:
            probe.detach()
    return probe.frame()
