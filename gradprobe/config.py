"""What a probe is asked to do: :class:`ProbeConfig` and its :class:`JacobianOptions`, validated once.

``attach(model, **options)`` builds one ``ProbeConfig`` from its keyword arguments; every
check of an option happens here, in ``__post_init__``, so a bad argument fails before any
hook is registered or any folder is created.

>>> ProbeConfig(every=10, jacobian=True, jacobian_options={"sub_batch": 16}).jacobian_options.sub_batch
16
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .blocks import BlockSpec

Schedule = Callable[[int], bool]

#: Default ``jacobian_options["sub_batch"]``: the Jacobian columns of a training step are
#: taken on a second forward pass over the first 16 samples of the batch (``None``: on the
#: whole batch, through the training graph itself). See ``jacobian.sub_batch_captures``.
SUB_BATCH = 16

#: Default ``jacobian_options["paths_sub_batch"]``: the path-length decomposition of
#: ``attach(paths=N)`` is taken on a second forward pass over the first 32 samples.
PATHS_SUB_BATCH = 32

SINK_OPTIONS = ("chunk_rows", "fmt", "flush_seconds", "max_buffer_rows", "resume")


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


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class JacobianOptions:
    """How a probe takes the Jacobian columns (``attach(..., jacobian_options=...)``).

    The defaults are the training ones, sized for a CIFAR ResNet-56 at batch 128
    (``benchmarks/jacobian_cost.py``; docs, Performance). The spectral columns cost several
    times the Frobenius ones, so they come once in 20 Jacobian steps, ``jac_spec`` on the
    second and ``prod_spec`` on the third of each 20 (:meth:`spectral_now`).

    Attributes:
        sub_batch: samples of the second forward pass the columns are taken on (cloned
            BatchNorm buffers, forked RNG: training is unchanged); ``None``: the whole batch,
            through the training graph.
        spec: ``True``/``False`` for the spectral columns (``jac_spec``, ``prod_spec``) on
            every/no step with Jacobian columns, or N for once in N of those steps:
            ``jac_spec`` on the second and ``prod_spec`` on the third of every N (N = 2: both
            on the second).
        power_iters, tol, prod, prod_spec: as in :func:`gradprobe.jacobian.jacobian_columns`.
        seed: seeds the probe vectors.
        paths_sub_batch: samples of the second forward pass of the path-length decomposition
            (``attach(paths=N)``); ``None``: the whole batch.
        batch_dim: the axis of the batch in the model's tensor arguments, which the sub-batch
            slices: 0 (batch first), 1 for sequence-first models (``batch_first=False``,
            ``(T, N, C)``); ``None`` (default): 1 where every submodule with a ``batch_first``
            attribute (RNNs, attention, Transformer layers) has it False, 0 where none has
            one; a model with both kinds is refused (the training graph is used, with a
            warning) until it is given.

    >>> JacobianOptions.from_mapping({"spec": True}).spec
    True
    >>> JacobianOptions(sub_batch=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jacobian_options['sub_batch'] must be a positive int (samples of the Jacobian pass) or ...
    """

    sub_batch: int | None = SUB_BATCH
    spec: bool | int = 20
    power_iters: int = 4
    tol: float = 1e-2
    prod: bool = True
    prod_spec: Literal["each", "shared", "none"] = "shared"
    seed: int = 0
    batch_dim: int | None = None
    paths_sub_batch: int | None = PATHS_SUB_BATCH

    def __post_init__(self) -> None:
        if not isinstance(self.spec, bool) and not _is_int(self.spec, 1):
            raise ValueError(
                f"jacobian_options['spec'] must be True, False or a positive int N (the spectral columns on "
                f"every N-th step that has Jacobian columns), got {self.spec!r}"
            )
        if self.sub_batch is not None and not _is_int(self.sub_batch, 1):
            raise ValueError(
                f"jacobian_options['sub_batch'] must be a positive int (samples of the Jacobian pass) or "
                f"None (the whole batch, through the training graph), got {self.sub_batch!r}"
            )
        if not _is_int(self.power_iters, 0):
            raise ValueError(
                f"jacobian_options['power_iters'] must be an int >= 0 (Lanczos steps per spectral "
                f"estimate; 0 skips the spectral columns), got {self.power_iters!r}"
            )
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol >= 0:
            raise ValueError(
                "jacobian_options['tol'] must be a number >= 0 (the Lanczos stopping tolerance), got "
                f"{self.tol!r}"
            )
        if not isinstance(self.prod, bool):
            raise ValueError(f"jacobian_options['prod'] must be True or False, got {self.prod!r}")
        if self.prod_spec not in ("each", "shared", "none"):
            raise ValueError(
                f"jacobian_options['prod_spec'] must be 'each', 'shared' or 'none', got {self.prod_spec!r}"
            )
        if not _is_int(self.seed, 0):
            raise ValueError(f"jacobian_options['seed'] must be an int >= 0, got {self.seed!r}")
        if self.paths_sub_batch is not None and not _is_int(self.paths_sub_batch, 1):
            raise ValueError(
                "jacobian_options['paths_sub_batch'] must be a positive int (samples of the path-length "
                f"decomposition's pass) or None (the whole batch), got {self.paths_sub_batch!r}"
            )
        if self.batch_dim is not None and not _is_int(self.batch_dim, 0):
            raise ValueError(
                "jacobian_options['batch_dim'] must be an int >= 0 (the batch axis of the model's tensor "
                "arguments: 1 for sequence-first models) or None (told from the model), got "
                f"{self.batch_dim!r}"
            )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | JacobianOptions | None) -> JacobianOptions:
        """The options of a mapping (``None``: the defaults); unknown keys are refused by name."""
        if isinstance(options, JacobianOptions):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(
                "jacobian_options= must be a mapping or a gradprobe.JacobianOptions, got "
                f"{type(options).__name__}"
            )
        given = dict(options or {})
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown jacobian_options {unknown}; the options are {known}")
        return cls(**given)

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (stored in a saved run's metadata)."""
        return dataclasses.asdict(self)

    def spectral_now(self, calls: int) -> bool | Literal["blocks", "products"]:
        """Which spectral columns the Jacobian step after ``calls`` Jacobian steps gets
        (``spec`` of :func:`gradprobe.jacobian.jacobian_columns`).

        With ``spec=N`` (N > 2) a cycle of N Jacobian steps spreads them over two: ``jac_spec``
        on the second, ``prod_spec`` on the third, each at about half the cost of both; the
        first one of a run, which also pays for the probe's first recorded step, is a
        Frobenius one. ``spec=2``: both on the second of every two.

        >>> [JacobianOptions(spec=20).spectral_now(c) for c in (0, 1, 2, 3, 20, 21, 22)]
        [False, 'blocks', 'products', False, False, 'blocks', 'products']
        """
        if isinstance(self.spec, bool) or self.spec == 1:
            return bool(self.spec)
        phase = calls % self.spec
        if self.spec == 2:
            return phase == 1
        return "blocks" if phase == 1 else "products" if phase == 2 else False

    def columns_kwargs(self, spec: bool | Literal["blocks", "products"]) -> dict[str, Any]:
        """Keyword arguments of :func:`gradprobe.jacobian.jacobian_columns` for one step."""
        return {
            "power_iters": self.power_iters,
            "tol": self.tol,
            "prod": self.prod,
            "prod_spec": self.prod_spec,
            "spec": spec,
        }


#: The training defaults of :class:`JacobianOptions` as a plain mapping.
TRAINING_JACOBIAN_OPTIONS: dict[str, Any] = dataclasses.asdict(JacobianOptions())


@dataclass(frozen=True)
class ProbeConfig:
    """Everything :func:`gradprobe.attach` is asked to do, validated once (fields: its keywords).

    Attributes:
        blocks: ``"auto"``, names or glob patterns, module class(es), or a predicate
            (see :func:`gradprobe.blocks.select_blocks`).
        every: record steps where ``step % every == 0``, or a callable ``step -> bool``.
        strict: raise metric errors instead of warning once and recording NaN.
        auto_step: ``None``/``True``: one step per backward pass until ``probe.step()`` is
            first called; ``False``: only ``probe.step()`` closes steps (gradient accumulation).
        shortcuts: ``{block name: child name or module}`` whose output a shape-changing block
            is compared with (default: a child named ``shortcut`` or ``downsample``); ``None``
            for a block without a shortcut by design (no warning that it lacks one).
        scaler: a ``torch.amp.GradScaler``; recorded gradient norms are divided by its scale.
        record_eval: also record forward/backward passes of blocks in eval mode.
        update_ratio: record ``update_ratio``, which keeps a copy of the probed parameters
            between recorded steps (up to twice their memory at a step's end); ``False``
            records NaN there and keeps no copy, for models whose weights barely fit.
        jacobian: add the Jacobian columns on every recorded step (``True``) or every N-th.
        probes: random vectors per Hutchinson estimate of the Jacobian columns.
        jacobian_options: keyword arguments of :func:`gradprobe.jacobian.jacobian_columns`
            (``power_iters``, ``tol``, ``prod``, ``prod_spec``), with the training defaults of
            :class:`JacobianOptions`. ``spec``: ``True``/``False`` for the spectral
            columns (``jac_spec``, ``prod_spec``) on every/no step with Jacobian columns, or
            N for once in N of those steps, ``jac_spec`` on the second and ``prod_spec`` on the
            third of every N (default 20; NaN on the others). ``sub_batch`` (default
            :data:`SUB_BATCH` = 16): the columns are taken on a second forward pass
            over the first ``sub_batch`` samples (cloned BatchNorm buffers,
            forked RNG: training is unchanged), ``None`` for the whole batch through the
            training graph. Calls whose arguments hold anything but tensors and plain values
            (a key/value cache object) always use the training graph. ``seed`` seeds the
            probe vectors. The ``jac_batch`` column says which batch size was used.
            ``batch_dim``: the batch axis the sub-batch slices (1 for sequence-first models;
            default: told from the submodules' ``batch_first``).
        sink: a folder to stream recorded rows into, in chunks, so memory stays bounded
            (``gradprobe.load(sink)`` reads the run); fails at once if it cannot be written.
            Under ``torch.distributed`` with several ranks each rank streams into its own
            ``rank-<rank>`` folder inside it, and ``gradprobe.load(sink)`` reads them as one
            run with a ``rank`` column.
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
            every N-th recorded step, on a sub-batch (``jacobian_options["paths_sub_batch"]``,
            default 32 samples) in a second forward pass, the loss a fixed random projection of
            the output; read it with ``probe.paths_frame()``, saved as ``paths.parquet``.
            A mapping is converted to :class:`JacobianOptions`.
        fused: take the statistics of calls too large to be batched (tensors over 64 KiB
            on the CPU, 1 MiB elsewhere) with two kernels compiled by ``torch.compile``,
            each reading a call's tensors once (:mod:`gradprobe.fused`);
            the first recorded step compiles them (seconds, cached on disk). Where they
            cannot be compiled the probe warns once and stays eager.

    >>> ProbeConfig(jacobian="yes")
    Traceback (most recent call last):
    ...
    ValueError: jacobian= must be a bool or a positive int (every N-th recorded step), got 'yes'
    """

    blocks: BlockSpec = "auto"
    every: int | Schedule = 1
    strict: bool = False
    auto_step: bool | None = None
    shortcuts: Mapping[str, Any] | None = None
    scaler: Any = None
    record_eval: bool = False
    update_ratio: bool = True
    jacobian: bool | int = False
    probes: int = 4
    jacobian_options: JacobianOptions = field(default_factory=JacobianOptions)
    sink: str | os.PathLike[str] | None = None
    sink_options: Mapping[str, Any] | None = None
    input: Any = None
    output: Any = None
    stacks: Any = None
    channel_dim: int | None = None
    paths: bool | int = False
    fused: bool = False

    def __post_init__(self) -> None:
        opts = JacobianOptions.from_mapping(self.jacobian_options)
        object.__setattr__(self, "jacobian_options", opts)
        if not callable(self.every) and not _is_int(self.every, 1):
            raise ValueError(f"every= must be a positive int or a callable step -> bool, got {self.every!r}")
        for name in ("paths", "jacobian"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not _is_int(value, 1):
                raise ValueError(
                    f"{name}= must be a bool or a positive int (every N-th recorded step), got {value!r}"
                )
        if self.channel_dim is not None and (
            not isinstance(self.channel_dim, int) or isinstance(self.channel_dim, bool)
        ):
            raise ValueError(
                f"channel_dim= must be None (dim 1 of 4-d outputs, the last dim of 2-d and 3-d ones) or an "
                f"int axis of the block outputs, got {self.channel_dim!r}"
            )
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused= must be True or False, got {self.fused!r}")
        if not _is_int(self.probes, 1):
            raise ValueError(f"probes= must be a positive int, got {self.probes!r}")
        unknown = sorted(set(self.sink_options or {}) - set(SINK_OPTIONS))
        if unknown:
            raise ValueError(f"unknown sink_options {unknown}; the options are {sorted(SINK_OPTIONS)}")

    @classmethod
    def build(cls, where: str, options: Mapping[str, Any]) -> ProbeConfig:
        """The config of ``where(**options)``; an unknown keyword is refused by name."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"{where}() got unexpected keyword argument(s) {unknown}; the options are {known}"
            )
        return cls(**options)

    @classmethod
    def signature(cls) -> inspect.Signature:
        """The signature of ``attach(model, blocks="auto", *, <the other fields>)``."""
        first = [
            inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
            inspect.Parameter(
                "blocks", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="auto", annotation="BlockSpec"
            ),
        ]
        rest = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None if f.name == "jacobian_options" else f.default,
                annotation="Mapping[str, Any] | JacobianOptions | None"
                if f.name == "jacobian_options"
                else f.type,
            )
            for f in dataclasses.fields(cls)
            if f.name != "blocks"
        ]
        return inspect.Signature(first + rest, return_annotation="Probe")

    @property
    def jacobian_every(self) -> int:
        """Jacobian columns on every N-th recorded step; 0: never."""
        return int(self.jacobian)

    @property
    def paths_every(self) -> int:
        """Path-length decomposition on every N-th recorded step; 0: never."""
        return int(self.paths)
