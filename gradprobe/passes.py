"""What a forward and backward pass that is not a training step needs, below the probe and
the one-shot functions alike: :func:`preserved`, the guard that leaves the model as it
was, and :func:`projection_loss`, the default loss (used by ``analyze``, ``paths``, the
assertions and the probe's path decomposition during training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .capture import find_output


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
