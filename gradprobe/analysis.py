"""The one-shot functions: :func:`analyze` and :func:`paths`, one forward and backward pass each,
without training and without changing the model (``spectrum`` is in :mod:`gradprobe.jacobian`).

They sit above the probe (``analyze`` attaches one) and above what they share with it:
the model-state guard and the default loss (:mod:`gradprobe.passes`) and the path-length
decomposition over captured blocks (:mod:`gradprobe.path_lengths`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._tensors import mute
from .blocks import BlockSpec, select_blocks, shortcut_modules
from .jacobian import ACCURATE_SPECTRA, differentiable_twice
from .passes import preserved, projection_loss
from .path_lengths import captured_decomposition
from .probe import attach

if TYPE_CHECKING:
    import pandas as pd

Tensor = torch.Tensor


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


def paths(
    model: nn.Module,
    inputs: Tensor | tuple[Any, ...],
    *,
    loss_fn: Callable[[Any], Tensor] | None = None,
    blocks: BlockSpec = "auto",
    seed: int = 0,
    max_length: int | None = None,
    shortcuts: Mapping[str, str | nn.Module] | None = None,
) -> pd.DataFrame:
    """The gradient at each stack's input split by path length: one row per (stack, length).

    One forward pass on ``inputs`` (a tensor or a tuple of positional arguments); the loss
    is ``loss_fn(output)``, or with ``loss_fn=None`` the projection of the model's first
    output tensor onto a fixed standard-normal direction drawn from ``seed`` (as in
    :func:`gradprobe.analyze`). Then, backward through each stack, the coefficients c_k of
    :mod:`gradprobe.path_lengths`: ``path_grad`` = ``|c_k|``, ``share``, ``n_paths`` = C(L_s, k),
    ``per_path``, ``cum_share``; ``attrs`` holds ``effective_length``, ``central_90`` and
    per-stack details (see :mod:`gradprobe.path_lengths`). ``max_length`` drops longer paths
    (cost about L * max_length VJPs instead of L^2 / 2; what they carried is the stack's
    ``remainder``). ``shortcuts``: ``{block: child name or module}`` as in
    :func:`gradprobe.attach` (default: a child named ``shortcut`` or ``downsample``).

    The model is left as it was: parameters, ``.grad``, buffers (BatchNorm running
    statistics), train/eval mode and the global RNG.

    >>> import torch, torch.nn as nn, gradprobe
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> net = nn.Sequential(Res(), Res(), Res())
    >>> frame = gradprobe.paths(net, torch.randn(8, 4))
    >>> frame["length"].tolist(), frame["n_paths"].tolist()
    ([0, 1, 2, 3], [1.0, 3.0, 3.0, 1.0])
    >>> round(float(frame["share"].sum()), 6)
    1.0
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    named = select_blocks(model, blocks)
    shortcut_of = shortcut_modules(named, shortcuts)

    def loss_of(output: Any) -> Tensor:
        return loss_fn(output) if loss_fn is not None else projection_loss(output, seed)

    # Muted: a probe attached to the model must not record this pass as a training step.
    with preserved(model, args), mute():
        frame, info = captured_decomposition(lambda: model(*args), named, shortcut_of, loss_of, max_length)
    _annotate(frame, info)
    _warn_unrun([n for n, _ in named], info)
    _warn_bypass(info)
    _warn_cancellation(info)
    return frame


def _warn_unrun(names: list[str], info: list[dict[str, Any]]) -> None:
    seen = {b for item in info for b in item["blocks"]}
    missing = [n for n in names if n not in seen]
    if missing:
        warnings.warn(
            f"gradprobe.paths: block(s) {missing} were not called with gradients in this pass (a "
            "ModuleList/ModuleDict has no forward of its own; its parent calls its members): they are "
            "in no stack of the frame. Pass blocks= the modules that are called.",
            RuntimeWarning,
            stacklevel=3,  # past paths(): the caller's line
        )


def _warn_cancellation(info: list[dict[str, Any]]) -> None:
    for item in info:
        g, rem = item["grad_norm"], item["residual"]
        # Only where the lengths do cancel: rounding grown by sum_k |c_k| > |g|, not a bypass
        if item["max_length"] is None and g > 0 and rem > 1e-3 * g and item["cancellation"] > 1.5:
            warnings.warn(
                f"gradprobe.paths: in stack {item['stack']} the paths of different lengths cancel "
                f"(sum_k |c_k| = {item['cancellation']:.3g} |g|), so sum_k c_k matches the autograd "
                f"gradient only to {rem / g:.2g} of |g| at this precision; each |c_k| (path_grad, share) "
                "is still right to the rounding of its own size. Run the model and inputs in float64 "
                "(model.double()) for an exact sum. (A ReLU after the addition, y = relu(x + F(x)), "
                "makes F' = H' - I carry the ReLU's mask: such cancellation is typical there.)",
                RuntimeWarning,
                stacklevel=3,  # past paths(): the caller's line
            )
            return


def _warn_bypass(info: list[dict[str, Any]]) -> None:
    bypassed = [item for item in info if item["bypass"] > 0]
    if bypassed:
        listed = ", ".join(f"{item['stack']} ({item['bypass']:.2g} of |g|)" for item in bypassed)
        warnings.warn(
            f"gradprobe.paths: part of the gradient at the input of stack(s) {listed} bypasses their "
            "blocks (a long skip around them: a U-Net's skip connections, an outer residual around "
            "nested blocks), so the path lengths describe only the part that runs through the blocks: "
            "sum_k c_k is that part, and the rest is the stack's bypass (attrs['stacks'][i]['bypass'] "
            "and the remainder). Select the blocks of one level (for nested residuals, the outer ones) "
            "to decompose a gradient that runs through them all.",
            RuntimeWarning,
            stacklevel=3,  # past paths(): the caller's line
        )


def _annotate(frame: pd.DataFrame, info: list[dict[str, Any]]) -> None:
    frame.attrs["stacks"] = info
    if not info:
        frame.attrs.update(effective_length=math.nan, central_90=(math.nan, math.nan))
        return
    main = max(info, key=lambda s: s["branching"])  # first of the longest
    frame.attrs["effective_length"] = main["effective_length"]
    frame.attrs["central_90"] = (main["length_lo"], main["length_hi"])
