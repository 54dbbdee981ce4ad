"""Small tensor and autograd helpers shared by the probe, the Jacobian estimators and the assertions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor of a module output: a tensor, a tuple/list, or a dict-like output (``ModelOutput``).

    >>> first_tensor((None, torch.ones(1), torch.zeros(1))).tolist()
    [1.0]
    """
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, (tuple, list)):
        values = obj
    else:
        return None
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    A module's forward call then is a recomputation (activation checkpointing), not a
    new forward pass.

    >>> in_backward()
    False
    """
    return bool(torch._C._current_graph_task_id() != -1)


def swap_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], swap: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A block call's arguments with its input (first positional tensor, or ``hidden_states=``)
    replaced by ``swap(x)``, as a forward pre-hook returns them; None if there is no such input.

    >>> swap_input((torch.ones(1), 2), {}, lambda x: 2 * x)[0][0].tolist()
    [2.0]
    """
    x: Any = args[0] if args else None
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return (swap(x), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if x is None and isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
        return args, {**kwargs, "hidden_states": swap(hidden)}
    return None
