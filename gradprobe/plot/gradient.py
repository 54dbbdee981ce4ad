"""Gradient flow: the gradient highway, block gains over training, skip versus branch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._style import (
    _MAX_WIDTH,
    LABELS,
    Step,
    _check_frame,
    _depth_axis,
    _depth_x,
    _figure_legend,
    _floats,
    _has_legend,
    _integer_ticks,
    _legend_outside,
    _lines_per_model,
    _models,
    _new_figure,
    _note_dropped,
    _own_axes,
    _panel_order,
    _pick_steps,
    _reference_line,
    _resolve_palette,
    _set_scale,
    _spans_decades,
    _text,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# ----------------------------------------------------------------------------- 1. gradient highway


def plot_highway(
    data: pd.DataFrame,
    *,
    x: str = "auto",
    y: str = "cum_gain",
    step: Step = "last",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """The gradient highway: ``cum_gain`` (log axis) against block index, one line per model
    and stack (an encoder and a decoder are drawn as two lines, each ending at its own last block).

    ``cum_gain`` is a block's grad_in over grad_out of its stack's last block, so a
    flat line at 1 is a perfect highway; a line falling towards the input
    means vanishing gradients, rising means exploding. ``step`` is "first",
    "last" or a step number (per model). ``x="auto"`` draws against block index, or against
    relative depth (0 = first block, 1 = last) when the models have different numbers of blocks.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": ["a", "b"], "index": [0, 1], "cum_gain": [0.01, 0.5]})
    >>> plot_highway(f).get_yscale()
    'log'
    """
    frame = _check_frame(data, ["step", "index" if x == "auto" else x, y], "plot_highway")
    frame, x = _depth_x(frame, x)
    pal = _resolve_palette(frame, palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, [y], "plot_highway")
    dropped = _lines_per_model(ax, rows, x, y, pal, log=True)
    _set_scale(ax, "y", True)
    _reference_line(ax, 1.0)
    _note_dropped(ax, dropped)
    _depth_axis(ax, rows[x], x)
    ax.set_ylabel(LABELS.get(y, y) + " (log scale)")
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
    pal = _resolve_palette(frame, palette)
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
    pal = _resolve_palette(frame, palette)
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
    frame, x = _depth_x(frame)
    pal = _resolve_palette(frame, palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, [skip, branch], "plot_skip_branch")
    values = np.concatenate([_floats(rows[skip]), _floats(rows[branch])])
    use_log = _spans_decades(values, 10.0)
    dropped = _lines_per_model(ax, rows, x, skip, pal, log=use_log, label_suffix=" skip")
    dropped += _lines_per_model(
        ax, rows, x, branch, pal, log=use_log, linestyle="--", marker="x", label_suffix=" branch"
    )
    if use_log:
        _set_scale(ax, "y", True)
    _note_dropped(ax, dropped)
    _depth_axis(ax, rows[x], x)
    ax.set_ylabel("gradient norm" + (" (log scale)" if use_log else ""))
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
    pal = _resolve_palette(frame, palette)
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
