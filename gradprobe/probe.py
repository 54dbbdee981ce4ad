"""The probe: owns every hook handle, the step counter, the schedule and the records.

How a value is captured (per block, on a recorded step):

1. A forward *pre*-hook replaces the block's input ``x`` by an alias
   ``x.view_as(x)`` and registers a tensor hook on it. Gradients reaching the
   alias flow through this block only, so that hook sees ``g_x`` of this block
   even when ``x`` also feeds a skip connection outside it. (For a block whose
   input does not require grad, the alias is a fresh leaf that does, so its
   ``g_x`` still exists; the caller's tensor and its flags are untouched.)
2. A forward hook computes the forward statistics at once and registers a
   tensor hook on the output ``y``. A tensor hook stays bound to the node that
   produced the value, so a later in-place op (``nn.ReLU(inplace=True)`` after
   the block) does not change what it sees. ``register_full_backward_hook`` is
   deliberately not used: it breaks on in-place ops (pytorch#61519) and
   misreports the first block when the model input does not require grad.
3. The tensor hooks reduce ``g_y`` and ``g_x`` to a few scalars at once
   (:mod:`gradprobe.metrics`) and drop the gradient tensors.
4. The first gradient hook of a backward pass queues a callback on the
   autograd engine that runs when that backward pass ends: it records the
   block parameter statistics and marks the step as finished.

Nothing is written on user modules; every handle lives in ``Probe._handles``
and is removed by ``detach`` (also on exceptions, through ``with``).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import math
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import capture as _capture_rule
from . import metrics
from ._tensors import in_backward
from ._version import __version__
from .blocks import BlockSpec, select_blocks, shortcut_modules
from .capture import alias_view as _alias
from .capture import find_output, swap_input
from .records import FRAME_COLUMNS, RowStore, Run, Sink, new_run_id

if TYPE_CHECKING:
    import pandas as pd

Schedule = Callable[[int], bool]


#: Default ``jacobian_options["sub_batch"]``: the Jacobian columns of a training step are
#: taken on a second forward pass over the first 32 samples of the batch (``None``: on the
#: whole batch, through the training graph itself). See ``jacobian.sub_batch_captures``.
SUB_BATCH = 32

#: Default ``jacobian_options`` of a probe (the rest are those of ``jacobian_columns``).
#: Chosen so that Jacobian columns every 10th step stay within 1.25x of bare training on a
#: CIFAR ResNet-56 at batch 128 (README, Performance): the Frobenius columns cost about 1.5
#: training steps per Jacobian step on a sub-batch of 32, the spectral ones (8 Lanczos
#: steps, one shared subspace for the products) about 9.5 more, so they come on every 20th
#: Jacobian step only -- the first one included, so the initial state always has them.
TRAINING_JACOBIAN_OPTIONS: dict[str, Any] = {
    "sub_batch": SUB_BATCH,
    "spec": 20,
    "power_iters": 8,
    "tol": 1e-2,
    "prod_spec": "shared",
}


def _jacobian_option_names() -> set[str]:
    """What jacobian_options may hold: jacobian_columns' knobs (read off its signature, so the
    two never drift apart), plus the probe's own ``seed`` and ``sub_batch``."""
    import inspect

    from .jacobian import jacobian_columns

    knobs = set(inspect.signature(jacobian_columns).parameters) - {"captures", "probes", "generator"}
    return knobs | {"seed", "sub_batch"}


def _resolve_stacks(names: list[str], stacks: Any) -> dict[str, str] | None:
    """``{block: stack name}`` from ``attach(..., stacks=...)``; None: detect them.

    Accepted: a mapping ``{stack name: pattern or list of patterns}``, or a list whose
    items (a pattern or a list of patterns) are the stacks in order, named by their
    blocks' common dotted prefix (or their position). Patterns are block names or globs
    as in ``blocks=``; every probed block must be in exactly one stack.
    """
    if stacks is None:
        return None
    from .blocks import glob_to_regex

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
        label = label or _capture_rule.common_prefix(members) or str(k)
        out.update(dict.fromkeys(members, label))
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"stacks=: blocks {missing} are in no stack; every probed block must be in one")
    return out


def every_n(n: int) -> Schedule:
    """Schedule that records steps where ``step % n == 0``.

    >>> [s for s in range(7) if every_n(3)(s)]
    [0, 3, 6]
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"every= must be a positive int or a callable step -> bool, got {n!r}")

    def schedule(step: int) -> bool:
        return step % n == 0

    schedule.__name__ = f"every_{n}"
    return schedule


# Muting is per thread and context (a ContextVar), not per probe: while one probe runs its own
# Jacobian passes through the graph, no probe (a second one on the same model included) may record
# those passes as training gradients -- but a probe training in another thread is not muted.
_MUTED: contextvars.ContextVar[int] = contextvars.ContextVar("gradprobe_muted", default=0)
# Autograd runs the backward of accelerator tensors on its own device threads, which see no Python
# context: there a muting pass anywhere in the process mutes (the rule before ContextVars).
_MUTED_ANYWHERE = [0]
_MUTED_LOCK = threading.Lock()


def _muted() -> bool:
    """Whether the probes' hooks must ignore what runs now (a probe's own Jacobian passes)."""
    if _MUTED.get():
        return True
    return bool(_MUTED_ANYWHERE[0]) and isinstance(threading.current_thread(), threading._DummyThread)


def _noop_hook() -> Callable[..., None]:
    """What a copy or a pickle of a probed module gets in place of a probe hook: a no-op that
    takes any arguments and returns None, from the standard library alone (so a pickled model
    loads where gradprobe is not installed)."""
    return contextlib.nullcontext().__exit__


class _Hook:
    """A module hook of a probe that stays with the module it was registered on.

    ``copy.deepcopy(model)`` (an EMA copy) and ``pickle``/``torch.save(model)`` copy a module's
    hook dicts: the copy gets a no-op (:func:`_noop_hook`) instead of this hook, so it never
    records into the probe and pickles without it. A shallow copy shares the dicts; it is told
    apart by identity and ignored.
    """

    __slots__ = ("__weakref__", "_eager", "_fn", "_module")

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self._fn = fn
        self._eager = _eager(fn)
        self._module = weakref.ref(module)

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        if module is not self._module():
            return None
        if torch.compiler.is_compiling():  # traced by Dynamo: break the graph, run eagerly
            return self._eager(module, *args)
        # Outside Dynamo the plain call: the disable wrapper costs about 40 us per call.
        return self._fn(module, *args)

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (contextlib.nullcontext(), "__exit__"))

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _noop_hook()

    def __copy__(self) -> _Hook:
        return self


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a hook eagerly under ``torch.compile``: Dynamo breaks the graph around it.

    Traced into a compiled graph, the tensor hooks that the probe registers are
    replayed in ways that double-count gradients (a view alias and its base share
    one node); eager hooks see exactly what eager mode sees.
    """
    return torch.compiler.disable(fn, recursive=True)


def _capture(call: _Call, x: torch.Tensor, y: torch.Tensor) -> Any:
    """A :class:`gradprobe.jacobian.BlockCapture` of this call, with gradient edges pinned now.

    Pinning matters with in-place ops: the output edge taken here stays right when y is
    later modified in place (a ReLU(inplace=True) after the block); if the block modified
    its input in place, the alias's own node left the graph, and the edge of the tensor
    it was made from (taken before the block ran) stands in for it.
    """
    from torch.autograd.graph import GradientEdge, get_gradient_edge

    from .jacobian import BlockCapture

    if x._version == call.x_version:
        x_edge = get_gradient_edge(x)
    elif call.x_node is not None:
        x_edge = GradientEdge(call.x_node, call.x_output_nr)
    else:
        x_edge = None
    return BlockCapture(
        name=call.block,
        x=x,
        y=y,
        same_shape=x.shape == y.shape,
        x_edge=x_edge,
        y_edge=get_gradient_edge(y) if y.requires_grad else None,
    )


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Statistics in full precision even inside ``torch.autocast`` (which would run dot in bf16)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _to_host(tensors: list[Any]) -> list[tuple[Any, list[float]]]:
    """``(tensor, values)`` pairs, copying each device's tensors to the host in one transfer."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    out: list[tuple[Any, list[float]]] = []
    for group in by_device.values():
        flat = torch.cat([t.reshape(-1).double() for t in group]).tolist()
        i = 0
        for t in group:
            n = t.numel()
            out.append((t, flat[i : i + n]))
            i += n
    return out


def _scaled(values: dict[int, list[float]], t: torch.Tensor | None, scale: float) -> list[float] | None:
    if t is None:
        return None
    # squared gradient statistics of a loss scaled by GradScaler carry scale**2
    return [v / scale**2 for v in values[id(t)]]


def _pooled(parts: list[list[float] | None], width: int) -> list[float]:
    """Element-wise sum over calls; NaN when any call lacks the statistic."""
    if not parts or any(p is None for p in parts):
        return [math.nan] * width
    return [sum(col) for col in zip(*parts, strict=True)]


@dataclass
class _Call:
    """Statistics of one call of one block within the current step (0-d tensors, no graph)."""

    block: str
    x: torch.Tensor | None = None  # alias, held only between the pre-hook and the forward hook
    x_version: int = 0
    x_node: Any = None  # grad_fn of the caller's input and its output_nr (in-place fallback)
    x_output_nr: int = 0
    same_shape: bool = False
    fwd: torch.Tensor | None = None
    sig: torch.Tensor | None = None  # per-channel moments of y and y - r (metrics.signal_stats)
    numel_x: int = 0
    numel_y: int = 0
    g_y: torch.Tensor | None = None  # held only between the g_y and the g_x hooks
    gyy: torch.Tensor | None = None
    bwd_x: torch.Tensor | None = None
    scale: float = 1.0


@dataclass
class _StepBuffer:
    calls: list[_Call] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # squared [|theta|, |grad|, |delta|]
    snapshot: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    jacobian: dict[str, dict[str, float]] = field(default_factory=dict)
    backward_done: bool = False
    blocks: set[str] = field(default_factory=set)  # blocks called with grad in this step


class Probe:
    """Hooks on the blocks of a model that record gradient and identity metrics.

    Create it with :func:`gradprobe.attach`. Stepping rule: by default each
    backward pass that reaches the probed blocks is one step. The step is
    closed lazily, when the next forward pass through a probed block begins
    (or on ``frame()``, ``save()``, ``detach()``), so ``probe.log(loss=...)``
    anywhere between a forward pass and the next one belongs to its step. The
    first call of :meth:`step` switches the probe to explicit stepping: from
    then on only ``step()`` closes a step, and every backward pass in between
    is pooled into it (gradient accumulation). ``auto_step=False`` selects
    explicit stepping from the start.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: BlockSpec = "auto",
        *,
        every: int | Schedule = 1,
        strict: bool = False,
        auto_step: bool | None = None,
        shortcuts: Mapping[str, str | nn.Module] | None = None,
        scaler: Any = None,
        record_eval: bool = False,
        update_ratio: bool = True,
        jacobian: bool | int = False,
        probes: int = 4,
        jacobian_options: Mapping[str, Any] | None = None,
        sink: str | os.PathLike[str] | None = None,
        sink_options: Mapping[str, Any] | None = None,
        input: Any = None,
        output: Any = None,
        stacks: Any = None,
        channel_dim: int | None = None,
        paths: bool | int = False,
    ) -> None:
        selected = select_blocks(model, blocks)
        names = [n for n, _ in selected]
        self._rules = _capture_rule.rules(names, input, output)
        self._stacks_given = _resolve_stacks(names, stacks)
        # --- path-length decomposition (gradprobe.paths) every N-th recorded step
        if isinstance(paths, bool) or (isinstance(paths, int) and paths >= 1):
            self._paths_every = int(paths)
        else:
            raise ValueError(
                f"paths= must be a bool or a positive int (every N-th recorded step), got {paths!r}"
            )
        self._paths_parts: list[pd.DataFrame] = []
        self._paths_step = -1  # the step whose decomposition was taken (one per step)
        if channel_dim is not None and (not isinstance(channel_dim, int) or isinstance(channel_dim, bool)):
            raise ValueError(
                f"channel_dim= must be None (dim 1 of 4-d outputs, the last dim of 2-d and 3-d ones) or an "
                f"int axis of the block outputs, got {channel_dim!r}"
            )
        self._channel_dim = channel_dim
        self._model = model
        self._schedule: Schedule = every if callable(every) else every_n(every)
        self._every = every if isinstance(every, int) else getattr(every, "__name__", repr(every))
        self._strict = strict
        self._auto = auto_step is not False
        self._scaler = scaler
        self._record_eval = record_eval
        # update_ratio needs a copy of the probed parameters from the previous recorded step
        # (and one of this step's while it closes): up to twice the parameter memory.
        self._update_ratio = update_ratio
        if isinstance(jacobian, bool):
            self._jacobian_every = 1 if jacobian else 0
        elif isinstance(jacobian, int) and jacobian >= 1:
            self._jacobian_every = jacobian
        else:
            raise ValueError(
                f"jacobian= must be a bool or a positive int (every N-th recorded step), got {jacobian!r}"
            )
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes= must be a positive int, got {probes!r}")
        self._probes = probes
        # Training defaults (TRAINING_JACOBIAN_OPTIONS): a sub-batch, and the spectral columns
        # on every 20th Jacobian step only, since each Lanczos step costs about as much as all
        # the Frobenius columns together (BatchNorm's double backward is slow).
        options = {**TRAINING_JACOBIAN_OPTIONS, **dict(jacobian_options or {})}
        known = _jacobian_option_names()
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown jacobian_options {unknown}; the options are {sorted(known)}")
        spec = options["spec"]
        if not isinstance(spec, bool) and not (isinstance(spec, int) and spec >= 1):
            raise ValueError(
                f"jacobian_options['spec'] must be True, False or a positive int N (the spectral columns on "
                f"every N-th step that has Jacobian columns), got {spec!r}"
            )
        sub = options["sub_batch"]
        if sub is not None and (not isinstance(sub, int) or isinstance(sub, bool) or sub < 1):
            raise ValueError(
                f"jacobian_options['sub_batch'] must be a positive int (samples of the Jacobian pass) or "
                f"None (the whole batch, through the training graph), got {sub!r}"
            )
        self._jacobian_options = options
        self._jacobian_generator: torch.Generator | None = None
        self._recorded_steps = 0
        self._jacobian_calls = 0  # steps that got Jacobian columns so far (the spectral schedule)

        self._modules: dict[str, nn.Module] = dict(selected)
        self._params: dict[str, list[nn.Parameter]] = {
            name: [p for p in module.parameters() if p.requires_grad] for name, module in selected
        }
        self._prev_params: dict[str, list[torch.Tensor]] = {}
        self._spare: dict[str, list[torch.Tensor]] = {}  # old snapshots, reused as buffers
        self._index: dict[str, int] = {}
        self._stack: dict[str, list[_Call]] = {name: [] for name in self._modules}
        self._shortcut_out: dict[str, torch.Tensor] = {}
        # Stack detection (see _link): whether each block's input was computed from the output
        # of the block before it in forward order, decided once per block; the previous
        # blocks' output nodes are held only until every block is decided (and never across steps).
        self._linked: dict[str, bool] = {}
        self._out_node: dict[str, Any] = {}
        self._no_shortcut: set[str] = set()  # shape-changing blocks without a shortcut, not yet warned
        self._captures: list[Any] = []  # jacobian.BlockCapture of this forward pass

        self._step = 0
        self._buf = _StepBuffer()
        self._store = RowStore()
        self._scalar_rows: list[dict[str, Any]] = []
        self._last_rows: list[dict[str, Any]] = []  # of the latest recorded step (last_rows)
        self._callback_queued = False
        self._warned: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._attached = False
        self._created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._shortcut_modules = shortcut_modules(list(self._modules.items()), shortcuts)
        self._run_id = new_run_id()
        # Last of the checks, so a bad argument never leaves an empty run folder behind.
        self._sink = self._open_sink(sink, sink_options) if sink is not None else None
        try:
            self._attach()
        except BaseException:
            if self._sink is not None:
                self._sink.close()
            raise

    def _open_sink(self, path: str | os.PathLike[str], options: Mapping[str, Any] | None) -> Sink:
        options = dict(options or {})
        known = {"chunk_rows", "fmt", "flush_seconds", "max_buffer_rows", "resume"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown sink_options {unknown}; the options are {sorted(known)}")
        sink = Sink(path, meta=self.meta(), run_id=self._run_id, **options)
        # resume=True: this probe continues the run in the folder, its id and its step numbers
        self._run_id = sink.run_id
        self._step = sink.resumed_steps
        return sink

    # ------------------------------------------------------------------ lifecycle
    def _attach(self) -> None:
        try:
            for name, module in self._modules.items():
                self._handles.append(
                    module.register_forward_pre_hook(
                        _Hook(partial(self._pre_hook, name), module), with_kwargs=True
                    )
                )
                # always_call: also when the block raises, so that call's records are released
                self._handles.append(
                    module.register_forward_hook(
                        _Hook(partial(self._post_hook, name), module), with_kwargs=True, always_call=True
                    )
                )
            for name, shortcut in self._shortcut_modules.items():
                self._handles.append(
                    shortcut.register_forward_hook(_Hook(partial(self._shortcut_hook, name), shortcut))
                )
            if self._jacobian_every:
                self._handles.append(
                    self._model.register_forward_hook(
                        _Hook(self._root_post_hook, self._model), with_kwargs=True
                    )
                )
            if self._paths_every:
                self._handles.append(
                    self._model.register_forward_hook(_eager(self._paths_hook), with_kwargs=True)
                )
        except BaseException:
            self._remove_handles()
            raise
        self._attached = True

    def _remove_handles(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def detach(self) -> None:
        """Remove every hook; recorded tables stay available. Safe to call twice."""
        try:
            if self._attached:
                self._flush()
        finally:
            if self._sink is not None and not self._sink.closed:
                if self._paths_parts:
                    self._sink.write_paths(self.paths_frame())  # never raises either
                self._sink.meta = self.meta()
                self._sink.close()  # never raises: a sink that cannot write warns and keeps its rows
            self._remove_handles()
            self._attached = False
            self._captures.clear()
            self._shortcut_out.clear()
            self._out_node.clear()
            for stack in self._stack.values():
                stack.clear()

    def __enter__(self) -> Probe:
        if not self._attached:
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
        order = list(self._modules)
        seen = sorted(self._index, key=self._index.__getitem__)
        return seen + [n for n in order if n not in self._index]

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._attached

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

    def last_rows(self) -> list[dict[str, Any]]:
        """The rows of the latest recorded step that has closed, one dict per block (for live logging).

        Closes a finished step first, as :meth:`frame` does; empty before the first recorded step
        closes. Cheap (no DataFrame), so a training-loop callback can call it on every step.

        >>> import torch, torch.nn as nn, gradprobe
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> with gradprobe.attach(net, ["0", "1"]) as probe:
        ...     net(torch.randn(2, 4)).sum().backward()
        ...     [(r["step"], r["block"]) for r in probe.last_rows()]
        [(0, '0'), (0, '1')]
        """
        self._flush()
        return [dict(row) for row in self._last_rows]

    def frame(self, gather: bool = False) -> pd.DataFrame:
        """One row per (recorded step, block), columns as in :data:`gradprobe.records.FRAME_COLUMNS`.

        Under ``torch.distributed`` a ``rank`` column is added; ``gather=True`` returns
        every rank's rows on rank 0 (a collective: call it on every rank; other ranks
        get their own rows).
        """
        streamed = self._streamed()
        frame = streamed.frame() if streamed is not None else self._store.frame()
        return self._distributed(frame, gather)

    def scalars(self, gather: bool = False) -> pd.DataFrame:
        """One row per step with the logged scalars (every step, recorded or not)."""
        import pandas as pd

        streamed = self._streamed()
        if streamed is not None:
            frame = streamed.scalars()
        else:
            frame = (
                pd.DataFrame.from_records(self._scalar_rows)
                if self._scalar_rows
                else pd.DataFrame({"step": []})
            )
            frame = frame.astype({"step": "int64"})
        return self._distributed(frame, gather)

    def _streamed(self) -> Run | None:
        """Close a finished step; with a sink, write what is buffered and read the run back."""
        self._flush()
        if self._sink is None:
            return None
        self._sink.meta = self.meta()
        if self._paths_parts:
            self._sink.write_paths(self.paths_frame())
        return self._sink.run()  # what is on disk plus what a failing disk left in memory

    @staticmethod
    def _distributed(frame: pd.DataFrame, gather: bool) -> pd.DataFrame:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return frame
        frame = frame.assign(rank=dist.get_rank())
        if not gather:
            return frame
        import pandas as pd

        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(frame, parts, dst=0)
        if parts is None:
            return frame
        return pd.concat(parts, ignore_index=True)

    def meta(self) -> dict[str, Any]:
        """Metadata stored with a saved run."""
        return {
            "kind": "probe",
            "run_id": self._run_id,
            "gradprobe_version": __version__,
            "torch_version": torch.__version__,
            "model_class": f"{type(self._model).__module__}.{type(self._model).__qualname__}",
            "blocks": self.blocks,
            "every": self._every,
            "created": self._created,
            "steps": self._step,
            "update_ratio": self._update_ratio,
            "jacobian": self._jacobian_every,
            "probes": self._probes,
            "jacobian_options": dict(self._jacobian_options) if self._jacobian_every else {},
            "paths": self._paths_every,
        }

    def paths_frame(self) -> pd.DataFrame:
        """The path-length decompositions of ``attach(..., paths=N)``: one row per (step, stack,
        length), columns ``step`` and those of :func:`gradprobe.paths`; empty without ``paths=``."""
        from .records import paths_table

        self._flush()
        return paths_table(self._paths_parts)

    def run(self) -> Run:
        """The recorded tables as a :class:`gradprobe.records.Run`."""
        return Run(
            self.frame(), self.scalars(), self.meta(), paths=self.paths_frame() if self._paths_every else None
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> os.PathLike[str]:
        """Save frame, scalars and metadata into the folder ``path``; read back with ``gradprobe.load``.

        Saving again updates the folder; a folder holding another run needs ``overwrite=True``.
        """
        return self.run().save(path, overwrite=overwrite)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"Probe({type(self._model).__name__}, blocks={len(self._modules)}, steps={self._step}, {state})"
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    @contextlib.contextmanager
    def _mute() -> Iterator[None]:
        """Every probe's hooks ignore what happens inside (a probe's own Jacobian passes), in this
        thread and context only."""
        token = _MUTED.set(_MUTED.get() + 1)
        with _MUTED_LOCK:
            _MUTED_ANYWHERE[0] += 1
        try:
            yield
        finally:
            with _MUTED_LOCK:
                _MUTED_ANYWHERE[0] -= 1
            _MUTED.reset(token)

    def _fail(self, where: str, exc: BaseException) -> None:
        if self._strict:
            raise exc
        # Warn once per kind of failure (not once per block and step): the first message
        # names the block, later ones would only flood the user's training log.
        kind = where.split(" of block ")[0]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"gradprobe: {where} failed ({type(exc).__name__}: {exc}); recording NaN there and "
                "carrying on. Pass strict=True to attach() to raise instead.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _recording(self) -> bool:
        return self._schedule(self._step)

    def _queue_backward_end(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if in_backward():
            # A forward call inside a backward pass is activation checkpointing recomputing
            # the block. Non-reentrant checkpointing ran the block normally first: that call
            # is recorded, the recomputation is not. Reentrant checkpointing ran it under
            # no_grad first: the recomputation is the only call with a graph, so record it.
            if not torch.is_grad_enabled():
                return None
            if name in self._buf.blocks:
                # Same graph as the first run (checkpointing compares saved tensors), no hooks;
                # also inside the probe's own Jacobian passes, which recompute it as well.
                return swap_input(args, kwargs, _alias, self._rules[name].input, module)
            if _muted():
                return None
        elif _muted():
            return None
        elif self._auto and self._buf.backward_done:
            self._close_step()
        if name not in self._index:  # forward order, also from no_grad passes
            self._index[name] = len(self._index)
        if not torch.is_grad_enabled() or not (module.training or self._record_eval):
            return None
        self._buf.blocks.add(name)
        if not self._recording():
            # Unrecorded step: one tensor hook per forward only to notice the backward pass.
            self._stack[name].append(_Call(block=name))  # placeholder keeps pre/post hooks paired
            return None
        try:
            return self._replace_input(name, module, args, kwargs)
        except Exception as exc:  # never break the user's forward pass
            self._fail(f"input capture of block {name}", exc)
            self._stack[name].append(_Call(block=name))
            return None

    def _replace_input(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = _Call(block=name)
        self._stack[name].append(call)
        module = self._modules[name]

        def capture(x: torch.Tensor) -> torch.Tensor:
            if not x.requires_grad and not any(p.requires_grad for p in module.parameters()):
                # A frozen block on an input without grad: its output needs no grad, and a probe
                # must not add one (a backward() that should raise would succeed).
                return x
            if name not in self._linked:
                self._link(name, x)
            alias = _alias(x)
            alias.register_hook(partial(self._grad_x_hook, call))
            call.x_node, call.x_output_nr = x.grad_fn, x.output_nr
            call.x = alias
            call.x_version = alias._version
            return alias

        swapped = swap_input(args, kwargs, capture, self._rules[name].input, module)
        if swapped is None:
            self._warn_once(f"input:{name}", _capture_rule.no_input_message(name, args, kwargs))
        return swapped

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _link(self, name: str, x: torch.Tensor) -> None:
        """Decide once whether block ``name`` continues the stack of the block before it.

        It does when its input ``x`` is computed, in this forward pass, from the output of
        the previous block in forward order (a walk back through ``x``'s autograd graph
        reaches that output's node). An input without a graph while the previous output
        has one is not computed from it differentiably: a new stack. Where the walk cannot
        tell (no graph at all, a graph too large to search), the chain goes on, as with
        a single stack.
        """
        index = self._index.get(name, -1)
        prev = next((n for n, i in self._index.items() if i == index - 1), None)
        if index <= 0 or prev is None:
            self._linked[name] = False  # the first block starts the first stack
        elif prev in self._out_node:
            self._linked[name] = _capture_rule.continues(x, self._out_node[prev])
        else:
            return  # the previous block has not run in this pass yet: decide on a later call
        if len(self._linked) == len(self._modules):
            self._out_node.clear()

    def _stack_names(self, names: list[str]) -> dict[str, str]:
        """``{block: stack name}`` for these blocks (in forward order).

        Given ``stacks=``: as given. Detected: consecutive blocks linked by :meth:`_link`
        form a stack, named by the longest dotted prefix its blocks' names share
        (``encoder.block``), the block's own name for a stack of one, or its position
        (``"0"``, ``"1"``, ...) when they share no prefix; a single stack is named that way too.
        """
        if self._stacks_given is not None:
            return {n: self._stacks_given[n] for n in names}
        return _capture_rule.stack_labels(names, self._linked)

    def _shortcut_hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack[name]
        if not stack or stack[-1].x is None:
            return
        # A shortcut only if this call applied it to the block's own input (the alias the
        # block received): a "downsample" applied to the block's result is not one.
        if not any(a is stack[-1].x for a in args):
            return
        out = find_output(output)
        if out is not None:
            self._shortcut_out[name] = out

    def _post_hook(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stack = self._stack.get(name)
        if not stack:
            return
        call = stack.pop()
        shortcut_out = self._shortcut_out.pop(name, None)
        if output is None and sys.exc_info()[1] is not None:
            # The block raised (this hook is registered with always_call): drop the input
            # alias and its node, which its tensor hook would otherwise keep alive with the
            # whole graph, and record nothing for the call.
            call.x = call.x_node = None
            return
        y = find_output(output, self._rules[name].output)
        if y is None:
            if self._recording() and torch.is_grad_enabled():
                self._warn_once(f"output:{name}", _capture_rule.no_output_message(name, output))
                if call.x is not None:
                    # A row of NaN (its input gradient still arrives): never zero rows in silence.
                    call.x = None
                    self._buf.calls.append(call)
            call.x = call.x_node = None
            return
        if not y.requires_grad:
            call.x = call.x_node = None
            return
        if shortcut_out is not None and (
            shortcut_out is y or (shortcut_out.data_ptr() == y.data_ptr() and shortcut_out.shape == y.shape)
        ):
            shortcut_out = None  # the "shortcut" computed the block's output: it is its last layer
        try:
            if not self._recording():
                # Unrecorded step: a bare hook whose only job is to notice the backward pass.
                y.register_hook(self._count_hook)
                return
            if len(self._linked) < len(self._modules):
                self._out_node[name] = y.grad_fn  # for _link of the next block in this pass
            self._record_forward(call, y, shortcut_out)
        except Exception as exc:
            self._fail(f"forward metrics of block {name}", exc)
        finally:
            call.x = None

    def _record_forward(self, call: _Call, y: torch.Tensor, shortcut_out: torch.Tensor | None) -> None:
        x = call.x
        if self._jacobian_due() and x is not None:
            self._captures.append(_capture(call, x, y))
        with torch.no_grad(), _no_autocast(y.device.type):
            if x is not None:
                call.same_shape = x.shape == y.shape
                ref = x if call.same_shape else shortcut_out
                if ref is None or ref.shape != y.shape:
                    self._no_shortcut.add(call.block)
                call.fwd = metrics.forward_stats(x, y, ref)
                if y.is_complex():
                    # Brock et al.'s channel moments are defined for real activations.
                    self._warn_once(
                        f"signal:{call.block}",
                        f"gradprobe: block {call.block} has a complex output: chan_mean_sq, chan_var and "
                        "branch_var are NaN there (signal propagation statistics are defined for real "
                        "activations).",
                    )
                else:
                    call.sig = metrics.signal_stats(y, ref, self._channel_dim)
                call.numel_x = x.numel()
                if x._version != call.x_version and call.x_node is not None:
                    # The block modified its input in place: the alias's node left the graph
                    # and its hook will not fire. Read g_x on the node that produced the
                    # caller's input instead (exact when the block is its only consumer).
                    call.x_node.register_prehook(partial(self._grad_x_node_hook, call))
            call.x_node = None
            call.numel_y = y.numel()
        self._buf.calls.append(call)
        y.register_hook(partial(self._grad_y_hook, call))

    def _count_hook(self, grad: torch.Tensor) -> None:
        if not _muted():
            self._queue_backward_end()

    def _grad_y_hook(self, call: _Call, grad: torch.Tensor) -> None:
        if _muted():
            return
        self._queue_backward_end()
        try:
            with torch.no_grad(), _no_autocast(grad.device.type):
                stats = metrics.grad_out_stats(grad)
                call.gyy = stats if call.gyy is None else call.gyy + stats
                if call.same_shape:
                    call.g_y = grad
        except Exception as exc:
            self._fail(f"output gradient of block {call.block}", exc)

    def _grad_x_hook(self, call: _Call, grad: torch.Tensor) -> None:
        if _muted():
            return
        self._queue_backward_end()
        try:
            with torch.no_grad(), _no_autocast(grad.device.type):
                stats = metrics.grad_in_stats(grad, call.g_y if call.same_shape else None)
                call.bwd_x = stats if call.bwd_x is None else call.bwd_x + stats
        except Exception as exc:
            self._fail(f"input gradient of block {call.block}", exc)
        finally:
            call.g_y = None

    def _grad_x_node_hook(self, call: _Call, grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        grad = grad_outputs[call.x_output_nr]
        if grad is not None:
            self._grad_x_hook(call, grad)

    def _on_backward_end(self, deferred: bool = False) -> None:
        if not deferred:
            # Run once more at the very end of the callback queue: DistributedDataParallel
            # queues its own end-of-backward callback (which waits for the gradient
            # all-reduce) after ours, and parameter gradients are final only after it.
            torch.autograd.Variable._execution_engine.queue_callback(partial(self._on_backward_end, True))
            return
        self._callback_queued = False
        try:
            if self._recording():
                self._record_params()
                if self._scaler is not None:
                    scale = float(self._scaler.get_scale())
                    for call in self._buf.calls:
                        call.scale = scale
        except Exception as exc:
            self._fail("parameter metrics", exc)
        finally:
            self._buf.backward_done = True

    def _record_params(self) -> None:
        # Taken at the end of every backward pass of a recorded step, before the optimizer
        # moves the weights; with gradient accumulation the last pass (full .grad) wins.
        names = sorted({c.block for c in self._buf.calls}, key=lambda n: self._index.get(n, -1))
        if not names:
            return
        groups = [self._params[n] for n in names]
        with torch.no_grad():
            stats = metrics.block_param_stats(groups, [self._prev_params.get(n) for n in names])
            self._buf.params = {n: stats[i] for i, n in enumerate(names)}
            if not self._update_ratio:
                return
            for n, params in zip(names, groups, strict=False):
                old = self._buf.snapshot.get(n) or self._spare.pop(n, None)
                if old is None or len(old) != len(params):
                    old = [torch.empty_like(p) for p in params]
                if params:
                    torch._foreach_copy_(old, [p.detach() for p in params])
                self._buf.snapshot[n] = old

    # ------------------------------------------------------------------ Jacobian
    def _jacobian_due(self) -> bool:
        return bool(self._jacobian_every) and self._recorded_steps % self._jacobian_every == 0

    def _root_post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        captures, self._captures = self._captures, []
        if not captures or _muted() or in_backward():
            return
        try:
            from .jacobian import BlockCapture, differentiable_twice, jacobian_columns

            if self._jacobian_generator is None:
                self._jacobian_generator = torch.Generator().manual_seed(
                    int(self._jacobian_options.get("seed", 0))
                )
            seen: set[str] = set()
            caps: list[BlockCapture] = []
            for cap in sorted(captures, key=lambda c: self._index[c.name]):
                if cap.name not in seen:  # weight sharing: the first call of each block
                    seen.add(cap.name)
                    caps.append(cap)
            stacks = self._stack_names([c.name for c in caps])
            for cap in caps:
                cap.stack = stacks[cap.name]
            options = {k: v for k, v in self._jacobian_options.items() if k not in ("seed", "sub_batch")}
            spec = options["spec"]
            options["spec"] = spec if isinstance(spec, bool) else self._jacobian_calls % spec == 0
            self._jacobian_calls += 1
            generator = self._jacobian_generator
            twice = bool(options["spec"])  # Jacobian-vector products by double backward

            def columns(captured: list[BlockCapture]) -> dict[str, dict[str, float]]:
                # A pass of our own (sub-batch, whole-batch rerun) ran attention through the math
                # kernel when twice; activation checkpointing recomputes its blocks while the
                # Jacobian passes run, and must pick the same kernel, or the recomputed tensors
                # differ from the saved ones (CheckpointError). The training graph's recomputation
                # keeps the training kernel.
                own = twice and captured is not caps
                with differentiable_twice() if own else contextlib.nullcontext():
                    return jacobian_columns(captured, probes=self._probes, generator=generator, **options)

            with self._mute():
                used = self._sub_batch(caps, args, kwargs, twice=twice) or caps
                try:
                    cols = columns(used)
                except RuntimeError:
                    # The training graph may refuse a second differentiation (a compiled backward
                    # frees its "donated" buffers): run the whole batch again, eagerly, instead.
                    if used is not caps:
                        raise
                    rerun = self._sub_batch(caps, args, kwargs, twice=twice, whole=True)
                    if rerun is None:
                        raise
                    used, cols = rerun, columns(rerun)
            for cap in used:
                cols[cap.name]["jac_batch"] = float(cap.x.shape[0]) if cap.x.dim() else 1.0
            self._buf.jacobian.update(cols)
        except Exception as exc:
            self._fail("Jacobian columns", exc)

    def _sub_batch(
        self,
        caps: list[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        twice: bool,
        whole: bool = False,
    ) -> list[Any] | None:
        """Captures of a second pass over the first ``sub_batch`` samples (``whole``: all of them).

        None: use the training graph (no sub-batch asked for, a batch no larger than it, or a
        call that cannot be re-run safely).
        """
        from .jacobian import batch_size, sub_batch_captures

        k = self._jacobian_options["sub_batch"]
        batch = batch_size(args, kwargs)
        if batch is None or self._jacobian_generator is None:
            return None
        if whole:
            k = batch
        elif k is None or batch <= k:
            return None  # the training graph already is the batch asked for, at no extra forward
        seed = int(torch.randint(0, 2**62, (1,), generator=self._jacobian_generator))
        named = [(c.name, self._modules[c.name]) for c in caps]
        try:
            rerun = sub_batch_captures(
                self._model, named, args, kwargs, k, seed, twice=twice, rules=self._rules
            )
            if rerun is None:
                return None
            got = [c.name for c in rerun if c.y_edge is not None]
            if got != [c.name for c in caps]:
                raise RuntimeError(
                    f"it ran the blocks {got} with a graph, the training pass {[c.name for c in caps]}"
                )
            for cap, mine in zip(rerun, caps, strict=True):
                cap.stack = mine.stack
            return rerun
        except Exception as exc:
            if self._strict:
                raise
            if "sub_batch" not in self._warned:
                self._warned.add("sub_batch")
                warnings.warn(
                    f"gradprobe: the sub-batch forward pass for the Jacobian columns failed "
                    f"({type(exc).__name__}: {exc}); using the training graph (the whole batch) instead. "
                    "Pass jacobian_options={'sub_batch': None} to always use it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None

    # ------------------------------------------------------------------ path lengths
    def _paths_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """After a recorded training forward pass: the path-length decomposition on the Jacobian
        sub-batch (a second forward pass of its own; the training graph is not used)."""
        if _muted() or in_backward() or not torch.is_grad_enabled() or not self._buf.blocks:
            return
        if (
            not self._recording()
            or self._recorded_steps % self._paths_every
            or self._paths_step == self._step
        ):
            return
        self._paths_step = self._step
        try:
            from .path_lengths import sub_batch_decomposition

            named = [(n, self._modules[n]) for n in self.blocks]
            k = self._jacobian_options["sub_batch"]
            seed = int(self._jacobian_options.get("seed", 0))
            with self._mute():
                frame = sub_batch_decomposition(
                    self._model, named, self._shortcut_modules, tuple(args), dict(kwargs), k, seed
                )
            if frame is None:
                raise RuntimeError(
                    "the forward call cannot be re-run safely (an argument that is neither a tensor nor a "
                    "plain value)"
                )
            frame.insert(0, "step", self._step)
            self._paths_parts.append(frame)
        except Exception as exc:
            self._fail("path-length decomposition", exc)

    # ------------------------------------------------------------------ step closing
    def _flush(self) -> None:
        if self._auto and self._buf.backward_done:
            self._close_step()

    def _close_step(self) -> None:
        try:
            self._close_step_records()
        finally:
            if self._sink is not None:
                self._sink.end_step()  # the step's rows and scalars reach the sink as one unit

    def _close_step_records(self) -> None:
        buf, self._buf = self._buf, _StepBuffer()
        self._captures.clear()
        self._out_node.clear()
        if self._no_shortcut:
            shapeless = sorted(
                (n for n in self._no_shortcut if f"shape:{n}" not in self._warned),
                key=lambda n: self._index.get(n, -1),
            )
            self._no_shortcut.clear()
            if shapeless:
                self._warned.update(f"shape:{n}" for n in shapeless)
                warnings.warn(
                    f"gradprobe: block(s) {shapeless} change the shape of their input and have no shortcut "
                    "applied to that input (a child named shortcut/downsample counts only when the block "
                    "applies it to its own input and its output is not the block's output): res_ratio and "
                    "cos_xy are NaN there. Name the shortcut with attach(..., shortcuts={block: child}).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        step = self._step
        self._step += 1
        if buf.scalars:  # scalars are cheap: kept for every step, recorded or not
            if self._sink is not None:
                self._sink.append_scalars({"step": step, **buf.scalars})
            else:
                self._scalar_rows.append({"step": step, **buf.scalars})
        if not self._schedule(step):
            return
        self._recorded_steps += 1
        try:
            rows = self._rows_of(step, buf)
            self._last_rows = rows
            (self._sink or self._store).append(rows)
            self._flag_non_finite(step, rows)
        except Exception as exc:
            self._fail("closing a step", exc)
        # Parameters as of this recorded step, for the next recorded step's update_ratio.
        for name, snap in buf.snapshot.items():
            old = self._prev_params.get(name)
            if old is not None:
                self._spare[name] = old
            self._prev_params[name] = snap

    def _flag_non_finite(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Warn once when nan/inf reaches the records: recorded as is, but never silently."""
        if "non-finite" in self._warned:
            return
        for row in rows:
            if f"input:{row['block']}" in self._warned or f"output:{row['block']}" in self._warned:
                continue  # NaN by design: the capture warning said why
            bad = [c for c in ("in_rms", "out_rms", "grad_out", "grad_in") if not math.isfinite(row[c])]
            if bad:
                self._warned.add("non-finite")
                warnings.warn(
                    f"gradprobe: non-finite {', '.join(bad)} at step {step}, block {row['block']} "
                    f"(index {row['index']}); recorded as is. Check the data and the loss for nan/inf "
                    "(gradprobe.testing.assert_finite_gradients names the block).",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return

    def _rows_of(self, step: int, buf: _StepBuffer) -> list[dict[str, Any]]:
        by_block: dict[str, list[_Call]] = {}
        for call in buf.calls:
            by_block.setdefault(call.block, []).append(call)
        if not by_block:
            return []
        # Every statistic of the step leaves the device in one transfer per device:
        # one sync instead of one per block keeps a GPU pipeline intact.
        stacked = buf.params
        host = _to_host(
            [t for c in buf.calls for t in (c.fwd, c.sig, c.gyy, c.bwd_x) if t is not None]
            + list(stacked.values())
        )
        values: dict[int, list[float]] = {id(t): v for t, v in host}
        rows = []
        for name, calls in by_block.items():
            complete = [c for c in calls if c.gyy is not None] or calls
            fwd = _pooled([values[id(c.fwd)] if c.fwd is not None else None for c in complete], 4)
            gyy = _pooled([_scaled(values, c.gyy, c.scale) for c in complete], 1)
            bwd = _pooled([_scaled(values, c.bwd_x, c.scale) for c in complete], 3)
            row: dict[str, Any] = {
                "step": step,
                "block": name,
                "index": self._index.get(name, -1),
                "calls": len(complete),
            }
            numel_x = sum(c.numel_x for c in complete)
            numel_y = sum(c.numel_y for c in complete)
            row.update(metrics.finalize(fwd, numel_x, numel_y, gyy[0], bwd))
            sig = [values[id(c.sig)] if c.sig is not None else [] for c in complete]
            row.update(metrics.signal_columns(metrics.pool_moments(sig)))
            params = stacked.get(name)
            psq, gsq, dsq = values[id(params)] if params is not None else (math.nan,) * 3
            row["param_norm"] = metrics._sqrt(psq)
            row["param_grad_norm"] = metrics._sqrt(gsq)
            row["update_ratio"] = metrics._div(metrics._sqrt(dsq), row["param_norm"])
            row.update(buf.jacobian.get(name, {}))
            rows.append(row)
        rows.sort(key=lambda r: r["index"])
        stacks = self._stack_names([r["block"] for r in rows])
        last_out: dict[str, float] = {}
        for row in rows:  # in forward order: the last row of a stack wins
            row["stack"] = stacks[row["block"]]
            last_out[row["stack"]] = row["grad_out"]
        for row in rows:
            row["cum_gain"] = metrics.cum_gain(row["grad_in"], last_out[row["stack"]])
        return [{c: r.get(c, math.nan) for c in FRAME_COLUMNS} for r in rows]


def attach(
    model: nn.Module,
    blocks: BlockSpec = "auto",
    *,
    every: int | Schedule = 1,
    strict: bool = False,
    auto_step: bool | None = None,
    shortcuts: Mapping[str, str | nn.Module] | None = None,
    scaler: Any = None,
    record_eval: bool = False,
    update_ratio: bool = True,
    jacobian: bool | int = False,
    probes: int = 4,
    jacobian_options: Mapping[str, Any] | None = None,
    sink: str | os.PathLike[str] | None = None,
    sink_options: Mapping[str, Any] | None = None,
    input: Any = None,
    output: Any = None,
    stacks: Any = None,
    channel_dim: int | None = None,
    paths: bool | int = False,
) -> Probe:
    """Register gradprobe's hooks on the blocks of ``model`` and return the :class:`Probe`.

    Args:
        model: any ``torch.nn.Module``.
        blocks: ``"auto"``, names or glob patterns, module class(es), or a predicate
            (see :func:`gradprobe.blocks.select_blocks`).
        every: record steps where ``step % every == 0``, or a callable ``step -> bool``.
        strict: raise metric errors instead of warning once and recording NaN.
        auto_step: ``None``/``True``: one step per backward pass until ``probe.step()`` is
            first called; ``False``: only ``probe.step()`` closes steps (gradient accumulation).
        shortcuts: ``{block name: child name or module}`` whose output a shape-changing block
            is compared with (default: a child named ``shortcut`` or ``downsample``).
        scaler: a ``torch.amp.GradScaler``; recorded gradient norms are divided by its scale.
        record_eval: also record forward/backward passes of blocks in eval mode.
        update_ratio: record ``update_ratio``, which keeps a copy of the probed parameters
            between recorded steps (up to twice their memory at a step's end); ``False``
            records NaN there and keeps no copy, for models whose weights barely fit.
        jacobian: add the Jacobian columns on every recorded step (``True``) or every N-th.
        probes: random vectors per Hutchinson estimate of the Jacobian columns.
        jacobian_options: keyword arguments of :func:`gradprobe.jacobian.jacobian_columns`
            (``power_iters``, ``tol``, ``prod``, ``prod_spec``), with the training defaults of
            :data:`TRAINING_JACOBIAN_OPTIONS`. ``spec``: ``True``/``False`` for the spectral
            columns (``jac_spec``, ``prod_spec``) on every/no step with Jacobian columns, or
            N for every N-th of those steps (default 20; NaN on the others).
            ``sub_batch`` (default :data:`SUB_BATCH` = 32): the columns are taken on a
            second forward pass over the first ``sub_batch`` samples (cloned BatchNorm buffers,
            forked RNG: training is unchanged), ``None`` for the whole batch through the
            training graph. Calls whose arguments hold anything but tensors and plain values
            (a key/value cache object) always use the training graph. ``seed`` seeds the
            probe vectors. The ``jac_batch`` column says which batch size was used.
        sink: a folder to stream recorded rows into, in chunks, so memory stays bounded
            (``gradprobe.load(sink)`` reads the run); fails at once if it cannot be written.
        sink_options: ``chunk_rows`` (rows per chunk, default 50,000), ``flush_seconds``
            (a chunk at the end of the first step after this many seconds, default 5: a crash
            loses at most that), ``fmt`` (``"parquet"`` or ``"csv"``), ``max_buffer_rows``
            (rows kept in memory while the folder cannot be written, default 1,000,000) and
            ``resume`` (append to the run already in the folder). See
            :class:`gradprobe.records.Sink`; a folder in use by another probe is refused.
        input: which argument of a block call is its input ``x`` (default: the first
            floating-point or complex positional tensor, else ``hidden_states=``, ``x=`` or
            ``input=``): a position, a keyword name, a callable ``(args, kwargs) -> tensor``,
            or ``{block name: one of those}``. See :mod:`gradprobe.capture`.
        output: which tensor of a block's output is ``y`` (default: the first
            floating-point or complex tensor of a tensor, tuple/list, dict/``ModelOutput`` or
            dataclass): a position, a key or field name, a callable ``output -> tensor``, or
            ``{block name: one of those}``.
        stacks: the chains of blocks that ``cum_gain``, ``prod_fro`` and ``prod_spec`` run
            along (the ``stack`` column). Default: detected at the first recorded step, a
            block joining the stack of the block before it when its input is computed from
            that block's output (an encoder and a decoder are two stacks). Override with
            ``{stack name: block names/globs}`` or a list of such lists (named by their
            common dotted prefix).
        channel_dim: the channel axis of block outputs for the signal propagation columns
            (``chan_mean_sq``, ``chan_var``, ``branch_var``); default dim 1 of 4-d outputs
            (N, C, H, W) and the last dim of 2-d and 3-d ones ((N, C), (N, T, C)).
        paths: the path-length decomposition (:func:`gradprobe.paths`) on every (``True``) or
            every N-th recorded step, on the Jacobian sub-batch (``jacobian_options["sub_batch"]``,
            default 32 samples) in a second forward pass, the loss a fixed random projection of
            the output; read it with ``probe.paths_frame()``, saved as ``paths.parquet``.

    >>> import torch, torch.nn as nn, gradprobe
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])
    >>> with gradprobe.attach(net) as probe:
    ...     net(torch.randn(16, 8)).pow(2).mean().backward()
    >>> probe.frame()[["block", "gain"]].shape
    (4, 2)
    """
    return Probe(
        model,
        blocks,
        every=every,
        strict=strict,
        auto_step=auto_step,
        shortcuts=shortcuts,
        scaler=scaler,
        record_eval=record_eval,
        update_ratio=update_ratio,
        jacobian=jacobian,
        probes=probes,
        jacobian_options=jacobian_options,
        sink=sink,
        sink_options=sink_options,
        input=input,
        output=output,
        stacks=stacks,
        channel_dim=channel_dim,
        paths=paths,
    )
