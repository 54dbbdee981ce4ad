"""Which probed blocks run: the warning for a selected block that is never called.

A block that never runs leaves nothing in the frame. The usual cause is a module that
holds layers without being a layer itself: an ``nn.ModuleList`` whose members the parent
calls one by one (``for norm, f in layers: x = x + f(norm(x))``). :class:`CallWatch`
watches the first recorded step: forward pre-hooks on the probed blocks' submodules say
which of them ran inside a block that did not, and :meth:`CallWatch.message` names every
such block in one warning, with what ran inside it, so that ``blocks=`` can name those.
Its hooks are on the model for that one step only.

>>> import torch, torch.nn as nn
>>> pair = nn.ModuleList([nn.LayerNorm(2), nn.Linear(2, 2)])
>>> watch = CallWatch({"layers.0": pair}); watch.start()
>>> _ = pair[1](pair[0](torch.ones(1, 2))); watch.stop()
>>> watch.ran_inside("layers.0"), "blocks=['layers.0.1']" in watch.message({})
(['layers.0.0', 'layers.0.1'], True)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any

from torch import nn

from .blocks import callable_module
from .capture import DEFAULT, Rule, find_output, gradient_edge, locate_input
from .hooks import Handles
from .stacking import adds_input, skips_input

#: Submodules of one block named in the warning at most.
MAX_LISTED = 6


class CallWatch:
    """Watch which submodules of the probed blocks run (between :meth:`start` and :meth:`stop`)."""

    def __init__(
        self,
        blocks: Mapping[str, nn.Module],
        rules: Mapping[str, Rule] | None = None,
        residual: bool = False,
        enclosing: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self._blocks = dict(blocks)
        # Modules holding several blocks (with residual=True): is each one a residual block itself?
        self._enclosing = dict(enclosing or {})
        #: Those of them whose output adds their own input to what their blocks computed.
        self.nested_in: list[str] = []
        self._rules = dict(rules or {})
        self._residual = residual  # whether to ask if each block adds its input to a branch
        self._ran: set[str] = set()
        self._handles = Handles()
        #: Blocks whose first call showed no addition of their input to a branch (``residual=True``),
        #: and all blocks whose first call was asked, in call order.
        self.not_residual: list[str] = []
        self.asked: list[str] = []
        self._asked: set[str] = set()  # the same as sets: asked once per call of every block
        self._nested: set[str] = set()

    def start(self) -> None:
        """Hook every submodule of the blocks (all or none)."""
        if self._handles:
            return
        probed = {id(m) for m in self._blocks.values()}
        with self._handles.all_or_none():
            for name, block in self._blocks.items():
                for sub_name, sub in block.named_modules(prefix=name):
                    if sub is not block and id(sub) not in probed:
                        self._handles.forward_pre(sub, partial(self._seen, sub_name))
                if self._residual:
                    self._handles.forward(block, partial(self._ask, name), with_kwargs=True)
            for name, module in self._enclosing.items():
                self._handles.forward(module, partial(self._ask_enclosing, name), with_kwargs=True)

    @property
    def watching(self) -> bool:
        """Whether the hooks are on (from :meth:`start` to :meth:`stop`)."""
        return bool(self._handles)

    def _seen(self, name: str, module: nn.Module, args: Any) -> None:
        self._ran.add(name)

    def _ask(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """A block's first call with a graph: does its output add its input to a branch?"""
        if name in self._asked or output is None:
            return
        rule = self._rules.get(name, DEFAULT)
        found = locate_input(args, kwargs, rule.input, module)
        y = find_output(output, rule.output)
        if found is None or y is None or not found[0].requires_grad or y.grad_fn is None:
            return
        self.asked.append(name)
        self._asked.add(name)
        if adds_input(y.grad_fn, gradient_edge(found[0]).node) is False:
            self.not_residual.append(name)

    def _ask_enclosing(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """A module holding several blocks returns: is it ``x + (its blocks)(x)``, a residual block
        whose branch holds them?"""
        if name in self._nested or output is None:
            return
        found = locate_input(args, kwargs, None, module)
        y = find_output(output)
        if found is None or y is None or not found[0].requires_grad:
            return
        if skips_input(y.grad_fn, gradient_edge(found[0]).node):
            self.nested_in.append(name)
            self._nested.add(name)

    def stop(self) -> None:
        """Remove the hooks (safe to call twice)."""
        self._handles.remove()

    def never_called(self, called: Collection[str]) -> list[str]:
        """The blocks not in ``called``, in module order."""
        return [n for n in self._blocks if n not in called]

    def ran_inside(self, block: str) -> list[str]:
        """The outermost submodules of ``block`` that ran, in module order."""
        ran = [n for n, _ in self._blocks[block].named_modules(prefix=block) if n in self._ran]
        return [n for n in ran if not any(n.startswith(o + ".") for o in ran if o != n)]

    def message(self, called: Collection[str]) -> str | None:
        """The one warning naming every block not in ``called`` (None if all ran)."""
        missing = self.never_called(called)
        if not missing:
            return None
        modules = {n: m for b in missing for n, m in self._blocks[b].named_modules(prefix=b)}
        parts, heaviest = [], []
        for block in missing:
            ran = self.ran_inside(block)
            if ran:
                heaviest.append(max(ran, key=lambda n: sum(p.numel() for p in modules[n].parameters())))
            listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in ran[:MAX_LISTED])
            more = f" and {len(ran) - MAX_LISTED} more" if len(ran) > MAX_LISTED else ""
            parts.append(f"{block}: {listed}{more}" if ran else f"{block}: nothing inside it ran either")
        container = any(not callable_module(self._blocks[b]) for b in missing)
        why = (
            " (a ModuleList/ModuleDict holds layers but has no forward of its own: its parent calls "
            "its members)"
            if container
            else ""
        )
        shown = ", ".join(repr(n) for n in heaviest[:3]) + (", ..." if len(heaviest) > 3 else "")
        hint = f", e.g. blocks=[{shown}] (the heaviest module that ran in each)" if heaviest else ""
        return (
            f"gradprobe: block(s) {missing} selected but never called in the first recorded step"
            f"{why}, so they have no rows in the frame, analyze, paths or the report. What ran inside "
            f"them: {'; '.join(parts)}. Pass blocks= the modules that are called{hint}."
        )


def not_residual_message(blocks: list[str], residual: list[str], stand_ins: Sequence[str] = ()) -> str:
    """The one warning for blocks ``"auto"`` selected whose output does not add their input to a branch
    (``stand_ins``: those that stand for a ModuleList member, see :mod:`gradprobe.blocks`)."""
    hint = f", e.g. blocks={[*residual[:3], '...'] if len(residual) > 3 else residual}" if residual else ""
    return (
        f"gradprobe: blocks='auto' selected block(s) {blocks} whose output does not add their input "
        "to a branch (no y = s(x) + F(x) in their autograd graph): they are not residual blocks (a "
        "patch embedding, feature-extractor or sampling convolutions, head projections, a block "
        "without its residual connection at a stride). Their rows are recorded, but skip_grad, "
        "branch_grad, res_ratio and the path lengths read them as y = x + (y - x). Pass blocks= the "
        f"blocks you mean{hint}."
        + (
            f" {list(stand_ins)} stand for the ModuleLists that hold them (a list is never called): "
            "where the parent's loop adds x + f(norm(x)) outside any module, these rows describe the "
            "branch f alone; to measure the residual layer, wrap that step in a module and select it."
            if stand_ins
            else ""
        )
    )


def enclosing_modules(model: nn.Module, blocks: Collection[str]) -> dict[str, nn.Module]:
    """The modules (neither the model nor a ModuleList, ModuleDict or Sequential) that are the
    nearest such ancestor of at least two of ``blocks``: a stage, or an outer residual block.

    >>> class Outer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.inner = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> list(enclosing_modules(nn.Sequential(Outer()), ["0.inner.0", "0.inner.1"]))
    ['0']
    """
    named = dict(model.named_modules())
    count: dict[str, int] = {}
    for block in blocks:
        parts = block.split(".")
        for k in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:k])
            if not isinstance(named.get(parent), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                count[parent] = count.get(parent, 0) + 1
                break
    return {n: named[n] for n, c in count.items() if c >= 2 and n in named}


def nested_message(outer: list[str], inner: Mapping[str, list[str]]) -> str:
    """The one warning for auto-selected blocks that sit in the branch of residual blocks."""
    inside = "; ".join(f"{o}: {inner[o][0]} ... {inner[o][-1]}" for o in outer)
    return (
        f"gradprobe: blocks='auto' selected blocks inside the branch of residual block(s) {outer} "
        f"({inside}): their outputs add their own input to what those blocks compute (nested "
        "residuals). The selected blocks' stacks end inside each outer block, and the gradient that "
        "takes the outer skips bypasses them. Pass blocks= the outer level, e.g. "
        f"blocks={[*outer[:3], '...'] if len(outer) > 3 else outer}, or both levels (each level then "
        "gets its own stacks and cum_gain)."
    )
