"""What a probe is asked to do: :class:`ProbeConfig` and its :class:`JacobianOptions`, validated once.

``attach(model, **options)`` builds one ``ProbeConfig`` from its keyword arguments; every
check of an option happens here, in ``__post_init__``, so a bad argument fails before any
hook is registered or any folder is created.

>>> ProbeConfig(every=10, jacobian=True, jacobian_options={"sub_batch": 16}).jacobian_options.sub_batch
16
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .blocks import BlockSpec

Schedule = Callable[[int], bool]

#: Default ``jacobian_options["sub_batch"]``: the Jacobian columns of a training step are
#: taken on a second forward pass over the first 32 samples of the batch (``None``: on the
#: whole batch, through the training graph itself). See ``jacobian.sub_batch_captures``.
SUB_BATCH = 32

SINK_OPTIONS = ("chunk_rows", "fmt", "flush_seconds", "max_buffer_rows", "resume")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class JacobianOptions:
    """How a probe takes the Jacobian columns (``attach(..., jacobian_options=...)``).

    The defaults are the training ones: Jacobian columns every 10th step stay within 1.25x
    of bare training on a CIFAR ResNet-56 at batch 128 (README, Performance). The spectral
    columns cost several times the Frobenius ones, so they come on every 20th Jacobian step
    only, the first one included (the initial state always has them).

    Attributes:
        sub_batch: samples of the second forward pass the columns are taken on (cloned
            BatchNorm buffers, forked RNG: training is unchanged); ``None``: the whole batch,
            through the training graph.
        spec: ``True``/``False`` for the spectral columns (``jac_spec``, ``prod_spec``) on
            every/no step with Jacobian columns, or N for every N-th of those steps.
        power_iters, tol, prod, prod_spec: as in :func:`gradprobe.jacobian.jacobian_columns`.
        seed: seeds the probe vectors.

    >>> JacobianOptions.from_mapping({"spec": True}).spec
    True
    >>> JacobianOptions(sub_batch=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jacobian_options['sub_batch'] must be a positive int (samples of the Jacobian pass) or ...
    """

    sub_batch: int | None = SUB_BATCH
    spec: bool | int = 20
    power_iters: int = 8
    tol: float = 1e-2
    prod: bool = True
    prod_spec: Literal["each", "shared", "none"] = "shared"
    seed: int = 0

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

    def columns_kwargs(self, spec: bool) -> dict[str, Any]:
        """Keyword arguments of :func:`gradprobe.jacobian.jacobian_columns` for one step."""
        return {
            "power_iters": self.power_iters,
            "tol": self.tol,
            "prod": self.prod,
            "prod_spec": self.prod_spec,
            "spec": spec,
        }


@dataclass(frozen=True)
class ProbeConfig:
    """Everything :func:`gradprobe.attach` is asked to do, validated once (fields: its keywords).

    ``jacobian_options`` may be given as a mapping; it is converted to :class:`JacobianOptions`.

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

    def __post_init__(self) -> None:
        opts = JacobianOptions.from_mapping(self.jacobian_options)  # type: ignore[arg-type]
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

    @property
    def jacobian_every(self) -> int:
        """Jacobian columns on every N-th recorded step; 0: never."""
        return int(self.jacobian)

    @property
    def paths_every(self) -> int:
        """Path-length decomposition on every N-th recorded step; 0: never."""
        return int(self.paths)
