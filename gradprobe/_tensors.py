"""Small autograd helpers shared by the probe, the Jacobian estimators and the assertions.

How a block's input and output are found is :mod:`gradprobe.capture`'s job.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    A module's forward call then is a recomputation (activation checkpointing), not a
    new forward pass.

    >>> in_backward()
    False
    """
    return bool(torch._C._current_graph_task_id() != -1)


# A probe's own passes (the Jacobian columns, the path-length decomposition) run the model's
# blocks and their backward again; no probe may record them as training. Muting is per thread
# and context: a probe training in another thread records on.
_MUTED: contextvars.ContextVar[int] = contextvars.ContextVar("gradprobe_muted", default=0)


def muted() -> bool:
    """Whether the probes' hooks must ignore what runs now (inside :func:`mute`).

    >>> muted()
    False
    """
    return _MUTED.get() > 0


@contextlib.contextmanager
def mute() -> Iterator[None]:
    """Every probe's hooks ignore what runs inside, in this thread and context only.

    Autograd runs the backward of accelerator tensors on its own device threads, which
    do not see this thread's context; multithreaded backward is switched off inside
    (a thread-local autograd setting), so the backward passes started here run on
    this thread and their hooks see the mute.

    >>> with mute():
    ...     muted()
    True
    """
    token = _MUTED.set(_MUTED.get() + 1)
    try:
        with torch.autograd.set_multithreading_enabled(False):
            yield
    finally:
        _MUTED.reset(token)
