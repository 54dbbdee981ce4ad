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
A *container* is an ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``.

1. **Runs.** A *run* is a maximal sequence of at least 2 consecutive children of
   one container (in insertion order) that share a class and each hold
   parameters. Every member of a run is a candidate block, so
   ``nn.Sequential(conv, bn, relu, Block(), Block(), Block(), pool, flatten, head)``
   gives its ``Block`` modules and an ``nn.ModuleDict`` of blocks gives its values.
   A container holding a single module that has submodules, is not a stage and
   holds no run (``Sequential(BasicBlock())``, a ResNet stage of depth 1) is a
   run of one; a ``Sequential(Linear)`` head, or a whole model wrapped in a
   ``Sequential``, is not.
2. **Stages are looked through.** A *stage* is a module whose job is to hold a
   list of layers plus a few extra modules (a downsampling layer, a norm). Its
   *layer list* is the stage itself when it is a container, otherwise its child
   container that holds more than half of its parameters. A container is a
   stage when it holds a run; any other module when its layer list is *pure*:
   every child has the same class and holds parameters (``SwinStage.blocks``,
   ``ConvNextStage.layers``, Hugging Face ``ResNetStage.layers``,
   ``AlbertLayerGroup.albert_layers``) and its layers are not containers
   themselves (torchvision's ``InvertedResidual`` holds ``Sequential`` s of
   ``Conv2dNormActivation``, itself a ``Sequential``: it is a block). A module with a
   weight-free child of its own beside its layer list (an activation, an
   identity shortcut, dropout; containers aside) computes rather than routes:
   it is a block, not a stage (Hugging Face ResNet's basic layer holds a
   ``Sequential`` of two conv layers next to its ``activation``).
   When any member of a run is a stage, the whole run is a run of stages: no
   member of it is a candidate, each contributes its own layers instead, so
   the granularity is the same in every stage (Swin gives
   ``swin.encoder.layers.S.blocks.N`` for every ``S``, never a stage beside
   another stage's layers; a stem or a downsampling ``Sequential`` that sits in
   a run of stages contributes only the runs inside it).
3. **A stage with a single layer contributes that layer**: its layer list is
   pure with one child (a Swin, ConvNeXt or ResNet stage of depth 1; ALBERT's
   one shared layer, which sits alone in a one-element layer group).
4. **Outermost.** A candidate inside another candidate is dropped (the convs of
   a bottleneck, the experts of a mixture-of-experts layer).
5. **Called.** A candidate without a forward of its own (an ``nn.ModuleList`` or
   ``nn.ModuleDict``: its parent calls its members, so its hooks never fire) stands for
   its child holding the most parameters, looked into until one has a forward: the
   x-transformers layout ``layers = ModuleList([ModuleList([norm, f]), ...])``, run as
   ``for norm, f in layers: x = x + f(norm(x))``, gives ``layers.N.1``, the branch ``f``
   (the residual addition is in the parent's loop, inside no module). A probe still names
   every selected block that did not run in its first recorded step in one warning, with
   what ran inside it (:mod:`gradprobe.coverage`).

A weight's parametrizations (``torch.nn.utils.parametrize``: weight norm, spectral
norm) are bookkeeping of one layer and never blocks or stages.

Each selected block comes from one *run*: the container and the range of its
members, e.g. ``model.layers[0..31]``, or a stage's one-layer list such as
``encoder.albert_layer_groups.0.albert_layers[0]``. :func:`auto_blocks` returns
the selection with its runs; ``gradprobe blocks MODULE:FACTORY`` prints them.

So torchvision ResNets give ``layer1.0 ... layer4.1`` (not their convs, not the
stages), GPT-2 gives ``transformer.h.N``, Llama ``model.layers.N``, T5
``encoder.block.N`` then ``decoder.block.N``, BERT ``encoder.layer.N``,
ConvNeXt its ConvNeXt layers, and ``nn.Sequential(Block(), Block(), ...)`` its
blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

from torch import nn
from torch.nn.utils import parametrize

BlockSpec = Union[  # noqa: UP007 (a runtime alias: ``X | Y`` of these typing objects needs 3.10+ anyway)
    str,
    Sequence[str],
    type[nn.Module],
    tuple[type[nn.Module], ...],
    Callable[[str, nn.Module], bool],
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_MAX_CANDIDATES = 20


class AutoBlock(NamedTuple):
    """A block chosen by ``blocks="auto"`` and the run it came from (see the module docstring)."""

    name: str
    module: nn.Module
    run: str
    #: The module stands for a run member that is never called (a ModuleList's, rule 5).
    stand_in: bool = False


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _runs(container: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Maximal sequences of >= 2 consecutive children sharing a class, each holding parameters."""
    runs: list[list[tuple[str, nn.Module]]] = []
    current: list[tuple[str, nn.Module]] = []
    for name, child in container.named_children():
        if current and type(child) is type(current[-1][1]) and _has_params(child):
            current.append((name, child))
            continue
        if len(current) >= 2:
            runs.append(current)
        current = [(name, child)] if _has_params(child) else []
    if len(current) >= 2:
        runs.append(current)
    return runs


def _layer_list(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The module itself if it is a container, else its child container holding most of its weights."""
    if isinstance(module, _CONTAINERS):
        return "", module
    if not any(isinstance(child, _CONTAINERS) for child in module.children()):
        return None  # (most modules: no need to count their weights)
    total = _n_params(module)
    for name, child in module.named_children():
        if name == "parametrizations" and parametrize.is_parametrized(module):
            continue  # a weight's parametrizations (weight norm ...), not a list of layers
        # More than half: a stage's job is to hold its layers; a block that merely
        # contains a list (parallel heads beside a larger MLP) is not a stage.
        if isinstance(child, _CONTAINERS) and 2 * _n_params(child) > total:
            return name, child
    return None


def _is_pure(container: nn.Module) -> bool:
    children = list(container.children())
    return bool(children) and all(type(c) is type(children[0]) and _has_params(c) for c in children)


def _is_stage(module: nn.Module) -> bool:
    found = _layer_list(module)
    if found is None:
        return False
    list_name, layers = found
    if isinstance(module, _CONTAINERS):
        return bool(_runs(layers))
    # A stage only routes: beside its layer list it holds weighted extras (a downsampling
    # layer, a norm) or containers. A weight-free operation of its own (an activation, an
    # identity shortcut, dropout) means it computes: a residual block, not a stage.
    for name, child in module.named_children():
        if name != list_name and not isinstance(child, _CONTAINERS) and not _has_params(child):
            return False
    # Its layer list holds nothing but its layers (torchvision's InvertedResidual keeps
    # Sequential(conv-norm-act, conv-norm-act, conv, norm): a block), and the layers are
    # not themselves Sequentials: a Sequential subclass such as Conv2dNormActivation is a
    # fixed pipeline of operations, the material of a block (MobileNetV3's InvertedResidual
    # holds a Sequential of three of them), not a block.
    return _is_pure(layers) and not isinstance(next(layers.children()), _CONTAINERS)


def _single_block(container: nn.Module) -> str | None:
    """The child of a one-module list that is a block: composite, not a stage, no run inside it.

    ``Sequential(BasicBlock())`` (a ResNet stage of depth 1) is a run of one; a
    ``Sequential(Linear)`` head, or a whole model wrapped in a ``Sequential``, is not.
    """
    if not _is_pure(container) or len(container) != 1:  # type: ignore[arg-type]
        return None
    ((name, child),) = list(container.named_children())
    if not any(True for _ in child.children()) or _is_stage(child):
        return None
    if any(_runs(m) for m in child.modules() if isinstance(m, _CONTAINERS)):
        return None
    return name


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _run_label(container: str, members: list[str]) -> str:
    where = container or "<root>"
    return f"{where}[{members[0]}]" if len(members) == 1 else f"{where}[{members[0]}..{members[-1]}]"


def _auto(model: nn.Module) -> list[AutoBlock]:
    candidates: dict[str, str] = {}  # name -> run label
    stages: list[tuple[str, nn.Module]] = []  # modules that are looked through
    # torch.nn.utils.parametrize keeps a weight's parametrizations in a ModuleDict
    # (``conv.parametrizations.weight``): bookkeeping of one layer, never blocks.
    all_named = list(model.named_modules())  # (walked once: thousands of modules in deep nets)
    hidden = tuple(
        f"{_join(name, 'parametrizations')}."
        for name, module in all_named
        if parametrize.is_parametrized(module)
    )
    for name, module in all_named:
        if hidden and f"{name}.".startswith(hidden):
            continue
        if isinstance(module, _CONTAINERS):
            single = _single_block(module)
            if single is not None:
                label = _run_label(name, [single])
                candidates.setdefault(_join(name, single), label)
            for run in _runs(module):
                members = [_join(name, child_name) for child_name, _ in run]
                if any(_is_stage(child) for _, child in run):
                    # A run of stages: same granularity in every stage, none selected itself.
                    stages += [(m, child) for m, (_, child) in zip(members, run, strict=True)]
                    continue
                label = _run_label(name, [child_name for child_name, _ in run])
                for member in members:
                    candidates.setdefault(member, label)
        elif _is_stage(module):
            stages.append((name, module))
    for name, stage in stages:
        found = _layer_list(stage)
        if found is not None and _is_pure(found[1]) and len(list(found[1].children())) == 1:
            list_name = _join(name, found[0])
            ((child_name, _),) = list(found[1].named_children())
            candidates.setdefault(_join(list_name, child_name), _run_label(list_name, [child_name]))
    # A stage is looked through even where it is a stage's single layer (ALBERT's layer
    # group inside its encoder); then keep the outermost of what is left.
    stage_names = {name for name, _ in stages}
    kept = [c for c in candidates if c not in stage_names]
    order = {n: i for i, (n, _) in enumerate(all_named)}
    named = dict(all_named)
    kept_set = set(kept)
    out: list[AutoBlock] = []
    chosen: set[str] = set()
    for c in sorted(kept, key=order.__getitem__):
        if any(p in kept_set for p in _ancestors(c)):  # (by name: linear in the blocks, not quadratic)
            continue
        part = _called_part(c, named[c])  # a ModuleList member of a run is never called itself
        if part is not None and part[0] not in chosen:
            chosen.add(part[0])
            out.append(AutoBlock(part[0], part[1], candidates[c], stand_in=part[0] != c))
    return out


def callable_module(module: nn.Module) -> bool:
    """Whether ``module`` has a forward of its own (an ``nn.ModuleList`` or ``nn.ModuleDict`` has
    none: its parent calls its members, so hooks on it never fire).

    >>> callable_module(nn.Sequential()), callable_module(nn.ModuleList())
    (True, False)
    """
    return type(module).forward is not nn.Module.forward


def _called_part(name: str, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The module that stands for a candidate list that is never called itself (a ModuleList or
    ModuleDict): its child holding the most parameters, looked into until it is not such a list
    (None: no child with parameters)."""
    while isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        weighted = [(n, c) for n, c in module.named_children() if _has_params(c)]
        if not weighted:
            return None
        child_name, module = max(weighted, key=lambda item: _n_params(item[1]))
        name = _join(name, child_name)
    return name, module


def _ancestors(name: str) -> list[str]:
    """The qualified names of the modules that hold module ``name``, innermost first (the root
    aside).

    >>> _ancestors("layer1.0.conv1")
    ['layer1.0', 'layer1']
    """
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]


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


def auto_blocks(model: nn.Module) -> list[AutoBlock]:
    """The blocks ``blocks="auto"`` selects, each with the run it came from, in module order.

    ``select_blocks(model)`` returns the same blocks without their runs.

    >>> import torch.nn as nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), Block(), Block(), Block(), nn.Linear(4, 2))
    >>> [(b.name, b.run) for b in auto_blocks(net)]
    [('2', '<root>[2..4]'), ('3', '<root>[2..4]'), ('4', '<root>[2..4]')]
    """
    model = _unwrap(model)
    found = _auto(model)
    if not found:
        raise _nothing_matched(model, "auto")
    return found


def _unwrap(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gradprobe needs a torch.nn.Module, got {type(model).__name__}; pass the model itself "
            "(for a wrapper such as a Lightning module or a pipeline, pass its inner nn.Module)"
        )
    # A torch.compile'd model wraps the original as ``_orig_mod``: name blocks as in the original.
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def select_blocks(model: nn.Module, blocks: BlockSpec = "auto") -> list[tuple[str, nn.Module]]:
    """Resolve ``blocks=`` into ``(qualified name, module)`` pairs in module order.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
    >>> [name for name, _ in select_blocks(net)]
    ['0', '1', '2']
    >>> [name for name, _ in select_blocks(net, "*.0")]
    ['0.0', '1.0', '2.0']
    """
    model = _unwrap(model)
    named = dict(model.named_modules())
    selected: list[str]
    if isinstance(blocks, str) and blocks == "auto":
        selected = [block.name for block in _auto(model)]
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


#: Child names taken for a block's shortcut when ``shortcuts=`` does not name one.
SHORTCUT_NAMES = ("shortcut", "downsample")


def shortcut_modules(
    named: Sequence[tuple[str, nn.Module]], given: Mapping[str, str | nn.Module | None] | None = None
) -> dict[str, nn.Module]:
    """Each block's shortcut module (the rule of the probe and ``paths``): ``given[name]`` (a
    child name or a module; ``None``: no shortcut by design), else a child named ``shortcut`` or
    ``downsample``.

    >>> block = nn.Module(); block.downsample = nn.Identity()
    >>> list(shortcut_modules([("b", block)]))
    ['b']
    """
    given = dict(given or {})
    out: dict[str, nn.Module] = {}
    names = [n for n, _ in named]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(
            f"shortcuts= names blocks that are not probed (not selected): {unknown}; selected: {names}"
        )
    for name, module in named:
        if name in given and given[name] is None:
            continue  # no shortcut by design, whatever the block's children are called
        spec = given.get(name)
        if isinstance(spec, nn.Module):
            out[name] = spec
            continue
        for child_name in (spec,) if isinstance(spec, str) else SHORTCUT_NAMES:
            child = getattr(module, child_name, None)
            if isinstance(child, nn.Module):
                out[name] = child
                break
        else:
            if isinstance(spec, str):
                raise ValueError(f"shortcuts[{name!r}] = {spec!r}: block {name} has no child module {spec!r}")
    return out


def without_shortcut(
    named: Sequence[tuple[str, nn.Module]], given: Mapping[str, Any] | None = None
) -> set[str]:
    """Blocks that have no shortcut by design, so a shape change without one is no surprise:
    those given as ``shortcuts={name: None}``, and the plain blocks of gradprobe's own nets
    (:class:`gradprobe.models.BasicBlock` and ``MLPBlock`` built with ``residual=False``).

    >>> from gradprobe.models import BasicBlock
    >>> sorted(without_shortcut([("a", BasicBlock(4, 8, 2, residual=False)), ("b", nn.Linear(2, 3))]))
    ['a']
    """
    from .models import BasicBlock, MLPBlock  # the reference nets; models imports nothing of gradprobe

    by_design = {name for name, spec in (given or {}).items() if spec is None}
    by_design |= {
        name for name, module in named if isinstance(module, (BasicBlock, MLPBlock)) and not module.residual
    }
    return by_design


def no_shortcut_message(blocks: list[str]) -> str:
    """The warning for shape-changing blocks whose output has no shortcut to be compared with."""
    return (
        f"gradprobe: block(s) {blocks} change the shape of their input and have no shortcut "
        "applied to that input (a child named shortcut/downsample counts only when the block "
        "applies it to its own input and its output is not the block's output): res_ratio and "
        "cos_xy are NaN there. Name the shortcut with attach(..., shortcuts={block: child}), or "
        "declare a block without one by design with shortcuts={block: None}."
    )
