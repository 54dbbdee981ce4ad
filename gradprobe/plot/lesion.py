"""Block lesions (Veit, Wilber and Belongie 2016): accuracy with one block, and k random blocks, deleted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._style import (
    _check_frame,
    _figure_legend,
    _floats,
    _has_legend,
    _integer_ticks,
    _legend_outside,
    _models,
    _new_figure,
    _note,
    _own_axes,
    _resolve_palette,
    _text,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The figures' labels of the lesion metrics.
_LESION_LABELS = {"acc": "test accuracy", "loss": "test loss"}


def plot_lesion(
    data: pd.DataFrame,
    *,
    y: str = "acc",
    kind: str = "single",
    palette: Mapping[str, Any] | str | None = None,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """A lesion frame (:func:`gradprobe.lesion`) drawn per model.

    ``kind="single"``: ``y`` with each block deleted, against the block's position, the intact
    model's value as a dotted line; downsampling blocks are hollow markers, blocks that cannot
    be removed are left out (counted in a note). ``kind="random"``: the mean of ``y`` over the
    random subsets against the number k of deleted blocks (k = 0: intact), with a band of one
    standard deviation.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"kind": ["none", "single", "single"], "k": [0, 1, 1], "position": [-1, 0, 1],
    ...                   "downsampling": [False, False, True], "removable": [True, True, True],
    ...                   "acc": [0.9, 0.88, 0.5], "acc_std": [float("nan")] * 3})
    >>> plot_lesion(t).get_lines()[0].get_ydata().tolist()
    [0.88, 0.5]
    """
    if kind not in ("single", "random"):
        raise ValueError(f"kind must be 'single' or 'random', got {kind!r}")
    frame = _check_frame(data, ["kind", "k", y], "plot_lesion")
    pal = _resolve_palette(frame, palette)
    ax = _own_axes(ax)
    left_out = 0
    for model in _models(frame):
        part = frame[frame["model"] == model]
        colour = pal[model]
        base = _floats(part.loc[part["kind"] == "none", y])
        if kind == "single":
            rows = part[part["kind"] == "single"].sort_values("position", kind="stable")
            values = _floats(rows[y])
            left_out += int(np.isnan(values).sum())
            xs = _floats(rows["position"])
            ax.plot(xs, values, color=colour, marker="o", markersize=4, label=_text(model))
            if "downsampling" in rows.columns:
                down = rows["downsampling"].to_numpy(dtype=bool)
                ax.plot(
                    xs[down], values[down], linestyle="none", marker="o", markersize=9,
                    markerfacecolor="none", markeredgecolor=colour,
                )  # fmt: skip
            if base.size:
                ax.axhline(base[0], color=colour, linestyle=":", linewidth=1.0, zorder=1)
        else:
            rows = part[part["kind"].isin(["none", "random"])].sort_values("k", kind="stable")
            ks, values = _floats(rows["k"]), _floats(rows[y])
            spread = _floats(rows[f"{y}_std"]) if f"{y}_std" in rows.columns else np.zeros_like(values)
            spread = np.where(np.isnan(spread), 0.0, spread)
            ax.plot(ks, values, color=colour, marker="o", markersize=4, label=_text(model))
            ax.fill_between(ks, values - spread, values + spread, color=colour, alpha=0.2, linewidth=0)
    label = _LESION_LABELS.get(y, y)
    if kind == "single":
        ax.set_xlabel("deleted block (position; hollow ring: downsampling)")
        ax.set_ylabel(f"{label}, one block deleted")
        if left_out:
            _note(ax, f"{left_out} block(s) cannot be removed (no shortcut)")
    else:
        ax.set_xlabel("blocks deleted at random (k)")
        ax.set_ylabel(f"{label} (mean ± sd)")
        _integer_ticks(ax)
    if legend and _has_legend(frame):
        _legend_outside(ax, title="model")
    return ax


def lesion_figure(
    data: pd.DataFrame, *, y: str = "acc", palette: Mapping[str, Any] | str | None = None
) -> Figure:
    """Two panels of :func:`plot_lesion`: single deletions (left) and k random deletions (right)."""
    frame = _check_frame(data, ["kind", "k", y], "lesion_figure")
    pal = _resolve_palette(frame, palette)
    fig, axes = _new_figure(1, 2, size=(11.0, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    plot_lesion(frame, y=y, kind="single", palette=pal, legend=False, ax=axes[0, 0])
    plot_lesion(frame, y=y, kind="random", palette=pal, legend=False, ax=axes[0, 1])
    if _has_legend(data):
        _figure_legend(fig, pal, _models(frame))
    return fig
