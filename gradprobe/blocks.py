"""Block selection: turn ``blocks=`` into an ordered list of ``(name, module)``.

A *block* is the unit whose input/output gradients and distance from identity
gradprobe measures. ``select_blocks`` accepts:

* ``"auto"`` -- the repeated computational unit (rule below);
* a list (or a single string) of qualified names or glob patterns. In a pattern
  ``*`` matches within one dotted segment (``"layer*.*"`` matches ``layer1.0``
  but not ``layer1.0.conv1``) and ``**`` matches any number of segments;
* a module class or tuple of classes (``isinstance``);
* a predicate ``(name, module) -> bool``.

The ``"auto"`` rule
-------------------
1. A *group* is an ``nn.Sequential`` or ``nn.ModuleList`` whose children all have
   the same class and at least one parameter between them (GPT-2's
   ``transformer.h``, BERT's ``encoder.layer``, torchvision's ``layer1`` ...).
2. Each child of a group is a candidate block, except a child that is itself a
   group (a stage that is a ``Sequential`` of blocks) or a *wrapper* whose only
   child module is a group (Hugging Face's ``ResNetStage``): those are looked
   through, so their own children become candidates instead.
3. Only the outermost candidates are kept: a candidate inside another selected
   block is dropped (the conv layers inside a Hugging Face bottleneck layer,
   the experts inside a transformer layer).

So torchvision ResNets give ``layer1.0 ... layer4.1`` (not their convs, not the
stages), GPT-2 gives ``transformer.h.N``, BERT ``encoder.layer.N``, Hugging
Face ResNet its basic/bottleneck layers, and ``nn.Sequential(Block(), Block(),
...)`` its blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Union

from torch import nn

BlockSpec = Union[  # noqa: UP007 (a runtime alias: ``X | Y`` of these typing objects needs 3.10+ anyway)
    str,
    Sequence[str],
    type[nn.Module],
    tuple[type[nn.Module], ...],
    Callable[[str, nn.Module], bool],
]

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_MAX_CANDIDATES = 20


def _is_group(module: nn.Module) -> bool:
    if not isinstance(module, _CONTAINERS):
        return False
    children = list(module.children())
    if not children:
        return False
    first = type(children[0])
    if any(type(c) is not first for c in children):
        return False
    return any(True for _ in module.parameters())


def _looked_through(module: nn.Module) -> bool:
    if _is_group(module):
        return True
    children = list(module.children())
    return len(children) == 1 and _is_group(children[0])


def _auto(model: nn.Module) -> list[str]:
    candidates: list[str] = []
    for name, module in model.named_modules():
        if not _is_group(module):
            continue
        for child_name, child in module.named_children():
            if _looked_through(child):
                continue
            candidates.append(f"{name}.{child_name}" if name else child_name)
    # Keep the outermost: drop a candidate nested inside another candidate.
    chosen = set(candidates)
    return [c for c in candidates if not any(_is_ancestor(other, c) for other in chosen if other != c)]


def _is_ancestor(parent: str, child: str) -> bool:
    return child.startswith(parent + ".")


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a block-name glob: ``*`` and ``?`` stay inside one dotted
    segment, ``**`` crosses dots. Shared by block selection on models and on frames.

    >>> rx = glob_to_regex("layer*.*")
    >>> bool(rx.match("layer1.0")), bool(rx.match("layer1.0.conv1"))
    (True, False)
    """
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += r"[^.]*"
            i += 1
        elif pattern[i] == "?":
            out += r"[^.]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def candidate_names(model: nn.Module, limit: int = _MAX_CANDIDATES) -> list[str]:
    """Names of modules that could sensibly be blocks (composite modules with parameters)."""
    names = [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.children()) and any(True for _ in module.parameters())
    ]
    if len(names) < limit:  # small models: leaf layers are candidates too
        names += [
            name
            for name, module in model.named_modules()
            if name and name not in names and any(True for _ in module.parameters(recurse=False))
        ]
    return names[:limit]


def _nothing_matched(model: nn.Module, asked: object) -> ValueError:
    names = candidate_names(model)
    listing = ", ".join(names) if names else "(the model has no submodules with parameters)"
    return ValueError(
        f"blocks={asked!r} selected no module of {type(model).__name__}. "
        f"Candidate module names: {listing}. Pass blocks= a list of these names, glob patterns "
        "such as 'layer*.*', a module class, or a predicate (name, module) -> bool."
    )


def select_blocks(model: nn.Module, blocks: BlockSpec = "auto") -> list[tuple[str, nn.Module]]:
    """Resolve ``blocks=`` into ``(qualified name, module)`` pairs in module order.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
    >>> [name for name, _ in select_blocks(net)]
    ['0', '1', '2']
    >>> [name for name, _ in select_blocks(net, "*.0")]
    ['0.0', '1.0', '2.0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gradprobe needs a torch.nn.Module, got {type(model).__name__}; pass the model itself "
            "(for a wrapper such as a Lightning module or a pipeline, pass its inner nn.Module)"
        )
    # A torch.compile'd model wraps the original as ``_orig_mod``: name blocks as in the original.
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        model = inner
    named = dict(model.named_modules())
    selected: list[str]
    if isinstance(blocks, str) and blocks == "auto":
        selected = _auto(model)
    elif isinstance(blocks, str) or (
        isinstance(blocks, Sequence)
        and not isinstance(blocks, str)
        and all(isinstance(b, str) for b in blocks)
    ):
        patterns: list[str] = [blocks] if isinstance(blocks, str) else [str(b) for b in blocks]
        if not patterns:
            raise ValueError("blocks= is an empty list; pass 'auto' or at least one module name or pattern")
        selected = []
        for pattern in patterns:
            if pattern in named and pattern:
                hits = [pattern]
            else:
                rx = glob_to_regex(pattern)
                hits = [n for n in named if n and rx.match(n)]
            if not hits:
                raise _nothing_matched(model, pattern)
            selected += [h for h in hits if h not in selected]
        order = {n: i for i, n in enumerate(named)}
        selected.sort(key=order.__getitem__)
    elif (isinstance(blocks, type) and issubclass(blocks, nn.Module)) or (
        isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks)
    ):
        selected = [n for n, m in named.items() if n and isinstance(m, blocks)]
    elif callable(blocks):
        selected = [n for n, m in named.items() if n and blocks(n, m)]  # type: ignore[call-arg]
    else:
        raise TypeError(
            f"blocks= must be 'auto', a name or glob pattern, a list of them, a module class or tuple of "
            f"classes, or a predicate (name, module) -> bool; got {type(blocks).__name__}"
        )
    if not selected:
        raise _nothing_matched(model, blocks)
    return [(n, named[n]) for n in selected]
