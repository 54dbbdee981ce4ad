"""Paths and signal: layer responses, signal propagation, gradient by path length."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ._style import (
    _MAX_WIDTH,
    LABELS,
    Step,
    _block_xlim,
    _check_frame,
    _depth_axis,
    _depth_x,
    _figure_legend,
    _floats,
    _has_legend,
    _hue_frame,
    _integer_ticks,
    _legend_outside,
    _lines_per_model,
    _models,
    _new_figure,
    _note_dropped,
    _own_axes,
    _panel_order,
    _pick_steps,
    _resolve_palette,
    _set_scale,
    _spans_decades,
    _text,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    the smallest against their rank (relative rank, 0 to 1, when the models differ in block count).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": list("abc"), "index": [0, 1, 2], "out_rms": [1.0, 3.0, 2.0]})
    >>> plot_responses(f, order="sorted").get_lines()[0].get_ydata().tolist()
    [3.0, 2.0, 1.0]
    """
    if order not in ("forward", "sorted"):
        raise ValueError(f"order must be 'forward' or 'sorted', got {order!r}")
    frame = _check_frame(data, ["step", "index", y], "plot_responses")
    frame, depth_x = _depth_x(frame)
    pal = _resolve_palette(frame, palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, [y], "plot_responses")
    if order == "sorted":
        parts = []
        for _, part in rows.groupby("model", sort=False):
            part = part.sort_values(y, ascending=False, kind="stable", na_position="last").copy()
            part["rank"] = np.arange(len(part), dtype="float64")
            if depth_x == "position":  # models of different depths: rank relative to the block count
                part["rank"] /= max(len(part) - 1, 1)
            parts.append(part)
        import pandas as pd

        rows = pd.concat(parts) if parts else rows.assign(rank=[])
    x = depth_x if order == "forward" else "rank"
    use_log = _spans_decades(_floats(rows[y]), 30.0)
    dropped = _lines_per_model(ax, rows, x, y, pal, log=use_log)
    if use_log:
        _set_scale(ax, "y", True)
    elif not (_floats(rows[y]) < 0).any():
        ax.set_ylim(bottom=0)  # sizes from 0: a zoomed axis would make equal responses look different
    _note_dropped(ax, dropped)
    if order == "forward":
        _depth_axis(ax, rows[x], x)
    else:
        if depth_x == "position":
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel("relative rank (0 = largest response, 1 = smallest)")
        else:
            _block_xlim(ax, rows[x])
            _integer_ticks(ax)
            ax.set_xlabel("block rank (sorted by response, largest first)")
    ax.set_ylabel(LABELS.get(y, y) + (" (log scale)" if use_log else ""))
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
    pal = _resolve_palette(frame, palette)
    fig, axes = _new_figure(1, 2, size=(9.6, 3.4), sharey=True)
    plot_responses(frame, y=y, step=step, order="forward", palette=pal, legend=False, ax=axes[0, 0])
    plot_responses(frame, y=y, step=step, order="sorted", palette=pal, legend=False, ax=axes[0, 1])
    axes[0, 0].set_title("forward order")
    axes[0, 1].set_title("sorted by magnitude")
    axes[0, 1].set_ylabel("")
    if _has_legend(data):
        _figure_legend(fig, pal, models)
    return fig


# ----------------------------------------------------------------------------- 8. signal propagation
#: The three panels of a signal propagation plot (Brock, De and Smith, ICLR 2021).
SIGNAL_PANELS: tuple[tuple[str, str], ...] = (
    ("chan_mean_sq", "average squared channel mean"),
    ("chan_var", "average channel variance"),
    ("branch_var", "residual branch variance"),
)


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
    frame, x = _depth_x(frame)
    pal = _resolve_palette(frame, palette)
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
        dropped = _lines_per_model(panel, rows, x, column, pal, log=use_log)
        if use_log:
            _set_scale(panel, "y", True)
        elif not (_floats(rows[column]) < 0).any():
            panel.set_ylim(bottom=0)
        _note_dropped(panel, dropped)
        panel.set_title(title)
        _depth_axis(panel, rows[x], x)
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
    C(L, k) / 2^L, is drawn dotted in grey for each distinct L (labelled with L when there are
    several): what the shares would be if every path carried the same gradient. The legend names
    the models, the two line styles and the reference once each.

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
    pal = _resolve_palette(frame, palette)
    ax = _own_axes(ax)
    seen_l: set[int] = set()
    drawn = steps_shown = 0
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
        steps_shown = max(steps_shown, len(wanted))
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
            share = np.array([math.comb(depth, int(i)) / 2.0**depth for i in k])
            ax.plot(k, share, color="0.45", linestyle=":", linewidth=1.2, zorder=1)
            if len(seen_l) > 1:  # several references: each is labelled with its L at its peak
                ax.annotate(
                    f"L={depth}",
                    (depth / 2, float(share.max())),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize=7,
                    color="0.35",
                )
    ax.set_xlabel("path length k (branches taken)")
    ax.set_ylabel("share of the gradient |c_k| / sum |c_j|")
    ax.set_ylim(bottom=0)
    _integer_ticks(ax)
    if drawn and (legend or reference):
        _legend_outside(ax, handles=_path_legend(pal if legend else {}, reference, steps_shown))
    return ax


def _path_legend(palette: Mapping[str, Any], reference: bool, steps_shown: int) -> list[Any]:
    """Legend handles: one per model, the two step styles, the reference once."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", markersize=4, label=_text(m)) for m, c in palette.items()]
    if steps_shown > 1:
        handles += [
            Line2D([], [], color="0.2", linestyle="--", label="first decomposed step"),
            Line2D([], [], color="0.2", label="last decomposed step"),
        ]
    if reference:
        handles.append(Line2D([], [], color="0.45", linestyle=":", label="path count C(L, k) / 2^L"))
    return handles


def path_lengths_figure(
    data: pd.DataFrame,
    *,
    steps: Sequence[Step] = ("first", "last"),
    palette: Mapping[str, Any] | str | None = None,
) -> Figure:
    """:func:`plot_path_lengths` with one panel per model (shared axes), plain left of residual,
    each with the path-count reference of its own number of branching blocks L.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "step": 0, "stack": 0, "length": [0, 1, 2] * 2,
    ...                   "share": [0.5, 0.4, 0.1, 0.2, 0.5, 0.3], "n_paths": [1.0, 2.0, 1.0] * 2})
    >>> len(path_lengths_figure(f).axes)
    2
    """
    import pandas as pd

    if "step" not in getattr(data, "columns", []):
        data = data.assign(step=0) if isinstance(data, pd.DataFrame) else data
    frame = _check_frame(data, ["step", "length", "share", "n_paths"], "path_lengths_figure")
    models, ncols = _panel_order(frame, _models(frame))
    pal = _resolve_palette(frame, palette)
    nrows = math.ceil(len(models) / ncols)
    fig, axes = _new_figure(
        nrows, ncols, size=(min(3.4 * ncols + 2.0, _MAX_WIDTH), 2.5 * nrows + 0.4), sharex="row", sharey=True
    )
    flat = axes.ravel()
    steps_shown = 0
    for i, (ax, model) in enumerate(zip(flat, models, strict=False)):
        part = frame[frame["model"] == model]
        plot_path_lengths(part, steps=steps, palette=pal, ax=ax)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        steps_shown = max(steps_shown, len({ln.get_linestyle() for ln in ax.get_lines()} - {":"}))
        ax.set_title(_text(model), color=pal[model], fontweight="bold")
        if i % ncols:
            ax.set_ylabel("")
        if i < len(models) - ncols:
            ax.set_xlabel("")
    for ax in flat[len(models) :]:
        ax.set_visible(False)
    fig.legend(handles=_path_legend({}, True, steps_shown), loc="outside right upper", frameon=False)
    return fig
