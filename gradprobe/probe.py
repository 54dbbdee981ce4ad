"""The probe: the hooks on a model's blocks, and the state machine that cuts training into steps.

What the hooks do at each block call (alias the input, take the forward statistics, reduce
``g_y`` and ``g_x``) is :mod:`gradprobe.taps`; the handles are :mod:`gradprobe.hooks`; rows
are built when the step closes (:mod:`gradprobe.rows`). Nothing is written on user modules;
every handle is removed by ``detach``.

Steps (``Probe._state``)::

    IDLE     --forward through a probed block-->            FORWARD
    FORWARD  --first gradient hook of a backward pass-->    BACKWARD (end-of-backward callback queued)
    FORWARD  --next call of the model-->                    FORWARD  (unreachable calls released)
    BACKWARD --that callback (parameter statistics)-->      DONE
    DONE     --next forward, frame(), save(), detach()-->   closed, IDLE  (automatic stepping)
    any      --step()-->                                    closed, IDLE  (explicit stepping from then on)

An unrecorded step (``every=``) runs the same machine with bare hooks that only notice the
backward pass; a recorded one keeps statistics. The taps enter the machine through
``_forward_kind`` (a forward call) and ``_backward_started`` (a gradient hook).
"""

from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import capture as _rule
from ._tensors import in_backward, muted
from ._version import __version__
from .alerts import Alerts
from .blocks import (
    BlockSpec,
    auto_blocks,
    no_shortcut_message,
    select_blocks,
    shortcut_modules,
    without_shortcut,
)
from .config import SUB_BATCH, TRAINING_JACOBIAN_OPTIONS, ProbeConfig, Schedule, every_n
from .coverage import CallWatch, enclosing_modules, nested_message, not_residual_message
from .hooks import Handles, remove_copied
from .jacobian.schedule import JacobianSchedule, paths_decomposition
from .records import RecordedTables, Recorder, Sink, new_run_id, rank_folder
from .rows import ParamSnapshots, ParamStat, loss_scale, non_finite, step_rows
from .sharding import refuse_fsdp1
from .stacking import StackTracker
from .taps import Fwd, Taps, in_transform

__all__ = [
    "SUB_BATCH",
    "TRAINING_JACOBIAN_OPTIONS",
    "Probe",
    "Schedule",
    "attach",
    "every_n",
]  # names kept here


@dataclass
class _Step:
    """What the current step has collected."""

    params: dict[str, ParamStat] = field(default_factory=dict)  # squared [|theta|, |grad|, |delta|]
    snapshot: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    jacobian: dict[str, dict[str, float]] = field(default_factory=dict)
    blocks: set[str] = field(default_factory=set)  # blocks called with grad in this step


class _State(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"
    DONE = "done"


class Probe(RecordedTables):
    """Hooks on the blocks of a model that record gradient and identity metrics.

    Create it with :func:`gradprobe.attach` (``Probe(model, config)`` takes a
    :class:`gradprobe.ProbeConfig`). Each backward pass that reaches the probed blocks is
    one step, closed lazily when the next forward pass through the model or a probed block
    begins (or on
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
        self._alerts = Alerts(config.strict)
        if isinstance(model, nn.Module):  # (select_blocks says what else model should be)
            refuse_fsdp1(model)
        # blocks="auto" selects once: its blocks, and which of them stand in for a ModuleList's member
        auto = isinstance(config.blocks, str) and config.blocks == "auto"
        found = auto_blocks(model) if auto else []
        selected = [(b.name, b.module) for b in found] if auto else select_blocks(model, config.blocks)
        names = [n for n, _ in selected]
        self._rules = _rule.rules(names, config.input, config.output)
        self._stacks = StackTracker(names, config.stacks)
        self._model, self._modules = model, dict(selected)
        self._schedule: Schedule = config.every if callable(config.every) else every_n(config.every)
        self._auto = config.auto_step is not False
        self._params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in selected}
        self._snapshots = ParamSnapshots(enabled=config.update_ratio)
        self._jacobian = JacobianSchedule(
            config.jacobian_every, config.probes, config.jacobian_options, config.strict, self._alerts.once
        )
        self._state, self._step, self._buf = _State.IDLE, 0, _Step()
        self._recording_of = (-1, False)  # (step, schedule(step)): the schedule is asked once per step
        self._recorded_steps, self._paths_step = 0, -1
        self._index: dict[str, int] = {}  # forward order
        self._taps = Taps(
            self._rules,
            self._stacks,
            self._index,
            config.channel_dim,
            forward_kind=self._forward_kind,
            recording=self._recording,
            backward_started=self._backward_started,
            fail=self._alerts.fail,
            warn_once=self._alerts.once,
            params=[p for group in self._params.values() for p in group],
            fused=config.fused,
        )
        self._taps.jacobian_due = self._jacobian.due(self._recorded_steps)
        self._hooks = Handles()  # on the model, while attached
        # which blocks run (and, for blocks="auto", which are residual) until the first recorded step closes
        self._enclosing = enclosing_modules(model, names) if auto else {}
        self._watch = CallWatch(self._modules, self._rules, residual=auto, enclosing=self._enclosing)
        self._stand_ins = {b.name for b in found if b.stand_in}
        self._block_hooks = Handles()  # on the blocks and shortcuts, taken off on unrecorded steps
        self._created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._shortcut_modules = shortcut_modules(list(self._modules.items()), config.shortcuts)
        self._no_shortcut_by_design = without_shortcut(list(self._modules.items()), config.shortcuts)
        self._run_id = new_run_id()
        sink = None
        if config.sink is not None:  # last of the checks: a bad argument leaves no empty folder behind
            sink = Sink(
                rank_folder(config.sink),
                meta=self.meta(),
                run_id=self._run_id,
                **dict(config.sink_options or {}),
            )
            self._run_id, self._step = sink.run_id, sink.resumed_steps  # resume: continue its run
        self._out = Recorder(sink, self.meta, paths=bool(config.paths_every))
        try:
            self._register()
        except BaseException:
            self._out.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def _register(self) -> None:
        for module in self._model.modules():  # of a copy or pickle of a probed model
            remove_copied(module)
        hooks = self._hooks
        with hooks.all_or_none():
            # The whole model's calls: where steps close, and where the block hooks are put
            # back before the blocks of a recorded step run.
            hooks.forward_pre(self._model, self._model_enter)
            hooks.forward(self._model, self._model_exit, always_call=True)
            if self.config.jacobian_every:
                hooks.forward(self._model, self._jacobian_hook, with_kwargs=True)
            if self.config.paths_every:
                hooks.forward(self._model, self._paths_hook, with_kwargs=True)
            self._wake()
            self._watch.start()

    def _wake(self) -> None:
        """Put the block hooks in place (all or none)."""
        if self._block_hooks:
            return
        hooks, taps = self._block_hooks, self._taps
        with hooks.all_or_none():
            for name, module in self._modules.items():
                hooks.forward_pre(module, partial(taps.pre_hook, name), with_kwargs=True)
                # always_call: also when the block raises, so that call's records are released
                hooks.forward(module, partial(taps.post_hook, name), with_kwargs=True, always_call=True)
            for name, shortcut in self._shortcut_modules.items():
                hooks.forward(shortcut, partial(taps.shortcut_hook, name))

    def _sleep(self) -> None:
        """Take the block hooks off for an unrecorded step: its only cost is then the model's hooks
        and one gradient hook on the model's output. Only from outside the blocks' calls (a
        hook cannot be removed while its module iterates over its hooks)."""
        if self._block_hooks and not self._block_hooks.compiled:  # Dynamo would recompile
            self._block_hooks.remove()

    def _may_sleep(self) -> bool:
        """Whether unrecorded steps can do without block hooks, once a recorded step has closed:
        with explicit stepping, or with automatic stepping where that step showed that the
        model's output hook notices every backward pass the block hooks would
        (:attr:`Taps.model_counts`)."""
        return self._recorded_steps > 0 and (not self._auto or self._taps.model_counts)

    def detach(self) -> None:
        """Remove every hook; recorded tables stay available. Safe to call twice."""
        try:
            if self._hooks:
                self._flush()
        finally:
            self._out.close()  # never raises: a sink that cannot write warns and keeps its rows
            self._hooks.remove()
            self._block_hooks.remove()
            self._watch.stop()
            self._taps.clear()
            self._stacks.forget()

    def __enter__(self) -> Probe:
        if not self._hooks:
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
        return bool(self._hooks)

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
        if self._hooks:
            self._hooks_for_step()

    def _hooks_for_step(self) -> None:
        """Block hooks on for a recorded step, off for an unrecorded one where that is safe."""
        try:
            if self._recording() or not self._may_sleep():
                self._wake()
            else:
                self._sleep()
        except Exception as exc:
            self._alerts.fail("switching the block hooks", exc)

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
    def _recording(self) -> bool:
        """Whether the current step is recorded (the schedule, asked once per step)."""
        if self._recording_of[0] != self._step:
            self._recording_of = (self._step, bool(self._schedule(self._step)))
        return self._recording_of[1]

    # ------------------------------------------------------------------ forward: IDLE -> FORWARD
    def _transformed(self) -> bool:
        """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...) is running: its tensors are
        not plain tensors and its gradients are not training's; the probe steps aside (warned once)."""
        if not in_transform():
            return False
        if muted():
            return True  # a probe's own pass (batched gradients): nothing to say
        self._alerts.once(
            "functorch",
            "gradprobe: a torch.func transform (vmap, grad, jacrev, ...) ran probed blocks: the probe "
            "records nothing inside such transforms (per-sample gradients are not the training "
            "gradient); the model's calls outside them are recorded as usual.",
        )
        return True

    def _forward_kind(self, name: str, module: nn.Module) -> Fwd:
        """The forward transition of a call of block ``name`` (closing a DONE step first)."""
        if self._transformed():
            return Fwd.IGNORE
        if in_backward():
            # A forward call inside a backward pass is activation checkpointing recomputing the
            # block. Non-reentrant checkpointing ran the block normally first: that call is
            # recorded, the recomputation only re-aliased (same graph as the first run; also
            # inside a probe's own passes). Reentrant checkpointing ran it under no_grad first:
            # the recomputation is the only call with a graph, so it is recorded.
            if not torch.is_grad_enabled():
                return Fwd.IGNORE
            if name in self._buf.blocks:
                return Fwd.RECOMPUTE
            if muted():
                return Fwd.IGNORE
        elif muted():
            return Fwd.IGNORE
        elif self._auto and self._state is _State.DONE:
            self._close_step()
        self._index.setdefault(name, len(self._index))  # forward order, also from no_grad passes
        if not torch.is_grad_enabled() or not (module.training or self.config.record_eval):
            return Fwd.IGNORE
        self._buf.blocks.add(name)
        if self._state is not _State.BACKWARD:
            self._state = _State.FORWARD
        return Fwd.CAPTURE if self._recording() else Fwd.COUNT

    def _counts(self, module: nn.Module) -> bool:
        """Whether a call of the whole model belongs to a step (as :meth:`_forward_kind` for blocks)."""
        if in_backward() or muted() or not torch.is_grad_enabled() or self._transformed():
            return False
        return module.training or self.config.record_eval

    def _model_enter(self, module: nn.Module, args: Any) -> None:
        """A call of the whole model: close a done step (automatic stepping), then hooks for the step."""
        if self._taps.model_enter() > 1 or not self._counts(module):
            return
        if self._auto and self._state is _State.DONE:
            self._close_step()
        elif self._state is _State.FORWARD:  # the last pass had no backward: free what it left
            try:
                self._taps.prune()
                self._taps.captures.clear()  # left by a pass that raised (its end consumes them)
                self._stacks.forget()
            except Exception as exc:
                self._alerts.fail("releasing a forward pass without a backward pass", exc)
        self._hooks_for_step()
        if not self._block_hooks and self._state is not _State.BACKWARD:
            self._state = _State.FORWARD  # the blocks' hooks would have said so

    def _model_exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._taps.model_exit(output, counts=self._counts(module))

    def _jacobian_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """End of a training forward pass: the Jacobian columns of the blocks it captured."""
        captures, self._taps.captures = self._taps.captures, []
        if not captures or muted() or in_backward() or self._transformed():
            return
        try:
            captures.sort(key=lambda c: self._index[c.name])
            cols = self._jacobian.columns(
                self._model, self._modules, captures, (args, kwargs), self._rules, self._stacks.names
            )
            self._buf.jacobian.update(cols)
        except Exception as exc:
            self._alerts.fail("Jacobian columns", exc)

    def _paths_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """End of a recorded training forward pass: the path-length decomposition, every N-th."""
        if muted() or in_backward() or not torch.is_grad_enabled() or not self._buf.blocks:
            return
        if self._transformed():
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
            self._alerts.fail("path-length decomposition", exc)

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
            self._taps.flush_signal()
        except Exception as exc:
            self._alerts.fail("signal propagation metrics", exc)
        try:
            if self._recording():
                # Before the optimizer moves the weights; with accumulation the last pass wins.
                names = sorted({c.block for c in self._taps.calls}, key=lambda n: self._index.get(n, -1))
                if names:
                    groups = [self._params[n] for n in names]
                    self._buf.params = self._snapshots.stats(names, groups)
                    self._snapshots.take(names, groups, self._buf.snapshot)
                if self.config.scaler is not None:
                    scale = loss_scale(self.config.scaler)
                    for call in self._taps.calls:
                        call.scale = scale
        except Exception as exc:
            self._alerts.fail("parameter metrics", exc)
        finally:
            self._state = _State.DONE

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
        recorded, step, active = self._recording(), self._step, self._state is not _State.IDLE
        buf, self._buf, self._state = self._buf, _Step(), _State.IDLE
        if recorded:
            self._taps.settle()
        self._taps.release()
        calls, self._taps.calls = self._taps.calls, []
        self._step += 1
        self._taps.captures.clear()
        self._stacks.forget()
        unexpected = self._taps.no_shortcut - self._no_shortcut_by_design
        by_index = sorted(unexpected, key=lambda n: self._index.get(n, -1))
        self._taps.no_shortcut.clear()
        self._alerts.once_each("shape", by_index, no_shortcut_message)
        if buf.scalars:  # scalars are cheap: kept for every step, recorded or not
            self._out.add_scalars(step, buf.scalars)
        if not recorded:
            return
        try:
            self._taps.flush_signal()  # a step without a backward pass
        except Exception as exc:
            self._alerts.fail("signal propagation metrics", exc)
        if active and self._watch.watching:
            self._warn_unrun(step, buf.blocks)
        self._recorded_steps += 1
        taps = self._taps
        taps.model_counts = taps.through_model and not taps.outside
        taps.through_model = taps.outside = False
        self._taps.jacobian_due = self._jacobian.due(self._recorded_steps)
        try:
            rows = step_rows(step, calls, buf.params, buf.jacobian, self._index, self._stacks.names)
            self._out.add_rows(rows)
            if "non-finite" not in self._alerts:
                excused = lambda b: f"input:{b}" in self._alerts or f"output:{b}" in self._alerts  # noqa: E731
                message = non_finite(step, rows, excused)  # recorded as is, but never silently
                if message is not None:
                    self._alerts.once("non-finite", message)
        except Exception as exc:
            self._alerts.fail("closing a step", exc)
        self._snapshots.commit(buf.snapshot)  # for the next recorded step's update_ratio

    def _warn_unrun(self, step: int, with_grad: set[str]) -> None:
        """The first recorded step closes: name the blocks that never ran, or say that the step
        left no rows (never an empty frame without a word)."""
        self._watch.stop()
        message = self._watch.message(self._index)
        if message is not None:
            self._alerts.once("unrun", message)
        # Beside residual blocks only: a plain net's blocks are all plain, by design.
        plain = [n for n in self._watch.not_residual if n not in self._no_shortcut_by_design]
        not_residual = set(self._watch.not_residual)
        residual = [n for n in self._watch.asked if n not in not_residual]
        if self._watch.nested_in:
            # the modules of the same classes as those found (a first one on an input without grad
            # cannot show its skip)
            kinds = {type(self._enclosing[n]) for n in self._watch.nested_in}
            outer = [n for n, m in self._enclosing.items() if type(m) in kinds]
            inner: dict[str, list[str]] = {o: [] for o in outer}
            for n in self._modules:  # (by each block's dotted prefixes: linear in the blocks)
                parts = n.split(".")
                for k in range(1, len(parts)):
                    inside = inner.get(".".join(parts[:k]))
                    if inside is not None:
                        inside.append(n)
            self._alerts.once("nested", nested_message(outer, inner))
        stand_ins = [n for n in plain if n in self._stand_ins]
        if plain and (residual or stand_ins):
            self._alerts.once("not-residual", not_residual_message(plain, residual, stand_ins))
        elif not with_grad:
            self._alerts.once(
                "empty",
                f"gradprobe: step {step} was recorded but no probed block ran with gradients in it "
                f"(blocks {list(self._modules)} ran only under torch.no_grad() or in eval mode): "
                "the frame has no rows for it. Pass record_eval=True to record eval-mode passes.",
            )


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
