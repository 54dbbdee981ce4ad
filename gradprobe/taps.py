"""The taps: what the probe's hooks do at each call of a probed block, forward and backward.

A forward pre-hook swaps the block's input ``x`` for an alias (:func:`gradprobe.capture.alias_view`)
whose tensor hook sees this block's ``g_x`` only; the forward hook takes the forward
statistics and hooks the output ``y`` (a tensor hook stays with the node that made ``y``, so
a later in-place op does not fool it; ``register_full_backward_hook`` breaks on those,
pytorch#61519). The gradient hooks reduce ``g_y`` and ``g_x`` to a few scalars at once
(:mod:`gradprobe.metrics`). The taps hold no step state of their own beyond the calls they
recorded, what waits for the backward pass, and what the last recorded step showed about
the model's calls; they ask the probe that owns them five things, passed in as callables: the
forward transition of a call (:class:`Fwd`), whether the step is recorded, that a backward
pass started, and how to report a failure or warn once. The signal moments of a block's
output wait in a :class:`gradprobe.batching.SignalQueue` for the end of the backward pass.
A call that no gradient can reach any more (its graph freed before a backward pass: a loss
dropped, a forward that raised) is released when the next forward pass begins
(:meth:`Taps.prune`), so that loops without a backward pass keep nothing.
On unrecorded steps a call only has its backward pass noticed, and with the block hooks off
(:class:`gradprobe.probe.Probe`) the model's own hooks (:meth:`Taps.model_exit`) do that.

Several backward passes through one call (``retain_graph=True``) add their gradients as
vectors, as ``.grad`` adds them: a pass's gradients are held by reference (no copy, at most
:data:`HOLD_BYTES` a step, released when the step closes) and a second pass replaces them by
the sums. Passes that do not train the probed parameters (:meth:`Taps._trains`: gradients
with respect to inputs, or ``create_graph=True`` ones that build a penalty) are kept apart and
recorded only where no training pass reached the block (:meth:`Taps.settle`, with a warning).
Inside ``torch.func`` transforms the hooks step aside (:func:`in_transform`).
"""

from __future__ import annotations

import enum
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from . import capture as _rule
from . import metrics
from ._tensors import in_backward, mute, muted
from .batching import SignalQueue
from .capture import alias_view, find_output, gradient_edge, swap_input
from .fused import Fused
from .jacobian.schedule import block_capture
from .rows import CallStats
from .sharding import is_sharded
from .stacking import StackTracker


@dataclass
class Call(CallStats):
    """One block call of the current step: its statistics and what its hooks hold meanwhile."""

    x: torch.Tensor | None = None  # alias, held only between the pre-hook and the forward hook
    x_version: int = 0
    x_node: Any = None  # grad_fn of the caller's input and its output_nr (in-place fallback)
    x_output_nr: int = 0
    same_shape: bool = False
    g_y: torch.Tensor | None = None  # held only between the g_y and the g_x hooks
    # A fresh input leaf's gradient edge, held from the forward hook to the g_y hook (or release()): a
    # backward pass that does not differentiate with respect to the leaf (torch.autograd.grad(loss,
    # params)) never computes g_x. The output's edge is the node running the g_y hook and y_nr; held
    # here it would tie the output's node to itself through its own hook, and no graph of such a
    # call would ever be freed.
    x_edge: Any = None
    y_nr: int = 0
    # A weak reference to the call's gradient hook (the output's, or the input's): dead once the
    # graph that would have run it is freed, when no gradient can reach the call any more.
    graph: Any = None
    # The block's other differentiable outputs (an auxiliary loss): their gradient edges and the
    # input's, held from the forward hook to the step's close (a cycle through their nodes, broken
    # by release(), at the step's close or when the call is pruned as unreachable), and the part of
    # g_x that reached x through them in the running pass, which the input hook takes out: the
    # block's columns are those of y = s(x) + F(x).
    other_edges: list[Any] | None = None
    other_x: torch.Tensor | None = None

    # The gradients of passes that are not known to train (see Taps._pass_kind), kept apart.
    aux: Call | None = None

    def release(self) -> None:
        """Drop what still ties this call to the autograd graph (at the close of its step)."""
        self.x_edge = self.g_y = self.other_edges = self.other_x = None
        self.drop_held()
        if self.aux is not None:
            self.aux.release()

    def unreachable(self) -> bool:
        """Whether no gradient can reach this call any more: its graph was freed before a backward
        pass reached it (a forward pass whose loss was dropped, or one that raised)."""
        return self.graph is not None and self.graph() is None and not (self.passes_y or self.passes_x)

    def target(self, train: bool) -> Call:
        """Where a pass's gradients go: this call for a training pass, else its ``aux`` shadow."""
        if train:
            return self
        if self.aux is None:
            self.aux = Call(block=self.block, same_shape=self.same_shape)
        return self.aux


#: The placeholder call of unrecorded steps: never recorded (its x stays None).
UNRECORDED = Call(block="")


#: Bytes of first-pass gradients a probe holds (references) so that a later backward pass through the
#: same calls can add its gradients to them as vectors; released when the step closes.
HOLD_BYTES = 64 << 20


#: The autograd node the running backward pass is executing (in a tensor hook: the node the hook
#: is on); a private but long-standing torch function, with a fallback that knows none.
_current_node: Callable[[], Any] = getattr(torch._C, "_current_autograd_node", lambda: None)

#: Recorded calls at which the calls of forward passes without a backward pass are pruned even
#: where no new call of the whole model says that a pass ended (blocks called on their own).
PRUNE_CALLS = 1024


#: The functorch interpreter stack's top (None outside every torch.func transform); a private but
#: long-standing torch function, with a fallback that sees no transform should it disappear.
_interpreter_stack: Callable[[], Any] = getattr(
    getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None
)


def in_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...; also batched gradients) is running:
    its tensors are not plain tensors, and the probe's hooks step aside.

    >>> in_transform(), torch.func.vmap(lambda t: torch.tensor(in_transform()))(torch.ones(2)).tolist()
    (False, [True, True])
    """
    return _interpreter_stack() is not None


def _will_execute(node: Any, strict: bool = False) -> bool:
    """Whether the running backward pass executes autograd node ``node``. Where torch cannot tell (a
    leaf that ``torch.autograd.grad`` captures as one of its inputs) True, or with ``strict`` the
    RuntimeError."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        if strict:
            raise
        return True


class Fwd(enum.Enum):
    """What a forward call of a probed block is to the probe."""

    IGNORE = 0  # no grad, eval mode, a probe's own pass, or a no-grad run under checkpointing
    RECOMPUTE = 1  # activation checkpointing re-running a block it already saw: alias, no hooks
    COUNT = 2  # unrecorded step: only notice the backward pass
    CAPTURE = 3  # recorded step


class Taps:
    """The per-call hooks of the probed blocks (``pre_hook``, ``post_hook``, ``shortcut_hook``
    take the block's name first). ``calls`` are the calls recorded in this step, ``captures``
    the Jacobian captures of this forward pass (taken while ``jacobian_due``), ``no_shortcut``
    the shape-changing blocks seen without a shortcut; the owner empties them."""

    def __init__(
        self,
        rules: Mapping[str, _rule.Rule],
        stacks: StackTracker,
        index: dict[str, int],
        channel_dim: int | None,
        *,
        forward_kind: Callable[[str, nn.Module], Fwd],
        recording: Callable[[], bool],
        backward_started: Callable[[], None],
        fail: Callable[[str, BaseException], None],
        warn_once: Callable[[str, str], None],
        params: Sequence[torch.Tensor] = (),
        hold_bytes: int = HOLD_BYTES,
        fused: bool = False,
    ) -> None:
        self._rules, self._stacks, self._index, self._channel_dim = rules, stacks, index, channel_dim
        self._forward_kind, self._recording, self._backward_started = (
            forward_kind,
            recording,
            backward_started,
        )
        self._fail, self._warn_once = fail, warn_once
        self._params = list(params)  # the probed parameters: what tells a training pass
        self._hold_bytes, self._held = hold_bytes, 0
        self._pass: tuple[int, bool] = (-1, True)  # (graph task id, whether it trains)
        self.calls: list[Call] = []
        self._prune_at = PRUNE_CALLS
        self.captures: list[Any] = []  # jacobian.BlockCapture
        self.no_shortcut: set[str] = set()
        self.jacobian_due = False
        self._stack: dict[str, list[Call]] = {name: [] for name in rules}  # pre -> post hook
        self._shortcut_out: dict[str, torch.Tensor] = {}
        self._signal = SignalQueue(fused=Fused(warn_once) if fused else None)
        self._model_calls = 0  # calls of the whole model in progress
        self._count_y: torch.Tensor | None = None  # the last unrecorded block output in them
        self.through_model = False  # a backward pass went through the model's output
        self.outside = False  # a block was called outside the model's own forward
        # The last recorded step's blocks ran inside the model's calls and its backward pass went
        # through the model's output: one count hook per model call will do, not one per block.
        self.model_counts = False

    def clear(self) -> None:
        """Drop what the hooks hold between calls (on detach)."""
        self.release()
        self._signal.clear()
        self._model_calls, self._count_y = 0, None
        self.captures.clear()
        self._shortcut_out.clear()
        for stack in self._stack.values():
            stack.clear()

    # ------------------------------------------------------------------ forward
    def model_enter(self) -> int:
        """A call of the whole model begins; the number of them in progress."""
        self._model_calls += 1
        return self._model_calls

    def model_exit(self, output: Any, *, counts: bool) -> None:
        """A call of the whole model ends. On an unrecorded step the backward pass is noticed by
        gradient hooks on the model's output (where a loss starts) and on the last probed
        block's output, two per model call instead of one per block (a hook costs about as
        much as the rest of an unrecorded block call); blocks called outside the model's own
        forward get one each, and with the block hooks off the output's hook is the only one.
        It also tells :attr:`through_model`: that a backward pass went through the output.
        ``counts``: the call is one a step counts (with grad, in training mode, not the probe's own)."""
        self._model_calls = max(self._model_calls - 1, 0)
        y, self._count_y = self._count_y, None
        if self._model_calls:
            return
        try:
            out = find_output(output) if counts else None
            if out is not None and out.requires_grad:
                out.register_hook(self._output_hook)
            if y is not None and y is not out:
                y.register_hook(self._count_hook)
        except Exception as exc:
            self._fail("the end of a forward pass", exc)

    def pre_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kind = self._forward_kind(name, module)
        if not self._model_calls and kind in (Fwd.COUNT, Fwd.CAPTURE) and not in_backward():
            self.outside = True  # (a recomputation under checkpointing runs in backward, alone)
            if self._index.get(name) == 0:  # the first block, called on its own: a new pass
                self.prune()
        if kind is Fwd.RECOMPUTE:
            return swap_input(args, kwargs, alias_view, self._rules[name].input, module)
        if kind is Fwd.CAPTURE:
            try:
                return self._capture_input(name, module, args, kwargs)
            except Exception as exc:  # never break the user's forward pass
                self._fail(f"input capture of block {name}", exc)
        if kind is Fwd.COUNT:  # placeholders keep pre/post hooks paired
            self._stack[name].append(UNRECORDED)  # nothing allocated on unrecorded steps
        elif kind is Fwd.CAPTURE:
            self._stack[name].append(Call(block=name))
        return None

    def _capture_input(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = Call(block=name)

        def capture(x: torch.Tensor) -> torch.Tensor:
            if not x.requires_grad and not any(p.requires_grad for p in module.parameters()):
                # A frozen block on an input without grad: its output needs no grad, and a probe
                # must not add one (a backward() that should raise would succeed).
                return x
            self._stacks.link(name, x, self._index)
            alias = alias_view(x)
            hook = partial(self._grad_x_alias_hook, call)
            call.graph = weakref.ref(hook)
            alias.register_hook(hook)
            call.x_node, call.x_output_nr = x.grad_fn, x.output_nr
            call.x, call.x_version = alias, alias._version
            return alias

        swapped = swap_input(args, kwargs, capture, self._rules[name].input, module)
        self._stack[name].append(call)
        if swapped is None:
            self._warn_once(f"input:{name}", _rule.no_input_message(name, args, kwargs))
        return swapped

    def shortcut_hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack[name]
        # A shortcut only if this call applied it to the block's own input (the alias the
        # block received): a "downsample" applied to the block's result is not one.
        if stack and stack[-1].x is not None and any(a is stack[-1].x for a in args):
            out = find_output(output)
            if out is not None:
                self._shortcut_out[name] = out

    def post_hook(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stack = self._stack.get(name)
        if not stack:
            return
        call = stack.pop()
        if call is UNRECORDED:  # unrecorded step: only notice the backward pass (the common path)
            try:
                if output is not None:  # None: the block raised (always_call)
                    y = find_output(output, self._rules[name].output)
                    if y is not None and y.requires_grad:
                        self._count(y)
            except Exception as exc:
                self._fail(f"forward pass of block {name}", exc)
            return
        shortcut_out = self._shortcut_out.pop(name, None)
        try:
            if output is None and sys.exc_info()[1] is not None:
                return  # the block raised (always_call): record nothing for this call
            y = find_output(output, self._rules[name].output)
            if y is None:
                if self._recording() and torch.is_grad_enabled():
                    self._warn_once(f"output:{name}", _rule.no_output_message(name, output))
                    if call.x is not None:  # a row of NaN (its input gradient still arrives)
                        call.x = None
                        self.calls.append(call)
            elif y.requires_grad:
                self._record_forward(call, y, shortcut_out)
                if call.x is not None and self._recording():
                    self._other_outputs(call, output, y)
        except Exception as exc:
            self._fail(f"forward metrics of block {name}", exc)
        finally:
            # Drop the alias and its node: its tensor hook would keep the whole graph alive.
            call.x = call.x_node = None

    def _record_forward(self, call: Call, y: torch.Tensor, shortcut_out: torch.Tensor | None) -> None:
        if shortcut_out is not None and (
            shortcut_out is y or (shortcut_out.data_ptr() == y.data_ptr() and shortcut_out.shape == y.shape)
        ):
            shortcut_out = None  # the "shortcut" computed the block's output: it is its last layer
        if not self._recording():
            self._count(y)
            return
        self._stacks.output(call.block, y.grad_fn)
        x = call.x
        if x is not None and self.jacobian_due:
            self.captures.append(
                block_capture(call.block, x, y, call.x_version, call.x_node, call.x_output_nr)
            )
        if x is not None:
            call.same_shape = x.shape == y.shape
            ref = x if call.same_shape else shortcut_out
            if ref is None or ref.shape != y.shape:
                self.no_shortcut.add(call.block)
            axis = metrics.channel_axis(y, self._channel_dim)
            if y.is_complex() or ref is not x or not self._signal.forward(call, x, y, axis):
                residual = call.add_forward(x, y, ref)  # now (else in the end-of-backward batch)
                if axis is not None and not y.is_complex():
                    self._signal.add(call, y, residual, axis)
            if y.is_complex():
                self._warn_once(
                    f"signal:{call.block}",
                    f"gradprobe: block {call.block} has a complex output: chan_mean_sq, chan_var and "
                    "branch_var are NaN there (signal propagation statistics are defined for real "
                    "activations).",
                )
            if x._version != call.x_version and call.x_node is not None:
                # The block modified its input in place: the alias's node left the graph and its
                # hook will not fire. Read g_x on the node that made the caller's input instead.
                call.x_node.register_prehook(partial(self._grad_x_node_hook, call))
        else:
            call.numel_y = y.numel()
        if x is not None and call.x_node is None and x._version == call.x_version:
            # The input is a leaf (data; the probe's own leaf where it had no grad): a pass that
            # differentiates with respect to the parameters only (torch.autograd.grad) does not
            # compute its gradient. Kept to compute it then; the graph held is this block's own.
            call.x_edge, call.y_nr = gradient_edge(x), y.output_nr
        self.calls.append(call)
        hook = partial(self._grad_y_hook, call)
        call.graph = weakref.ref(hook)
        y.register_hook(hook)
        if len(self.calls) >= self._prune_at:
            self.prune()

    def prune(self) -> None:
        """A forward pass begins with no backward pass since the last one (a loss computed and then
        dropped, a validation pass in training mode, a forward that raised, or several forwards
        before one backward): reduce the held block outputs, and release the calls that no
        gradient can reach any more, with what they hold, so that memory stays bounded whatever
        the loop. Calls whose graph is still alive stay: a later backward pass may reach them.
        Called by the probe when the model is called again, here when the first block is called
        on its own, and every :data:`PRUNE_CALLS` calls (and twice the calls kept) otherwise."""
        self.flush_signal()
        live = []
        for call in self.calls:
            if call.unreachable():
                call.release()
            else:
                live.append(call)
        self.calls = live
        self._prune_at = max(PRUNE_CALLS, 2 * len(live))
        if not self._model_calls:  # no call of the model in progress will take them (its end would)
            self.captures.clear()

    def _other_outputs(self, call: Call, output: Any, y: torch.Tensor) -> None:
        """A block whose output holds more than y: its columns stay those of y = s(x) + F(x), so the
        gradient reaching x through the other outputs is taken out of g_x (measured by a
        vector-Jacobian product from each one's gradient hook, only in passes that reach it); an
        output rule that took a tensor unlike the input beside one like it says so, pointing to
        ``output=``."""
        x = call.x
        assert x is not None
        if output is y:  # the block returned one tensor: nothing else to read
            return
        spec = _rule.same_shape_output(output, y, x.shape) if self._rules[call.block].output is None else None
        if spec is not None:
            self.no_shortcut.discard(call.block)  # the output rule is the suspect, not a shortcut
            self._warn_once(
                f"output-shape:{call.block}", _rule.wrong_output_message(call.block, output, y, spec, x.shape)
            )
        others = _rule.other_outputs(output, y)
        if not others or x._version != call.x_version:
            return
        call.other_edges = [gradient_edge(x)]
        for t in others:
            call.other_edges.append(gradient_edge(t))
            t.register_hook(partial(self._grad_other_hook, call, len(call.other_edges) - 1))

    def flush_signal(self) -> None:
        """Reduce the held tensors of the step's calls in batches (end of a backward pass, step close)."""
        for block in self._signal.flush():
            self._warn_once(
                f"signal-inplace:{block}",
                f"gradprobe: a tensor of block {block} (its input, output or a gradient) was changed in "
                "place before the probe reduced it: the columns that need it are NaN in this step, "
                "and the block's statistics are taken when its tensors arrive from now on.",
            )

    # ------------------------------------------------------------------ backward
    def _count(self, y: torch.Tensor) -> None:
        """Have the backward pass through ``y`` noticed (on an unrecorded step)."""
        if self._model_calls and self.model_counts:
            self._count_y = y  # one hook when the model returns (model_exit)
        else:
            y.register_hook(self._count_hook)

    def _count_hook(self, grad: torch.Tensor) -> None:
        if not muted():
            self._backward_started()

    def _output_hook(self, grad: torch.Tensor) -> None:
        if not muted():
            self.through_model = True
            self._backward_started()

    def _trains(self) -> bool:
        """Whether the running backward pass is a training pass: it accumulates into the probed
        parameters' ``.grad`` (``backward()``), or differentiates with respect to them without
        building a graph (``torch.autograd.grad(loss, params)``). A pass that reaches no parameter
        (``torch.autograd.grad(loss, x)``: a saliency map, an input-gradient penalty) or one that
        builds a graph of the parameter gradients (``create_graph=True``: a gradient-norm penalty,
        or a meta-learning inner step) is not known to train. Asked once per pass; a probe
        without parameters takes every pass for a training one (it cannot tell)."""
        task = int(torch._C._current_graph_task_id())
        if task == self._pass[0]:
            return self._pass[1]
        trains = not self._params
        sharded = False
        for p in self._params:
            if not p.requires_grad:  # frozen since attach
                continue
            if is_sharded(p):  # FSDP2 runs the pass on unsharded copies: p is never in its graph
                sharded = True
                continue
            try:
                if _will_execute(gradient_edge(p).node, strict=True):
                    trains = True
                    break
            except RuntimeError:  # a leaf that torch.autograd.grad captures: differentiated for
                trains = not torch.is_grad_enabled()  # grad mode on in a pass: create_graph=True
                break
        if sharded and not trains:  # cannot tell: a pass without create_graph is taken to train
            trains = not torch.is_grad_enabled()
        self._pass = (task, trains)
        return trains

    def _hold(self, grad: torch.Tensor) -> bool:
        """Whether a first pass's gradient may be held (within ``hold_bytes`` a step)."""
        size = grad.numel() * grad.element_size()
        if self._held + size > self._hold_bytes:
            return False
        self._held += size
        return True

    def _grad_y_hook(self, call: Call, grad: torch.Tensor) -> None:
        if muted() or in_transform():  # (a transform's batched gradients are not training's)
            return
        self._backward_started()
        try:
            target = call.target(self._trains())
            hold = target.passes_y == 0 and self._hold(grad)
            paired = target.add_grad_out(grad, hold, self._signal)
            if call.same_shape:
                target.g_y = paired
        except Exception as exc:
            self._fail(f"output gradient of block {call.block}", exc)
        x_edge = call.x_edge
        if x_edge is not None:
            call.x_edge = None
            node = _current_node()  # the node this hook is on: the one that made y
            if node is not None and not _will_execute(x_edge.node):
                self._grad_x_by_vjp(call, x_edge, GradientEdge(node, call.y_nr), grad)

    def _grad_x_by_vjp(self, call: Call, x_edge: Any, y_edge: Any, grad: torch.Tensor) -> None:
        """``g_x`` of a call whose input leaf this backward pass skips (``torch.autograd.grad(loss,
        params)`` differentiates with respect to the parameters only): the vector-Jacobian product
        through the block, run before the pass reaches the block (its graph is intact), muted."""
        try:
            with mute():
                (g_x,) = torch.autograd.grad(y_edge, x_edge, grad, retain_graph=True, allow_unused=True)
        except Exception as exc:
            call.target(self._trains()).g_y = None
            self._fail(f"input gradient of block {call.block}", exc)
            return
        if g_x is not None:
            self._grad_x_hook(call, g_x)
        else:
            call.target(self._trains()).g_y = None

    def _grad_other_hook(self, call: Call, index: int, grad: torch.Tensor) -> None:
        """Gradient reached one of the block's other outputs: the part of g_x it carries, by a
        vector-Jacobian product run before the pass reaches the block (its graph is intact)."""
        if muted() or in_transform() or call.other_edges is None:
            return
        try:
            x_edge, edge = call.other_edges[0], call.other_edges[index]
            with mute():
                (part,) = torch.autograd.grad(edge, x_edge, grad, retain_graph=True, allow_unused=True)
            if part is not None:
                call.other_x = part if call.other_x is None else call.other_x + part
        except Exception as exc:
            self._fail(f"input gradient of block {call.block}", exc)

    def _grad_x_alias_hook(self, call: Call, grad: torch.Tensor) -> None:
        if muted() or in_transform():  # (also the probe's own products through this block)
            return
        other, call.other_x = call.other_x, None
        self._grad_x_hook(call, grad if other is None else grad - other)

    def _grad_x_hook(self, call: Call, grad: torch.Tensor) -> None:
        if muted() or in_transform():
            return
        self._backward_started()
        target = call
        try:
            target = call.target(self._trains())
            hold = target.passes_x == 0 and self._hold(grad)
            target.add_grad_in(grad, target.g_y if call.same_shape else None, hold, self._signal)
        except Exception as exc:
            self._fail(f"input gradient of block {call.block}", exc)
        finally:
            target.g_y = None

    def settle(self) -> None:
        """The step closes: a call that no training pass reached keeps the gradients of the passes
        that did (said in a warning), and the blocks whose passes pooled as sums of squares are
        named in another (never a silent mix)."""
        squares: dict[str, None] = {}  # (the blocks in call order, each once: a dict, not a list scan)
        for call in self.calls:
            aux = call.aux
            if aux is not None and call.passes_y == 0 and call.passes_x == 0:
                call.gyy, call.bwd_x, call.squares = aux.gyy, aux.bwd_x, aux.squares
                call.passes_y, call.passes_x = aux.passes_y, aux.passes_x
                self._warn_once(
                    f"aux:{call.block}",
                    f"gradprobe: block {call.block} was reached in this step only by backward passes "
                    "that do not train its parameters (torch.autograd.grad with respect to inputs, or "
                    "with create_graph=True): its gradient columns are those passes' gradients. A "
                    "backward() or torch.autograd.grad(loss, params) pass in the same step is what "
                    "the probe records otherwise.",
                )
            if call.squares:
                squares.setdefault(call.block)
        if squares:
            self._warn_once(
                "squares",
                f"gradprobe: block(s) {list(squares)} received several backward passes in one step beyond "
                f"the {self._hold_bytes >> 20} MiB of first-pass gradients the probe holds to add them as "
                "vectors: their grad_out, grad_in and branch columns pool those passes as "
                "sqrt(|g1|^2 + |g2|^2), not |g1 + g2| as .grad adds them.",
            )

    def release(self) -> None:
        """Drop the graph ties and held gradients of the current step's calls (at its close, or on
        detach)."""
        for call in self.calls:
            call.release()
        self._held = 0

    def _grad_x_node_hook(self, call: Call, grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        grad = grad_outputs[call.x_output_nr]
        if grad is not None:
            self._grad_x_hook(call, grad)
