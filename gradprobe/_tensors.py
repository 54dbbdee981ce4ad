"""Small autograd helpers shared by the probe, the Jacobian estimators and the assertions.

How a block's input and output are found is :mod:`gradprobe.capture`'s job.
"""

from __future__ import annotations

import torch


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    A module's forward call then is a recomputation (activation checkpointing), not a
    new forward pass.

    >>> in_backward()
    False
    """
    return bool(torch._C._current_graph_task_id() != -1)
