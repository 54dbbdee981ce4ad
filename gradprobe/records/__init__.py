"""Tables of a run: the column schema, the :class:`Run` container, save/load, the row store and the sink.

This is the hinge of gradprobe's one-way data flow: probes produce rows of
Python floats, everything downstream (plots, reports, assertions) reads the
frames built here and never touches a probe.

A run on disk is a folder::

    run/
      frame.parquet    one row per (step, block)   (frame.csv without pyarrow)
      scalars.parquet  one row per step            (scalars.csv without pyarrow)
      paths.parquet    one row per (step, stack, path length), when the probe recorded
                       path-length decompositions (``attach(..., paths=N)``; gradprobe.paths)
      meta.json        versions, model class, block names, settings, dtypes, run id

No pickle is used anywhere, so loading a run never executes code.

Nothing lost: every file is written under a temporary name in its folder,
flushed, fsynced and renamed (:func:`atomic_write`); a run saved into a new
folder is built in a temporary folder and renamed into place. A run is never
deleted to be rewritten, a folder holding a *different* run (another
``run_id`` in its ``meta.json``) is only replaced with ``overwrite=True``, and
files gradprobe did not write are never removed: a folder that holds neither a run nor a
report is written into only with ``overwrite=True``. Nothing is written over a device, a
FIFO or a socket.

Loading checks before it trusts: ``meta.json``'s fields, the tables' columns and types,
regular files only and sizes bounded; a problem is one :class:`RunFormatError` (a
``ValueError``) naming the file, or one warning naming it.
A :class:`Sink` streams a run to disk from its first step (see its docstring
for what a crash can lose and how :func:`load` reports damage).

The rooms, one job each (every name is importable from ``gradprobe.records``):

* :mod:`.schema`: the columns, their glossary, empty and row-built frames;
* :mod:`.files`: atomic writes, table files, chunk names, destination checks;
* :mod:`.run`: :class:`Run`, :func:`save_run`, :func:`load`;
* :mod:`.store`: :class:`RowStore`, recorded rows in memory;
* :mod:`.sink`: :class:`Sink`, a run streamed to disk under a lock;
* :mod:`.recorder`: :class:`Recorder` and :class:`RecordedTables`, where a probe's steps go.
"""

from __future__ import annotations

from .files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_destination,
    foreign_files,
    new_run_id,
    not_regular,
    report_at,
    run_id_at,
    run_kind,
    try_write,
)
from .recorder import RecordedTables, Recorder, rank_view
from .run import Run, check_meta, load, rank_folder, read_meta, save_run
from .schema import (
    EXTRA_COLUMNS,
    FORMAT_VERSION,
    FRAME_COLUMNS,
    GLOSSARY,
    JACOBIAN_COLUMNS,
    KEY_COLUMNS,
    METRIC_COLUMNS,
    MODEL_COLUMNS,
    PATHS_COLUMNS,
    SIGNAL_COLUMNS,
    VALUE_COLUMNS,
    RunFormatError,
    empty_frame,
    has_parquet,
    paths_table,
    rows_to_frame,
)
from .sink import LOCK_FILE, Sink
from .store import RowStore

__all__ = [
    "EXTRA_COLUMNS",
    "FORMAT_VERSION",
    "FRAME_COLUMNS",
    "GLOSSARY",
    "JACOBIAN_COLUMNS",
    "KEY_COLUMNS",
    "LOCK_FILE",
    "METRIC_COLUMNS",
    "MODEL_COLUMNS",
    "PATHS_COLUMNS",
    "SIGNAL_COLUMNS",
    "VALUE_COLUMNS",
    "RecordedTables",
    "Recorder",
    "RowStore",
    "Run",
    "RunFormatError",
    "Sink",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_destination",
    "check_meta",
    "empty_frame",
    "foreign_files",
    "has_parquet",
    "load",
    "new_run_id",
    "not_regular",
    "paths_table",
    "rank_folder",
    "rank_view",
    "read_meta",
    "report_at",
    "rows_to_frame",
    "run_id_at",
    "run_kind",
    "save_run",
    "try_write",
]
