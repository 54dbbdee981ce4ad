"""Diagnoses that run the model: :func:`assert_finite_gradients` and where its nan/inf comes from.

One forward and backward pass through :func:`gradprobe.analyze` (the model is left as it
was); an autograd-engine callback queued from the loss's gradient reads every parameter's
``.grad`` when that pass ends. The message follows a non-finite value to its origin: the
first block in forward order whose output turns non-finite, else the first block in
backward order whose input gradient does, else the parameter whose gradient does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from .asserts import _obtain
from .bands import (
    FINITE_COLUMNS,
    Violation,
    _check,
    _fail,
    _finite_violations,
    _fmt,
    _is_module,
    _notify,
    _order,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from ..blocks import BlockSpec

__all__ = ["assert_finite_gradients"]


def _nonfinite_value(t: torch.Tensor) -> float | None:
    """nan if ``t`` holds a nan, inf if it holds an inf (and no nan), None when all finite."""
    import torch

    if t.is_sparse:
        t = t.coalesce().values()
    if torch.isnan(t).any():
        return math.nan
    if torch.isinf(t).any():
        return math.inf
    return None


def _finite_story(
    frame: pd.DataFrame,
    violations: Sequence[Violation],
    inputs_bad: bool,
) -> tuple[str, str]:
    """Where the first nan/inf comes from, and its advice (assert_finite_gradients' reporting rule)."""
    # The story of one step (of one model): the first one with a violation.
    first = violations[0]
    violations = [v for v in violations if v.step == first.step and v.model == first.model]
    rows = frame
    if "step" in rows.columns:
        rows = rows.loc[rows["step"] == first.step]
    if first.model is not None and "model" in rows.columns:
        rows = rows.loc[rows["model"].astype(str) == first.model]
    rows = rows.sort_values("index")
    by_block: dict[str, dict[str, float]] = {}
    for v in violations:
        if v.column in FINITE_COLUMNS:
            by_block.setdefault(v.block, {})[v.column] = v.value
    at = f"at step {first.step}, " if "step" in frame.columns and frame["step"].nunique() > 1 else ""
    if first.model is not None:
        at = f"in model {first.model!r}, {at}"
    story, advice = _finite_origin(rows, by_block, violations, inputs_bad)
    return at + story, advice


def _finite_origin(
    rows: pd.DataFrame,
    by_block: dict[str, dict[str, float]],
    violations: Sequence[Violation],
    inputs_bad: bool,
) -> tuple[str, str]:
    names = rows["block"].astype(str).tolist()
    forward_advice = (
        "log, sqrt, pow or division of a value that can be zero or negative (clamp it first, e.g. "
        "x.clamp_min(1e-6)), or an overflow in low precision (float16)."
    )
    # 1. Forward pass, in forward order: the first block whose output is non-finite made it
    #    (or, when its input is non-finite already, something before it did).
    for i, name in enumerate(names):
        bad = by_block.get(name, {})
        index = int(rows["index"].iloc[i])
        if "in_rms" in bad:
            if inputs_bad:
                return (
                    f"the model's input already holds {_fmt(bad['in_rms'])}",
                    "the data contains nan/inf: check the data pipeline (missing values, normalisation "
                    "by a zero standard deviation).",
                )
            before = f"between block {names[i - 1]!r} and block {name!r}" if i else f"before block {name!r}"
            return (
                f"non-finite values first appear in the forward pass {before} (index {index}): the input of "
                f"{name!r} is {_fmt(bad['in_rms'])}",
                f"look at the layers {before} (a stem, an embedding, code between blocks) for "
                f"{forward_advice}",
            )
        if "out_rms" in bad:
            return (
                f"non-finite values first appear in the forward pass of block {name!r} (index {index}): its "
                f"input is finite, its output is {_fmt(bad['out_rms'])}",
                f"look at the forward pass of {name!r} for {forward_advice}",
            )
    loss = [v for v in violations if v.column == "loss"]
    if loss:
        return (
            f"every block's output is finite but the loss is {_fmt(loss[0].value)}: it comes from the layers "
            "after the last block (the head) or from loss_fn",
            "look at the head and the loss: log of a probability that can be 0 (use log_softmax / "
            "cross_entropy on logits), division by zero, " + forward_advice.split(", or ")[0] + ".",
        )
    backward_advice = (
        "its forward pass is finite but its derivative is not: sqrt, norm or pow with exponent < 1 at 0, log "
        "at 0, or torch.where / masking that hides a nan or inf in the branch not taken (the gradient of "
        "that branch is still computed); add an eps or mask the input before the operation."
    )
    # 2. Backward pass, from the output towards the input: the first place where the gradient turns
    #    non-finite made it; everything nearer the input only inherits it.
    for i in reversed(range(len(names))):
        name, bad = names[i], by_block.get(names[i], {})
        index = int(rows["index"].iloc[i])
        if "grad_out" in bad:
            after = (
                f"between block {name!r} and block {names[i + 1]!r}"
                if i + 1 < len(names)
                else "after the last block"
            )
            return (
                "the forward pass is finite; in the backward pass the gradient is already "
                f"{_fmt(bad['grad_out'])} "
                f"at the output of block {name!r} (index {index}), so it turns non-finite {after}",
                f"look at the layers {after} (the head, the loss): "
                + backward_advice.replace("its forward", "their forward").replace(
                    "its derivative", "their derivative"
                ),
            )
        if "grad_in" in bad:
            return (
                "the forward pass is finite; in the backward pass the gradient first turns non-finite in "
                f"block {name!r} (index {index}): its output gradient is finite, its input gradient is "
                f"{_fmt(bad['grad_in'])}",
                f"look at block {name!r}: {backward_advice}",
            )
    # 3. Only parameter gradients: each is computed from finite activations and finite gradients,
    #    so the parameter's own use in the forward pass is to blame.
    params = [v for v in violations if v.column == "param_grad"]
    if not params:
        for v in violations:
            if v.column == "param_grad_norm":  # a recorded frame: per block, not per parameter
                return (
                    "activations and the gradients flowing through the blocks are finite, but the parameter "
                    f"gradients of block {v.block!r} (index {v.index}) are {_fmt(v.value)}",
                    f"look at how the parameters of {v.block!r} enter its forward pass: a derivative that is "
                    "infinite at their current value (sqrt, pow with exponent < 1, log or division at 0).",
                )
    if params:
        p = params[0]
        where = f"in the block at index {p.index}" if p.index >= 0 else "outside the probed blocks"
        return (
            f"activations and the gradients flowing through the blocks are finite, but the gradient of "
            f"parameter {p.block!r} ({where}) is {_fmt(p.value)}",
            f"look at how {p.block!r} enters the forward pass: its derivative is infinite at its current "
            "value (sqrt, pow with exponent < 1, log or division at 0).",
        )
    first = violations[0]
    return (
        f"{first}",
        "look at the named blocks first; the exception's .frame has every metric of every block.",
    )


def assert_finite_gradients(
    model: nn.Module | pd.DataFrame | Any,
    inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    blocks: BlockSpec = "auto",
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """Assert that no nan or inf appears in activations, gradients, parameter gradients or the loss.

    Checks every block's input and output (``in_rms``, ``out_rms``), its output and
    input gradients (``grad_out``, ``grad_in``), the gradient of every parameter
    (inside or outside the blocks, named in the message), and the loss. The message
    names where the first nan/inf comes from, by this rule: a value that turns
    non-finite in the forward pass shows in every later activation, so the origin
    is the first block in forward order whose output is non-finite (or the layers
    before it, or the model input, if its input already is); if the forward pass
    and the loss are finite, a non-finite gradient shows in every block between
    its origin and the input, so the origin is the first block in *backward*
    order whose input gradient is non-finite while its output gradient is finite;
    if only parameter gradients are non-finite, the first such parameter in
    forward order. Norms are accumulated in float32 (or wider), so a float32
    tensor with entries above about 1e19 also reads as inf. Pass a frame instead
    of a model to check the block columns of every recorded step. Returns the
    frame; raises :class:`GradientAssertionError`.

    >>> import torch, torch.nn as nn
    >>> class Log(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return torch.log(self.fc(x))  # nan where fc(x) < 0
    >>> net = nn.Sequential(Log(), Log())
    >>> try:
    ...     assert_finite_gradients(net, torch.randn(8, 4))
    ... except AssertionError as exc:
    ...     print(str(exc).splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
    assert_finite_gradients failed for Sequential: non-finite values first appear in the forward pass
    of block '0' (index 0): its input is finite, its output is nan
    """
    __tracebackhide__ = True  # pytest shows the test's line, not gradprobe's internals
    who = "assert_finite_gradients"
    rule = (
        "every block activation (in_rms, out_rms), block gradient (grad_out, grad_in), parameter gradient "
        "and the loss must be finite"
    )
    if not _is_module(model):
        frame, label = _obtain(
            who, model, inputs, loss_fn=loss_fn, blocks=blocks, jacobian=False, seed=seed, options=options
        )
        _notify(who, frame)
        violations = _check(frame, {"finite": True}, who)
        if violations:
            story, advice = _finite_story(frame, violations, inputs_bad=False)
            raise _fail(who, f"{label}: {story}", rule, violations, frame, advice=advice)
        return frame
    import torch

    from ..analysis import analyze
    from ..passes import projection_loss

    if inputs is None:
        raise TypeError(
            f"{who}(model, inputs) needs the inputs of the model: a batch tensor or a tuple of arguments"
        )
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    inputs_bad = any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in args
    )
    module = cast("nn.Module", model)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    seen: dict[str, Any] = {"loss": None, "grads": []}

    def read_grads() -> None:
        # Runs when the backward pass ends: every .grad holds this pass's gradient only,
        # because analyze() clears them before (and restores the user's afterwards).
        seen["grads"] = [(n, _nonfinite_value(p.grad)) for n, p in params if p.grad is not None]

    def on_loss_grad(grad: torch.Tensor) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(read_grads)

    def wrapped_loss(output: Any) -> Any:
        loss = loss_fn(output) if loss_fn is not None else projection_loss(output, seed)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            seen["loss"] = float(loss.detach())
            if loss.requires_grad:
                loss.register_hook(on_loss_grad)  # a hook on this pass's loss tensor: nothing of the model
        return loss

    with warnings.catch_warnings():
        # the probe warns about the first non-finite value it records; this assertion says more
        warnings.filterwarnings("ignore", message="gradprobe: non-finite", category=RuntimeWarning)
        frame = analyze(
            module, inputs, loss_fn=wrapped_loss, blocks=blocks, jacobian=False, seed=seed, **options
        )
    label = type(module).__name__
    _notify(who, frame)
    violations = [v for v in _finite_violations(frame) if v.column != "param_grad_norm"]
    spans = sorted(
        ((str(b), int(i)) for b, i in zip(frame["block"], frame["index"], strict=True)),
        key=lambda bi: len(bi[0]),
        reverse=True,
    )
    for name, value in seen["grads"]:
        if value is None:
            continue
        # the innermost block holding the parameter (blocks can nest when chosen by hand)
        index = next((i for b, i in spans if name.startswith(b + ".")), -1)
        violations.append(Violation("finite", name, index, 0, value, math.inf, "param_grad"))
    loss = seen["loss"]
    if loss is not None and not math.isfinite(loss):
        violations.append(Violation("finite", "<loss>", -1, 0, loss, math.inf, "loss"))
    if not violations:
        return frame
    violations.sort(key=_order)
    story, advice = _finite_story(frame, violations, inputs_bad)
    raise _fail(who, f"{label}: {story}", rule, violations, frame, advice=advice)
