"""The ``assert_*`` band assertions: on a frame, a run or a probe, or on a model and its
inputs, measured once through :func:`gradprobe.analyze`.

The checks and the failure messages are those of :mod:`gradprobe.testing.bands`, which
reads frames only; this module is the one that may run a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .bands import _as_frame, _assert_bands, _assert_finite, _filter_blocks, _is_module, _name_list, _notify

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from ..blocks import BlockSpec

__all__ = ["assert_gradient_flow", "assert_jacobian_bounded", "assert_near_identity"]


def _obtain(
    who: str,
    model: Any,
    inputs: Any,
    *,
    loss_fn: Any,
    blocks: Any,
    jacobian: bool,
    seed: int,
    options: dict[str, Any],
) -> tuple[pd.DataFrame, str]:
    """The frame to check and how to call it in messages: analyze(model, inputs), or the given frame."""
    if not _is_module(model):
        if inputs is not None or loss_fn is not None or options:
            raise TypeError(
                f"{who}: inputs=, loss_fn= and analysis options apply to a model; with a frame or a run, "
                "pass only the frame (and blocks=)"
            )
        frame = _filter_blocks(_as_frame(model, f"{who}()"), blocks, who)
        return frame, "the given frame"
    if inputs is None:
        raise TypeError(
            f"{who}(model, inputs) needs the inputs of the model: a batch tensor, or a tuple of the "
            "positional arguments of model(...)"
        )
    from ..analysis import analyze

    frame = analyze(model, inputs, loss_fn=loss_fn, blocks=blocks, jacobian=jacobian, seed=seed, **options)
    return frame, type(model).__name__


# ----------------------------------------------------------------------------- assertions


def assert_gradient_flow(
    model: nn.Module | pd.DataFrame | Any,
    inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    blocks: BlockSpec = "auto",
    min_cum_gain: float | None = 1e-3,
    max_cum_gain: float | None = 1e3,
    min_gain: float | None = None,
    max_gain: float | None = None,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """Assert that no block's gradient vanishes or explodes: ``cum_gain`` (and ``gain``) stay in a band.

    ``cum_gain`` of a block is the norm of the loss gradient at its input over
    the norm at the output of the last block of its stack (an encoder and a decoder
    are checked as two chains): ``min_cum_gain`` catches a gradient that
    vanishes on its way back to the input, ``max_cum_gain`` one that explodes.
    ``min_gain``/``max_gain`` bound each block's own gain. One forward/backward
    pass of :func:`gradprobe.analyze` (``loss_fn``, ``seed`` and ``**options`` go
    there; without ``loss_fn`` the loss is a fixed random projection of the output);
    or pass a frame / :class:`gradprobe.Run` as ``model`` to check every recorded
    step. A block with nan/inf activations or gradients fails first, named as such (no band
    is judged on it). Returns the frame; raises :class:`GradientAssertionError`.

    >>> import torch, torch.nn as nn
    >>> deep = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(40)])
    >>> assert_gradient_flow(deep, torch.randn(32, 16))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    gradprobe.testing.GradientAssertionError: ...
    """
    __tracebackhide__ = True  # pytest shows the test's line, not gradprobe's internals
    bands = {
        "min_cum_gain": min_cum_gain,
        "max_cum_gain": max_cum_gain,
        "min_gain": min_gain,
        "max_gain": max_gain,
    }
    who = "assert_gradient_flow"
    frame, label = _obtain(
        who, model, inputs, loss_fn=loss_fn, blocks=blocks, jacobian=False, seed=seed, options=options
    )
    _notify(who, frame)
    _assert_bands(who, frame, label, bands)
    return frame


def _identity_shaped(frame: pd.DataFrame) -> Any:
    """Rows of blocks whose output has their input's shape (those that can be the identity).

    The frame says so indirectly: ``skip_grad`` (and ``jac_id``) are NaN exactly for
    blocks that change shape. Without gradient information (a nan gradient) the
    block is kept, so that nothing is skipped by mistake.
    """
    import numpy as np
    import pandas as pd

    def col(name: str) -> pd.Series:
        return frame[name] if name in frame.columns else pd.Series(np.nan, index=frame.index)

    if "skip_grad" not in frame.columns and "jac_id" not in frame.columns:
        return pd.Series(True, index=frame.index)
    unknown = ~np.isfinite(col("grad_out").astype(float))
    return col("skip_grad").notna() | col("jac_id").notna() | unknown


def assert_near_identity(
    model: nn.Module | pd.DataFrame | Any,
    inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    blocks: BlockSpec = "auto",
    max_res_ratio: float | None = 0.05,
    max_jac_id: float | None = None,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """Assert that every identity-shaped block starts near the identity map.

    Checks ``res_ratio = |y - x| / |x| <= max_res_ratio`` (forward: the block's
    output is close to its input) and, with ``max_jac_id``, ``jac_id = |J - I|_F /
    sqrt(n) <= max_jac_id`` (the block is close to the identity as a linear map;
    computes the Jacobian columns). Blocks whose output shape differs from their
    input shape cannot be the identity and are skipped (the message names them);
    if every block changes shape, ``ValueError``. Meant for models at
    initialisation built to start at the identity: zero-initialised residual
    branches, ReZero, SkipInit, Fixup. A block with nan/inf activations or gradients
    fails first, named as such (its shape cannot be told from a nan gradient). Returns the
    whole frame; raises :class:`GradientAssertionError`.

    >>> import torch, torch.nn as nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(8, 8)
    ...         self.alpha = nn.Parameter(torch.zeros(()))  # ReZero: y = x + alpha * F(x)
    ...     def forward(self, x):
    ...         return x + self.alpha * torch.relu(self.fc(x))
    >>> frame = assert_near_identity(nn.Sequential(*[Block() for _ in range(6)]), torch.randn(4, 8))
    >>> float(frame["res_ratio"].max())
    0.0
    """
    __tracebackhide__ = True  # pytest shows the test's line, not gradprobe's internals
    if max_res_ratio is None and max_jac_id is None:
        raise ValueError("assert_near_identity: pass max_res_ratio= and/or max_jac_id=; both are None")
    who = "assert_near_identity"
    frame, label = _obtain(
        who,
        model,
        inputs,
        loss_fn=loss_fn,
        blocks=blocks,
        jacobian=max_jac_id is not None,
        seed=seed,
        options=options,
    )
    _notify(who, frame)
    _assert_finite(who, frame, label)  # a nan gradient would hide the block's shape
    same = _identity_shaped(frame)
    skipped = list(dict.fromkeys(frame.loc[~same, "block"].astype(str)))
    if not same.any():
        raise ValueError(
            f"{who}: every selected block of {label} changes the shape of its input ({_name_list(skipped)}), "
            "so none of them can be the identity; pass blocks= naming the residual blocks"
        )
    notes = []
    if skipped:
        notes.append(f"skipped (output shape differs from input shape): {_name_list(skipped)}")
    bands = {"max_res_ratio": max_res_ratio, "max_jac_id": max_jac_id}
    scope = "block whose output has its input's shape"
    _assert_bands(who, frame.loc[same], label, bands, notes, scope=scope)
    return frame


def assert_jacobian_bounded(
    model: nn.Module | pd.DataFrame | Any,
    inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    blocks: BlockSpec = "auto",
    max_spec: float | None = None,
    max_prod_spec: float | None = None,
    min_prod_spec: float | None = None,
    probes: int = 8,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """Assert spectral bounds: each block's Jacobian, and the product from each block to the output.

    ``max_spec`` bounds ``jac_spec``, the largest singular value of each block's
    Jacobian (a Lipschitz constant of the block at this batch); ``max_prod_spec``
    and ``min_prod_spec`` bound ``prod_spec``, the largest singular value of the
    product of block Jacobians from each block's input to the last block's output.
    The singular values are Lanczos estimates: each is a lower bound of the true
    value that converges to it, so a failed ``max_`` bound is certain while a pass
    is accurate to the estimator's tolerance (``power_iters=``, ``tol=`` go to
    :func:`gradprobe.jacobian.jacobian_columns`). Returns the frame; raises
    :class:`GradientAssertionError`.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
    >>> with torch.no_grad():
    ...     for block in net:
    ...         _ = block[0].weight.copy_(0.5 * torch.eye(8))
    >>> frame = assert_jacobian_bounded(net, torch.randn(4, 8), max_spec=0.6)
    >>> bool(frame["jac_spec"].max() <= 0.5 + 1e-6)  # tanh' <= 1 times 0.5 I
    True
    """
    __tracebackhide__ = True  # pytest shows the test's line, not gradprobe's internals
    bands = {"max_jac_spec": max_spec, "max_prod_spec": max_prod_spec, "min_prod_spec": min_prod_spec}
    if all(v is None for v in bands.values()):
        raise ValueError(
            "assert_jacobian_bounded: pass at least one of max_spec=, max_prod_spec=, min_prod_spec="
        )
    who = "assert_jacobian_bounded"
    if _is_module(model):
        options = {"probes": probes, **options}
    frame, label = _obtain(
        who, model, inputs, loss_fn=loss_fn, blocks=blocks, jacobian=True, seed=seed, options=options
    )
    _notify(who, frame)
    _assert_bands(who, frame, label, bands)
    return frame
