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

from ._style import (
    ACCURACY_COLUMNS,
    LABELS,
    LOSS_COLUMNS,
    SINGLE_MODEL,
    has_jacobian,
    model_palette,
    offscreen,
)
from .gradient import (
    gain_heatmaps,
    highway_figure,
    plot_gain_heatmap,
    plot_highway,
    plot_skip_branch,
    skip_branch_figure,
)
from .identity import identity_figure, plot_over_steps
from .jacobian import jacobian_figure, plot_jacobian, plot_spectrum
from .lesion import lesion_figure, plot_lesion
from .paths import (
    SIGNAL_PANELS,
    path_lengths_figure,
    plot_path_lengths,
    plot_responses,
    plot_signal_propagation,
    responses_figure,
)
from .training import accuracy_column, loss_column, plot_accuracy, plot_loss, training_figure

__all__ = [
    "ACCURACY_COLUMNS",
    "LABELS",
    "LOSS_COLUMNS",
    "SIGNAL_PANELS",
    "SINGLE_MODEL",
    "accuracy_column",
    "gain_heatmaps",
    "has_jacobian",
    "highway_figure",
    "identity_figure",
    "jacobian_figure",
    "lesion_figure",
    "loss_column",
    "model_palette",
    "offscreen",
    "path_lengths_figure",
    "plot_accuracy",
    "plot_gain_heatmap",
    "plot_highway",
    "plot_jacobian",
    "plot_lesion",
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
