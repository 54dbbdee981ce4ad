"""Jacobians and spectra: singular values of block Jacobians, their products, histograms."""

from __future__ import annotations

from collections import Counter
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
    _floats,
    _has_legend,
    _legend_outside,
    _lines_per_model,
    _models,
    _new_figure,
    _note_dropped,
    _own_axes,
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
    frame, x = _depth_x(frame)
    if not any(np.isfinite(_floats(frame[c])).any() for c in columns):
        raise ValueError(
            f"plot_jacobian: {list(columns)} are NaN everywhere; record them with "
            "gradprobe.attach(..., jacobian=True) or gradprobe.analyze(...)."
        )
    pal = _resolve_palette(frame, palette)
    ax = _own_axes(ax)
    rows = _pick_steps(frame, step, list(columns), "plot_jacobian")
    values = np.concatenate([_floats(rows[c]) for c in columns])
    use_log = _spans_decades(values, 10.0)
    dropped: Counter[str] = Counter()
    styles: list[tuple[Any, str]] = [("-", "o"), ("--", "x")]
    for column, (linestyle, marker) in zip(columns, styles, strict=False):
        dropped += _lines_per_model(ax, rows, x, column, pal, log=use_log, linestyle=linestyle, marker=marker)
    _reference_line(ax, 1.0)
    if use_log:
        _set_scale(ax, "y", True)
    _note_dropped(ax, dropped)
    _depth_axis(ax, rows[x], x)
    product = all(c.startswith("prod") for c in columns)
    ax.set_ylabel(("product Jacobian" if product else "block Jacobian") + " singular value")
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
    pal = _resolve_palette(frame, palette)
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
