"""Hook handles: a module hook that is safe to copy, pickle and compile, and the one list of a
probe's handles, registered all or none and removed together.

A copy of a probed model carries no gradprobe hooks: ``copy.deepcopy`` (an EMA copy,
``AveragedModel``) leaves the copy's hook dicts as the user made them once it returns. A
pickled model (``torch.save``) loads without gradprobe: where the loading process has imported
gradprobe its hooks load as stand-ins that take themselves out of the module's hook dicts on
its first call, elsewhere as a no-op of the standard library (a pickle cannot run code once
it is loaded, nor choose without gradprobe).

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
import importlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Hook dicts of a module, each with the dicts keyed by the same handle ids (what a handle's
#: ``remove()`` clears together).
_HOOK_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
}


class Copied:
    """What a copied or unpickled :class:`ModuleHook` becomes: on the first call of its module
    it removes every such stand-in from the hook dicts of that module and its submodules (as
    their handles would), and it never changes what the module computes.

    >>> import torch, torch.nn as nn
    >>> net = nn.Linear(2, 2)
    >>> _ = net.register_forward_hook(Copied(), with_kwargs=True)  # what an unpickled copy holds
    >>> _ = net(torch.zeros(1, 2)); dict(net._forward_hooks), dict(net._forward_hooks_with_kwargs)
    ({}, {})
    """

    __slots__ = ()

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        # Under torch.compile a graph break: Dynamo would trace the changes to the hook dicts.
        (_remove_eagerly if torch.compiler.is_compiling() else _remove_all)(module)

    def __reduce__(self) -> tuple[Any, ...]:
        return _STAND_IN

    def __copy__(self) -> Copied:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Copied:
        return self


COPIED = Copied()


class _Reduced:
    """Pickles as the reduce value it holds: a call made when the pickle loads."""

    __slots__ = ("value",)

    def __init__(self, value: tuple[Any, ...]) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return self.value


# What a hook pickles as: at load, getattr(sys.modules.get("gradprobe.hooks"), "COPIED", no-op), built
# of standard-library calls only, so that the pickle loads where gradprobe is not installed.
_SYS_MODULES = _Reduced((getattr, (_Reduced((importlib.import_module, ("sys",))), "modules")))
_STAND_IN = (
    getattr,
    (_Reduced((dict.get, (_SYS_MODULES, __name__))), "COPIED", contextlib.nullcontext().__exit__),
)


def _stand_in(hook: Any) -> bool:
    """A :class:`Copied`, or the no-op a hook loads as where gradprobe was not imported."""
    return isinstance(hook, Copied) or (
        getattr(hook, "__func__", None) is contextlib.nullcontext.__exit__
        and type(getattr(hook, "__self__", None)) is contextlib.nullcontext
    )


def remove_copied(module: nn.Module) -> int:
    """Remove the stand-ins of copied or unpickled gradprobe hooks from ``module``'s hook dicts (as
    their handles would); how many there were. :func:`gradprobe.attach` does it for the model's
    modules, so that a model pickled while attached and loaded without gradprobe loses them."""
    found = 0
    for name, companions in _HOOK_DICTS.items():
        hooks = module.__dict__.get(name)
        if not hooks:
            continue
        ids = [key for key, hook in hooks.items() if _stand_in(hook)]
        for key in ids:
            for dict_name in (name, *companions):
                module.__dict__.get(dict_name, {}).pop(key, None)
        found += len(ids)
    return found


def _remove_all(module: nn.Module) -> None:
    for m in module.modules():
        remove_copied(m)


_remove_eagerly = torch.compiler.disable(_remove_all, recursive=True)


class _RemoveAfterCopy:
    """Kept in a ``copy.deepcopy`` memo: freed when that deepcopy returns, when the copy's state is
    complete, and then takes the stand-ins out of the copied module's hook dicts."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a finalizer must not raise (the stand-ins stay)
            remove_copied(self.module)


class ModuleHook:
    """A module hook that stays with its module: ``copy.deepcopy`` (an EMA copy) and
    ``pickle``/``torch.save`` give the copy a :class:`Copied` stand-in instead, which a deepcopy
    removes from the copy's hook dicts as it returns and an unpickled one removes on the
    module's first call; a shallow copy shares the hook dicts and is told apart by identity.
    Under ``torch.compile`` Dynamo breaks the graph around the hook and runs it eagerly:
    traced tensor hooks double-count gradients."""

    __slots__ = ("__weakref__", "_fn", "_module", "compiled")

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self._fn = fn
        self._module = weakref.ref(module)
        self.compiled = False  # called from a frame Dynamo compiled

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        if module is not self._module():
            return None
        # Outside Dynamo the plain call: the disable wrapper costs about 40 us per call.
        return (
            _call_eagerly(self, module, *args) if torch.compiler.is_compiling() else self._fn(module, *args)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return _STAND_IN

    def __deepcopy__(self, memo: dict[Any, Any]) -> Copied:
        # deepcopy makes the module's copy (memo[id(module)]) before copying its state, hook dicts
        # included; the memo lives until that deepcopy returns, and so does what it holds.
        module = self._module()
        copied = memo.get(id(module)) if module is not None else None
        key = ("gradprobe.hooks", id(copied))
        if isinstance(copied, nn.Module) and key not in memo:
            memo[key] = _RemoveAfterCopy(copied)
        return COPIED

    def __copy__(self) -> ModuleHook:
        return self


def _compiled_call(hook: ModuleHook, module: nn.Module, *args: Any) -> Any:
    hook.compiled = True  # runs eagerly (a graph break): a plain attribute write
    return hook._fn(module, *args)


# One disabled function for every hook: a wrapper made per hook would cost about 30 us each at
# attach, most of a second on a model of thousands of blocks.
_call_eagerly = torch.compiler.disable(_compiled_call, recursive=True)


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
