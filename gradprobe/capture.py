"""The one rule that finds a block's input and output tensors, and the aliases that capture them.

Used by the probe's hooks and by the one-pass block capture here (:func:`capturing`,
:func:`capture_blocks`) that the Jacobian passes, ``analyze``, ``spectrum`` and ``paths``
run: all of them see the same ``x`` and ``y`` of a block.

The default rule
----------------
* **Input** ``x``: the first floating-point or complex tensor among the positional
  arguments of the call, else the ``hidden_states``, ``x`` or ``input`` keyword
  argument (first one present). ``None``, integer and bool tensors (masks, ids,
  positions) and other values are skipped, so ``block(mask, hidden)`` and
  ``block(None, hidden_states=h)`` both give ``hidden``.
* **Output** ``y``: the first floating-point or complex tensor of the output,
  searched depth-first: a tensor; a tuple or list (in order); a dict or a Hugging
  Face ``ModelOutput`` (in key order); a ``@dataclass`` (fields in order).

Overrides (``attach(..., input=..., output=...)``, also ``analyze`` and ``spectrum``):

* ``input``: an ``int`` (that positional argument), a ``str`` (that keyword argument,
  or the positional argument of that name in the block's ``forward`` signature), or a
  callable ``(args, kwargs) -> Tensor`` returning one of the call's arguments (found
  by identity among the arguments, also inside tuples, lists and dicts, so that it
  can be replaced by the alias that measures its gradient).
* ``output``: an ``int`` (that item of a tuple/list, or field of a dataclass), a
  ``str`` (that key of a dict/``ModelOutput`` or attribute), or a callable
  ``(output) -> Tensor``.
* either one may also be a mapping ``{block name: spec}``: blocks it does not name use
  the default rule.

Where no tensor is found the probe warns once per block, naming the types the block
received and how to pass ``input=``/``output=``, and records NaN in the columns that
need the missing tensor.

Also here: the input aliases that make ``g_x`` the gradient through one block
(:func:`alias_view` for the probe's hooks, :func:`alias_pinned` with pinned gradient
edges for the Jacobian passes). :func:`capturing` runs a forward pass with every named
block's input replaced by :func:`alias_pinned` and its output found by
:func:`find_output`, and yields a :class:`BlockCapture` per block, stacks labelled by
the probe's stack rule (:mod:`gradprobe.stacking`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeGuard, Union

import torch
from torch import nn

from ._tensors import in_backward
from .blocks import select_blocks
from .stacking import continues, nesting, stack_labels

Tensor = torch.Tensor

InputSpec = Union[int, str, Callable[[tuple[Any, ...], dict[str, Any]], Any], None]  # noqa: UP007
OutputSpec = Union[int, str, Callable[[Any], Any], None]  # noqa: UP007

#: Keyword arguments that hold a block's input when no positional argument does, in order.
INPUT_KEYWORDS = ("hidden_states", "x", "input")

# How deep the default output rule looks into nested containers.
_MAX_DEPTH = 4


def is_signal(t: Any) -> TypeGuard[Tensor]:
    """Whether ``t`` can be a block's input or output: a floating-point or complex tensor.

    >>> is_signal(torch.ones(2)), is_signal(torch.ones(2, dtype=torch.bool)), is_signal(None)
    (True, False, False)
    """
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


@dataclass(frozen=True)
class Rule:
    """How to find one block's input and output (``None``: the default rule)."""

    input: InputSpec = None
    output: OutputSpec = None


DEFAULT = Rule()


def _check_spec(value: Any, what: str) -> None:
    if value is None or callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"{what}= must be None, an int (position), a str (keyword or field name), a callable, or a "
            f"mapping {{block name: one of those}}; got {type(value).__name__}"
        )
    if isinstance(value, int) and value < 0 and what == "input":
        raise ValueError(f"input={value}: positions count from 0")


def rules(names: list[str], input: Any = None, output: Any = None) -> dict[str, Rule]:
    """One :class:`Rule` per block from ``attach``'s ``input=``/``output=``.

    A mapping names blocks (others get the default); anything else applies to every block.

    >>> rules(["a", "b"], input={"b": 1})["b"].input, rules(["a", "b"], input={"b": 1})["a"].input
    (1, None)
    """
    per: dict[str, dict[str, Any]] = {n: {} for n in names}
    for what, spec in (("input", input), ("output", output)):
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ValueError(f"{what}= names blocks that are not probed: {unknown}; probed: {names}")
            for name, value in spec.items():
                _check_spec(value, what)
                per[name][what] = value
        else:
            _check_spec(spec, what)
            for name in names:
                per[name][what] = spec
    return {n: Rule(**kw) if kw else DEFAULT for n, kw in per.items()}


def describe(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The types a call received, for messages.

    >>> describe((None, torch.ones(2, dtype=torch.long)), {"mask": 1})
    'args (NoneType, Tensor[int64]), kwargs {mask: int}'
    """

    def one(v: Any) -> str:
        if isinstance(v, Tensor):
            return f"Tensor[{str(v.dtype).removeprefix('torch.')}]"
        return type(v).__name__

    a = ", ".join(one(v) for v in args)
    k = ", ".join(f"{key}: {one(v)}" for key, v in kwargs.items())
    return f"args ({a}), kwargs {{{k}}}"


@functools.lru_cache(maxsize=256)
def _positional_names(forward: Any) -> tuple[str, ...]:
    """Names of the parameters of a bound ``forward`` that can be passed by position."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def _positional_index(module: Any, name: str) -> int | None:
    """Position of parameter ``name`` in ``module.forward``'s signature (None if not positional)."""
    if module is None:
        return None
    # Keyed by the class's function, not the bound method: no reference to the module is kept.
    forward = getattr(type(module), "forward", None)
    names = _positional_names(forward)[1:] if forward is not None else ()  # without self
    return names.index(name) if name in names else None


# Where an input was found: ("arg", i), ("kw", name), or ("path", [keys]) for a callable's pick.
Where = tuple[str, Any]


def _find_in(obj: Any, target: Tensor, depth: int = 0) -> list[Any] | None:
    if obj is target:
        return []
    if depth >= _MAX_DEPTH:
        return None
    items: Any
    if isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    else:
        return None
    for key, value in items:
        sub = _find_in(value, target, depth + 1)
        if sub is not None:
            return [key, *sub]
    return None


def locate_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], spec: InputSpec = None, module: Any = None
) -> tuple[Tensor, Where] | None:
    """The block input and where it sits in the call, or None when the rule finds none.

    >>> x, where = locate_input((None, torch.ones(2, dtype=torch.bool), torch.ones(3)), {})
    >>> where, x.shape
    (('arg', 2), torch.Size([3]))
    """
    if spec is None:
        for i, a in enumerate(args):
            if is_signal(a):
                return a, ("arg", i)
        for key in INPUT_KEYWORDS:
            v = kwargs.get(key)
            if is_signal(v):
                return v, ("kw", key)
        return None
    if isinstance(spec, int):
        v = args[spec] if spec < len(args) else None
        return (v, ("arg", spec)) if is_signal(v) else None
    if isinstance(spec, str):
        if spec in kwargs:
            v = kwargs[spec]
            return (v, ("kw", spec)) if is_signal(v) else None
        pos = _positional_index(module, spec)
        if pos is not None and pos < len(args) and is_signal(args[pos]):
            return args[pos], ("arg", pos)
        return None
    picked = spec(args, kwargs)
    if not is_signal(picked):
        return None
    path = _find_in([list(args), kwargs], picked)
    if path is None:
        raise ValueError(
            "input= returned a tensor that is not one of the call's arguments (nor inside a tuple, list "
            "or dict of them): the probe must replace it to measure its gradient; return an argument"
        )
    return picked, ("path", path)


def _replaced(obj: Any, path: list[Any], new: Any) -> Any:
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, key: _replaced(obj[key], rest, new)}
    items = list(obj)
    items[key] = _replaced(items[key], rest, new)
    return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)


def replace_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], where: Where, new: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` with the input at ``where`` replaced by ``new``.

    >>> replace_input((1, 2), {}, ("arg", 1), torch.zeros(1))[0][1].tolist()
    [0.0]
    """
    kind, at = where
    if kind == "arg":
        return (*args[:at], new, *args[at + 1 :]), kwargs
    if kind == "kw":
        return args, {**kwargs, at: new}
    both = _replaced([list(args), kwargs], at, new)
    return tuple(both[0]), both[1]


def swap_input(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    swap: Callable[[Tensor], Tensor],
    spec: InputSpec = None,
    module: Any = None,
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call's arguments with its input replaced by ``swap(x)``, as a forward pre-hook returns
    them; None if the rule finds no input.

    >>> swap_input((None, torch.ones(1), 2), {}, lambda x: 2 * x)[0][1].tolist()
    [2.0]
    """
    found = locate_input(args, kwargs, spec, module)
    if found is None:
        return None
    x, where = found
    return replace_input(args, kwargs, where, swap(x))


def _first(obj: Any, depth: int = 0) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj if is_signal(obj) else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, (tuple, list)):
        values = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    else:
        return None
    for v in values:
        t = _first(v, depth + 1)
        if t is not None:
            return t
    return None


def find_output(output: Any, spec: OutputSpec = None) -> Tensor | None:
    """The block output: the first floating-point or complex tensor of ``output`` (default rule).

    >>> find_output((torch.ones(2, dtype=torch.long), {"h": torch.zeros(1)})).tolist()
    [0.0]
    """
    if spec is None:
        return _first(output)
    if callable(spec):
        got = spec(output)
    elif isinstance(spec, int):
        if dataclasses.is_dataclass(output) and not isinstance(output, type):
            fields = dataclasses.fields(output)
            got = getattr(output, fields[spec].name) if -len(fields) <= spec < len(fields) else None
        elif isinstance(output, (tuple, list)) and -len(output) <= spec < len(output):
            got = output[spec]
        else:
            got = None
    elif isinstance(output, Mapping) and spec in output:
        got = output[spec]
    else:
        got = getattr(output, spec, None)
    return got if is_signal(got) else None


def _signals(
    obj: Any, path: tuple[Any, ...] = (), depth: int = 0
) -> Iterator[tuple[tuple[Any, ...], Tensor]]:
    """Every floating-point or complex tensor of an output with its path of keys, depth first
    (the default rule's order)."""
    if isinstance(obj, Tensor):
        if is_signal(obj):
            yield path, obj
        return
    if depth >= _MAX_DEPTH:
        return
    items: Any
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        return
    for key, value in items:
        yield from _signals(value, (*path, key), depth + 1)


def other_outputs(output: Any, y: Tensor) -> list[Tensor]:
    """The differentiable tensors of ``output`` besides the block output ``y`` (an auxiliary loss,
    router logits, a second stream): gradient reaching the block's input through them is not
    gradient through y.

    >>> y = torch.ones(2, requires_grad=True) * 2
    >>> len(other_outputs((y, y.sum()), y)), len(other_outputs((y, y.detach().sum()), y))
    (1, 0)
    """
    # (a view of y is y: its gradient reaches y's own node)
    return [t for _, t in _signals(output) if t is not y and t._base is not y and t.requires_grad]


def same_shape_output(output: Any, y: Tensor, shape: torch.Size) -> Any:
    """Where the output holds a differentiable tensor shaped like the input when ``y`` is not: the
    ``output=`` spec that picks it (a position, a key or field name), or None.

    >>> x = torch.ones(3, 2)
    >>> same_shape_output((x.sum(), 2 * x), x.sum(), x.shape), same_shape_output(2 * x, 2 * x, x.shape)
    (1, None)
    """
    if y.shape == shape:
        return None
    for path, t in _signals(output):
        if t is not y and t.shape == shape and len(path) == 1:
            return path[0]
    return None


def wrong_output_message(block: str, output: Any, y: Tensor, spec: Any, shape: torch.Size) -> str:
    """The one warning for an output rule that landed on a tensor unlike the input beside one like it."""
    return (
        f"gradprobe: block {block!r} returned {describe_output(output)}; the capture rule took the "
        f"tensor of shape {tuple(y.shape)} as its output y, while the input has shape {tuple(shape)} and "
        f"the output holds a tensor of that shape at {spec!r}. Its columns describe the tensor taken. "
        f"If {spec!r} is the block's output, pass output= to attach(), e.g. output={{{block!r}: {spec!r}}}."
    )


def describe_output(output: Any) -> str:
    """The type of an output, with the types inside a container, for messages.

    >>> describe_output((None, 3))
    'tuple (NoneType, int)'
    """
    if isinstance(output, Tensor):
        return f"Tensor[{str(output.dtype).removeprefix('torch.')}]"
    if isinstance(output, Mapping):
        inner = ", ".join(f"{k}: {type(v).__name__}" for k, v in output.items())
        return f"{type(output).__name__} {{{inner}}}"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} ({', '.join(type(v).__name__ for v in output)})"
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        inner = ", ".join(
            f"{f.name}: {type(getattr(output, f.name)).__name__}" for f in dataclasses.fields(output)
        )
        return f"{type(output).__name__} {{{inner}}}"
    return type(output).__name__


def no_input_message(block: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The one warning for a block whose input the rule cannot find."""
    return (
        f"gradprobe: block {block!r} was called without a floating-point or complex tensor where the "
        f"capture rule looks for its input (the first such positional argument, else hidden_states=, x= "
        f"or input=); it received {describe(args, kwargs)}. Its input columns (grad_in, gain, cum_gain, "
        f"res_ratio, cos_xy, in_rms, Jacobian) are NaN. Pass input= to attach(): a position, a keyword "
        f"name, or a callable (args, kwargs) -> tensor, e.g. input={{{block!r}: 1}}."
    )


def no_output_message(block: str, output: Any) -> str:
    """The one warning for a block whose output the rule cannot find."""
    return (
        f"gradprobe: block {block!r} returned no floating-point or complex tensor where the capture rule "
        f"looks (a tensor, tuple/list, dict/ModelOutput or dataclass); it returned "
        f"{describe_output(output)}. "
        f"Its columns are NaN. Pass output= to attach(): a position, a key or field name, or a callable "
        f"output -> tensor, e.g. output={{{block!r}: 'hidden'}}."
    )


# ---------------------------------------------------------------------- aliases
def alias_view(x: Tensor) -> Tensor:
    """The probe's stand-in for a block input: its gradient is the gradient through this block only.

    A view keeps in-place semantics (an in-place op on it still writes the caller's
    tensor). An input that does not require grad gets a fresh leaf that does, so
    the first block's input gradient exists; the caller's tensor is untouched.

    >>> alias_view(torch.ones(2)).requires_grad
    True
    """
    # x[...] is aten::alias: one view op, and a backward that passes the gradient on as it is
    # (view_as would reshape it: two more ops per block and step).
    return x[...] if x.requires_grad else x.detach().requires_grad_(True)


def gradient_edge(t: Tensor) -> Any:
    """``torch.autograd.graph.get_gradient_edge(t)``: what autograd differentiates, pinned now."""
    from torch.autograd.graph import get_gradient_edge

    return get_gradient_edge(t)


@dataclass
class Pending:
    """An input alias made by :func:`alias_pinned`, between a block's pre-hook and its forward hook."""

    x: Tensor  # what the block sees
    edge: Any  # what to differentiate with respect to
    fallback: Any  # ... if the block modified x in place (the alias' own node is then bypassed)
    version: int

    def input_edge(self) -> Any:
        """The edge to differentiate with respect to, once the block has run."""
        return self.edge if self.x._version == self.version else self.fallback


def alias_pinned(x: Tensor) -> Pending:
    """The Jacobian passes' stand-in for a block input, with its gradient edges pinned.

    An in-place op on the alias (``relu_`` as the block's first op) rebases the graph
    around the alias' view node; the gradient then arrives at the node that produced x,
    whose edge is kept as the fallback. An input without grad becomes a fresh leaf,
    and the block sees a clone of it, so that it may modify its input in place.

    >>> p = alias_pinned(torch.ones(2)); p.x.requires_grad, p.x is p.edge
    (True, False)
    """
    if x.requires_grad:
        alias = alias_view(x)
        return Pending(alias, gradient_edge(alias), gradient_edge(x), alias._version)
    leaf = alias_view(x)
    alias = leaf.clone()
    return Pending(alias, leaf, leaf, alias._version)


# ---------------------------------------------------------------------- capturing blocks in one pass
# What autograd accepts as an input or output: a tensor, or a GradientEdge pinned before an in-place op.
GradNode = Tensor | Any


@dataclass
class BlockCapture:
    """One block's input and output, as seen inside the live forward graph.

    ``x`` is an alias of the block's input created right before the block ran
    (``x[...]``, a view of x, or a fresh leaf requiring grad for an input that does not),
    so gradients with respect to it flow through this block only; ``y`` is the
    block's first output tensor. ``x_edge`` and ``y_edge``, when given
    (``torch.autograd.graph.get_gradient_edge(t)``), are used by autograd instead
    of the tensors, which matters when an in-place operation modifies them:

    * ``y_edge``: the edge of y taken when the block returned; it stays right when
      y is modified in place afterwards (a ``ReLU(inplace=True)`` after the block).
    * ``x_edge``: if the block modified its input in place (``relu_`` as its first
      op; the alias' version counter changed), autograd rebases the graph around
      the alias' view node and no gradient reaches it any more; pass the edge of
      the tensor the alias was made from (taken before the block ran) instead.
      :func:`capture_blocks` does exactly this.

    >>> x = torch.randn(2, 3, requires_grad=True)
    >>> cap = BlockCapture("b", x, 2 * x, same_shape=True)
    >>> cap.name, cap.same_shape
    ('b', True)
    """

    name: str
    x: Tensor
    y: Tensor
    same_shape: bool
    x_edge: Any = None
    y_edge: Any = None
    stack: str = ""  # the chain the block belongs to: products run to the last capture of its stack

    @property
    def input(self) -> GradNode:
        """What autograd differentiates with respect to: ``x_edge`` if given, else ``x``."""
        return self.x if self.x_edge is None else self.x_edge

    @property
    def output(self) -> GradNode:
        """What autograd differentiates: ``y_edge`` if given, else ``y``."""
        return self.y if self.y_edge is None else self.y_edge


class _StopForward(BaseException):
    """Raised in the end block's forward hook: nothing after it is needed.

    A BaseException, so that a model's own ``except Exception`` cannot swallow it.
    """


def forward_call(model: nn.Module, inputs: Any) -> Callable[[], Any]:
    """The forward call ``model(*inputs)`` (``inputs``: a tuple of arguments or one tensor)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return lambda: model(*args)


def run_capturing(
    forward: Callable[[], Any],
    named: Sequence[tuple[str, nn.Module]],
    *,
    start: str | None = None,
    stop_after: str | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> tuple[Any, list[BlockCapture]]:
    """Run ``forward()`` once; capture (input alias, output) of each named block's first call.

    Every hook is gone on return, so a checkpointed block cannot be recomputed from these
    captures; :func:`capturing` keeps the recomputation alike while it is open.
    """
    with capturing(forward, named, start=start, stop_after=stop_after, rules=rules) as got:
        return got


@contextmanager
def capturing(
    forward: Callable[[], Any],
    named: Sequence[tuple[str, nn.Module]],
    *,
    start: str | None = None,
    stop_after: str | None = None,
    rules: Mapping[str, Rule] | None = None,
    every_call: bool = False,
) -> Iterator[tuple[Any, list[BlockCapture]]]:
    """Run ``forward()`` once; yield (output, captures of each named block's first call).

    Inputs and outputs are found by :mod:`gradprobe.capture` (``rules``: per-block
    overrides, as the probe's ``input=``/``output=``). With ``start``, only that block's
    input is replaced (the first block called if ``start`` is ``"*first*"``), later
    blocks keep their graph inputs (their captured x is then the plain input). With
    ``stop_after``, the forward is aborted once that block has returned (output
    ``None``). Until the block closes, a block that activation checkpointing recomputes
    during a backward pass gets its input replaced the same way again:
    ``torch.utils.checkpoint`` insists on the same graph. A block called several times (weight
    sharing) is captured at its first call, or with ``every_call`` at each call (in the order
    the calls return; all of them in the first call's stack).
    """
    caps: dict[str, BlockCapture] = {}
    every: list[BlockCapture] = []
    pending: dict[str, Pending] = {}
    order: list[str] = []
    handles = []
    replaced: set[str] = set()  # blocks whose input this pass replaced by an alias
    state = {"started": start is None}
    rule = dict(rules or {})
    linked: dict[str, bool] = {}  # stacks, as the probe detects them (stacking.continues)
    # nested blocks continue the stacks of their own level (a shortcut capture: its block's level)
    nest = nesting([n.split("\x00")[0] for n, _ in named])
    level = {n: nest[n.split("\x00")[0]] for n, _ in named}

    def pre(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (name in caps and not every_call) or name in pending:
            return None  # weight sharing: the first call only (unless every_call)
        found = locate_input(args, kwargs, rule.get(name, DEFAULT).input, module)
        if found is None:
            return None
        x, where = found
        before = [n for n in order if level[n] == level[name]]
        if before and caps[before[-1]].y_edge is not None:
            linked[name] = continues(x, caps[before[-1]].y_edge.node)
        if start is not None and not state["started"]:
            if start not in ("*first*", name):
                return None
            state["started"] = True
        elif start is not None:
            edge = gradient_edge(x) if x.requires_grad else x
            pending[name] = Pending(x, edge, edge, x._version)
            return None
        pending[name] = got = alias_pinned(x)
        replaced.add(name)
        return replace_input(args, kwargs, where, got.x)

    def post(name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if name not in pending:
            return
        got = pending.pop(name)
        y = find_output(output, rule.get(name, DEFAULT).output)
        if y is None:
            return
        cap = BlockCapture(
            name,
            got.x,
            y,
            same_shape=got.x.shape == y.shape,
            x_edge=got.input_edge(),
            y_edge=gradient_edge(y) if y.requires_grad else None,
        )
        every.append(cap)
        if name in caps:
            return  # a later call of a shared block (every_call)
        caps[name] = cap
        order.append(name)
        if name == stop_after:
            raise _StopForward

    for name, module in named:
        handles.append(module.register_forward_pre_hook(partial(pre, name), with_kwargs=True))
        handles.append(module.register_forward_hook(partial(post, name), with_kwargs=True))
    output = None
    try:
        output = forward()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    handles.clear()
    labels = stack_labels(order, linked, level)
    for cap in every:
        cap.stack = labels[cap.name]

    def again(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name not in replaced or not in_backward() or not torch.is_grad_enabled():
            return None
        return swap_input(args, kwargs, lambda x: alias_pinned(x).x, rule.get(name, DEFAULT).input, module)

    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(partial(again, name), with_kwargs=True))
        yield output, every if every_call else [caps[n] for n in order]
    finally:
        for h in handles:
            h.remove()


def capture_blocks(
    model: nn.Module, inputs: Any, blocks: Any = "auto", *, input: Any = None, output: Any = None
) -> tuple[Any, list[BlockCapture]]:
    """Run ``model(*inputs)`` once and capture every selected block's input alias and output.

    This is what the probe does during training: each block's input is replaced by
    an alias (``x[...]``, a view of x, or a leaf requiring grad when x does not), so the
    captures are ready for :func:`gradprobe.jacobian.jacobian_columns`. The forward pass is an ordinary
    one (BatchNorm running statistics update, dropout draws from the global RNG);
    hooks are removed before returning. Returns (model output, captures in forward
    order); a block called twice is captured at its first call. ``input=``/``output=``
    override the capture rule as in :func:`gradprobe.attach` (:mod:`gradprobe.capture`).

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    >>> out, caps = capture_blocks(net, torch.randn(2, 3), blocks=["0", "2"])
    >>> [c.name for c in caps], caps[0].same_shape
    (['0', '2'], True)
    """
    named = select_blocks(model, blocks)
    given = rules([n for n, _ in named], input, output)
    with torch.enable_grad():
        return run_capturing(forward_call(model, inputs), named, rules=given)
