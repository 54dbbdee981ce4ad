"""Assertions on gradient flow and identity behaviour, for test suites and CI.

Each ``assert_*`` function runs one forward and backward pass through
:func:`gradprobe.analyze` (the model is left exactly as it was: parameters, their
``.grad``, buffers, train/eval mode and the global RNG), or checks a frame you
pass instead of a model (``Probe.frame()``, a saved :class:`gradprobe.Run`, every
recorded step of it). A passing assertion returns the frame it checked, so a
test can go on inspecting it; a failing one raises
:class:`GradientAssertionError` (an ``AssertionError``) whose message names the
rule, the threshold, every offending block with its value and index (a table of
at most 10 rows, then a summary of the rest) and ends with one line of advice.
The exception carries ``.violations`` and ``.frame``.

>>> import torch, torch.nn as nn
>>> from gradprobe.testing import assert_gradient_flow
>>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
>>> frame = assert_gradient_flow(net, torch.randn(16, 8))
>>> len(frame)
3

:func:`check` applies the same rules to any frame and returns the violations
instead of raising, e.g. on every step of a recorded training run.

Three rooms: :mod:`gradprobe.testing.bands` (band checks on frames, and the
listeners of the frames they check; it never runs a model),
:mod:`gradprobe.testing.asserts` (the band assertions, on a frame or on a model
measured through :func:`gradprobe.analyze`) and :mod:`gradprobe.testing.diagnose`
(diagnoses that run the model: :func:`assert_finite_gradients`). Neither imports
pytest, nor (at import time) pandas or torch; the pytest plugin
(:mod:`gradprobe.pytest_plugin`) learns which frames a test looked at through
:func:`frame_listener`.
"""

from __future__ import annotations

from .asserts import assert_gradient_flow, assert_jacobian_bounded, assert_near_identity
from .bands import (
    BAND_ALIASES,
    FINITE_COLUMNS,
    MAX_TABLE_ROWS,
    FrameListener,
    GradientAssertionError,
    Violation,
    add_frame_listener,
    check,
    format_violations,
    frame_listener,
)
from .diagnose import assert_finite_gradients

__all__ = [
    "BAND_ALIASES",
    "FINITE_COLUMNS",
    "MAX_TABLE_ROWS",
    "FrameListener",
    "GradientAssertionError",
    "Violation",
    "add_frame_listener",
    "assert_finite_gradients",
    "assert_gradient_flow",
    "assert_jacobian_bounded",
    "assert_near_identity",
    "check",
    "format_violations",
    "frame_listener",
]
