"""Training curves: loss and accuracy per model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._style import (
    ACCURACY_COLUMNS,
    LABELS,
    LOSS_COLUMNS,
    _check_frame,
    _drawable,
    _figure_legend,
    _floats,
    _has_legend,
    _legend_outside,
    _models,
    _new_figure,
    _note_dropped,
    _own_axes,
    _resolve_palette,
    _set_scale,
    _text,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    pal = _resolve_palette(frame, palette)
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
    pal = _resolve_palette(frame, palette)
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
    pal = _resolve_palette(frame, palette)
    fig, axes = _new_figure(1, len(panels), size=(4.2 * len(panels) + 1.5, 3.4))
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            plot_loss(frame, x=x, y=loss_col, palette=pal, legend=False, ax=ax)
        else:
            plot_accuracy(frame, x=x, y=acc_col, palette=pal, legend=False, ax=ax)
    if _has_legend(scalars):
        _figure_legend(fig, pal, models)
    return fig
