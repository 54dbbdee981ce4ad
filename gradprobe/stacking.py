"""Stacks: which probed blocks form one chain, and what each chain is called.

A *stack* is a chain of blocks, each one's input computed from the previous one's output
(an encoder and a decoder are two stacks). ``cum_gain``, the Jacobian products and the
path-length decomposition run along stacks. The rules, shared by the probe's hooks
(:class:`StackTracker`) and the one-pass block capture (:func:`gradprobe.capture.capturing`):

* **Linked** (:func:`continues`): a block continues the stack of the block before it (in
  forward order) when its input is computed from that block's output, found by a bounded
  walk back through the input's autograd graph (:func:`reaches`); where the walk cannot
  tell, the chain goes on.
* **Nested** (:func:`nesting`): a block selected inside another selected block (the residual
  blocks in the branch of a residual block) is in a stack of its level: the blocks inside one
  block form their own stacks, apart from that block's, so ``cum_gain`` runs to the last block
  of the block's own level.
* **Named** (:func:`stack_labels`): by the longest dotted prefix its blocks share
  (:func:`common_prefix`), the block's own name for a stack of one, or its position.
* **Given** (:func:`resolve_stacks`): ``attach(..., stacks=...)`` names them instead.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import torch

from .blocks import glob_to_regex

Tensor = torch.Tensor


# ---------------------------------------------------------------------- graph reachability
#: Autograd nodes a reachability walk visits at most (between consecutive blocks it is a few).
MAX_WALK = 20_000


def reaches(start: Any, target: Any, limit: int = MAX_WALK) -> bool | None:
    """Whether the autograd node ``target`` is reachable from node ``start`` (``grad_fn``s).

    Breadth-first through ``next_functions``; None when more than ``limit`` nodes were
    visited without an answer, or when ``start`` is None (no graph: cannot tell).

    >>> a = torch.ones(2, requires_grad=True); b = a * 2; c = (b + 1).sum()
    >>> reaches(c.grad_fn, b.grad_fn), reaches(b.grad_fn, c.grad_fn)
    (True, False)
    """
    if start is None or target is None:
        return None
    from collections import deque

    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node is target:
            return True
        if len(seen) > limit:
            return None
        for child, _ in getattr(node, "next_functions", ()):
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)
    return False


def adds_input(output: Any, target: Any, limit: int = MAX_WALK) -> bool | None:
    """Whether the autograd node ``output`` computes an addition both of whose operands depend on
    the node ``target``: y = s(x) + F(x), a residual block's own work (x the block's input, s the
    identity or a shortcut). None when the walk visits more than ``limit`` nodes, or without a
    graph.

    >>> x = torch.ones(2, requires_grad=True).view_as(torch.ones(2))
    >>> w = torch.ones(2, requires_grad=True)
    >>> residual, plain = x + torch.tanh(w * x), torch.tanh(w * x) + 1
    >>> adds_input(residual.grad_fn, x.grad_fn), adds_input(plain.grad_fn, x.grad_fn)
    (True, False)
    """
    if output is None or target is None:
        return None
    reach: dict[Any, bool] = {}  # node -> whether it depends on target
    todo: list[tuple[Any, bool]] = [(output, False)]
    while todo:
        node, children_done = todo.pop()
        if children_done:
            reach[node] = any(reach.get(c, False) for c, _ in node.next_functions if c is not None)
            continue
        if node in reach:
            continue
        if node is target:
            reach[node] = True
            continue
        if len(reach) > limit:
            return None
        reach[node] = False  # (provisional: a node is visited once)
        todo.append((node, True))
        todo += [
            (c, False) for c, _ in getattr(node, "next_functions", ()) if c is not None and c not in reach
        ]
    for node, depends in reach.items():
        if depends and type(node).__name__.startswith("AddBackward"):
            kids = [c for c, _ in node.next_functions if c is not None and reach.get(c, False)]
            if len(kids) >= 2:
                return True
    return False


def skips_input(output: Any, target: Any, hops: int = 2) -> bool | None:
    """Whether the autograd node ``output`` is (up to ``hops`` single-input nodes after it) an
    addition of the tensor whose node is ``target`` itself to something computed from it:
    ``x + f(x)`` with the identity skip taken right at the module's input. None without a graph.

    >>> x = torch.ones(2, requires_grad=True) * 1
    >>> w = torch.ones(2, requires_grad=True)
    >>> h = x + torch.tanh(w * x)
    >>> skips_input((x + h).grad_fn, x.grad_fn), skips_input((h + torch.tanh(h)).grad_fn, x.grad_fn)
    (True, False)
    """
    if output is None or target is None:
        return None
    node = output
    for _ in range(hops + 1):
        children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
        if type(node).__name__.startswith("AddBackward"):
            if not any(c is target for c in children):
                return False
            return any(c is not target and reaches(c, target) for c in children)
        if len(children) != 1:
            return False
        node = children[0]
    return False


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix shared by these names (a single name: itself).

    >>> common_prefix(["encoder.block.0", "encoder.block.1"]), common_prefix(["a.0", "b.0"])
    ('encoder.block', '')
    """
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for segs in zip(*parts, strict=False):
        if any(s != segs[0] for s in segs):
            break
        common.append(segs[0])
    return ".".join(common)


def nesting(names: list[str]) -> dict[str, str]:
    """Each block's nearest enclosing block among ``names`` (``""``: none), by dotted name.

    >>> nesting(["a", "a.inner.0", "a.inner.1", "b"])
    {'a': '', 'a.inner.0': 'a', 'a.inner.1': 'a', 'b': ''}
    """
    # By each name's dotted prefixes, longest first: linear in the names (comparing every pair
    # would take seconds at thousands of blocks).
    known = set(names)
    out = {}
    for n in names:
        parts = n.split(".")
        prefixes = (".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1))
        out[n] = next((p for p in prefixes if p in known), "")
    return out


def stack_labels(
    names: list[str], linked: Mapping[str, bool], nest: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{block: stack name}``: consecutive blocks (forward order) form a stack while each is
    ``linked`` to the one before it (undecided counts as linked).

    A stack is named by its blocks' longest common dotted prefix, by the block's own name
    for a stack of one, or by its position (``"0"``, ``"1"``, ...) when the names share no
    prefix; a repeated name gets ``#k`` appended. With ``nest`` (:func:`nesting`), a block
    continues only the stack of the earlier blocks inside the same enclosing block.

    >>> stack_labels(["enc.0", "enc.1", "dec.0", "dec.1"], {"dec.0": False})
    {'enc.0': 'enc', 'enc.1': 'enc', 'dec.0': 'dec', 'dec.1': 'dec'}
    >>> stack_labels(["layer1.0", "layer2.0"], {})
    {'layer1.0': '0', 'layer2.0': '0'}
    >>> names = ["o.0", "o.0.i.0", "o.0.i.1", "o.1"]
    >>> stack_labels(names, {"o.0.i.0": False}, nesting(names))
    {'o.0': 'o', 'o.1': 'o', 'o.0.i.0': 'o.0.i', 'o.0.i.1': 'o.0.i'}
    """
    nest = nest or {}
    groups: list[list[str]] = []
    current: dict[str, int] = {}  # enclosing block -> its current group
    for n in names:
        key = nest.get(n, "")
        if key not in current or linked.get(n, True) is False:
            current[key] = len(groups)
            groups.append([])
        groups[current[key]].append(n)
    out: dict[str, str] = {}
    used: set[str] = set()
    for k, group in enumerate(groups):
        label = common_prefix(group) or str(k)
        if label in used:
            label = f"{label}#{k}"
        used.add(label)
        out.update(dict.fromkeys(group, label))
    return out


def continues(x: Tensor, previous_output: Any) -> bool:
    """Whether a block input ``x`` continues the stack of the block whose output's autograd node
    is ``previous_output``: ``x`` is computed from it (a bounded walk back through ``x``'s graph).

    An ``x`` without a graph while the previous output has one is not computed from it
    differentiably (False); where the walk cannot tell (too large a graph), True: the
    chain goes on.

    >>> a = torch.ones(2, requires_grad=True); y = a * 2
    >>> continues(y + 1, y.grad_fn), continues(a.detach(), y.grad_fn)
    (True, False)
    """
    return node_continues(x.grad_fn, previous_output)


def node_continues(start: Any, previous_output: Any) -> bool:
    """:func:`continues` for an autograd node ``start`` (None: no graph) instead of a tensor.

    >>> a = torch.ones(2, requires_grad=True); y = a * 2
    >>> node_continues((y + 1).grad_fn, y.grad_fn), node_continues(None, y.grad_fn)
    (True, False)
    """
    if start is None:
        return previous_output is None
    return reaches(start, previous_output) is not False


# ---------------------------------------------------------------------- stacks of the probe
def resolve_stacks(names: list[str], stacks: Any) -> dict[str, str] | None:
    """``{block: stack name}`` from ``attach(..., stacks=...)``; None: detect them.

    Accepted: a mapping ``{stack name: pattern or list of patterns}``, or a list whose
    items (a pattern or a list of patterns) are the stacks in order, named by their
    blocks' common dotted prefix (or their position). Patterns are block names or globs
    as in ``blocks=``; every probed block must be in exactly one stack.

    >>> resolve_stacks(["enc.0", "enc.1", "dec.0"], [["enc.*"], ["dec.*"]])
    {'enc.0': 'enc', 'enc.1': 'enc', 'dec.0': 'dec.0'}
    """
    if stacks is None:
        return None
    if isinstance(stacks, Mapping):
        items = [(str(k), v) for k, v in stacks.items()]
    elif isinstance(stacks, (list, tuple)):
        items = [("", v) for v in stacks]
    else:
        raise TypeError(
            "stacks= must be a mapping {stack name: block names/patterns} or a list of such lists, got "
            f"{type(stacks).__name__}"
        )
    out: dict[str, str] = {}
    for k, (label, spec) in enumerate(items):
        patterns = [spec] if isinstance(spec, str) else list(spec)
        regexes = [glob_to_regex(p) for p in patterns]
        members = [n for n in names if any(r.match(n) for r in regexes)]
        if not members:
            raise ValueError(f"stacks=: {spec!r} matches none of the probed blocks {names}")
        twice = [n for n in members if n in out]
        if twice:
            raise ValueError(f"stacks=: blocks {twice} are in two stacks")
        label = label or common_prefix(members) or str(k)
        out.update(dict.fromkeys(members, label))
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"stacks=: blocks {missing} are in no stack; every probed block must be in one")
    return out


class StackTracker:
    """Which stack (the chain ``cum_gain`` and the products run along) each probed block is in.

    Given ``stacks=`` (:func:`resolve_stacks`): as given. Otherwise detected during the first
    forward passes: a block continues the stack of the block before it in forward order when
    its input is computed, in that pass, from that block's output (a walk back through the
    autograd graph, :func:`continues`); an input without a graph while the
    previous output has one starts a new stack; where the walk cannot tell, the chain goes on.
    Each block is decided once; output nodes are held only until all are (never across steps).
    """

    def __init__(self, names: list[str], stacks: Any = None) -> None:
        self._given = resolve_stacks(names, stacks)
        self._nest = nesting(names)
        self._count = len(names)
        self._linked: dict[str, bool] = {}
        self._out_node: dict[str, Any] = {}
        # The blocks of the forward order seen so far, at each nesting level, in that order:
        # [(position, name)] (where a bisection finds the block before a block).
        self._seen = 0
        self._levels: dict[str, list[tuple[int, str]]] = {}

    @property
    def detecting(self) -> bool:
        """Whether some block is not decided yet."""
        return len(self._linked) < self._count

    def output(self, name: str, node: Any) -> None:
        """The autograd node of block ``name``'s output in this pass (for the next block's decision)."""
        if self.detecting:
            self._out_node[name] = node

    def link(self, name: str, x: Any, index: dict[str, int]) -> None:
        """Decide, once, whether block ``name`` (input ``x``) continues the previous block's stack.

        ``index``: each block's position in the forward order, a dict that only grows (a block's
        position is fixed when it is first called)."""
        if name in self._linked:
            return
        position, key = index.get(name, -1), self._nest.get(name, "")
        # the block before it in forward order at its own level (nested blocks: inside the same block)
        prev = self._before(index, key, position)
        if position <= 0 or prev is None:
            self._linked[name] = False  # the first block starts the first stack
        elif prev in self._out_node:
            self._linked[name] = continues(x, self._out_node[prev])
        else:
            return  # the previous block has not run in this pass yet: decide on a later call
        if not self.detecting:
            self._out_node.clear()

    def _before(self, index: dict[str, int], key: str, position: int) -> str | None:
        """The block at nesting level ``key`` with the largest position below ``position``.

        The blocks added to ``index`` since the last call are taken in (from its end: a dict keeps
        insertion order) and each level's blocks are kept sorted by position, so a call costs the
        new blocks and a bisection, not a scan of every block."""
        new = len(index) - self._seen
        if new > 0:
            recent = reversed(index)
            added = [next(recent) for _ in range(new)]
            for n in reversed(added):  # (positions grow with insertion: each lands at the end)
                bisect.insort(self._levels.setdefault(self._nest.get(n, ""), []), (index[n], n))
            self._seen = len(index)
        level = self._levels.get(key, [])
        k = bisect.bisect_left(level, (position, "")) - 1
        return level[k][1] if k >= 0 else None

    def forget(self) -> None:
        """Drop the output nodes of this pass (a step closed or the probe detached)."""
        self._out_node.clear()

    def names(self, blocks: list[str]) -> dict[str, str]:
        """``{block: stack name}`` for these blocks, in forward order: named by the longest dotted
        prefix a detected stack's blocks share, the block's own name for a stack of one, or its
        position (``"0"``, ``"1"``, ...) when they share none."""
        if self._given is not None:
            return {n: self._given[n] for n in blocks}
        return stack_labels(blocks, self._linked, self._nest)
