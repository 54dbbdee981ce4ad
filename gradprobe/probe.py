"""The probe: the hooks on a model's blocks, and the state machine that cuts training into steps.

Capture, per block call on a recorded step: a forward pre-hook swaps the block's input ``x``
for an alias (:func:`gradprobe.capture.alias_view`) whose tensor hook sees this block's
``g_x`` only; the forward hook takes the forward statistics and hooks the output ``y`` (a
tensor hook stays with the node that made ``y``, so a later in-place op does not fool it;
``register_full_backward_hook`` breaks on those, pytorch#61519). Gradient hooks reduce
``g_y`` and ``g_x`` to a few scalars at once (:mod:`gradprobe.metrics`); rows are built
when the step closes (:mod:`gradprobe.rows`). Nothing is written on user modules; every
handle is removed by ``detach``.

Steps (``Probe._state``)::

    IDLE     --forward through a probed block-->            FORWARD
    FORWARD  --first gradient hook of a backward pass-->    BACKWARD (end-of-backward callback queued)
    BACKWARD --that callback (parameter statistics)-->      DONE
    DONE     --next forward, frame(), save(), detach()-->   closed, IDLE  (automatic stepping)
    any      --step()-->                                    closed, IDLE  (explicit stepping from then on)

An unrecorded step (``every=``) runs the same machine with bare hooks that only notice the
backward pass; a recorded one keeps statistics.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import capture as _rule
from ._tensors import in_backward, muted
from ._version import __version__
from .blocks import BlockSpec, StackTracker, no_shortcut_message, select_blocks, shortcut_modules
from .capture import alias_view, find_output, swap_input
from .config import SUB_BATCH, TRAINING_JACOBIAN_OPTIONS, ProbeConfig, Schedule, every_n
from .jacobian.schedule import JacobianSchedule, block_capture, paths_decomposition
from .records import RecordedTables, Recorder, Sink, new_run_id
from .rows import CallStats, ParamSnapshots, loss_scale, non_finite, step_rows

__all__ = [
    "SUB_BATCH",
    "TRAINING_JACOBIAN_OPTIONS",
    "Probe",
    "Schedule",
    "attach",
    "every_n",
]  # names kept here


class _Hook:
    """A module hook that stays with its module: ``copy.deepcopy`` (an EMA copy) and
    ``pickle``/``torch.save`` give the copy a no-op from the standard library instead (so a
    pickled model loads without gradprobe); a shallow copy shares the hook dicts and is told
    apart by identity. Under ``torch.compile`` Dynamo breaks the graph around the hook and
    runs it eagerly: traced tensor hooks double-count gradients."""

    __slots__ = ("__weakref__", "_eager", "_fn", "_module")

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self._fn, self._eager = fn, torch.compiler.disable(fn, recursive=True)
        self._module = weakref.ref(module)

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        if module is not self._module():
            return None
        # Outside Dynamo the plain call: the disable wrapper costs about 40 us per call.
        return self._eager(module, *args) if torch.compiler.is_compiling() else self._fn(module, *args)

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (contextlib.nullcontext(), "__exit__"))

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return contextlib.nullcontext().__exit__

    def __copy__(self) -> _Hook:
        return self


@dataclass
class _Call(CallStats):
    """One block call of the current step: its statistics and what its hooks hold meanwhile."""

    x: torch.Tensor | None = None  # alias, held only between the pre-hook and the forward hook
    x_version: int = 0
    x_node: Any = None  # grad_fn of the caller's input and its output_nr (in-place fallback)
    x_output_nr: int = 0
    same_shape: bool = False
    g_y: torch.Tensor | None = None  # held only between the g_y and the g_x hooks


@dataclass
class _Step:
    """What the current step has collected."""

    calls: list[_Call] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # squared [|theta|, |grad|, |delta|]
    snapshot: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    jacobian: dict[str, dict[str, float]] = field(default_factory=dict)
    blocks: set[str] = field(default_factory=set)  # blocks called with grad in this step


#: The placeholder call of unrecorded steps: never recorded (its x stays None).
_UNRECORDED = _Call(block="")


class _State(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"
    DONE = "done"


class _Fwd(enum.Enum):
    """What a forward call of a probed block is to the probe."""

    IGNORE = 0  # no grad, eval mode, a probe's own pass, or a no-grad run under checkpointing
    RECOMPUTE = 1  # activation checkpointing re-running a block it already saw: alias, no hooks
    COUNT = 2  # unrecorded step: only notice the backward pass
    CAPTURE = 3  # recorded step


class Probe(RecordedTables):
    """Hooks on the blocks of a model that record gradient and identity metrics.

    Create it with :func:`gradprobe.attach` (``Probe(model, config)`` takes a
    :class:`gradprobe.ProbeConfig`). Each backward pass that reaches the probed blocks is
    one step, closed lazily when the next forward pass through a probed block begins (or on
    ``frame()``, ``save()``, ``detach()``), so ``probe.log(loss=...)`` anywhere between a
    forward pass and the next one belongs to its step. The first call of :meth:`step`
    switches to explicit stepping: only ``step()`` closes a step, and every backward pass in
    between is pooled into it (gradient accumulation); ``auto_step=False`` starts so.
    """

    def __init__(self, model: nn.Module, config: ProbeConfig | None = None, **options: Any) -> None:
        if config is None:
            config = ProbeConfig.build("Probe", options)
        elif options or not isinstance(config, ProbeConfig):
            raise TypeError("Probe(model, config) takes a gradprobe.ProbeConfig, or the keywords of attach()")
        self.config = config
        selected = select_blocks(model, config.blocks)
        names = [n for n, _ in selected]
        self._rules = _rule.rules(names, config.input, config.output)
        self._stacks = StackTracker(names, config.stacks)
        self._model, self._modules = model, dict(selected)
        self._schedule: Schedule = config.every if callable(config.every) else every_n(config.every)
        self._auto = config.auto_step is not False
        self._params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in selected}
        self._snapshots = ParamSnapshots(enabled=config.update_ratio)
        self._jacobian = JacobianSchedule(
            config.jacobian_every, config.probes, config.jacobian_options, config.strict, self._warn_once
        )
        self._state, self._step, self._buf = _State.IDLE, 0, _Step()
        self._recording_of = (-1, False)  # (step, schedule(step)): the schedule is asked once per step
        self._recorded_steps, self._paths_step = 0, -1
        self._index: dict[str, int] = {}  # forward order
        self._stack: dict[str, list[_Call]] = {name: [] for name in self._modules}  # pre -> post hook
        self._shortcut_out: dict[str, torch.Tensor] = {}
        self._no_shortcut: set[str] = set()  # shape-changing blocks without a shortcut, not yet warned
        self._captures: list[Any] = []  # jacobian.BlockCapture of this forward pass
        self._warned: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._shortcut_modules = shortcut_modules(list(self._modules.items()), config.shortcuts)
        self._run_id = new_run_id()
        sink = None
        if config.sink is not None:  # last of the checks: a bad argument leaves no empty folder behind
            sink = Sink(config.sink, meta=self.meta(), run_id=self._run_id, **dict(config.sink_options or {}))
            self._run_id, self._step = sink.run_id, sink.resumed_steps  # resume: continue its run
        self._out = Recorder(sink, self.meta, paths=bool(config.paths_every))
        try:
            self._register()
        except BaseException:
            self._out.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def _register(self) -> None:
        add = self._handles.append
        try:
            for name, module in self._modules.items():
                add(
                    module.register_forward_pre_hook(
                        _Hook(partial(self._pre_hook, name), module), with_kwargs=True
                    )
                )
                # always_call: also when the block raises, so that call's records are released
                post = _Hook(partial(self._post_hook, name), module)
                add(module.register_forward_hook(post, with_kwargs=True, always_call=True))
            for name, shortcut in self._shortcut_modules.items():
                add(shortcut.register_forward_hook(_Hook(partial(self._shortcut_hook, name), shortcut)))
            if self.config.jacobian_every:
                add(
                    self._model.register_forward_hook(
                        _Hook(self._jacobian_hook, self._model), with_kwargs=True
                    )
                )
            if self.config.paths_every:
                hook = torch.compiler.disable(self._paths_hook, recursive=True)
                add(self._model.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self._remove_handles()
            raise

    def _remove_handles(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def detach(self) -> None:
        """Remove every hook; recorded tables stay available. Safe to call twice."""
        try:
            if self._handles:
                self._flush()
        finally:
            self._out.close()  # never raises: a sink that cannot write warns and keeps its rows
            self._remove_handles()
            self._captures.clear()
            self._shortcut_out.clear()
            self._stacks.forget()
            for stack in self._stack.values():
                stack.clear()

    def __enter__(self) -> Probe:
        if not self._handles:
            raise RuntimeError(
                "this probe is detached: its hooks are gone and it would record nothing; attach a new one "
                "with gradprobe.attach(model)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ public API
    @property
    def blocks(self) -> list[str]:
        """Probed block names, in forward order once a forward pass has run (module order before)."""
        seen = sorted(self._index, key=self._index.__getitem__)
        return seen + [n for n in self._modules if n not in self._index]

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    @property
    def current_step(self) -> int:
        """Number of the step being recorded now (steps start at 0)."""
        return self._step

    def log(self, **scalars: Any) -> None:
        """Attach scalars (loss, accuracy, lr, ...) to the current step.

        Tensors are converted with ``.item()``; call it before the next forward pass.
        """
        for key, value in scalars.items():
            if key == "step":
                raise ValueError("'step' is reserved: the probe numbers steps itself")
            if isinstance(value, torch.Tensor):
                value = value.detach().item() if value.numel() == 1 else value.detach().tolist()
            self._buf.scalars[key] = value

    def step(self) -> None:
        """Close the current step now and switch to explicit stepping (see the class docstring)."""
        self._auto = False
        self._close_step()

    def meta(self) -> dict[str, Any]:
        """Metadata stored with a saved run."""
        cfg, every = self.config, self.config.every
        return {
            "kind": "probe",
            "run_id": self._run_id,
            "gradprobe_version": __version__,
            "torch_version": torch.__version__,
            "model_class": f"{type(self._model).__module__}.{type(self._model).__qualname__}",
            "blocks": self.blocks,
            "every": every if isinstance(every, int) else getattr(every, "__name__", repr(every)),
            "created": self._created,
            "steps": self._step,
            "update_ratio": cfg.update_ratio,
            "jacobian": cfg.jacobian_every,
            "probes": cfg.probes,
            "jacobian_options": cfg.jacobian_options.as_dict() if cfg.jacobian_every else {},
            "paths": cfg.paths_every,
        }

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"Probe({type(self._model).__name__}, blocks={len(self._modules)}, steps={self._step}, {state})"
        )

    # ------------------------------------------------------------------ helpers
    def _fail(self, where: str, exc: BaseException) -> None:
        if self.config.strict:
            raise exc
        # Once per kind of failure (not per block and step): later ones would flood the log.
        self._warn_once(
            where.split(" of block ")[0],
            f"gradprobe: {where} failed ({type(exc).__name__}: {exc}); recording NaN there and "
            "carrying on. Pass strict=True to attach() to raise instead.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _recording(self) -> bool:
        """Whether the current step is recorded (the schedule, asked once per step)."""
        if self._recording_of[0] != self._step:
            self._recording_of = (self._step, bool(self._schedule(self._step)))
        return self._recording_of[1]

    # ------------------------------------------------------------------ forward: IDLE -> FORWARD
    def _forward_kind(self, name: str, module: nn.Module) -> _Fwd:
        """The forward transition of a call of block ``name`` (closing a DONE step first)."""
        if in_backward():
            # A forward call inside a backward pass is activation checkpointing recomputing the
            # block. Non-reentrant checkpointing ran the block normally first: that call is
            # recorded, the recomputation only re-aliased (same graph as the first run; also
            # inside a probe's own passes). Reentrant checkpointing ran it under no_grad first:
            # the recomputation is the only call with a graph, so it is recorded.
            if not torch.is_grad_enabled():
                return _Fwd.IGNORE
            if name in self._buf.blocks:
                return _Fwd.RECOMPUTE
            if muted():
                return _Fwd.IGNORE
        elif muted():
            return _Fwd.IGNORE
        elif self._auto and self._state is _State.DONE:
            self._close_step()
        self._index.setdefault(name, len(self._index))  # forward order, also from no_grad passes
        if not torch.is_grad_enabled() or not (module.training or self.config.record_eval):
            return _Fwd.IGNORE
        self._buf.blocks.add(name)
        if self._state is not _State.BACKWARD:
            self._state = _State.FORWARD
        return _Fwd.CAPTURE if self._recording() else _Fwd.COUNT

    def _pre_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kind = self._forward_kind(name, module)
        if kind is _Fwd.RECOMPUTE:
            return swap_input(args, kwargs, alias_view, self._rules[name].input, module)
        if kind is _Fwd.CAPTURE:
            try:
                return self._capture_input(name, module, args, kwargs)
            except Exception as exc:  # never break the user's forward pass
                self._fail(f"input capture of block {name}", exc)
        if kind is _Fwd.COUNT:  # placeholders keep pre/post hooks paired
            self._stack[name].append(_UNRECORDED)  # nothing allocated on unrecorded steps
        elif kind is _Fwd.CAPTURE:
            self._stack[name].append(_Call(block=name))
        return None

    def _capture_input(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = _Call(block=name)

        def capture(x: torch.Tensor) -> torch.Tensor:
            if not x.requires_grad and not any(p.requires_grad for p in module.parameters()):
                # A frozen block on an input without grad: its output needs no grad, and a probe
                # must not add one (a backward() that should raise would succeed).
                return x
            self._stacks.link(name, x, self._index)
            alias = alias_view(x)
            alias.register_hook(partial(self._grad_x_hook, call))
            call.x_node, call.x_output_nr = x.grad_fn, x.output_nr
            call.x, call.x_version = alias, alias._version
            return alias

        swapped = swap_input(args, kwargs, capture, self._rules[name].input, module)
        self._stack[name].append(call)
        if swapped is None:
            self._warn_once(f"input:{name}", _rule.no_input_message(name, args, kwargs))
        return swapped

    def _shortcut_hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack[name]
        # A shortcut only if this call applied it to the block's own input (the alias the
        # block received): a "downsample" applied to the block's result is not one.
        if stack and stack[-1].x is not None and any(a is stack[-1].x for a in args):
            out = find_output(output)
            if out is not None:
                self._shortcut_out[name] = out

    def _post_hook(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stack = self._stack.get(name)
        if not stack:
            return
        call = stack.pop()
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
                        self._buf.calls.append(call)
            elif y.requires_grad:
                self._record_forward(call, y, shortcut_out)
        except Exception as exc:
            self._fail(f"forward metrics of block {name}", exc)
        finally:
            # Drop the alias and its node: its tensor hook would keep the whole graph alive.
            call.x = call.x_node = None

    def _record_forward(self, call: _Call, y: torch.Tensor, shortcut_out: torch.Tensor | None) -> None:
        if shortcut_out is not None and (
            shortcut_out is y or (shortcut_out.data_ptr() == y.data_ptr() and shortcut_out.shape == y.shape)
        ):
            shortcut_out = None  # the "shortcut" computed the block's output: it is its last layer
        if call is _UNRECORDED or not self._recording():
            y.register_hook(self._count_hook)  # unrecorded step: only notice the backward pass
            return
        self._stacks.output(call.block, y.grad_fn)
        x = call.x
        if x is not None and self._jacobian.due(self._recorded_steps):
            self._captures.append(
                block_capture(call.block, x, y, call.x_version, call.x_node, call.x_output_nr)
            )
        if x is not None:
            call.same_shape = x.shape == y.shape
            ref = x if call.same_shape else shortcut_out
            if ref is None or ref.shape != y.shape:
                self._no_shortcut.add(call.block)
            call.add_forward(x, y, ref, self.config.channel_dim)
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
        self._buf.calls.append(call)
        y.register_hook(partial(self._grad_y_hook, call))

    def _jacobian_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """End of a training forward pass: the Jacobian columns of the blocks it captured."""
        captures, self._captures = self._captures, []
        if not captures or muted() or in_backward():
            return
        try:
            captures.sort(key=lambda c: self._index[c.name])
            cols = self._jacobian.columns(
                self._model, self._modules, captures, (args, kwargs), self._rules, self._stacks.names
            )
            self._buf.jacobian.update(cols)
        except Exception as exc:
            self._fail("Jacobian columns", exc)

    def _paths_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """End of a recorded training forward pass: the path-length decomposition, every N-th."""
        if muted() or in_backward() or not torch.is_grad_enabled() or not self._buf.blocks:
            return
        if (
            not self._recording()
            or self._recorded_steps % self.config.paths_every
            or self._paths_step == self._step
        ):
            return
        self._paths_step = self._step
        try:
            named = [(n, self._modules[n]) for n in self.blocks]
            opts = self.config.jacobian_options
            frame = paths_decomposition(self._model, named, self._shortcut_modules, (args, kwargs), opts)
            frame.insert(0, "step", self._step)
            self._out.paths_parts.append(frame)
        except Exception as exc:
            self._fail("path-length decomposition", exc)

    # ------------------------------------------------------------------ backward: -> BACKWARD -> DONE
    def _backward_started(self) -> None:
        if self._state is not _State.BACKWARD:
            self._state = _State.BACKWARD
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ending)

    def _backward_ending(self) -> None:
        # Once more at the very end of the callback queue: DistributedDataParallel queues its
        # own end-of-backward callback (the gradient all-reduce) after ours; parameter
        # gradients are final only after it.
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        try:
            if self._recording():
                # Before the optimizer moves the weights; with accumulation the last pass wins.
                names = sorted({c.block for c in self._buf.calls}, key=lambda n: self._index.get(n, -1))
                if names:
                    groups = [self._params[n] for n in names]
                    self._buf.params = self._snapshots.stats(names, groups)
                    self._snapshots.take(names, groups, self._buf.snapshot)
                if self.config.scaler is not None:
                    scale = loss_scale(self.config.scaler)
                    for call in self._buf.calls:
                        call.scale = scale
        except Exception as exc:
            self._fail("parameter metrics", exc)
        finally:
            self._state = _State.DONE

    def _count_hook(self, grad: torch.Tensor) -> None:
        if not muted():
            self._backward_started()

    def _grad_y_hook(self, call: _Call, grad: torch.Tensor) -> None:
        if muted():
            return
        self._backward_started()
        try:
            call.add_grad_out(grad)
            if call.same_shape:
                call.g_y = grad
        except Exception as exc:
            self._fail(f"output gradient of block {call.block}", exc)

    def _grad_x_hook(self, call: _Call, grad: torch.Tensor) -> None:
        if muted():
            return
        self._backward_started()
        try:
            call.add_grad_in(grad, call.g_y if call.same_shape else None)
        except Exception as exc:
            self._fail(f"input gradient of block {call.block}", exc)
        finally:
            call.g_y = None

    def _grad_x_node_hook(self, call: _Call, grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        grad = grad_outputs[call.x_output_nr]
        if grad is not None:
            self._grad_x_hook(call, grad)

    # ------------------------------------------------------------------ closing: DONE -> IDLE
    def _flush(self) -> None:
        if self._auto and self._state is _State.DONE:
            self._close_step()

    def _close_step(self) -> None:
        try:
            self._close_records()
        finally:
            self._out.end_step()  # the step's rows and scalars reach the sink as one unit

    def _close_records(self) -> None:
        recorded, step = self._recording(), self._step
        buf, self._buf, self._state = self._buf, _Step(), _State.IDLE
        self._step += 1
        self._captures.clear()
        self._stacks.forget()
        self._warn_shapeless()
        if buf.scalars:  # scalars are cheap: kept for every step, recorded or not
            self._out.add_scalars(step, buf.scalars)
        if not recorded:
            return
        self._recorded_steps += 1
        try:
            rows = step_rows(step, buf.calls, buf.params, buf.jacobian, self._index, self._stacks.names)
            self._out.add_rows(rows)
            if "non-finite" not in self._warned:
                excused = lambda b: f"input:{b}" in self._warned or f"output:{b}" in self._warned  # noqa: E731
                message = non_finite(step, rows, excused)  # recorded as is, but never silently
                if message is not None:
                    self._warn_once("non-finite", message)
        except Exception as exc:
            self._fail("closing a step", exc)
        self._snapshots.commit(buf.snapshot)  # for the next recorded step's update_ratio

    def _warn_shapeless(self) -> None:
        by_index = sorted(self._no_shortcut, key=lambda n: self._index.get(n, -1))
        self._no_shortcut.clear()
        shapeless = [n for n in by_index if f"shape:{n}" not in self._warned]
        if shapeless:
            self._warned.update(f"shape:{n}" for n in shapeless)
            warnings.warn(no_shortcut_message(shapeless), RuntimeWarning, stacklevel=4)


def attach(model: nn.Module, blocks: BlockSpec = "auto", **options: Any) -> Probe:
    """Register gradprobe's hooks on the blocks of ``model`` and return the :class:`Probe`.

    ``blocks`` and the keyword ``options`` are the fields of :class:`gradprobe.ProbeConfig`,
    documented there (``every=``, ``jacobian=``, ``sink=``, ``stacks=``, ...).

    >>> import torch, torch.nn as nn, gradprobe
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])
    >>> with gradprobe.attach(net) as probe:
    ...     net(torch.randn(16, 8)).pow(2).mean().backward()
    >>> probe.frame()[["block", "gain"]].shape
    (4, 2)
    """
    return Probe(model, ProbeConfig.build("attach", {"blocks": blocks, **options}))


# help(attach) and inspect show every keyword: the fields of ProbeConfig, the one list of them.
setattr(attach, "__signature__", ProbeConfig.signature())  # noqa: B010 (mypy: no __signature__ on functions)
