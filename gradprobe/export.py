"""TensorBoard export: a run's per-block columns as scalars, tagged ``gradprobe/<column>/<block>``.

:func:`tensorboard` writes a whole run (a probe, a :class:`~gradprobe.records.Run`, a saved
run folder or a block frame) into a TensorBoard log folder; :class:`TensorBoardStream`
writes a probe's rows while it trains (``gradprobe compare --tensorboard DIR``);
:func:`step_scalars` is the one place that turns the rows of one step into tags and
values, so the export, the stream and the Lightning and Hugging Face callbacks
(:mod:`gradprobe.integrations`) log the same tags.

Tags, one value per recorded step:

* ``gradprobe/<column>/<block>``: a column of the block frame (``gradprobe/cum_gain/layer1.0``);
* ``gradprobe/summary/<name>``: per-model summaries of the step (:func:`summaries`);
* ``gradprobe/<scalar>``: the run's logged scalars (loss, accuracy, lr) in an export;
* histograms ``gradprobe/jac_spec`` (the largest singular value of each block's Jacobian,
  on steps that have it) and ``gradprobe/spectrum[/<name>]`` (singular values passed as
  ``spectra=``, e.g. from :func:`gradprobe.spectrum`).

A multi-model run (``gradprobe compare``) gets one TensorBoard run per model, in a
subfolder named after the model, so TensorBoard overlays the models' curves. NaN and
infinite values are left out (TensorBoard cannot draw them). The event files come from
``torch.utils.tensorboard.SummaryWriter`` (imported only when used; ``pip install
'gradprobe[tensorboard]'``). An export writes each event file under a temporary folder and
moves it into place when it is complete; a stream appends as it goes (TensorBoard skips a
record cut off by a crash).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import JACOBIAN_COLUMNS, METRIC_COLUMNS, Run, load

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LOG_COLUMNS", "TensorBoardStream", "step_scalars", "summaries", "summary_writer", "tensorboard"]

#: Columns that the training callbacks and ``compare --tensorboard`` log per block by default.
LOG_COLUMNS: tuple[str, ...] = ("cum_gain", "gain", "res_ratio")

#: Columns of the frame an export can write (``calls``, ``index`` and ``jac_batch`` are book-keeping).
EXPORT_COLUMNS: tuple[str, ...] = METRIC_COLUMNS + tuple(c for c in JACOBIAN_COLUMNS if c != "jac_batch")

# Scalars columns that are keys or labels, not curves.
_SCALAR_KEYS = frozenset({"step", "model", "depth", "residual", "rank"})


def summary_writer(logdir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``logdir``, or an ImportError naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard imports the tensorboard package
        raise ImportError(
            "gradprobe's TensorBoard export needs the tensorboard package: "
            "pip install 'gradprobe[tensorboard]' (or pip install tensorboard)"
        ) from exc
    return SummaryWriter(log_dir=str(logdir), **kwargs)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summaries(rows: Sequence[Mapping[str, Any]], prefix: str = "gradprobe") -> dict[str, float]:
    """Per-model summaries of one step's rows, as ``{tag: value}``.

    ``<prefix>/summary/min_gain`` and ``max_gain`` (over blocks), ``first_cum_gain`` (the
    ``cum_gain`` of the block nearest the input: its grad_in over grad_out of the last block of its
    stack) and
    ``max_res_ratio``. A summary whose values are all NaN is left out.

    >>> s = summaries([{"block": "a", "index": 0, "gain": 2.0, "cum_gain": 3.0, "res_ratio": 0.1},
    ...                {"block": "b", "index": 1, "gain": 1.5, "cum_gain": 1.5, "res_ratio": float("nan")}])
    >>> [(tag.split("/")[-1], value) for tag, value in s.items()]
    [('min_gain', 1.5), ('max_gain', 2.0), ('first_cum_gain', 3.0), ('max_res_ratio', 0.1)]
    """
    out: dict[str, float] = {}
    gains = [float(r["gain"]) for r in rows if _finite(r.get("gain"))]
    if gains:
        out[f"{prefix}/summary/min_gain"] = min(gains)
        out[f"{prefix}/summary/max_gain"] = max(gains)
    if rows:
        first = min(rows, key=lambda r: r.get("index", 0))
        if _finite(first.get("cum_gain")):
            out[f"{prefix}/summary/first_cum_gain"] = float(first["cum_gain"])
    ratios = [float(r["res_ratio"]) for r in rows if _finite(r.get("res_ratio"))]
    if ratios:
        out[f"{prefix}/summary/max_res_ratio"] = max(ratios)
    return out


def step_scalars(
    rows: Sequence[Mapping[str, Any]], columns: Iterable[str] = LOG_COLUMNS, prefix: str = "gradprobe"
) -> dict[str, float]:
    """The tags and values of one step's rows: ``<prefix>/<column>/<block>`` plus :func:`summaries`.

    >>> tags = step_scalars([{"block": "layer1.0", "index": 0, "gain": 1.25, "cum_gain": 2.5}], ["gain"])
    >>> tags["gradprobe/gain/layer1.0"], tags["gradprobe/summary/first_cum_gain"]
    (1.25, 2.5)
    """
    out: dict[str, float] = {}
    for column in columns:
        for row in rows:
            value = row.get(column)
            if _finite(value):
                out[f"{prefix}/{column}/{row['block']}"] = float(value)  # type: ignore[arg-type]
    out.update(summaries(rows, prefix))
    return out


def _as_run(data: Any) -> Run:
    import pandas as pd

    if isinstance(data, Run):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load(data)
    if isinstance(data, pd.DataFrame):
        return Run(data, pd.DataFrame({"step": pd.Series(dtype="int64")}), {})
    if callable(getattr(data, "frame", None)) and callable(getattr(data, "scalars", None)):
        return Run(data.frame(), data.scalars(), {})
    raise TypeError(
        "tensorboard() takes a probe, a gradprobe Run, the folder of a saved run or a block frame "
        f"(pandas DataFrame); got {type(data).__name__}"
    )


def model_folder(name: str) -> str:
    """A model name as one folder name (TensorBoard shows it as the run name).

    >>> model_folder("resnet-56"), model_folder("a/b c")
    ('resnet-56', 'a_b_c')
    """
    cleaned = re.sub(r"[^\w.+=-]+", "_", name).strip("._")
    return cleaned or "model"


def _export_columns(frame: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    import numpy as np

    if columns is None:
        return [
            c
            for c in EXPORT_COLUMNS
            if c in frame.columns and bool(np.isfinite(np.asarray(frame[c], dtype=float)).any())
        ]
    if isinstance(columns, str):
        columns = [columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        numeric = [str(c) for c in frame.columns if c not in ("step", "block", "index", "model")]
        raise ValueError(f"columns {missing} are not in the run; it has {numeric}")
    return list(columns)


def _write(
    writer: Any, frame: pd.DataFrame, scalars: pd.DataFrame, columns: Sequence[str], spectra: Any
) -> None:
    import numpy as np

    for key, rows in frame.groupby("step", sort=True):
        step = int(key)  # type: ignore[arg-type]
        records: list[dict[str, Any]] = rows.to_dict("records")  # type: ignore[assignment]
        for tag, value in step_scalars(records, columns).items():
            writer.add_scalar(tag, value, step)
        if "jac_spec" in rows.columns:
            values = np.asarray(rows["jac_spec"], dtype=float)
            values = values[np.isfinite(values)]
            if values.size:
                writer.add_histogram("gradprobe/jac_spec", values, step)
    if "step" in scalars.columns:
        curves = [c for c in scalars.columns if c not in _SCALAR_KEYS]
        for record in scalars.to_dict("records"):
            for column in curves:
                value = record[column]
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(f"gradprobe/{column}", float(value), int(record["step"]))
    for name, values in spectra:
        writer.add_histogram(name, np.asarray(values, dtype=float).ravel(), 0)


def _spectra(spectra: Any) -> list[tuple[str, Any]]:
    if spectra is None:
        return []
    if isinstance(spectra, Mapping):
        return [(f"gradprobe/spectrum/{name}", values) for name, values in spectra.items()]
    return [("gradprobe/spectrum", spectra)]


def tensorboard(
    data: Any,
    logdir: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    spectra: Any = None,
) -> Path:
    """Write a run into the TensorBoard log folder ``logdir``; return it.

    ``data`` is a probe, a :class:`~gradprobe.records.Run`, the folder of a saved run or
    a block frame. Every (column, block) becomes the scalar ``gradprobe/<column>/<block>``
    at each recorded step (``columns``: which; default every metric column that holds a
    value), with the per-step summaries of :func:`summaries` and the run's logged scalars
    as ``gradprobe/<name>``. A run with a ``model`` column gets one subfolder per model.
    Where the Jacobian columns have ``jac_spec`` values, their spread over blocks is a
    histogram per step; ``spectra`` (an array of singular values, or a mapping name ->
    array, e.g. from :func:`gradprobe.spectrum`) adds histograms of those.

    >>> import tempfile, pandas as pd
    >>> frame = pd.DataFrame({"step": [0, 0, 1, 1], "block": ["a", "b", "a", "b"], "index": [0, 1, 0, 1],
    ...                       "gain": [1.0, 2.0, 1.5, 2.5], "cum_gain": [2.0, 2.0, 3.75, 2.5]})
    >>> out = tensorboard(frame, tempfile.mkdtemp())
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> events = EventAccumulator(str(out)).Reload()
    >>> [e.value for e in events.Scalars("gradprobe/gain/b")]
    [2.0, 2.5]
    """
    run = _as_run(data)
    frame, scalars = run.frame(), run.scalars()
    missing = [c for c in ("step", "block") if c not in frame.columns]
    if missing:
        raise ValueError(f"tensorboard(): the block frame lacks {missing}; it has {list(frame.columns)}")
    cols = _export_columns(frame, columns)
    out = Path(logdir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; TensorBoard logs go into a folder")
    out.mkdir(parents=True, exist_ok=True)
    if "model" in frame.columns:
        names = list(dict.fromkeys(map(str, frame["model"])))
        groups = []
        for name in names:
            has_model = "model" in scalars.columns
            part = scalars[scalars["model"].astype(str) == name] if has_model else scalars[:0]
            groups.append((model_folder(name), frame[frame["model"].astype(str) == name], part))
    else:
        groups = [("", frame, scalars)]
    for i, (folder, part_frame, part_scalars) in enumerate(groups):
        target = out / folder if folder else out
        # A complete event file or none: written in a temporary folder, then moved in.
        tmp = Path(tempfile.mkdtemp(prefix=".gradprobe-export-", dir=out))
        try:
            writer = summary_writer(tmp)
            try:
                _write(writer, part_frame, part_scalars, cols, _spectra(spectra) if i == 0 else [])
            finally:
                writer.close()
            target.mkdir(parents=True, exist_ok=True)
            for event_file in tmp.iterdir():
                os.replace(event_file, target / event_file.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class TensorBoardStream:
    """Write a probe's rows into TensorBoard as its steps close (``gradprobe compare --tensorboard``).

    Call :meth:`update` after each training step (it writes the latest recorded step that has
    closed and was not written yet) and :meth:`close` at the end.

    >>> import tempfile, torch, torch.nn as nn, gradprobe
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> stream = TensorBoardStream(tempfile.mkdtemp())
    >>> with gradprobe.attach(net, ["0", "1"]) as probe:
    ...     for _ in range(3):
    ...         net(torch.randn(2, 4)).sum().backward()
    ...         stream.update(probe)
    >>> stream.close(); stream.written
    3
    """

    def __init__(self, logdir: str | os.PathLike[str], columns: Sequence[str] = LOG_COLUMNS) -> None:
        self.logdir = Path(logdir)
        self.columns = tuple(columns)
        self.written = 0  # steps written
        self._last = -1
        # Written to disk every 10 s (SummaryWriter's default is 120 s): a live view should be live.
        self._writer = summary_writer(self.logdir, flush_secs=10)

    def update(self, probe: Any) -> None:
        """Write the probe's latest closed recorded step, unless it was written already."""
        rows = probe.last_rows()
        if not rows or rows[0]["step"] <= self._last:
            return
        step = int(rows[0]["step"])
        for tag, value in step_scalars(rows, self.columns).items():
            self._writer.add_scalar(tag, value, step)
        self._last = step
        self.written += 1

    def scalars(self, step: int, **values: float) -> None:
        """Write logged scalars (loss, accuracy, lr) as ``gradprobe/<name>`` at ``step``."""
        for name, value in values.items():
            if _finite(value):
                self._writer.add_scalar(f"gradprobe/{name}", float(value), step)

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
