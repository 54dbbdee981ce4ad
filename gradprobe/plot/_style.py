"""The shared style of gradprobe's figures: palette, axes helpers, scales, legends and notes."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


Color = tuple[float, float, float]
Step = int | str

#: Name under which a frame without a ``model`` column is drawn.
SINGLE_MODEL = "run"

#: Candidate scalar columns, most specific first (runner names, then a probe's ``probe.log`` names).
LOSS_COLUMNS: tuple[str, ...] = ("train_loss", "loss")
ACCURACY_COLUMNS: tuple[str, ...] = ("test_acc", "acc", "accuracy", "val_acc", "train_acc")

#: Axis labels: what is plotted and in which unit. Norms are in the units of the loss gradient.
LABELS: dict[str, str] = {
    "index": "block index (0 = nearest the input)",
    "position": "relative depth (0 = first block, 1 = last block)",
    "step": "training step",
    "gain": "block gain |dL/dx| / |dL/dy|",
    "cum_gain": "cumulative gain to the stack output\n|dL/dx| / |dL/dy_last|",
    "grad_out": "|dL/dy| (gradient norm)",
    "grad_in": "|dL/dx| (gradient norm)",
    "skip_grad": "skip |g_y| (gradient norm)",
    "branch_grad": "branch |g_x - g_y| (gradient norm)",
    "branch_cos": "cos(skip, branch gradient)",
    "res_ratio": "res_ratio |y - x| / |x|\n(0 = identity)",
    "cos_xy": "cos(x, y)",
    "in_rms": "RMS of block input x",
    "out_rms": "RMS of block output y",
    "param_norm": "parameter norm",
    "param_grad_norm": "parameter gradient norm",
    "update_ratio": "|parameter update| / |parameters|",
    "jac_fro": "block Jacobian RMS singular value",
    "jac_spec": "block Jacobian largest singular value",
    "jac_id": "jac_id |J - I|_F / sqrt(n)\n(0 = identity)",
    "prod_fro": "RMS singular value of the product",
    "prod_spec": "largest singular value of the product",
    "chan_mean_sq": "average squared channel mean",
    "chan_var": "average channel variance",
    "branch_var": "residual branch variance",
    "train_loss": "training loss (log scale)",
    "loss": "training loss (log scale)",
    "test_acc": "test accuracy",
    "train_acc": "training accuracy",
    "acc": "accuracy",
}

_RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

# Widest figure in inches: at 100 dpi it fills the report's text column without being scaled down.
_MAX_WIDTH = 11.2

# Set by :func:`offscreen`: figures are then built on the Agg canvas without pyplot, so
# making files never touches the user's interactive backend or pyplot's figure registry.
_OFFSCREEN: contextvars.ContextVar[bool] = contextvars.ContextVar("gradprobe_offscreen", default=False)


@contextlib.contextmanager
def offscreen() -> Iterator[None]:
    """Within the block, figures are created on an Agg canvas, outside pyplot.

    Use it when writing files (the report does): nothing is shown, the user's
    backend is untouched, and dropping the Figure frees it (no ``plt.close``).

    >>> import pandas as pd
    >>> from gradprobe.plot import training_figure
    >>> with offscreen():
    ...     fig = training_figure(pd.DataFrame({"step": [0, 1], "loss": [2.0, 1.0]}))
    >>> type(fig.canvas).__name__
    'FigureCanvasAgg'
    """
    token = _OFFSCREEN.set(True)
    try:
        yield
    finally:
        _OFFSCREEN.reset(token)


# ----------------------------------------------------------------------------- helpers


#: Colour maps of the two families of a plain-versus-residual run: plain nets in oranges, residual
#: nets in blues; within a family a deeper model is darker.
FAMILY_CMAPS: dict[bool, str] = {False: "Oranges", True: "Blues"}

# The stretch of a family's colour map that is used: paler than 0.45 is hard to see on white.
_FAMILY_RANGE = (0.45, 0.9)


def model_palette(
    models: Sequence[str] | pd.DataFrame | Any, *, palette: str = "colorblind"
) -> dict[str, Color]:
    """Map model names to colours; the one palette of every figure and of the report's swatches.

    ``models`` is a frame with ``model`` and ``residual`` columns (``depth`` optional: a run's
    block frame, scalars or summary table): plain nets get oranges and residual nets blues
    (:data:`FAMILY_CMAPS`), a deeper model a darker shade of its family. Otherwise ``models`` are
    names (or a frame's ``model`` column), coloured in the order given (duplicates ignored): up to
    10 get seaborn's colour-blind-safe "colorblind" palette, more evenly spaced "husl" hues.
    Pass the result as ``palette=`` to every figure so that a model keeps its colour everywhere.

    >>> pal = model_palette(["plain-20", "resnet-20"])
    >>> list(pal), len(set(pal.values()))
    (['plain-20', 'resnet-20'], 2)
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"model": ["plain-20", "plain-56", "resnet-20"], "depth": [20, 56, 20],
    ...                      "residual": [False, False, True]})
    >>> pal = model_palette(runs)
    >>> [max(range(3), key=lambda i: c[i]) for c in pal.values()]  # strongest channel: red, red, blue
    [0, 0, 2]
    >>> sum(pal["plain-56"]) < sum(pal["plain-20"])  # deeper is darker
    True
    """
    import seaborn as sns

    if hasattr(models, "columns"):
        frame = cast("pd.DataFrame", models)
        if "model" not in frame.columns:
            models = [SINGLE_MODEL]
        elif "residual" in frame.columns and len(frame) and frame["residual"].notna().all():
            return _family_palette(frame)
        else:
            models = frame["model"].tolist()
    names = list(dict.fromkeys(str(m) for m in models))
    n = max(len(names), 1)
    if palette == "colorblind" and n > 10:
        palette = "husl"
    colours = sns.color_palette(palette, n_colors=n)
    return {name: (float(c[0]), float(c[1]), float(c[2])) for name, c in zip(names, colours, strict=False)}


def _family_palette(frame: pd.DataFrame) -> dict[str, Color]:
    """Plain nets in oranges, residual nets in blues; lightness by depth within a family (deeper: darker)."""
    import seaborn as sns

    first = frame.drop_duplicates("model")
    order = {str(m): i for i, m in enumerate(first["model"])}
    out: dict[str, Color] = {}
    for residual, cmap_name in FAMILY_CMAPS.items():
        part = first[first["residual"].astype(bool) == residual]
        depth = part["depth"].astype("float64").fillna(0.0) if "depth" in part.columns else 0.0 * part.index
        ranked = sorted(zip(depth, map(str, part["model"]), strict=True), key=lambda d: (d[0], order[d[1]]))
        if not ranked:
            continue
        cmap = sns.color_palette(cmap_name, as_cmap=True)
        lo, hi = _FAMILY_RANGE
        levels = np.linspace(lo, hi, len(ranked)) if len(ranked) > 1 else np.array([(lo + hi) / 2 + 0.1])
        for (_, name), level in zip(ranked, levels, strict=True):
            c = cmap(float(level))
            out[name] = (float(c[0]), float(c[1]), float(c[2]))
    return {str(m): out[str(m)] for m in first["model"]}


def has_jacobian(data: pd.DataFrame) -> bool:
    """Whether ``data`` has at least one finite value in a Jacobian column.

    >>> import pandas as pd
    >>> has_jacobian(pd.DataFrame({"jac_fro": [float("nan")]}))
    False
    """
    from ..records import JACOBIAN_COLUMNS

    return any(c in data.columns and bool(np.isfinite(_floats(data[c])).any()) for c in JACOBIAN_COLUMNS)


def _floats(series: Any) -> np.ndarray:
    return np.asarray(series, dtype="float64")


def _text(value: Any) -> str:
    # matplotlib parses text between two "$" as mathtext; user strings are shown literally
    return str(value).replace("$", r"\$")


def _check_frame(data: Any, columns: Sequence[str], where: str) -> pd.DataFrame:
    import pandas as pd

    if not isinstance(data, pd.DataFrame):
        raise TypeError(
            f"{where} takes a pandas DataFrame (probe.frame(), run.frame() or run.scalars()), "
            f"got {type(data).__name__}"
        )
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(
            f"{where} needs column(s) {missing}; the frame has {list(map(str, data.columns))}. "
            "Pass the column names that hold these values (see the function's keyword arguments)."
        )
    frame = data.copy()
    if "model" not in frame.columns:
        frame["model"] = SINGLE_MODEL
    frame["model"] = frame["model"].astype(str)
    return frame


def _models(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["model"].tolist()))


def _has_legend(data: pd.DataFrame) -> bool:
    # one model needs no key: there is nothing to tell apart
    return "model" in data.columns and data["model"].nunique() > 1


def _resolve_palette(
    models: Sequence[str] | pd.DataFrame, palette: Mapping[str, Any] | str | None
) -> dict[str, Any]:
    """The colours of ``models`` (names, or a frame: then plain/residual families when it can tell)."""
    if palette is None:
        return dict(model_palette(models))
    names = _models(cast("pd.DataFrame", models)) if hasattr(models, "columns") else list(models)
    if isinstance(palette, str):
        return dict(model_palette(names, palette=palette))
    resolved = {str(k): v for k, v in palette.items()}
    missing = [m for m in names if m not in resolved]
    if missing:  # unknown models get colours not used by the given ones, so none is shared
        used = set(map(str, resolved.values()))
        spare = [c for c in model_palette(list(resolved) + missing).values() if str(c) not in used]
        spare += list(model_palette(missing, palette="husl").values())
        resolved.update(zip(missing, spare, strict=False))
    return resolved


def _panel_order(frame: pd.DataFrame, models: list[str]) -> tuple[list[str], int]:
    """Models in panel order and the number of columns: plain left of residual, rows by depth."""
    if {"depth", "residual"} <= set(frame.columns):
        first = frame.drop_duplicates("model").set_index("model")
        key = {m: (float(cast(Any, first.loc[m, "depth"])), bool(first.loc[m, "residual"])) for m in models}
        ordered = sorted(models, key=lambda m: (key[m], models.index(m)))
        depths = [key[m][0] for m in ordered]
        paired = all(depths.count(d) == 2 for d in depths) and all(
            not key[ordered[i]][1] and key[ordered[i + 1]][1] for i in range(0, len(ordered), 2)
        )
        if paired:
            return ordered, 2
        return ordered, min(len(ordered), 3)
    return models, min(len(models), 3)


def _new_figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float], **kw: Any
) -> tuple[Figure, Any]:
    """A figure with a grid of axes (ndarray of shape (nrows, ncols)), in gradprobe's style."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    with sns.axes_style("whitegrid"), plt.rc_context(cast(Any, _RC)):
        if _OFFSCREEN.get():
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure as MplFigure

            fig = MplFigure(figsize=size, layout="constrained")
            FigureCanvasAgg(fig)
            axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
        else:
            fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained", **kw)
    return fig, axes


def _own_axes(ax: Axes | None, size: tuple[float, float] = (6.0, 3.6)) -> Axes:
    if ax is not None:
        return ax
    _, axes = _new_figure(size=size)
    return axes[0, 0]


def _pick_steps(frame: pd.DataFrame, step: Step, columns: Sequence[str], where: str) -> pd.DataFrame:
    """Rows of one step per model: "first"/"last" among steps where ``columns`` were recorded, or an int."""
    import pandas as pd

    # the step is chosen among rows where the columns were recorded, but all rows of that step are
    # kept: a block with NaN there (a projection) must stay in the line as a gap, not be skipped over
    recorded = frame[~frame[list(columns)].isna().all(axis=1)]
    parts = []
    for model, rows in recorded.groupby("model", sort=False):
        steps = rows["step"]
        if isinstance(step, str):
            if step not in ("first", "last"):
                raise ValueError(f"{where}: step must be 'first', 'last' or an int, got {step!r}")
            chosen = steps.min() if step == "first" else steps.max()
        else:
            if int(step) not in set(steps.tolist()):
                available = sorted(set(steps.tolist()))
                shown = available if len(available) <= 12 else [*available[:6], "...", *available[-5:]]
                raise ValueError(
                    f"{where}: model {model!r} has no recorded {list(columns)} at step {step}; "
                    f"recorded steps: {shown}. Pass step='first', 'last' or one of these."
                )
            chosen = int(step)
        parts.append(frame[(frame["model"] == model) & (frame["step"] == chosen)])
    if not parts:
        return frame.iloc[0:0]
    return pd.concat(parts).sort_values(["model", "index"], kind="stable")


def _drawable(values: np.ndarray, log: bool) -> tuple[np.ndarray, Counter[str]]:
    """Values the axis can show, others set to NaN and counted by kind (for the note on the axes).

    Infinite values are never drawn; a log axis also cannot show 0 or negative values. NaN
    (not measured) is a gap, not counted.
    """
    counts: Counter[str] = Counter()
    bad = np.isinf(values)
    counts["infinite"] = int(bad.sum())
    if log:
        nonpositive = np.isfinite(values) & (values <= 0)
        counts["zero or negative"] = int(nonpositive.sum())
        bad = bad | nonpositive
    return np.where(bad, np.nan, values), counts


def _zero_aware_scale(values: np.ndarray, log: bool | str, ratio: float = 30.0) -> tuple[str, float]:
    """ "linear", "log" or "symlog" for a metric that is exactly 0 in a meaningful state.

    ``res_ratio`` is exactly 0 for an identity block (zero-initialised
    residual branches), the very state a reader looks for; a log axis cannot
    show it, so values spanning decades that include zeros get a symmetric log
    axis, linear below the smallest positive decade. Returns the scale and that
    threshold.
    """
    if log == "auto":
        log = _spans_decades(values, ratio)
    if not log:
        return "linear", 0.0
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size and (finite == 0).any() and not (finite < 0).any():
        return "symlog", float(10 ** math.floor(math.log10(float(positive.min()))))
    return "log", 0.0


def _spans_decades(values: np.ndarray, ratio: float = 30.0) -> bool:
    pos = values[np.isfinite(values) & (values > 0)]
    return bool(pos.size) and float(pos.max() / pos.min()) >= ratio


def _note(ax: Axes, text: str) -> None:
    ax.text(
        0.99,
        0.02,
        text,
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="0.35",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5},
    )


def _note_dropped(ax: Axes, dropped: Counter[str]) -> None:
    parts = [f"{n} {kind}" for kind, n in sorted(dropped.items()) if n]
    if parts:
        where = " (log axis)" if dropped.get("zero or negative") else ""
        _note(ax, "not drawn" + where + ": " + ", ".join(parts))


def _legend_outside(ax: Axes, *, title: str | None = None, handles: list[Any] | None = None) -> None:
    kw: dict[str, Any] = {
        "loc": "upper left",
        "bbox_to_anchor": (1.02, 1.0),
        "borderaxespad": 0.0,
        "frameon": False,
        "title": title,
    }
    if handles is not None:
        kw["handles"] = handles
    ax.legend(**kw)


def _figure_legend(fig: Figure, palette: Mapping[str, Any], models: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=palette[m], marker="o", markersize=4, label=_text(m)) for m in models]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title="model")


def _reference_line(ax: Axes, y: float, *, horizontal: bool = True) -> None:
    # dotted and at zorder 1: below the data, and told apart from data lines by its style
    if horizontal:
        ax.axhline(y, color="0.3", linestyle=":", linewidth=1.0, zorder=1)
    else:
        ax.axvline(y, color="0.3", linestyle=":", linewidth=1.0, zorder=1)


def _plain_log_ticks(axis: Any) -> None:
    """Label log ticks as plain numbers (0.3, 2, 1e-05) rather than 3x10^-1, and only where they fit.

    matplotlib's log formatter decides which ticks get a label (all decades;
    some minor ticks when the axis spans under two decades); only the text changes.
    """
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    # an axis spanning less than a decade may hold no major tick, hence no major grid line
    axis.grid(True, which="minor", color="0.93", linewidth=0.6)


def _set_symlog(ax: Axes, linthresh: float) -> None:
    """A y axis that is logarithmic above ``linthresh`` and linear (through 0) below it."""
    from matplotlib.ticker import FuncFormatter, NullLocator, SymmetricalLogLocator

    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=linthresh))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def _set_scale(ax: Axes, which: str, log: bool) -> None:
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log" if log else "linear")
    if log:
        _plain_log_ticks(axis)


def _block_xlim(ax: Axes, positions: Any) -> None:
    """Show every block position, also blocks whose value is NaN (autoscaling would hide them)."""
    pos = _floats(positions)
    pos = pos[np.isfinite(pos)]
    if pos.size:
        ax.set_xlim(float(pos.min()) - 0.5, float(pos.max()) + 0.5)


def _depth_x(frame: pd.DataFrame, x: str = "auto") -> tuple[pd.DataFrame, str]:
    """The x column of a figure against depth: ``x``, or for "auto" "index" when every model has the
    same block indices and "position" otherwise, so that a shallow model is not squeezed into the
    left part of a deep one's axis.

    "position" is ``(index - first) / (last - first)`` over each model's blocks: 0 is its first
    block (nearest the input), 1 its last.
    """
    if x != "auto":
        return frame, x
    spans = frame.groupby("model", sort=False)["index"].agg(["min", "max"])
    if len(spans) <= 1 or (spans.nunique() <= 1).all():
        return frame, "index"
    lo = frame.groupby("model", sort=False)["index"].transform("min").astype("float64")
    hi = frame.groupby("model", sort=False)["index"].transform("max").astype("float64")
    span = (hi - lo).where(hi > lo, 1.0)
    return frame.assign(position=(frame["index"].astype("float64") - lo) / span), "position"


def _depth_axis(ax: Axes, positions: Any, x: str) -> None:
    """Limits, ticks and label of an x axis against depth (block index or relative position)."""
    if x == "position":
        ax.set_xlim(-0.03, 1.03)
    else:
        _block_xlim(ax, positions)
        _integer_ticks(ax)
    ax.set_xlabel(LABELS.get(x, x))


def _integer_ticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))


def _lines_per_model(
    ax: Axes,
    frame: pd.DataFrame,
    x: str,
    y: str,
    palette: Mapping[str, Any],
    *,
    log: bool,
    linestyle: str = "-",
    marker: str = "o",
    label_suffix: str = "",
) -> Counter[str]:
    dropped: Counter[str] = Counter()
    for model, rows in frame.groupby("model", sort=False):
        # Each stack (encoder, decoder, ...) is its own chain: one line each, not joined across.
        # Frames without a stack column (older runs) are one chain.
        parts = rows.groupby("stack", sort=False) if "stack" in rows.columns else [(None, rows)]
        for k, (_, part) in enumerate(parts):
            part = part.sort_values(x, kind="stable")
            values = _floats(part[y])
            values, n = _drawable(values, log)
            dropped += n
            ax.plot(
                _floats(part[x]),
                values,
                linestyle=linestyle,
                marker=marker,
                markersize=3,
                linewidth=1.4,
                color=palette[str(model)],
                label=_text(model) + label_suffix if k == 0 else "_nolegend_",
            )
    return dropped


def _hue_frame(data: Any, columns: Sequence[str], hue: str, where: str) -> tuple[pd.DataFrame, bool]:
    """The frame with ``hue``'s values as its ``model`` column (what the line helpers colour by)."""
    if hue != "model" and hasattr(data, "columns") and hue in data.columns:
        data = data.assign(model=data[hue].astype(str))
    elif hue != "model" and hasattr(data, "columns"):
        raise ValueError(
            f"{where}: hue={hue!r} is not a column; the frame has {list(map(str, data.columns))}"
        )
    return _check_frame(data, columns, where), "model" in data.columns
