"""Hook handles: a module hook that is safe to copy, pickle and compile, and the one list of a
probe's handles, registered all or none and removed together.

>>> import torch, torch.nn as nn
>>> net, seen = nn.Linear(2, 2), []
>>> handles = Handles()
>>> with handles.all_or_none():
...     handles.forward(net, lambda module, args, output: seen.append(output.shape))
>>> _ = net(torch.zeros(1, 2)); handles.remove(); _ = net(torch.zeros(1, 2))
>>> seen, bool(handles)
([torch.Size([1, 2])], False)
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class ModuleHook:
    """A module hook that stays with its module: ``copy.deepcopy`` (an EMA copy) and
    ``pickle``/``torch.save`` give the copy a no-op from the standard library instead (so a
    pickled model loads without gradprobe); a shallow copy shares the hook dicts and is told
    apart by identity. Under ``torch.compile`` Dynamo breaks the graph around the hook and
    runs it eagerly: traced tensor hooks double-count gradients."""

    __slots__ = ("__weakref__", "_eager", "_fn", "_module", "compiled")

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self._fn, self._eager = fn, torch.compiler.disable(self._compiled_call, recursive=True)
        self._module = weakref.ref(module)
        self.compiled = False  # called from a frame Dynamo compiled

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        if module is not self._module():
            return None
        # Outside Dynamo the plain call: the disable wrapper costs about 40 us per call.
        return self._eager(module, *args) if torch.compiler.is_compiling() else self._fn(module, *args)

    def _compiled_call(self, module: nn.Module, *args: Any) -> Any:
        self.compiled = True  # runs eagerly (a graph break): a plain attribute write
        return self._fn(module, *args)

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (contextlib.nullcontext(), "__exit__"))

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return contextlib.nullcontext().__exit__

    def __copy__(self) -> ModuleHook:
        return self


class Handles:
    """The handles of one probe's hooks; true while any is registered."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._module_hooks: list[ModuleHook] = []
        self._compiled = False

    def __bool__(self) -> bool:
        return bool(self._handles)

    @property
    def compiled(self) -> bool:
        """Whether Dynamo ever compiled a frame that called one of these hooks (also removed ones)."""
        return self._compiled or any(h.compiled for h in self._module_hooks)

    def forward_pre(self, module: nn.Module, fn: Callable[..., Any], **options: Any) -> None:
        """``module.register_forward_pre_hook`` with ``fn`` wrapped in a :class:`ModuleHook`."""
        hook = ModuleHook(fn, module)
        self._handles.append(module.register_forward_pre_hook(hook, **options))
        self._module_hooks.append(hook)

    def forward(self, module: nn.Module, fn: Callable[..., Any], **options: Any) -> None:
        """``module.register_forward_hook`` with ``fn`` wrapped in a :class:`ModuleHook`."""
        hook = ModuleHook(fn, module)
        self._handles.append(module.register_forward_hook(hook, **options))
        self._module_hooks.append(hook)

    def add(self, handle: RemovableHandle) -> None:
        """Keep a handle registered some other way."""
        self._handles.append(handle)

    @contextlib.contextmanager
    def all_or_none(self) -> Iterator[Handles]:
        """Register in this block: should any registration raise, every handle goes."""
        try:
            yield self
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every handle (safe to call twice)."""
        self._compiled = self.compiled
        handles, self._handles, self._module_hooks = self._handles, [], []
        for handle in handles:
            handle.remove()
