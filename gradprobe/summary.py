"""The per-model summary of a run: one row per model, the numbers that tell its story.

:func:`summary` is the one definition behind every summary gradprobe shows: the
table ``gradprobe compare`` prints, the summary table of the HTML report and the
text the pytest plugin adds to a failing test. It reads only tables (the block
frame, the scalars and the path-length table of a :class:`~gradprobe.records.Run`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GAIN_BAND", "summary"]

#: Default band for the block gain: blocks whose gain leaves it at some step are counted.
GAIN_BAND: tuple[float, float] = (0.5, 2.0)


def _finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype="float64")
    return arr[~np.isnan(arr)]


def _last(values: Any) -> float:
    arr = _finite(values)
    return float(arr[-1]) if arr.size else math.nan


def _train_loss(logged: pd.DataFrame, column: str | None) -> float:
    """Mean loss over the last epoch (one batch's loss is noisy); the last value logged without epochs."""
    if column is None:
        return math.nan
    if "epoch" in logged.columns and logged["epoch"].notna().any():
        last = _finite(logged[logged["epoch"] == logged["epoch"].max()][column])
        if last.size:
            return float(last.mean())
    return _last(logged[column])


def _main_stack(part: pd.DataFrame) -> pd.DataFrame:
    """The rows of the stack with the most blocks (the first such stack on ties)."""
    if "stack" not in part.columns or part["stack"].nunique(dropna=False) <= 1:
        return part
    stacks = part.groupby("stack", sort=False, dropna=False)
    sizes = stacks["block"].nunique().to_dict()
    first_index = stacks["index"].min().to_dict()
    main = max(sizes, key=lambda s: (sizes[s], -first_index[s]))
    return part[part["stack"] == main]


def _at(part: pd.DataFrame, step: Any, column: str) -> np.ndarray:
    if column not in part.columns or step is None:
        return np.array([])
    return part.loc[part["step"] == step, column].to_numpy(dtype="float64")


def _band(values: np.ndarray) -> tuple[float, float]:
    arr = values[~np.isnan(values)]
    return (float(arr.min()), float(arr.max())) if arr.size else (math.nan, math.nan)


def _effective_lengths(paths: pd.DataFrame | None, model: str) -> dict[str, float]:
    """``effective_length`` of the model's stack with the most branching blocks, first and last step."""
    nan = {"effective_length_init": math.nan, "effective_length_end": math.nan}
    if paths is None or not len(paths):
        return nan
    from .path_lengths import paths_summary as path_summary

    part = paths[paths["model"].astype(str) == model] if "model" in paths.columns else paths
    if not len(part):
        return nan
    lengths = path_summary(part)
    order = [c for c in ("step", "branching") if c in lengths.columns]
    main = lengths.sort_values(order, ascending=[True, False][: len(order)], kind="stable")
    if "step" in main.columns:
        main = main.drop_duplicates("step")  # per step, the stack with the most branching blocks
    return {
        "effective_length_init": float(main["effective_length"].iloc[0]),
        "effective_length_end": float(main["effective_length"].iloc[-1]),
    }


def _model_row(
    model: str, part: pd.DataFrame, logged: pd.DataFrame, columns: tuple[str | None, str | None], band: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model}
    for extra in ("depth", "residual"):
        if extra in part.columns and len(part):
            row[extra] = part[extra].iloc[0]
    row["blocks"] = int(part["block"].nunique()) if "block" in part.columns else 0
    row["steps"] = int(part["step"].nunique()) if "step" in part.columns else 0
    row["train_loss"] = _train_loss(logged, columns[0])
    row["test_acc"] = _last(logged[columns[1]]) if columns[1] is not None else math.nan
    steps = sorted(part["step"].unique().tolist()) if len(part) else []
    ends = (("init", steps[0] if steps else None), ("end", steps[-1] if steps else None))
    main = _main_stack(part)
    first_block = main[main["index"] == main["index"].min()] if len(main) else main
    identity = part[part["skip_grad"].notna()] if "skip_grad" in part.columns else part
    for tag, step in ends:
        first = _at(first_block, step, "cum_gain")
        row[f"cum_gain_{tag}"] = float(first[0]) if first.size else math.nan
        row[f"cum_gain_min_{tag}"], row[f"cum_gain_max_{tag}"] = _band(_at(part, step, "cum_gain"))
        ratio = _at(identity, step, "res_ratio")
        row[f"res_ratio_{tag}"] = float(ratio.max()) if ratio.size else math.nan
    names: list[str] = []
    if "gain" in part.columns:
        gain = part["gain"].to_numpy(dtype="float64")
        outside = part[(gain < band[0]) | (gain > band[1])]  # NaN compares False: unmeasured is not "outside"
        names = list(dict.fromkeys(outside["block"].astype(str).tolist()))
    row["gain_outside"] = len(names)
    row["gain_outside_blocks"] = ", ".join(names)
    ratio = part["res_ratio"].to_numpy(dtype="float64") if "res_ratio" in part.columns else np.array([])
    if ratio.size and not np.isnan(ratio).all():
        at_max = int(np.nanargmax(ratio))
        row["max_res_ratio"] = float(ratio[at_max])
        row["max_res_ratio_block"] = str(part["block"].iloc[at_max])
    else:
        row["max_res_ratio"], row["max_res_ratio_block"] = math.nan, ""
    return row


def summary(
    frame: pd.DataFrame,
    scalars: pd.DataFrame | None = None,
    paths: pd.DataFrame | None = None,
    *,
    band: tuple[float, float] = GAIN_BAND,
    lesion: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per model of a block frame (with its scalars and path-length table, when given).

    Columns (``depth`` and ``residual`` only when the frame has them):

    - ``model``, ``depth``, ``residual``; ``blocks`` and ``steps`` (how many were recorded);
    - ``train_loss``: the mean training loss (``train_loss``, else ``loss``) over the last
      epoch when ``scalars`` has an ``epoch`` column, else the last value logged;
      ``test_acc``: the last accuracy logged (``test_acc``, ``acc``, ...);
    - ``cum_gain_init``, ``cum_gain_end``: ``cum_gain`` of the first block of the model's main
      stack (the one with the most blocks) at the first and the last recorded step: how much the
      gradient reaching the input end is amplified (>1) or shrunk (<1) relative to the output end;
    - ``cum_gain_min_init`` ... ``cum_gain_max_end``: the band of ``cum_gain`` over every block
      (of every stack) at those two steps;
    - ``res_ratio_init``, ``res_ratio_end``: the largest ``res_ratio`` over the shape-preserving
      blocks (those with a ``skip_grad``; every block without that column) at the two steps;
      0 means each of them is exactly the identity;
    - ``effective_length_init``, ``effective_length_end``: the share-weighted mean path length of
      the gradient (:func:`gradprobe.paths`) of the stack with the most branching blocks, at the
      first and the last step of ``paths``; NaN without a decomposition;
    - ``gain_outside`` and ``gain_outside_blocks``: how many blocks had a ``gain`` outside
      ``band`` at some recorded step, and their names;
    - ``max_res_ratio`` and ``max_res_ratio_block``: the largest ``res_ratio`` of any block and step;
    - with a ``lesion`` table (:func:`gradprobe.lesion`, with a ``model`` column for several
      models): ``lesion_worst_drop`` and ``lesion_worst_block``, the largest test-accuracy drop
      of a single block deletion and its block, and ``lesion_median_drop``, the median drop over
      the removable blocks that keep the shape (NaN where the model has no lesion rows).

    Missing values are NaN. A frame without a ``model`` column is one model, ``"run"``.

    >>> import pandas as pd
    >>> frame = pd.DataFrame({"step": [0, 0, 5, 5], "block": ["a", "b"] * 2, "index": [0, 1] * 2,
    ...                       "gain": [0.25, 1.0, 1.0, 1.0], "cum_gain": [0.25, 1.0, 0.8, 1.0],
    ...                       "res_ratio": [0.0, 0.5, 0.1, 0.6]})
    >>> scalars = pd.DataFrame({"step": [0, 5], "loss": [2.0, 1.5]})
    >>> table = summary(frame, scalars)
    >>> table[["model", "train_loss", "cum_gain_init", "cum_gain_end"]].values.tolist()
    [['run', 1.5, 0.25, 0.8]]
    >>> table[["cum_gain_min_init", "cum_gain_max_init", "gain_outside_blocks"]].values.tolist()
    [[0.25, 1.0, 'a']]
    >>> table[["res_ratio_init", "res_ratio_end", "max_res_ratio_block"]].values.tolist()
    [[0.5, 0.6, 'b']]
    """
    import pandas as pd

    from .plot import SINGLE_MODEL, accuracy_column, loss_column

    lo, hi = band
    if not 0 < lo < hi:
        raise ValueError(f"band must be (low, high) with 0 < low < high, got {band}")
    if "model" not in frame.columns:
        frame = frame.assign(model=SINGLE_MODEL)
    scalars = scalars if scalars is not None else pd.DataFrame()
    if "model" not in scalars.columns:
        scalars = scalars.assign(model=SINGLE_MODEL)
    columns = (loss_column(scalars), accuracy_column(scalars)) if len(scalars) else (None, None)
    models = list(dict.fromkeys(frame["model"].astype(str).tolist()))
    models += [m for m in dict.fromkeys(scalars["model"].astype(str).tolist()) if m not in models]
    rows = []
    for model in models:
        part = frame[frame["model"].astype(str) == model]
        if {"step", "index"} <= set(part.columns):
            part = part.sort_values(["step", "index"], kind="stable")
        logged = scalars[scalars["model"].astype(str) == model]
        if "step" in logged.columns:
            logged = logged.sort_values("step", kind="stable")
        row = _model_row(model, part, logged, columns, band)
        row.update(_effective_lengths(paths, model))
        if lesion is not None:
            row.update(lesion_drops(lesion, model))
        rows.append(row)
    return pd.DataFrame(rows)


def lesion_drops(lesion: pd.DataFrame, model: str | None = None) -> dict[str, Any]:
    """``lesion_worst_drop``, ``lesion_worst_block`` and ``lesion_median_drop`` of one model's
    lesion rows (all rows when ``model`` is None or the table has no ``model`` column).

    >>> import pandas as pd
    >>> t = pd.DataFrame({"kind": ["none", "single", "single", "single"], "block": [None, "a", "b", "c"],
    ...                   "downsampling": [False, False, True, False], "removable": [True] * 4,
    ...                   "acc": [0.9, 0.88, 0.5, 0.86]})
    >>> d = lesion_drops(t)
    >>> d["lesion_worst_block"], round(d["lesion_worst_drop"], 2), round(d["lesion_median_drop"], 2)
    ('b', 0.4, 0.03)
    """
    import math

    out: dict[str, Any] = {
        "lesion_worst_drop": math.nan,
        "lesion_worst_block": None,
        "lesion_median_drop": math.nan,
    }
    part = lesion
    if model is not None and "model" in lesion.columns:
        part = lesion[lesion["model"].astype(str) == model]
    base = part[part["kind"] == "none"]
    single = part[(part["kind"] == "single") & part["removable"].astype(bool)]
    if "acc" not in part.columns or base.empty or single.empty:
        return out
    drops = (float(base["acc"].iloc[0]) - single["acc"].astype(float)).to_numpy()
    worst = int(np.argmax(drops))
    out["lesion_worst_drop"] = float(drops[worst])
    out["lesion_worst_block"] = str(single["block"].iloc[worst])
    same = drops[~single["downsampling"].astype(bool).to_numpy()]
    out["lesion_median_drop"] = float(np.median(same)) if len(same) else math.nan
    return out


def lesion_records(frame: pd.DataFrame) -> dict[str, Any]:
    """A lesion frame as a JSON-able mapping (columns, rows, attrs), as a compare run keeps it in its meta."""

    def plain(value: Any) -> Any:
        if hasattr(value, "item"):  # numpy scalars
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return None  # JSON null: a missing block name or metric alike
        return value

    rows = [[plain(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return {"columns": list(frame.columns), "rows": rows, "attrs": dict(frame.attrs)}


def lesion_table(stored: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """The lesion frame back from :func:`lesion_records` (``meta["lesions"]`` of a compare run), or None."""
    import pandas as pd

    if not stored or not isinstance(stored, Mapping) or "columns" not in stored:
        return None
    frame = pd.DataFrame(list(stored.get("rows") or []), columns=list(stored["columns"]))
    for column in frame.columns:
        if column in ("k", "position", "samples", "depth"):
            frame[column] = frame[column].astype("int64")
        elif column in ("downsampling", "removable", "residual"):
            frame[column] = frame[column].astype("bool")
        elif column not in ("kind", "block", "model"):
            frame[column] = frame[column].astype("float64")
    frame.attrs.update(dict(stored.get("attrs") or {}))
    return frame
