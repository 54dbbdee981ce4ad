"""Band checks on block frames: :func:`check`, the violations and their messages.

A band is a bound on a column of the frame (``min_cum_gain=1e-3``); every row
outside it is a :class:`Violation`. Everything here reads frames and never runs a
model: the ``assert_*`` assertions, which may also measure a model and its inputs
first, are in :mod:`gradprobe.testing.asserts`.
Every frame checked is passed to the listeners of the current context
(:func:`frame_listener`): that is how the pytest plugin learns what a test looked at.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import _format

if TYPE_CHECKING:
    import pandas as pd


__all__ = [
    "FINITE_COLUMNS",
    "GradientAssertionError",
    "Violation",
    "add_frame_listener",
    "check",
    "format_violations",
    "frame_listener",
]

#: Rows shown in the table of a failure message; the rest are summarised in one line.
MAX_TABLE_ROWS = 10

#: Columns that ``finite=True`` checks: activations and gradients of every block.
FINITE_COLUMNS: tuple[str, ...] = ("in_rms", "out_rms", "grad_out", "grad_in", "param_grad_norm")

#: Short band names accepted by :func:`check` besides the column names (``max_spec`` = ``max_jac_spec``).
BAND_ALIASES: dict[str, str] = {"spec": "jac_spec"}

# Columns where NaN is a broken value (a nan gradient or activation, a 0/0 gain of a dead block), so a
# band on them reports it. Elsewhere NaN means "not applicable" (res_ratio and jac_id of a block that
# changes shape, Jacobian columns on steps where they were not computed, ...) and is skipped.
_NAN_IS_VIOLATION = frozenset({"grad_out", "grad_in", "gain", "cum_gain", "in_rms", "out_rms"})

_KEY_COLUMNS = ("step", "block", "index")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Violation:
    """One value outside its band: which rule, where (block, index, step) and by how much.

    ``rule`` is the band's name (``"min_cum_gain"``, ``"max_res_ratio"``, ...) or
    ``"finite"``; ``column`` is the metric it reads. For ``finite`` violations of
    :func:`assert_finite_gradients`, ``column`` can also be ``"param_grad"`` (then
    ``block`` is the parameter's qualified name and ``index`` the index of the block
    holding it, or -1 outside every probed block) or ``"loss"`` (``block`` is ``"<loss>"``).
    ``model`` is set for frames of a multi-model :class:`gradprobe.Run`.

    >>> print(Violation("min_cum_gain", "layer1.0", 0, 0, 2e-05, 0.001, "cum_gain"))
    step 0, block 'layer1.0' (index 0): cum_gain = 2.00e-05 is below min_cum_gain = 0.001
    """

    rule: str
    block: str
    index: int
    step: int
    value: float
    threshold: float
    column: str
    model: str | None = None

    def where(self) -> str:
        """Where the value was seen, in words."""
        model = f"model {self.model!r}, " if self.model is not None else ""
        if self.column == "loss":
            return f"{model}step {self.step}, the loss"
        if self.column == "param_grad":
            inside = f"in the block at index {self.index}" if self.index >= 0 else "outside the probed blocks"
            return f"{model}step {self.step}, parameter {self.block!r} ({inside})"
        return f"{model}step {self.step}, block {self.block!r} (index {self.index})"

    def relation(self) -> str:
        """What is wrong with the value, e.g. ``is below min_cum_gain = 0.001``."""
        if self.rule == "finite":
            return "is not finite"
        if math.isnan(self.value):
            return f"so {self.rule} = {_fmt(self.threshold)} cannot hold"
        word = "below" if self.rule.startswith("min_") else "above"
        return f"is {word} {self.rule} = {_fmt(self.threshold)}"

    def __str__(self) -> str:
        metric = (
            "gradient" if self.column == "param_grad" else "value" if self.column == "loss" else self.column
        )
        if math.isnan(self.value) and self.rule != "finite":
            return f"{self.where()}: {metric} is nan, {self.relation()}"
        return f"{self.where()}: {metric} = {_fmt(self.value)} {self.relation()}"


class GradientAssertionError(AssertionError):
    """Raised by the ``assert_*`` functions of :mod:`gradprobe.testing`.

    ``violations`` lists every :class:`Violation`; ``frame`` is the frame that was checked.
    """

    def __init__(
        self,
        message: str,
        violations: Sequence[Violation] = (),
        frame: pd.DataFrame | None = None,
    ) -> None:
        super().__init__(message)
        self.violations: list[Violation] = list(violations)
        self.frame = frame


# ----------------------------------------------------------------------------- the plugin's hook point

FrameListener = Callable[[str, Any], None]

# The listeners of the current context (a test, a thread, an asyncio task), never of the whole
# process: a listener sees the checks made where it was added, and nowhere else.
_LISTENERS: ContextVar[tuple[FrameListener, ...]] = ContextVar("gradprobe_frame_listeners", default=())


def _callable(listener: FrameListener) -> FrameListener:
    if not callable(listener):
        raise TypeError(
            f"add_frame_listener needs a callable (source, frame) -> None, got {type(listener).__name__}"
        )
    return listener


@contextmanager
def frame_listener(listener: FrameListener) -> Iterator[None]:
    """Call ``listener(source, frame)`` for every frame an assertion or :func:`check` has inside the block.

    ``source`` is the function's name (``"assert_gradient_flow"``, ``"check"``, ...)
    and ``frame`` the block frame it checked, passed or failed. The listener is
    active in the current context only (this thread or asyncio task) until the
    ``with`` block ends. This is how the pytest plugin learns which frames a
    failing test looked at, without this module importing pytest. A listener
    that raises only triggers a warning.

    >>> import pandas as pd
    >>> seen = []
    >>> with frame_listener(lambda source, frame: seen.append(source)):
    ...     check(pd.DataFrame({"step": [0], "block": ["b"], "index": [0], "gain": [1.0]}), max_gain=2.0)
    []
    >>> seen
    ['check']
    """
    token = _LISTENERS.set((*_LISTENERS.get(), _callable(listener)))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def add_frame_listener(listener: FrameListener) -> Callable[[], None]:
    """Like :func:`frame_listener` without a ``with`` block: returns a function that removes the listener.

    The listener is added to the current context (this thread or asyncio task).

    >>> seen = []
    >>> remove = add_frame_listener(lambda source, frame: seen.append(source))
    >>> import pandas as pd
    >>> check(pd.DataFrame({"step": [0], "block": ["b"], "index": [0], "gain": [1.0]}), max_gain=2.0)
    []
    >>> remove(); seen
    ['check']
    """
    _LISTENERS.set((*_LISTENERS.get(), _callable(listener)))

    def remove() -> None:
        _LISTENERS.set(tuple(f for f in _LISTENERS.get() if f is not listener))

    return remove


def _notify(source: str, frame: pd.DataFrame) -> None:
    for listener in _LISTENERS.get():
        try:
            listener(source, frame)
        except Exception as exc:  # a reporting tool must never change the outcome of an assertion
            warnings.warn(
                f"gradprobe frame listener {listener!r} failed: {exc!r}", RuntimeWarning, stacklevel=3
            )


# ----------------------------------------------------------------------------- formatting


def _fmt(value: float) -> str:
    """A number in a message: 4 significant digits in [1e-3, 1e4), scientific notation outside."""
    return _format.number(float(value), 4, nan="nan")


def _severity(v: Violation) -> float:
    """How far outside its band a value is (a ratio >= 1; inf for nan/inf), to pick the rows to show."""
    if not math.isfinite(v.value) or v.rule == "finite":
        return math.inf
    low, high = (v.value, v.threshold) if v.rule.startswith("min_") else (v.threshold, v.value)
    if low > 0 and high > 0:
        return high / low
    return 1.0 + abs(v.value - v.threshold)


def _order(v: Violation) -> tuple[Any, ...]:
    # Blocks in forward order, a block's columns in frame order; parameters outside every block and
    # the loss after them.
    from ..records import FRAME_COLUMNS

    rank = FRAME_COLUMNS.index(v.column) if v.column in FRAME_COLUMNS else len(FRAME_COLUMNS)
    return (v.model or "", v.step, v.index if v.index >= 0 else math.inf, v.column == "loss", v.block, rank)


def _name_list(names: Sequence[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join([*names[:3], "...", *names[-2:]])


def format_violations(violations: Sequence[Violation], *, limit: int = MAX_TABLE_ROWS) -> str:
    """The aligned table of failure messages: at most ``limit`` rows, then one line for the rest.

    The rows shown are the ``limit`` worst violations (furthest outside their band),
    in forward order. Use it for :func:`check` results:
    ``assert not violations, format_violations(violations)``.

    >>> v = [Violation("max_gain", f"b{i}", i, 0, 2.0 + i, 1.5, "gain") for i in range(12)]
    >>> print(format_violations(v, limit=2))
      index  block  gain  violates
         10  b10      12  max_gain = 1.5
         11  b11      13  max_gain = 1.5
      ... and 10 more: b0, b1, b2, ..., b8, b9 (index 0 to 9); gain from 2 to 11
    """
    if not violations:
        return "  (no violations)"
    ordered = sorted(violations, key=_order)
    shown = sorted(sorted(ordered, key=_severity, reverse=True)[:limit], key=_order)
    shown_ids = {id(v) for v in shown}
    rest = [v for v in ordered if id(v) not in shown_ids]
    columns = list(dict.fromkeys(v.column for v in ordered))
    with_model = any(v.model is not None for v in ordered)
    with_step = len({v.step for v in ordered}) > 1
    one_metric = len(columns) == 1 and columns[0] not in ("param_grad", "loss")
    headers = ["index"] + (["model"] if with_model else []) + ["block"] + (["step"] if with_step else [])
    headers += [columns[0]] if one_metric else ["metric", "value"]
    headers += ["violates"]
    right = [True] + ([False] if with_model else []) + [False] + ([True] if with_step else [])
    right += [True] if one_metric else [False, True]
    right += [False]
    rows = []
    for v in shown:
        row = [str(v.index) if v.index >= 0 else "-"] + ([v.model or ""] if with_model else []) + [v.block]
        row += [str(v.step)] if with_step else []
        if not one_metric:
            row.append({"param_grad": "param gradient", "loss": "loss"}.get(v.column, v.column))
        row.append(_fmt(v.value))
        row.append("finite" if v.rule == "finite" else f"{v.rule} = {_fmt(v.threshold)}")
        rows.append(row)
    lines = _format.table(headers, rows, right, indent="  ")
    if rest:
        names = list(dict.fromkeys(v.block for v in rest))
        indices = [v.index for v in rest if v.index >= 0]
        where = []
        if indices:
            lo, hi = min(indices), max(indices)
            where.append(f"index {lo}" if lo == hi else f"index {lo} to {hi}")
        steps = sorted({v.step for v in rest})
        if with_step:
            where.append(f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]} to {steps[-1]}")
        ranges = []
        for column in dict.fromkeys(v.column for v in rest):
            values = [v.value for v in rest if v.column == column]
            finite = [x for x in values if not math.isnan(x)]
            label = {"param_grad": "parameter gradients", "loss": "loss"}.get(column, column)
            if not finite:
                ranges.append(f"{label} nan")
            elif min(finite) == max(finite) and len(finite) == len(values):
                ranges.append(f"{label} {_fmt(finite[0])}")
            else:
                nan_note = f" ({len(values) - len(finite)} nan)" if len(finite) < len(values) else ""
                ranges.append(f"{label} from {_fmt(min(finite))} to {_fmt(max(finite))}{nan_note}")
        where_text = f" ({', '.join(where)})" if where else ""
        lines.append(f"  ... and {len(rest)} more: {_name_list(names)}{where_text}; {'; '.join(ranges)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- check()


def _as_frame(data: Any, who: str) -> pd.DataFrame:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    frame_fn = getattr(data, "frame", None)
    if callable(frame_fn):  # a gradprobe.Run or a Probe
        frame = frame_fn()
        if isinstance(frame, pd.DataFrame):
            return frame
    raise TypeError(
        f"{who} needs a block frame (a pandas DataFrame from Probe.frame() or gradprobe.analyze) "
        f"or a gradprobe.Run, got {type(data).__name__}"
    )


def _parse_bands(frame: pd.DataFrame, bands: dict[str, Any], who: str) -> tuple[dict[str, list[Any]], bool]:
    """``{column: [min, max]}`` from ``min_<col>=`` / ``max_<col>=`` keywords, and the ``finite`` flag."""
    import pandas as pd

    numeric = [
        str(c) for c in frame.columns if c not in _KEY_COLUMNS and pd.api.types.is_numeric_dtype(frame[c])
    ]
    limits: dict[str, list[Any]] = {}
    finite = False
    for key, value in bands.items():
        if key == "finite":
            if not isinstance(value, bool):
                raise TypeError(f"{who}: finite= must be True or False, got {value!r}")
            finite = value
            continue
        side, _, name = key.partition("_")
        if side not in ("min", "max") or not name:
            raise TypeError(
                f"{who} got an unknown band {key}=; bands are min_<column>= and max_<column>= for a numeric "
                f"column of the frame ({', '.join(numeric)}), max_spec= (= max_jac_spec) or finite=True"
            )
        if value is None:
            continue
        column = BAND_ALIASES.get(name, name)
        if column not in frame.columns:
            raise ValueError(
                f"{who}: {key}= checks the column {column!r}, which this frame does not have; its numeric "
                f"columns are: {', '.join(numeric)}"
            )
        if column not in numeric:
            raise ValueError(f"{who}: {key}= needs a numeric column, but {column!r} is {frame[column].dtype}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{who}: {key}= must be a number (or None to skip the band), got {value!r}")
        limits.setdefault(column, [None, None])[0 if side == "min" else 1] = float(value)
    for column, (low, high) in limits.items():
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"{who}: min_{column}={low!r} is larger than max_{column}={high!r}; no value can pass"
            )
    return limits, finite


def _rows(frame: pd.DataFrame, mask: Any, column: str) -> Iterable[tuple[str, int, int, float, str | None]]:
    sub = frame.loc[mask]
    models = sub["model"].astype(str).tolist() if "model" in sub.columns else [None] * len(sub)
    yield from zip(
        sub["block"].astype(str).tolist(),
        sub["index"].astype(int).tolist(),
        sub["step"].astype(int).tolist() if "step" in sub.columns else [0] * len(sub),
        sub[column].astype(float).tolist(),
        models,
        strict=True,
    )


#: The columns a band assertion needs finite before it reads a band: activations and block gradients
#: (a parameter gradient may be missing by design: no ``.grad`` under ``torch.autograd.grad``).
_SIGNAL_COLUMNS = ("in_rms", "out_rms", "grad_out", "grad_in")


def _finite_violations(
    frame: pd.DataFrame, recorded_only: bool = False, columns: Sequence[str] = FINITE_COLUMNS
) -> list[Violation]:
    """``finite`` violations of ``columns``; ``recorded_only``: skip a column without any value in
    the frame (one that was not recorded, as in a hand-made frame)."""
    import numpy as np

    out: list[Violation] = []
    for column in columns:
        if column not in frame.columns:
            continue
        values = frame[column].astype(float).to_numpy()
        if recorded_only and np.isnan(values).all():
            continue
        bad = ~np.isfinite(values)
        if column == "param_grad_norm" and "param_norm" in frame.columns:
            # NaN here also means "no trainable parameters" (param_norm NaN too): not a violation.
            bad &= ~(np.isnan(values) & frame["param_norm"].isna().to_numpy())
        for block, index, step, value, model in _rows(frame, bad, column):
            out.append(Violation("finite", block, index, step, value, math.inf, column, model))
    return out


def _check(frame: pd.DataFrame, bands: dict[str, Any], who: str) -> list[Violation]:
    import numpy as np

    missing = [c for c in ("block", "index") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{who}: the frame has no column(s) {missing}; pass a block frame (Probe.frame(), analyze)"
        )
    if frame.empty:
        raise ValueError(
            f"{who}: the frame is empty, there is nothing to check (no recorded step reached a block)"
        )
    limits, finite = _parse_bands(frame, bands, who)
    if not limits and not finite:
        raise ValueError(
            f"{who}: no band given; pass at least one of min_<column>=, max_<column>= or finite=True"
        )
    out: list[Violation] = []
    for column, (low, high) in limits.items():
        values = frame[column].astype(float).to_numpy()
        nan = np.isnan(values)
        if nan.all():
            raise ValueError(
                f"{who}: column {column!r} has no values in this frame (all NaN), so it cannot be checked. "
                "Jacobian columns are NaN unless the frame was recorded with jacobian=True (or the Jacobian "
                "computation failed: look for a RuntimeWarning); res_ratio and jac_id are NaN for blocks "
                "whose output shape differs from their input shape."
            )
        flag_nan = nan & (column in _NAN_IS_VIOLATION)
        for rule, limit, bad in (
            (f"min_{column}", low, values < low if low is not None else None),
            (f"max_{column}", high, values > high if high is not None else None),
        ):
            if limit is None or bad is None:
                continue
            if flag_nan.any():  # report a nan once, under the first band of the column
                bad = bad | flag_nan
                flag_nan = np.zeros_like(flag_nan)
            for block, index, step, value, model in _rows(frame, bad, column):
                out.append(Violation(rule, block, index, step, value, limit, column, model))
    if finite:
        out.extend(_finite_violations(frame))
    return sorted(out, key=_order)


def check(frame: Any, **bands: Any) -> list[Violation]:
    """Check every row (every step and block) of a frame against bands; return the violations.

    Bands are ``min_<column>=`` and ``max_<column>=`` for any numeric column of the
    frame (``min_cum_gain=1e-3``, ``max_res_ratio=0.05``, ``max_update_ratio=0.1``;
    ``max_spec=`` is short for ``max_jac_spec=``; ``None`` skips a band), and
    ``finite=True`` for nan/inf in activations and gradients (:data:`FINITE_COLUMNS`).
    NaN in ``grad_out``, ``grad_in``, ``gain``, ``cum_gain``, ``in_rms`` or ``out_rms``
    is a violation of a band on that column; in other columns NaN means "not
    applicable" (``res_ratio`` of a shape-changing block, Jacobian columns on steps
    without them) and is skipped. A column with no value at all raises ``ValueError``
    rather than passing silently. ``frame`` is a block frame or a :class:`gradprobe.Run`.

    >>> import pandas as pd
    >>> run = pd.DataFrame({"step": [0, 0, 100, 100], "block": ["a", "b"] * 2, "index": [0, 1] * 2,
    ...                     "cum_gain": [0.5, 1.0, 2e-4, 1.0]})
    >>> [str(v) for v in check(run, min_cum_gain=1e-3, max_cum_gain=1e3)]
    ["step 100, block 'a' (index 0): cum_gain = 2.00e-04 is below min_cum_gain = 0.001"]
    """
    data = _as_frame(frame, "check()")
    _notify("check", data)
    return _check(data, bands, "check()")


# ----------------------------------------------------------------------------- assertions: helpers


def _is_module(obj: Any) -> bool:
    from torch import nn

    return isinstance(obj, nn.Module)


def _filter_blocks(frame: pd.DataFrame, blocks: Any, who: str) -> pd.DataFrame:
    if isinstance(blocks, str) and blocks == "auto":
        return frame
    if isinstance(blocks, str):
        blocks = [blocks]
    if not (isinstance(blocks, Sequence) and all(isinstance(b, str) for b in blocks)):
        raise TypeError(
            f"{who}: with a frame, blocks= must be 'auto' or block names / glob patterns; module classes "
            "and predicates select modules of a model, so pass the model instead"
        )
    from ..blocks import glob_to_regex

    names = frame["block"].astype(str)
    keep = names.isin(list(blocks))
    for pattern in blocks:
        keep |= names.str.match(glob_to_regex(pattern))
    if not keep.any():
        available = ", ".join(dict.fromkeys(names.tolist()))
        raise ValueError(
            f"{who}: blocks={blocks!r} matches no block of the frame; its blocks are: {available}"
        )
    return frame.loc[keep]


def _band_text(bands: dict[str, Any]) -> str:
    """``0.001 <= cum_gain <= 1000; gain >= 0.1`` from keyword bands."""
    limits: dict[str, list[str | None]] = {}
    for key, value in bands.items():
        if value is None or key == "finite":
            continue
        side, _, name = key.partition("_")
        column = BAND_ALIASES.get(name, name)
        limits.setdefault(column, [None, None])[0 if side == "min" else 1] = _fmt(value)
    parts = []
    for column, (low, high) in limits.items():
        if low is not None and high is not None:
            parts.append(f"{low} <= {column} <= {high}")
        elif low is not None:
            parts.append(f"{column} >= {low}")
        else:
            parts.append(f"{column} <= {high}")
    return "; ".join(parts)


# Definitions that the glossary gives relative to its previous line, spelled out for a message.
_DEFINITIONS = {
    "prod_spec": "largest singular value of the product of block Jacobians from this block's input to the "
    "last block's output",
}


def _glossary_lines(columns: Iterable[str]) -> list[str]:
    from ..records import GLOSSARY

    definitions = {**GLOSSARY, **_DEFINITIONS}
    return [f"  {c} = {definitions[c]}" for c in dict.fromkeys(columns) if c in definitions]


_ADVICE: dict[str, str] = {
    "min_cum_gain": "the gradient vanishes on its way to the input: plain nets of this depth "
    "({blocks} blocks) usually need residual connections or a normalised initialisation (Kaiming/He init, "
    "BatchNorm or LayerNorm).",
    "max_cum_gain": "the gradient explodes on its way to the input: scale the residual branches down at "
    "initialisation (zero-init their last layer, or 1/sqrt(depth)), normalise activations, or lower the "
    "initial weight scale.",
    "min_gain": "these blocks shrink the gradient they pass back: check their initial weight scale "
    "(Kaiming/He init keeps a Linear/Conv + ReLU layer's gain near 1) and look for saturating activations "
    "(tanh, sigmoid).",
    "max_gain": "these blocks amplify the gradient they pass back: lower their initial weight scale or "
    "normalise their output.",
    "max_res_ratio": "the residual branches are far from zero at initialisation: zero-initialise the last "
    "layer of each branch (e.g. zero_init_residual=True: the last BatchNorm weight = 0) or scale each branch "
    "by a learnable scalar initialised to 0 (ReZero, SkipInit, Fixup).",
    "max_jac_id": "the blocks' Jacobians are far from the identity at initialisation: zero-initialise the "
    "last layer of each residual branch or scale each branch by a learnable scalar initialised to 0 "
    "(ReZero, SkipInit, Fixup).",
    "max_jac_spec": "these blocks stretch some input direction by more than the bound: constrain their "
    "layers with spectral normalisation (torch.nn.utils.parametrizations.spectral_norm) or scale their "
    "residual branch down.",
    "max_prod_spec": "the network stretches some direction by more than the bound between these blocks and "
    "the output: bound each block (spectral normalisation) or normalise activations.",
    "min_prod_spec": "every direction shrinks between these blocks and the output (the product of block "
    "Jacobians collapses, as in deep plain nets): residual connections keep the product's spectrum near 1.",
}


def _advice(violations: Sequence[Violation], frame: pd.DataFrame) -> str:
    counts: dict[str, int] = {}
    for v in violations:
        counts[v.rule] = counts.get(v.rule, 0) + 1
    rule = max(counts, key=counts.__getitem__)  # the most frequent rule (first on ties)
    text = _ADVICE.get(rule)
    if text is None:
        return (
            f"look at the named blocks first; the exception's .frame has every metric of every block "
            f"(see the glossary line of {violations[0].column} above)."
        )
    return text.format(blocks=frame["block"].nunique())


def _fail(
    who: str,
    title: str,
    rule: str,
    violations: Sequence[Violation],
    frame: pd.DataFrame,
    *,
    advice: str,
    notes: Sequence[str] = (),
) -> GradientAssertionError:
    lines = [
        f"{who} failed for {title}",
        f"rule: {rule}",
        *notes,
        "",
        format_violations(violations),
        "",
        f"advice: {advice}",
    ]
    return GradientAssertionError("\n".join(lines), violations, frame)


#: The advice of a failure on non-finite values: no band can be judged on them.
NON_FINITE_ADVICE = (
    "the model produces nan/inf at the named blocks, so their bands cannot be judged (a nan gain is "
    "neither vanishing nor exploding): gradprobe.testing.assert_finite_gradients(model, inputs) follows "
    "the first nan/inf to the block that made it; check the data, the loss and the initial weights "
    "(a division by zero, a log of 0, an overflow, a custom backward)."
)


def _assert_finite(who: str, frame: pd.DataFrame, label: str) -> None:
    """Fail with the blocks whose activations or gradients are nan/inf, before any band is read
    (a non-finite backward would otherwise pass for a shape change, a vanishing gradient, or a
    column without values)."""
    __tracebackhide__ = True
    if frame.empty or "block" not in frame.columns:
        return  # _check says what is wrong with such a frame
    violations = sorted(_finite_violations(frame, True, _SIGNAL_COLUMNS), key=_order)
    if not violations:
        return
    blocks = sorted({(v.model, v.block) for v in violations})
    n_blocks = frame.groupby(["model", "block"] if "model" in frame.columns else ["block"]).ngroups
    columns = [c for c in _SIGNAL_COLUMNS if c in frame.columns]
    raise _fail(
        who,
        f"{label}: {len(blocks)} of {n_blocks} blocks have non-finite activations or gradients "
        f"({_name_list([b for _, b in blocks])})",
        f"finite {', '.join(columns)} at every block, before any band is checked",
        violations,
        frame,
        advice=NON_FINITE_ADVICE,
        notes=_glossary_lines(v.column for v in violations),
    )


def _assert_bands(
    who: str,
    frame: pd.DataFrame,
    label: str,
    bands: dict[str, Any],
    notes: Sequence[str] = (),
    scope: str = "block",
) -> None:
    __tracebackhide__ = True
    _assert_finite(who, frame, label)
    violations = _check(frame, bands, who)
    if not violations:
        return
    blocks = sorted({(v.model, v.block) for v in violations})
    n_blocks = frame.groupby(["model", "block"] if "model" in frame.columns else ["block"]).ngroups
    steps = frame["step"].nunique() if "step" in frame.columns else 1
    at_steps = f" (over {steps} recorded steps)" if steps > 1 else ""
    title = f"{label}: {len(blocks)} of {n_blocks} blocks are outside the band{at_steps}"
    every = f"at every {scope} and step" if steps > 1 else f"at every {scope}"
    columns = [v.column for v in violations]
    rule = f"{_band_text(bands)} {every}"
    raise _fail(
        who,
        title,
        rule,
        violations,
        frame,
        advice=_advice(violations, frame),
        notes=[*_glossary_lines(columns), *notes],
    )
