"""Figures of a run's tables, in the seaborn style.

Every function takes a DataFrame (``Probe.frame()``, ``Run.frame()`` or a
scalars frame) plus column names and never a probe, so figures can be redrawn
from a saved run. Axes-level functions are called ``plot_*``: they draw into
``ax`` (a new figure when ``ax`` is None) and return the Axes. Figure-level
functions end in ``_figure`` (plus :func:`gain_heatmaps`): they lay out several
panels and return the matplotlib Figure.

Conventions shared by all figures:

* one colour per model, from :func:`model_palette` (colour-blind-safe), the same
  in every figure when the same ``palette`` is passed (the report does this);
* a frame without a ``model`` column (a single probe) is drawn as one model
  and gets no legend;
* NaN (e.g. skip metrics of a projection block, Jacobians on steps where they
  were not computed) leaves a gap; values a log axis cannot show (inf, 0) are
  left out and counted in a note on the axes, never silently;
* "first" / "last" steps are chosen per model, among steps where the plotted
  columns were recorded.

seaborn and matplotlib are imported inside the functions so that importing
gradprobe stays light.
"""

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

__all__ = [
    "accuracy_column",
    "gain_heatmaps",
    "has_jacobian",
    "highway_figure",
    "identity_figure",
    "jacobian_figure",
    "loss_column",
    "model_palette",
    "offscreen",
    "plot_accuracy",
    "plot_gain_heatmap",
    "plot_highway",
    "plot_jacobian",
    "plot_loss",
    "plot_over_steps",
    "plot_path_lengths",
    "plot_responses",
    "plot_signal_propagation",
    "plot_skip_branch",
    "plot_spectrum",
    "responses_figure",
    "skip_branch_figure",
    "training_figure",
]

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


def model_palette(models: Sequence[str] | Any, *, palette: str = "colorblind") -> dict[str, Color]:
    """Map model names to colours, in the order given (duplicates ignored).

    Pass the result as ``palette=`` to every figure so that a model keeps its
    colour everywhere. Up to 10 models get seaborn's colour-blind-safe
    "colorblind" palette; more get evenly spaced "husl" hues (still distinct,
    no longer colour-blind-safe).

    >>> pal = model_palette(["plain-20", "resnet-20"])
    >>> list(pal), len(set(pal.values()))
    (['plain-20', 'resnet-20'], 2)
    """
    import seaborn as sns

    names = list(dict.fromkeys(str(m) for m in models))
    n = max(len(names), 1)
    if palette == "colorblind" and n > 10:
        palette = "husl"
    colours = sns.color_palette(palette, n_colors=n)
    return {name: (float(c[0]), float(c[1]), float(c[2])) for name, c in zip(names, colours, strict=False)}


def has_jacobian(data: pd.DataFrame) -> bool:
    """Whether ``data`` has at least one finite value in a Jacobian column.

    >>> import pandas as pd
    >>> has_jacobian(pd.DataFrame({"jac_fro": [float("nan")]}))
    False
    """
    from .records import JACOBIAN_COLUMNS

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
    return "model" in data.columns


def _resolve_palette(models: Sequence[str], palette: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if palette is None or isinstance(palette, str):
        return dict(model_palette(models, palette=palette or "colorblind"))
    resolved = {str(k): v for k, v in palette.items()}
    missing = [m for m in models if m not in resolved]
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


# ----------------------------------------------------------------------------- 1. gradient highway


def plot_highway(
    data: pd.DataFrame,
    *,
    x: str = "index",
    y: str = "cum_gain",
    step: Step = "last",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """The gradient highway: ``cum_gain`` (log axis) against block index, one line per model
    and stack (an encoder and a decoder are drawn as two lines, each ending at its own last block).

    ``cum_gain`` is the product of block gains from a block to its stack's output, so a
    flat line at 1 is a perfect highway; a line falling towards the input
    means vanishing gradients, rising means exploding. ``step`` is "first",
    "last" or a step number (per model).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": ["a", "b"], "index": [0, 1], "cum_gain": [0.01, 0.5]})
    >>> plot_highway(f).get_yscale()
    'log'
    """
    frame = _check_frame(data, ["step", x, y], "plot_highway")
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, [y], "plot_highway")
    dropped = _lines_per_model(ax, rows, x, y, pal, log=True)
    _block_xlim(ax, rows[x])
    _set_scale(ax, "y", True)
    _reference_line(ax, 1.0)
    _note_dropped(ax, dropped)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y) + " (log scale)")
    _integer_ticks(ax)
    if legend and _has_legend(data) and len(rows):
        _legend_outside(ax, title="model")
    return ax


def highway_figure(
    data: pd.DataFrame,
    *,
    steps: Sequence[Step] = ("first", "last"),
    y: str = "cum_gain",
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """Gradient highway at initialisation and at the end of training, side by side (shared y axis).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": [0, 0, 9, 9], "block": list("abab"), "index": [0, 1] * 2,
    ...                   "cum_gain": [0.01, 0.5, 0.2, 0.9]})
    >>> len(highway_figure(f).axes)
    2
    """
    frame = _check_frame(data, ["step", "index", y], "highway_figure")
    models = _models(frame)
    pal = _resolve_palette(models, palette)
    fig, axes = _new_figure(1, len(steps), size=(4.0 * len(steps) + 1.6, 3.6), sharey=True)
    names = {
        "first": "at initialisation (first recorded step)",
        "last": "after training (last recorded step)",
    }
    for ax, step in zip(axes[0], steps, strict=True):
        plot_highway(frame, y=y, step=step, palette=pal, legend=False, ax=ax)
        ax.set_title(names.get(str(step), f"step {step}"))
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    if _has_legend(data):
        _figure_legend(fig, pal, models)
    return fig


# ----------------------------------------------------------------------------- 2. gain heatmap


def _centred_ticks(limit: float) -> list[float]:
    """Colour bar ticks symmetric around 1 in log space: 1/limit .. 1 .. limit, at most 7, rounded."""
    decades = math.log10(limit)
    if decades >= 1:
        step = max(1, math.ceil(2 * math.floor(decades) / 6))
        top = math.floor(decades)
        return [
            10.0**k for k in sorted({sign * j * step for j in range(top // step + 1) for sign in (-1, 1)})
        ]
    ticks = [limit**-1, limit**-0.5, 1.0, limit**0.5, limit]
    return [float(f"{t:.2g}") for t in ticks]


def _centred_colorbar(bar: Any, limit: float, label: str) -> None:
    bar.set_label(label)
    bar.ax.minorticks_off()
    ticks = _centred_ticks(limit)
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])


def _log_limit(values: np.ndarray, vlim: float | None) -> float:
    """Symmetric colour limit in decades around 1, so that gain 1 sits at the colour map's centre."""
    if vlim is not None:
        if not vlim > 1:
            raise ValueError(f"vlim must be > 1 (the colour scale runs from 1/vlim to vlim), got {vlim}")
        return float(vlim)
    pos = values[np.isfinite(values) & (values > 0)]
    if not pos.size:
        return 10.0
    decades = float(np.max(np.abs(np.log10(pos))))
    return float(10 ** max(decades, 0.25))


def plot_gain_heatmap(
    data: pd.DataFrame,
    *,
    value: str = "gain",
    model: str | None = None,
    vlim: float | None = None,
    cmap: str = "RdBu_r",
    colorbar: bool = True,
    max_labels: int = 24,
    ax: Axes | None = None,
) -> Axes:
    """Heatmap of a gain per block (rows, forward order from the top) and step (columns).

    The colour scale is logarithmic and centred on 1 (white): red blocks
    amplify the gradient on its way back, blue ones shrink it. Limits run from
    ``1/vlim`` to ``vlim`` (default: the largest deviation in the data);
    values beyond saturate, NaN is grey. With several models pass ``model=``.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": [0, 0, 1, 1], "block": list("abab"), "index": [0, 1] * 2,
    ...                   "gain": [0.5, 2.0, 0.8, 1.1]})
    >>> plot_gain_heatmap(f).get_ylabel()
    'block (forward order)'
    """
    from matplotlib.colors import LogNorm

    frame = _check_frame(data, ["step", "block", "index", value], "plot_gain_heatmap")
    models = _models(frame)
    if model is None:
        if len(models) > 1:
            raise ValueError(
                f"plot_gain_heatmap draws one model; the frame has {models}. "
                "Pass model=NAME, or use gain_heatmaps() for one panel per model."
            )
        model = models[0]
    rows = frame[frame["model"] == str(model)]
    if rows.empty:
        raise ValueError(f"plot_gain_heatmap: no rows for model {model!r}; models: {models}")
    ax = _own_axes(ax, size=(6.0, 4.0))
    table = rows.pivot_table(index="index", columns="step", values=value, aggfunc="mean", dropna=False)
    grid = table.to_numpy(dtype="float64")
    limit = _log_limit(_floats(rows[value]), vlim)
    shown = np.clip(grid, 1.0 / limit, limit)  # inf saturates, 0 hits the floor, NaN stays NaN
    steps = table.columns.to_numpy(dtype="float64")
    if len(steps) > 1:
        mids = (steps[:-1] + steps[1:]) / 2
        x_edges = np.concatenate(
            [[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]]
        )
    else:
        x_edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    y_edges = np.arange(len(table.index) + 1) - 0.5
    import seaborn as sns

    colours = sns.color_palette(cmap, as_cmap=True).with_extremes(bad="0.75")
    mesh = ax.pcolormesh(
        x_edges, y_edges, np.ma.masked_invalid(shown), cmap=colours, norm=LogNorm(1.0 / limit, limit)
    )
    ax.set_ylim(y_edges[-1], y_edges[0])  # input at the top, like reading the network forward
    names = rows.drop_duplicates("index").set_index("index")["block"].reindex(table.index)
    every = max(1, math.ceil(len(names) / max_labels))
    ax.set_yticks(np.arange(len(names))[::every], [_text(n) for n in names.tolist()[::every]], fontsize=7)
    ax.grid(False)
    ax.set_xlabel(LABELS["step"])
    ax.set_ylabel("block (forward order)")
    _integer_ticks(ax)
    if colorbar:
        bar = ax.figure.colorbar(mesh, ax=ax)
        _centred_colorbar(bar, limit, f"{value} (log scale, 1 = unchanged)")
    return ax


def gain_heatmaps(
    data: pd.DataFrame,
    *,
    value: str = "gain",
    vlim: float | None = None,
    cmap: str = "RdBu_r",
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """One :func:`plot_gain_heatmap` panel per model with one shared, log-centred colour scale.

    Panels are laid out plain left of residual, one row per depth, when the
    frame has ``depth`` and ``residual`` columns. Titles use the model colour.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"model": ["p", "p", "r", "r"], "step": 0, "block": "b", "index": 0,
    ...                   "gain": [0.5, 0.6, 1.0, 1.1]})
    >>> len(gain_heatmaps(f).axes)  # two panels and a colour bar
    3
    """
    frame = _check_frame(data, ["step", "block", "index", value], "gain_heatmaps")
    models, ncols = _panel_order(frame, _models(frame))
    pal = _resolve_palette(_models(frame), palette)
    limit = _log_limit(_floats(frame[value]), vlim)
    nrows = math.ceil(len(models) / ncols)
    tall = max(frame.groupby("model")["index"].nunique().max() * 0.12, 2.2)
    fig, axes = _new_figure(
        nrows, ncols, size=(min(3.9 * ncols + 1.2, _MAX_WIDTH), min(tall, 5.0) * nrows + 0.3)
    )
    flat = axes.ravel()
    for ax, model in zip(flat, models, strict=False):
        plot_gain_heatmap(frame, value=value, model=model, vlim=limit, cmap=cmap, colorbar=False, ax=ax)
        ax.set_title(_text(model), color=pal[model], fontweight="bold")
    for ax in flat[len(models) :]:
        ax.set_visible(False)
    bar = fig.colorbar(flat[0].collections[0], ax=list(flat[: len(models)]), shrink=0.9, aspect=30)
    _centred_colorbar(bar, limit, f"{value} (log scale, 1 = unchanged)")
    return fig


# ----------------------------------------------------------------------------- 3. distance from identity


def plot_over_steps(
    data: pd.DataFrame,
    *,
    y: str = "res_ratio",
    x: str = "step",
    model: str | None = None,
    log: bool | str = "auto",
    linthresh: float | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """One line per block of a metric over training steps, coloured by relative depth.

    Colour runs from the input (dark) to the output (light) so depths of
    different models compare. ``log="auto"`` uses a log axis when the values
    span more than ~1.5 decades; when they also hold exact zeros (identity
    blocks) the axis is "symlog", linear below ``linthresh`` (default: the
    smallest positive decade), so 0 stays visible. Steps where the metric is
    NaN are skipped (so sparse Jacobian columns draw as points joined across gaps).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": [0, 1, 0, 1], "block": list("aabb"), "index": [0, 0, 1, 1],
    ...                   "res_ratio": [0.0, 0.1, 0.0, 0.2]})
    >>> len(plot_over_steps(f).get_lines())
    2
    """
    import matplotlib as mpl
    import seaborn as sns

    frame = _check_frame(data, [x, "index", y], "plot_over_steps")
    models = _models(frame)
    if model is None:
        if len(models) > 1:
            raise ValueError(
                f"plot_over_steps draws one model; the frame has {models}. "
                "Pass model=NAME, or use identity_figure() for one panel per model."
            )
        model = models[0]
    rows = frame[frame["model"] == str(model)]
    ax = _own_axes(ax)
    if log == "symlog":
        scale, threshold = "symlog", linthresh or _zero_aware_scale(_floats(rows[y]), True)[1] or 1e-3
    else:
        scale, threshold = _zero_aware_scale(_floats(rows[y]), log)
    colours = sns.color_palette(cmap, as_cmap=True)
    top = max(int(rows["index"].max()) if len(rows) else 0, 1)
    dropped: Counter[str] = Counter()
    for index, block in rows.groupby("index", sort=True):
        block = block.sort_values(x, kind="stable")
        values = _floats(block[y])
        values, n = _drawable(values, scale == "log")
        dropped += n
        keep = ~np.isnan(values)
        sparse = keep.sum() <= 30
        ax.plot(
            _floats(block[x])[keep],
            values[keep],
            # 0.9: the lightest yellow of the map is hard to see on white
            color=colours(0.9 * int(cast(Any, index)) / top),
            linewidth=1.0,
            marker="o" if sparse else None,
            markersize=2.5,
        )
    if scale == "log":
        _set_scale(ax, "y", True)
    elif scale == "symlog":
        _set_symlog(ax, threshold)
    _note_dropped(ax, dropped)
    ax.set_xlabel(LABELS.get(x, x))
    suffix = {"log": " (log scale)", "symlog": " (log scale, 0 shown)", "linear": ""}[scale]
    ax.set_ylabel(LABELS.get(y, y) + suffix)
    _integer_ticks(ax)
    if colorbar:
        mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, top / 0.9), cmap=colours)
        bar = ax.figure.colorbar(mappable, ax=ax)
        bar.set_label("block index")
        bar.ax.set_ylim(0, top)
    return ax


def identity_figure(
    data: pd.DataFrame,
    *,
    metrics: Sequence[str] = ("res_ratio", "jac_id"),
    cmap: str = "viridis",
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """Distance from identity during training: a row per metric, a panel per model (plain beside residual).

    Metrics absent from the frame or all-NaN (``jac_id`` without Jacobian
    probes) are left out. Rows share their y axis so models compare directly.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": [0, 1], "block": "b", "index": 0, "res_ratio": [0.0, 0.1]})
    >>> len(identity_figure(f).axes)  # one panel and its colour bar
    2
    """
    import matplotlib as mpl
    import seaborn as sns

    frame = _check_frame(data, ["step", "index"], "identity_figure")
    rows_of = [m for m in metrics if m in frame.columns and bool(np.isfinite(_floats(frame[m])).any())]
    if not rows_of:
        raise ValueError(
            f"identity_figure: none of {list(metrics)} has a finite value in the frame; "
            "res_ratio comes from the probe engine, jac_id from attach(..., jacobian=True)."
        )
    models, _ = _panel_order(frame, _models(frame))
    pal = _resolve_palette(_models(frame), palette)
    ncols = len(models)
    fig, axes = _new_figure(
        len(rows_of), ncols, size=(min(2.6 * ncols + 1.4, _MAX_WIDTH), 2.6 * len(rows_of) + 0.4), sharey="row"
    )
    for r, metric in enumerate(rows_of):
        scale, threshold = _zero_aware_scale(_floats(frame[metric]), "auto")  # one scale per shared row
        mode: bool | str = scale if scale == "symlog" else scale == "log"
        for c, model in enumerate(models):
            ax = axes[r, c]
            plot_over_steps(
                frame, y=metric, model=model, log=mode, linthresh=threshold, cmap=cmap, colorbar=False, ax=ax
            )
            if r == 0:
                ax.set_title(_text(model), color=pal[model], fontweight="bold")
            if c:
                ax.set_ylabel("")
            if r < len(rows_of) - 1:
                ax.set_xlabel("")
    colours = sns.color_palette(cmap, as_cmap=True)
    mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1 / 0.9), cmap=colours)
    bar = fig.colorbar(mappable, ax=list(axes.ravel()), shrink=0.8, aspect=30, pad=0.01)
    bar.ax.set_ylim(0, 1)
    bar.set_label("block position (0 = input, 1 = output)")
    return fig


# ----------------------------------------------------------------------------- 4. skip versus branch


def plot_skip_branch(
    data: pd.DataFrame,
    *,
    skip: str = "skip_grad",
    branch: str = "branch_grad",
    step: Step = "last",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Gradient through the skip (solid) and through the branch (dashed) per block, in model colours.

    Where the solid line is above the dashed one, most of the gradient takes
    the identity highway. Projection blocks (shape change) are NaN: gaps.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("ab"), "index": [0, 1],
    ...                   "skip_grad": [float("nan"), 1.0], "branch_grad": [float("nan"), 0.1]})
    >>> len(plot_skip_branch(f).get_lines())
    2
    """
    from matplotlib.lines import Line2D

    frame = _check_frame(data, ["step", "index", skip, branch], "plot_skip_branch")
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, [skip, branch], "plot_skip_branch")
    values = np.concatenate([_floats(rows[skip]), _floats(rows[branch])])
    use_log = _spans_decades(values, 10.0)
    dropped = _lines_per_model(ax, rows, "index", skip, pal, log=use_log, label_suffix=" skip")
    dropped += _lines_per_model(
        ax, rows, "index", branch, pal, log=use_log, linestyle="--", marker="x", label_suffix=" branch"
    )
    _block_xlim(ax, rows["index"])
    if use_log:
        _set_scale(ax, "y", True)
    _note_dropped(ax, dropped)
    ax.set_xlabel(LABELS["index"])
    ax.set_ylabel("gradient norm" + (" (log scale)" if use_log else ""))
    _integer_ticks(ax)
    if legend:
        styles = [
            Line2D([], [], color="0.2", marker="o", markersize=3, label="skip |g_y|"),
            Line2D([], [], color="0.2", linestyle="--", marker="x", markersize=3, label="branch |g_x - g_y|"),
        ]
        if _has_legend(data):
            styles = [
                Line2D([], [], color=pal[m], marker="o", markersize=4, label=_text(m)) for m in _models(frame)
            ] + styles
        _legend_outside(ax, handles=styles)
    return ax


def skip_branch_figure(
    data: pd.DataFrame,
    *,
    step: Step = "last",
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """:func:`plot_skip_branch` with one panel per model (shared y axis), plain beside residual.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"model": ["p", "r"], "step": 0, "block": "b", "index": 0,
    ...                   "skip_grad": [1.0, 1.0], "branch_grad": [2.0, 0.1]})
    >>> len(skip_branch_figure(f).axes)
    2
    """
    from matplotlib.lines import Line2D

    frame = _check_frame(data, ["step", "index", "skip_grad", "branch_grad"], "skip_branch_figure")
    models, ncols = _panel_order(frame, _models(frame))
    pal = _resolve_palette(_models(frame), palette)
    nrows = math.ceil(len(models) / ncols)
    fig, axes = _new_figure(
        nrows, ncols, size=(min(3.6 * ncols + 1.9, _MAX_WIDTH), 2.7 * nrows + 0.3), sharey=True
    )
    values = np.concatenate([_floats(frame["skip_grad"]), _floats(frame["branch_grad"])])
    use_log = _spans_decades(values, 10.0)
    flat = axes.ravel()
    for i, (ax, model) in enumerate(zip(flat, models, strict=False)):
        plot_skip_branch(frame[frame["model"] == model], step=step, palette=pal, legend=False, ax=ax)
        _set_scale(ax, "y", use_log)
        ax.set_title(_text(model), color=pal[model], fontweight="bold")
        if i % ncols:
            ax.set_ylabel("")
        if i < len(models) - ncols:
            ax.set_xlabel("")
    for ax in flat[len(models) :]:
        ax.set_visible(False)
    key = [
        Line2D([], [], color="0.2", marker="o", markersize=3, label="skip |g_y|"),
        Line2D([], [], color="0.2", linestyle="--", marker="x", markersize=3, label="branch |g_x - g_y|"),
    ]
    fig.legend(handles=key, loc="outside right upper", frameon=False, title="gradient through")
    return fig


# ----------------------------------------------------------------------------- 5. training curves


def _first_column(frame: pd.DataFrame, given: str | None, candidates: Sequence[str], what: str) -> str | None:
    if given is not None:
        if given not in frame.columns:
            raise ValueError(
                f"no column {given!r} for the {what}; the frame has {list(map(str, frame.columns))}"
            )
        return given
    for name in candidates:
        if name in frame.columns and bool(np.isfinite(_floats(frame[name])).any()):
            return name
    return None


def loss_column(scalars: pd.DataFrame) -> str | None:
    """The training-loss column of a scalars frame ("train_loss", else "loss") with values, or None.

    >>> import pandas as pd
    >>> loss_column(pd.DataFrame({"step": [0], "loss": [2.3]}))
    'loss'
    """
    return _first_column(scalars, None, LOSS_COLUMNS, "loss")


def accuracy_column(scalars: pd.DataFrame) -> str | None:
    """The accuracy column of a scalars frame ("test_acc", "acc", ...) with values, or None.

    >>> import pandas as pd
    >>> accuracy_column(pd.DataFrame({"step": [0, 1], "test_acc": [float("nan"), 0.9], "acc": [0.5, 0.6]}))
    'test_acc'
    """
    return _first_column(scalars, None, ACCURACY_COLUMNS, "accuracy")


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    import pandas as pd

    return pd.Series(values).rolling(window, min_periods=1, center=True).mean().to_numpy()


def plot_loss(
    scalars: pd.DataFrame,
    *,
    x: str = "step",
    y: str | None = None,
    smooth: int | str = "auto",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Training loss per model on a log axis (the degradation problem shows as a higher deep-plain curve).

    ``y`` defaults to "train_loss", else "loss". Raw values are drawn faintly
    and a centred rolling mean over ``smooth`` steps on top ("auto": ~2% of the
    steps; 1 or 0: no smoothing).

    >>> import pandas as pd
    >>> plot_loss(pd.DataFrame({"step": [0, 1, 2], "loss": [2.0, 1.0, 0.5]})).get_yscale()
    'log'
    """
    frame = _check_frame(scalars, [x], "plot_loss")
    column = _first_column(frame, y, LOSS_COLUMNS, "loss")
    if column is None:
        raise ValueError(
            f"plot_loss: no loss column among {list(LOSS_COLUMNS)} with values; "
            f"the frame has {list(map(str, scalars.columns))}. Pass y=COLUMN."
        )
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    values_all = _floats(frame[column])
    use_log = bool((values_all[np.isfinite(values_all)] > 0).all())
    dropped: Counter[str] = Counter()
    for model, rows in frame.groupby("model", sort=False):
        rows = rows.sort_values(x, kind="stable")
        values = _floats(rows[column])
        steps = _floats(rows[x])
        values, n = _drawable(values, use_log)
        dropped += n
        keep = ~np.isnan(values)
        steps, values = steps[keep], values[keep]
        window = max(1, len(values) // 50) if smooth == "auto" else max(1, int(smooth))
        colour = pal[str(model)]
        if window > 1:
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            values = np.exp(_smooth(np.log(values), window)) if use_log else _smooth(values, window)
        ax.plot(steps, values, color=colour, linewidth=1.5, label=_text(model))
    if use_log:
        _set_scale(ax, "y", True)
    _note_dropped(ax, dropped)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(f"{column.replace('_', ' ')}" + (" (log scale)" if use_log else ""))
    if legend and _has_legend(scalars):
        _legend_outside(ax, title="model")
    return ax


def plot_accuracy(
    scalars: pd.DataFrame,
    *,
    x: str = "step",
    y: str | None = None,
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Accuracy per model over steps, as a percentage; NaN rows (not measured at that step) are skipped.

    ``y`` defaults to the first of "test_acc", "acc", "accuracy", "val_acc",
    "train_acc" with values. Accuracies are fractions in [0, 1].

    >>> import pandas as pd
    >>> plot_accuracy(pd.DataFrame({"step": [0, 5], "test_acc": [0.1, 0.9]})).get_ylabel()
    'test accuracy (%)'
    """
    from matplotlib.ticker import PercentFormatter

    frame = _check_frame(scalars, [x], "plot_accuracy")
    column = _first_column(frame, y, ACCURACY_COLUMNS, "accuracy")
    if column is None:
        raise ValueError(
            f"plot_accuracy: no accuracy column among {list(ACCURACY_COLUMNS)} with values; "
            f"the frame has {list(map(str, scalars.columns))}. Pass y=COLUMN."
        )
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    for model, rows in frame.groupby("model", sort=False):
        rows = rows.sort_values(x, kind="stable")
        values = _floats(rows[column])
        keep = np.isfinite(values)
        ax.plot(
            _floats(rows[x])[keep],
            values[keep],
            color=pal[str(model)],
            marker="o" if keep.sum() <= 60 else None,
            markersize=3,
            linewidth=1.5,
            label=_text(model),
        )
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(column, column.replace("_", " ")) + " (%)")
    if legend and _has_legend(scalars):
        _legend_outside(ax, title="model")
    return ax


def training_figure(
    scalars: pd.DataFrame,
    *,
    x: str = "step",
    loss: str | None = None,
    accuracy: str | None = None,
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """Training loss (log axis) and accuracy side by side, one colour per model.

    Either panel is left out when its column is absent.

    >>> import pandas as pd
    >>> s = pd.DataFrame({"step": [0, 1], "train_loss": [2.0, 1.0], "test_acc": [0.2, 0.5]})
    >>> len(training_figure(s).axes)
    2
    """
    frame = _check_frame(scalars, [x], "training_figure")
    loss_col = _first_column(frame, loss, LOSS_COLUMNS, "loss")
    acc_col = _first_column(frame, accuracy, ACCURACY_COLUMNS, "accuracy")
    panels = [p for p in (loss_col and "loss", acc_col and "acc") if p]
    if not panels:
        raise ValueError(
            f"training_figure: no loss ({list(LOSS_COLUMNS)}) or accuracy ({list(ACCURACY_COLUMNS)}) "
            f"column with values; the frame has {list(map(str, scalars.columns))}."
        )
    models = _models(frame)
    pal = _resolve_palette(models, palette)
    fig, axes = _new_figure(1, len(panels), size=(4.2 * len(panels) + 1.5, 3.4))
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            plot_loss(frame, x=x, y=loss_col, palette=pal, legend=False, ax=ax)
        else:
            plot_accuracy(frame, x=x, y=acc_col, palette=pal, legend=False, ax=ax)
    if _has_legend(scalars):
        _figure_legend(fig, pal, models)
    return fig


# ----------------------------------------------------------------------------- 6. layer responses


def plot_responses(
    data: pd.DataFrame,
    *,
    y: str = "out_rms",
    step: Step = "last",
    order: str = "forward",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Layer responses (``out_rms`` per block), in forward order or sorted by size (He et al. 2016, Fig. 7).

    ``order="sorted"`` plots each model's blocks from the largest response to
    the smallest against their rank.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("abc"), "index": [0, 1, 2], "out_rms": [1.0, 3.0, 2.0]})
    >>> plot_responses(f, order="sorted").get_lines()[0].get_ydata().tolist()
    [3.0, 2.0, 1.0]
    """
    if order not in ("forward", "sorted"):
        raise ValueError(f"order must be 'forward' or 'sorted', got {order!r}")
    frame = _check_frame(data, ["step", "index", y], "plot_responses")
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, [y], "plot_responses")
    if order == "sorted":
        parts = []
        for _, part in rows.groupby("model", sort=False):
            part = part.sort_values(y, ascending=False, kind="stable", na_position="last").copy()
            part["rank"] = np.arange(len(part))
            parts.append(part)
        import pandas as pd

        rows = pd.concat(parts) if parts else rows.assign(rank=[])
    x = "index" if order == "forward" else "rank"
    use_log = _spans_decades(_floats(rows[y]), 30.0)
    dropped = _lines_per_model(ax, rows, x, y, pal, log=use_log)
    _block_xlim(ax, rows[x])
    if use_log:
        _set_scale(ax, "y", True)
    elif not (_floats(rows[y]) < 0).any():
        ax.set_ylim(bottom=0)  # sizes from 0: a zoomed axis would make equal responses look different
    _note_dropped(ax, dropped)
    ax.set_xlabel(LABELS["index"] if order == "forward" else "block rank (sorted by response, largest first)")
    ax.set_ylabel(LABELS.get(y, y) + (" (log scale)" if use_log else ""))
    _integer_ticks(ax)
    if legend and _has_legend(data):
        _legend_outside(ax, title="model")
    return ax


def responses_figure(
    data: pd.DataFrame,
    *,
    y: str = "out_rms",
    step: Step = "last",
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """Layer responses in forward order (left) and sorted by magnitude (right).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("ab"), "index": [0, 1], "out_rms": [1.0, 2.0]})
    >>> len(responses_figure(f).axes)
    2
    """
    frame = _check_frame(data, ["step", "index", y], "responses_figure")
    models = _models(frame)
    pal = _resolve_palette(models, palette)
    fig, axes = _new_figure(1, 2, size=(9.6, 3.4), sharey=True)
    plot_responses(frame, y=y, step=step, order="forward", palette=pal, legend=False, ax=axes[0, 0])
    plot_responses(frame, y=y, step=step, order="sorted", palette=pal, legend=False, ax=axes[0, 1])
    axes[0, 0].set_title("forward order")
    axes[0, 1].set_title("sorted by magnitude")
    axes[0, 1].set_ylabel("")
    if _has_legend(data):
        _figure_legend(fig, pal, models)
    return fig


# ----------------------------------------------------------------------------- 7. Jacobians


def plot_jacobian(
    data: pd.DataFrame,
    *,
    columns: Sequence[str] = ("jac_fro", "jac_spec"),
    step: Step = "last",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Jacobian singular values per block against block index: first column solid, second dashed.

    Use ``columns=("prod_fro", "prod_spec")`` for the product of block
    Jacobians from each block to the last block of its stack (one line per stack).
    The step is chosen among the steps where the Jacobian was computed. A dotted line marks 1 (an isometry).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("ab"), "index": [0, 1],
    ...                   "jac_fro": [1.0, 1.2], "jac_spec": [2.0, 3.0]})
    >>> len(plot_jacobian(f).get_lines())  # two columns and the reference line at 1
    3
    """
    from matplotlib.lines import Line2D

    if not 1 <= len(columns) <= 2:
        raise ValueError(f"plot_jacobian draws one or two columns (solid, dashed), got {list(columns)}")
    frame = _check_frame(data, ["step", "index", *columns], "plot_jacobian")
    if not any(np.isfinite(_floats(frame[c])).any() for c in columns):
        raise ValueError(
            f"plot_jacobian: {list(columns)} are NaN everywhere; record them with "
            "gradprobe.attach(..., jacobian=True) or gradprobe.analyze(...)."
        )
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, list(columns), "plot_jacobian")
    values = np.concatenate([_floats(rows[c]) for c in columns])
    use_log = _spans_decades(values, 10.0)
    dropped: Counter[str] = Counter()
    styles: list[tuple[Any, str]] = [("-", "o"), ("--", "x")]
    for column, (linestyle, marker) in zip(columns, styles, strict=False):
        dropped += _lines_per_model(
            ax, rows, "index", column, pal, log=use_log, linestyle=linestyle, marker=marker
        )
    _block_xlim(ax, rows["index"])
    _reference_line(ax, 1.0)
    if use_log:
        _set_scale(ax, "y", True)
    _note_dropped(ax, dropped)
    ax.set_xlabel(LABELS["index"])
    product = all(c.startswith("prod") for c in columns)
    ax.set_ylabel(("product Jacobian" if product else "block Jacobian") + " singular value")
    _integer_ticks(ax)
    if legend:
        handles = [
            Line2D([], [], color="0.2", linestyle=ls, marker=mk, markersize=3, label=LABELS.get(c, c))
            for c, (ls, mk) in zip(columns, styles, strict=False)
        ]
        if _has_legend(data):
            handles = [
                Line2D([], [], color=pal[m], marker="o", markersize=4, label=_text(m)) for m in _models(frame)
            ] + handles
        _legend_outside(ax, handles=handles)
    return ax


def plot_spectrum(
    values: Any,
    *,
    bins: int = 40,
    log: bool | str = "auto",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Histogram of singular values (e.g. from ``gradprobe.spectrum``) with a dotted line at 1.

    ``values`` is an array of singular values, or a mapping name -> array to
    overlay several (step outlines, coloured like the models of the same name).
    ``log="auto"`` bins on a log axis when the values span more than a decade.

    >>> import numpy as np
    >>> ax = plot_spectrum(np.array([0.5, 1.0, 1.0, 2.0]))
    >>> ax.get_xlabel()
    'singular value'
    """
    if isinstance(values, Mapping):
        named = {str(k): np.asarray(v, dtype="float64").ravel() for k, v in values.items()}
    else:
        named = {"": np.asarray(values, dtype="float64").ravel()}
    if not named or all(v.size == 0 for v in named.values()):
        raise ValueError("plot_spectrum: no singular values to draw (the array is empty)")
    ax = _own_axes(ax)
    everything = np.concatenate(list(named.values()))
    use_log = _spans_decades(everything, 10.0) if log == "auto" else bool(log)
    shown = everything[np.isfinite(everything) & ((everything > 0) if use_log else True)]
    if shown.size == 0:
        raise ValueError("plot_spectrum: no finite (and, on a log axis, positive) singular value to draw")
    lo, hi = float(shown.min()), float(shown.max())
    if use_log:
        edges = np.geomspace(lo, hi * 1.0001, bins + 1)
    else:
        pad = 0.5 if hi == lo else 0.0
        edges = np.linspace(lo - pad, hi + pad + 1e-12, bins + 1)
    pal = _resolve_palette([k for k in named if k], palette) if any(named) else {}
    dropped: Counter[str] = Counter()
    for name, vals in named.items():
        ok = np.isfinite(vals) & ((vals > 0) if use_log else True)
        dropped["infinite"] += int(np.isinf(vals).sum())
        dropped["zero or negative"] += int((np.isfinite(vals) & (vals <= 0)).sum()) if use_log else 0
        if len(named) == 1:
            ax.hist(vals[ok], bins=edges.tolist(), color=pal.get(name, (0.0, 0.45, 0.70)), alpha=0.8)
        else:
            ax.hist(
                vals[ok],
                bins=edges.tolist(),
                histtype="step",
                linewidth=1.5,
                color=pal[name],
                label=_text(name),
            )
    _reference_line(ax, 1.0, horizontal=False)
    if use_log:
        _set_scale(ax, "x", True)
    _note_dropped(ax, dropped)
    ax.set_xlabel("singular value")
    ax.set_ylabel("count")
    if legend and len(named) > 1:
        _legend_outside(ax)
    return ax


def jacobian_figure(
    data: pd.DataFrame,
    *,
    step: Step = "last",
    spectrum: Any = None,
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """Block Jacobians and products of Jacobians against block index, plus an optional spectrum histogram.

    Panels whose columns are all NaN are left out; ``spectrum`` is passed to
    :func:`plot_spectrum`.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("ab"), "index": [0, 1], "jac_fro": [1.0, 1.2],
    ...                   "jac_spec": [2.0, 3.0], "prod_fro": [1.5, 1.2], "prod_spec": [4.0, 3.0]})
    >>> len(jacobian_figure(f).axes)
    2
    """
    from matplotlib.lines import Line2D

    frame = _check_frame(data, ["step", "index"], "jacobian_figure")
    groups = [
        cols
        for cols in (("jac_fro", "jac_spec"), ("prod_fro", "prod_spec"))
        if all(c in frame.columns for c in cols) and any(np.isfinite(_floats(frame[c])).any() for c in cols)
    ]
    if not groups and spectrum is None:
        raise ValueError(
            "jacobian_figure: the frame has no Jacobian values (jac_*/prod_* are NaN or absent) and no "
            "spectrum was given; record them with gradprobe.attach(..., jacobian=True)."
        )
    models = _models(frame)
    pal = _resolve_palette(models, palette)
    n = len(groups) + (spectrum is not None)
    fig, axes = _new_figure(1, n, size=(min(3.6 * n + 1.9, _MAX_WIDTH), 3.4))
    for ax, cols in zip(axes[0], groups, strict=False):
        plot_jacobian(frame, columns=cols, step=step, palette=pal, legend=False, ax=ax)
        ax.set_title("each block" if cols[0] == "jac_fro" else "product from the block to the output")
    names = list(models) if _has_legend(data) and groups else []
    if spectrum is not None:
        ax = axes[0, -1]
        if isinstance(spectrum, Mapping):
            names += [str(k) for k in spectrum if str(k) not in names]
        pal = _resolve_palette(names or models, pal)
        plot_spectrum(spectrum, palette=pal, legend=False, ax=ax)
        ax.set_title("singular value spectrum")
    handles = [Line2D([], [], color=pal[m], marker="o", markersize=4, label=_text(m)) for m in names]
    if groups:
        handles += [
            Line2D([], [], color="0.2", marker="o", markersize=3, label="RMS singular value"),
            Line2D(
                [], [], color="0.2", linestyle="--", marker="x", markersize=3, label="largest singular value"
            ),
        ]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return fig


# ----------------------------------------------------------------------------- 8. signal propagation
#: The three panels of a signal propagation plot (Brock, De and Smith, ICLR 2021).
SIGNAL_PANELS: tuple[tuple[str, str], ...] = (
    ("chan_mean_sq", "average squared channel mean"),
    ("chan_var", "average channel variance"),
    ("branch_var", "residual branch variance"),
)


def _hue_frame(data: Any, columns: Sequence[str], hue: str, where: str) -> tuple[pd.DataFrame, bool]:
    """The frame with ``hue``'s values as its ``model`` column (what the line helpers colour by)."""
    if hue != "model" and hasattr(data, "columns") and hue in data.columns:
        data = data.assign(model=data[hue].astype(str))
    elif hue != "model" and hasattr(data, "columns"):
        raise ValueError(
            f"{where}: hue={hue!r} is not a column; the frame has {list(map(str, data.columns))}"
        )
    return _check_frame(data, columns, where), "model" in data.columns


def plot_signal_propagation(
    data: pd.DataFrame,
    *,
    step: Step = 0,
    hue: str = "model",
    palette: Mapping[str, Any] | str | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> Axes:
    """Signal propagation plot (Brock et al. 2021): per block, at ``step`` (default 0, initialisation),
    the average squared channel mean, the average channel variance of the block output and the
    variance of the residual branch, against block depth, one line per ``hue`` value.

    Draws three panels side by side in a new figure, or into the three Axes given as ``ax``;
    returns the first panel's Axes (``ax.figure`` holds all three). The y axes are logarithmic
    when a panel spans more than a factor 30.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("ab"), "index": [0, 1], "chan_mean_sq": [0.3, 0.6],
    ...                   "chan_var": [0.7, 1.4], "branch_var": [1.0, 1.0]})
    >>> [a.get_title() for a in plot_signal_propagation(f).figure.axes]
    ['average squared channel mean', 'average channel variance', 'residual branch variance']
    """
    columns = [c for c, _ in SIGNAL_PANELS]
    frame, legend = _hue_frame(data, ["step", "index", *columns], hue, "plot_signal_propagation")
    pal = _resolve_palette(_models(frame), palette)
    if ax is None:
        _, grid = _new_figure(1, 3, size=(_MAX_WIDTH, 3.2))
        axes = list(grid[0])
    else:
        axes = list(ax) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
        if len(axes) != 3:
            raise ValueError(f"plot_signal_propagation: ax must be None or three Axes, got {len(axes)}")
    rows = _pick_steps(frame, step, columns, "plot_signal_propagation")
    for panel, (column, title) in zip(axes, SIGNAL_PANELS, strict=True):
        use_log = _spans_decades(_floats(rows[column]), 30.0)
        dropped = _lines_per_model(panel, rows, "index", column, pal, log=use_log)
        _block_xlim(panel, rows["index"])
        if use_log:
            _set_scale(panel, "y", True)
        elif not (_floats(rows[column]) < 0).any():
            panel.set_ylim(bottom=0)
        _note_dropped(panel, dropped)
        panel.set_title(title)
        panel.set_xlabel("block depth (index)")
        _integer_ticks(panel)
    if legend and len(rows):
        _legend_outside(axes[-1], title=hue)
    return axes[0]


# ----------------------------------------------------------------------------- 9. path lengths
def plot_path_lengths(
    data: pd.DataFrame,
    *,
    steps: Sequence[Step] = ("first", "last"),
    stack: str | int | None = None,
    hue: str = "model",
    palette: Mapping[str, Any] | str | None = None,
    reference: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Gradient by path length (Veit et al. 2016, Fig. 6): ``share`` against path length k, one line
    per model and step (dashed: the first of ``steps``, solid: the others), from a paths frame
    (``gradprobe.paths``, ``probe.paths_frame()``, ``run.paths()``).

    ``stack``: which stack, by name as in the frame (default: each model's stack with the most
    branching blocks). With ``reference``, the binomial distribution of the number of paths,
    C(L, k) / 2^L, is drawn in faint grey for each distinct L: what the shares would be if every
    path carried the same gradient.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "stack": 0, "length": [0, 1, 2], "share": [0.5, 0.4, 0.1],
    ...                   "n_paths": [1.0, 2.0, 1.0]})
    >>> len(plot_path_lengths(f).get_lines())
    2
    """
    import pandas as pd

    cols = ["length", "share", "n_paths"]
    if "step" not in getattr(data, "columns", []):
        data = data.assign(step=0) if isinstance(data, pd.DataFrame) else data
    frame, legend = _hue_frame(data, ["step", *cols], hue, "plot_path_lengths")
    if "stack" not in frame.columns:
        frame["stack"] = 0
    pal = _resolve_palette(_models(frame), palette)
    ax = _own_axes(ax)
    seen_l: set[int] = set()
    drawn = 0
    for model, rows in frame.groupby("model", sort=False):
        if stack is None:  # the stack with the most branching blocks (n_paths at k = 1 is L)
            per_stack = rows[rows["length"] == 1].groupby("stack", sort=False)["n_paths"].max()
            chosen = cast(Any, per_stack.idxmax()) if len(per_stack) else rows["stack"].iloc[0]
        else:
            chosen = stack
        rows = rows[rows["stack"] == chosen]
        recorded = sorted(set(rows["step"].tolist()))
        if not recorded:
            continue
        wanted: list[int] = []
        for s in steps:
            value = recorded[0] if s == "first" else recorded[-1] if s == "last" else int(s)
            if value in recorded and value not in wanted:
                wanted.append(value)
        for i, value in enumerate(wanted):
            part = rows[rows["step"] == value].sort_values("length")
            style = "--" if i == 0 and len(wanted) > 1 else "-"
            ax.plot(
                _floats(part["length"]),
                _floats(part["share"]),
                linestyle=style,
                marker="o",
                markersize=3,
                linewidth=1.4,
                color=pal[str(model)],
                label=f"{_text(model)}, step {value}",
            )
            drawn += 1
            at_one = part.loc[part["length"] == 1, "n_paths"].tolist()
            if at_one:
                seen_l.add(int(at_one[0]))
    if reference:
        for depth in sorted(seen_l):
            k = np.arange(depth + 1)
            ax.plot(
                k,
                [math.comb(depth, int(i)) / 2.0**depth for i in k],
                color="0.6",
                alpha=0.5,
                linewidth=1.0,
                zorder=1,
                label=f"path count C({depth}, k) / 2^{depth}",
            )
    ax.set_xlabel("path length k (branches taken)")
    ax.set_ylabel("share of the gradient |c_k| / sum |c_j|")
    ax.set_ylim(bottom=0)
    _integer_ticks(ax)
    if drawn and (legend or reference):
        _legend_outside(ax, title=hue if legend else None)
    return ax
