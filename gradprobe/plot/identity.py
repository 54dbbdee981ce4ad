"""Distance from identity: a metric of every block over training steps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ._style import (
    _MAX_WIDTH,
    LABELS,
    _check_frame,
    _drawable,
    _floats,
    _integer_ticks,
    _models,
    _new_figure,
    _note_dropped,
    _own_axes,
    _panel_order,
    _resolve_palette,
    _set_scale,
    _set_symlog,
    _text,
    _zero_aware_scale,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    pal = _resolve_palette(frame, palette)
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
