"""The :class:`Run` container, and saving and loading runs (saved whole or streamed by a sink)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import (
    _CHUNK,
    _LEGACY_CHUNK,
    _TABLE_FILES,
    LOCK_FILE,
    RUN_ID,
    _fsync_dir,
    _meta_text,
    _read_csv,
    _read_table,
    _replace_together,
    _write_table,
    atomic_write,
    atomic_write_text,
    check_destination,
    new_run_id,
    parse_meta,
    read_regular,
    run_id_at,
    unfinished_write,
)
from .schema import (
    FORMAT_VERSION,
    FRAME_COLUMNS,
    KEY_COLUMNS,
    VALUE_COLUMNS,
    RunFormatError,
    _dtypes,
    _empty_scalars,
    empty_frame,
    has_parquet,
    paths_table,
)

if TYPE_CHECKING:
    import pandas as pd


class Run:
    """The tables of one or several probed training runs, plus metadata.

    ``Probe.save`` and ``gradprobe.compare`` produce runs; ``gradprobe.load``
    reads them back. Frames come back equal to the saved ones (values, dtypes
    and column order).

    >>> import pandas as pd
    >>> run = Run(empty_frame(), pd.DataFrame({"step": [0], "loss": [1.0]}), {"every": 1})
    >>> run.scalars()["loss"].tolist()
    [1.0]
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        scalars: pd.DataFrame,
        meta: Mapping[str, Any] | None = None,
        *,
        paths: pd.DataFrame | None = None,
    ):
        self._frame = frame
        self._scalars = scalars
        self.meta: dict[str, Any] = dict(meta or {})
        self._paths = paths

    def frame(self) -> pd.DataFrame:
        """One row per (step, block) (and per model for a multi-model run)."""
        return self._frame.copy()

    def scalars(self) -> pd.DataFrame:
        """One row per step with the logged scalars (loss, accuracy, lr, ...)."""
        return self._scalars.copy()

    def paths(self) -> pd.DataFrame:
        """Path-length decompositions, one row per (step, stack, length) (and per model); empty if none."""
        return paths_table([] if self._paths is None else [self._paths])

    @property
    def models(self) -> list[str]:
        """Model names in the order they were run (empty for a single-probe run)."""
        if "model" in self._frame.columns:
            return list(dict.fromkeys(self._frame["model"].tolist()))
        return list(self.meta.get("models", []))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the run into the folder ``path`` (created if needed); return it.

        Saving again into the same folder updates it; a folder holding another run
        is replaced only with ``overwrite=True`` (see :func:`save_run`).
        """
        self.meta.setdefault("run_id", new_run_id())  # later saves of this run go to the same folder
        return save_run(path, self._frame, self._scalars, self.meta, overwrite=overwrite, paths=self._paths)

    def __repr__(self) -> str:
        steps = self._frame["step"].nunique() if len(self._frame) else 0
        blocks = self._frame["block"].nunique() if len(self._frame) else 0
        models = f", models={self.models}" if self.models else ""
        return f"Run(steps={steps}, blocks={blocks}, rows={len(self._frame)}{models})"


def save_run(
    path: str | os.PathLike[str],
    frame: pd.DataFrame,
    scalars: pd.DataFrame,
    meta: Mapping[str, Any],
    *,
    fmt: str | None = None,
    overwrite: bool = False,
    paths: pd.DataFrame | None = None,
) -> Path:
    """Write frame, scalars and metadata into the folder ``path``; return it.

    ``fmt`` is ``"parquet"`` or ``"csv"``; by default Parquet when pyarrow is
    installed, CSV otherwise. Nothing is deleted to be rewritten: a new folder is
    built under a temporary name and renamed into place; in a folder that already
    holds this run (same ``meta["run_id"]``) each table is replaced atomically and
    ``meta.json`` last. A folder holding another run is refused unless ``overwrite``
    (then the new run is built aside and swapped in whole).
    """
    if fmt is None:
        fmt = "parquet" if has_parquet() else "csv"
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    run_id = str(meta.get("run_id") or new_run_id())
    out = check_destination(path, run_id, overwrite=overwrite)
    full_meta = dict(meta)
    full_meta["run_id"] = run_id
    full_meta["format_version"] = FORMAT_VERSION
    full_meta["table_format"] = fmt
    full_meta["dtypes"] = {"frame": _dtypes(frame), "scalars": _dtypes(scalars)}
    full_meta.pop("streamed", None)
    if paths is not None:
        full_meta["dtypes"]["paths"] = _dtypes(paths)

    def fill(folder: Path) -> None:
        atomic_write(folder / f"frame.{fmt}", lambda tmp: _write_table(frame, tmp, fmt))
        atomic_write(folder / f"scalars.{fmt}", lambda tmp: _write_table(scalars, tmp, fmt))
        if paths is not None:
            atomic_write(folder / f"paths.{fmt}", lambda tmp: _write_table(paths, tmp, fmt))
        atomic_write_text(folder / "meta.json", _meta_text(full_meta))  # last: it commits the run

    existing = run_id_at(out)
    if out.is_dir():
        # This run, another one (overwrite=True) or a folder without one: files are replaced, never
        # removed first, and files gradprobe did not write stay. Every file is written and fsynced
        # under a temporary name before the first rename, so a kill while a table is written leaves
        # the old run whole; only the renames themselves (meta.json last, microseconds apart) stand
        # between the old set of files and the new one.
        _replace_together(out, fill)
        other = "csv" if fmt == "parquet" else "parquet"
        replaced = existing is not None and existing != run_id  # another run's files give way
        stale = [f"frame.{other}", f"scalars.{other}"]  # a table of the other format is a leftover now
        if paths is not None:
            stale.append(f"paths.{other}")
        elif replaced:
            stale += ["paths.parquet", "paths.csv"]  # the replaced run's path lengths are not this run's
        for name in stale:
            with contextlib.suppress(OSError):
                (out / name).unlink()
        if replaced:
            for chunk in [p for p in out.iterdir() if _CHUNK.match(p.name) or _LEGACY_CHUNK.match(p.name)]:
                with contextlib.suppress(OSError):
                    chunk.unlink()  # a streamed run replaced by a saved one: its chunks would be read
        _fsync_dir(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp")
    building.mkdir()
    try:
        fill(building)
        os.rename(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return out


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of the run folder ``path``, checked; a one-line :class:`RunFormatError`
    (a ``ValueError``) naming the file if it is damaged or not what gradprobe writes.

    >>> import tempfile, pandas as pd
    >>> d = tempfile.mkdtemp()
    >>> _ = Run(empty_frame(), pd.DataFrame({"step": [0]}), {"every": 3}).save(d)
    >>> read_meta(d)["every"]
    3
    """
    meta_file = Path(path) / "meta.json"
    if not os.path.lexists(meta_file):
        raise FileNotFoundError(f"{Path(path)} has no meta.json; is it a gradprobe run folder?")
    try:
        meta = parse_meta(meta_file)
    except OSError as exc:
        raise RunFormatError(
            f"{meta_file} is not readable gradprobe metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(meta, dict):
        raise RunFormatError(
            f"{meta_file} holds a JSON {type(meta).__name__}, not gradprobe metadata (a JSON object)"
        )
    check_meta(meta, meta_file)
    return meta


#: Counts in ``meta.json``: non-negative integers below 2**31 (step numbers are stored as int32).
_COUNTS = ("chunks", "steps_written", "dropped_steps", "dropped_rows", "steps")
_MAX_COUNT = 2**31 - 1


def check_meta(meta: Mapping[str, Any], meta_file: Path) -> None:
    """Check the fields of a run's ``meta.json`` that gradprobe acts on: their types, a known
    ``format_version`` and ``table_format``, a run id that can name files, the dtypes.
    Raises a one-line :class:`RunFormatError` naming ``meta_file`` and the field."""
    import pandas as pd

    def bad(key: str, want: str) -> RunFormatError:
        return RunFormatError(f"{meta_file}: {key!r} must be {want}, got {meta[key]!r:.80}")

    version = meta.get("format_version")
    if version is not None:
        if type(version) is not int or version < 1:
            raise bad("format_version", "a positive integer")
        if version > FORMAT_VERSION:
            raise RunFormatError(
                f"{meta_file}: format_version {version} is newer than this gradprobe reads "
                f"({FORMAT_VERSION}); upgrade gradprobe to read this run"
            )
    if meta.get("table_format") is not None and meta["table_format"] not in ("parquet", "csv"):
        raise bad("table_format", "'parquet' or 'csv'")
    if meta.get("streamed") is not None and not isinstance(meta["streamed"], bool):
        raise bad("streamed", "true or false")
    run_id = meta.get("run_id")
    if run_id is not None:
        if not isinstance(run_id, str):
            raise bad("run_id", "a string")
        if meta.get("streamed") and run_id and not RUN_ID.match(run_id):
            raise bad("run_id", "12 hexadecimal digits (it names the chunk files)")
    for key in _COUNTS:
        value = meta.get(key)
        if value is not None and (type(value) is not int or not 0 <= value <= _MAX_COUNT):
            raise bad(key, f"an integer from 0 to {_MAX_COUNT}")
    for key in ("model_class", "kind"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(key, "a string")
    blocks = meta.get("blocks")
    if blocks is not None and not (isinstance(blocks, list) and all(isinstance(b, str) for b in blocks)):
        raise bad("blocks", "a list of block names")
    dtypes = meta.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(isinstance(d, dict) for d in dtypes.values()):
        raise RunFormatError(f"{meta_file}: 'dtypes' must map table -> {{column: dtype}}, got {dtypes!r:.80}")
    for table, columns in dtypes.items():
        for col, dtype in columns.items():
            try:
                if not isinstance(dtype, str):
                    raise TypeError(dtype)
                pd.api.types.pandas_dtype(dtype)
            except (TypeError, ValueError):
                raise RunFormatError(
                    f"{meta_file}: unknown dtype {dtype!r:.40} of column {col!r:.40} ({table!r:.40})"
                ) from None


def check_frame(frame: pd.DataFrame, file: Path, required: tuple[str, ...] = KEY_COLUMNS) -> pd.DataFrame:
    """Check a block frame read from ``file``: the ``required`` columns are present, the keys
    are whole numbers and names, the metric columns numbers. Returns it with the key columns
    as int64; raises a one-line :class:`RunFormatError` naming the file and the column."""
    import numpy as np

    dtypes = dict(frame.dtypes.items())  # once: a column lookup per check costs more than the check
    missing = [c for c in required if c not in dtypes]
    if missing:
        raise RunFormatError(f"{file} lacks the column(s) {', '.join(missing)} of a block frame")
    for col in ("step", "index", "calls"):
        dtype = dtypes.get(col)
        if dtype is None:
            continue
        values = frame[col].to_numpy()
        if dtype.kind not in "iuf" or (
            len(values)
            and (
                (dtype.kind == "f" and (not np.isfinite(values).all() or (values % 1 != 0).any()))
                or values.min() < -_MAX_COUNT
                or values.max() > _MAX_COUNT
            )
        ):
            if not len(values):  # an empty column read from CSV has no type to check
                frame[col] = values.astype(np.int64)
                continue
            raise RunFormatError(
                f"{file}: column {col!r} holds {dtype} values, not whole numbers below 2**31 without gaps"
            )
        if dtype != np.int64:
            frame[col] = values.astype(np.int64)
    for col in VALUE_COLUMNS:
        dtype = dtypes.get(col)
        if dtype is not None and dtype.kind not in "iuf":
            raise RunFormatError(f"{file}: column {col!r} holds {dtype} values, not numbers")
    return frame


def _check_scalars(scalars: pd.DataFrame, file: Path) -> pd.DataFrame:
    if "step" not in scalars.columns:
        raise RunFormatError(f"{file} lacks the column 'step' of a scalars table")
    return check_frame(scalars, file, ("step",))


def load(path: str | os.PathLike[str], *, strict: bool = False) -> Run:
    """Read a run saved by ``Probe.save``, ``Run.save`` or ``gradprobe compare``, or streamed by a sink.

    Everything is checked before it is trusted: ``meta.json`` (:func:`check_meta`), that the
    files match what it says, every table's columns and types. Only regular files are read
    (never a FIFO or a device), ``meta.json`` and chunks up to a size. A problem with the
    folder is one :class:`RunFormatError` (a ``ValueError``) naming the file.

    A streamed run is read chunk by chunk: every complete chunk loads; damaged ones
    (cut short, unreadable, wrong columns, steps already read from another chunk, a frame
    chunk without its scalars) are skipped with one ``RuntimeWarning`` that names them, and
    stray files are ignored with a warning. ``strict=True`` raises :class:`RunFormatError`
    on damage instead. A run that a live process is still streaming (it holds the folder's
    lock) is not damaged: its files being written are left out, with a warning saying so
    and how much was read. A folder of ``rank-<n>`` run folders (what the ranks of a
    distributed run stream, :func:`rank_folder`) loads as one run with a ``rank`` column.

    >>> import tempfile, pandas as pd
    >>> d = tempfile.mkdtemp()
    >>> _ = Run(empty_frame(), pd.DataFrame({"step": [0]}), {}).save(d)
    >>> len(load(d).frame())
    0
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a saved gradprobe run (expected a folder with meta.json, "
            "frame.parquet|csv and scalars.parquet|csv)"
        )
    ranks = _rank_folders(folder)
    if ranks:
        return _load_ranks(ranks, strict)
    meta = read_meta(folder)
    dtypes = meta.pop("dtypes", {})
    names = [p.name for p in folder.iterdir()]
    tables = sorted(n for n in names if n in _TABLE_FILES)
    chunks = [n for n in names if _CHUNK.match(n) or _LEGACY_CHUNK.match(n)]
    if meta.get("streamed") and tables and not chunks:
        raise RunFormatError(
            f"{folder / 'meta.json'} says the run was streamed by a sink, but the folder holds the "
            f"saved tables {', '.join(tables)} and no chunk; its meta.json does not belong to these tables"
        )
    if meta.get("streamed") or (chunks and not tables):
        run = _load_streamed(folder, meta, strict)
        return Run(run.frame(), run.scalars(), run.meta, paths=_read_paths(folder, dtypes))
    if chunks:
        warnings.warn(
            f"gradprobe.load: {folder}: ignored {len(chunks)} sink chunk file(s) ({chunks[0]} ...); "
            "meta.json describes the saved tables frame/scalars, which are read",
            RuntimeWarning,
            stacklevel=2,
        )
    fmt = meta.get("table_format")
    frame = _read_table(folder / "frame", dtypes.get("frame", {}), fmt)
    frame = check_frame(frame, _table_file(folder, "frame", fmt))
    scalars = _read_table(folder / "scalars", dtypes.get("scalars", {}), fmt)
    scalars = _check_scalars(scalars, _table_file(folder, "scalars", fmt))
    for name, table in (("frame", frame), ("scalars", scalars)):
        saved = dtypes.get(name)
        if saved and set(map(str, table.columns)) != set(saved):
            missing = [c for c in saved if c not in table.columns]
            extra = [str(c) for c in table.columns if c not in saved]
            warnings.warn(
                f"gradprobe.load: {_table_file(folder, name, fmt)} does not have the columns meta.json lists "
                f"(missing: {missing or 'none'}; not listed: {extra or 'none'}); read as it is",
                RuntimeWarning,
                stacklevel=2,
            )
    return Run(frame, scalars, meta, paths=_read_paths(folder, dtypes, fmt))


_RANK_FOLDER = re.compile(r"rank-(\d+)")


def rank_folder(path: str | os.PathLike[str]) -> Path:
    """Where a probe under ``torch.distributed`` (more than one rank) streams its rows: the
    folder ``rank-<rank>`` inside ``path``, one per rank (``gradprobe.load(path)`` reads them
    all as one run with a ``rank`` column); ``path`` itself in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Path(path) / f"rank-{dist.get_rank()}"
    return Path(path)


def _rank_folders(folder: Path) -> dict[int, Path]:
    """``{rank: folder}`` of a folder holding one streamed run per rank (and no meta.json itself)."""
    if os.path.lexists(folder / "meta.json"):
        return {}
    out = {}
    for p in folder.iterdir():
        m = _RANK_FOLDER.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def _load_ranks(folders: Mapping[int, Path], strict: bool) -> Run:
    """The runs of every rank as one: frames, scalars and paths with a ``rank`` column, the
    metadata of the lowest rank (``ranks``: the ranks read)."""
    import pandas as pd

    runs = {rank: load(f, strict=strict) for rank, f in folders.items()}
    frame = pd.concat([r.frame().assign(rank=k) for k, r in runs.items()], ignore_index=True)
    scalars = pd.concat([r.scalars().assign(rank=k) for k, r in runs.items()], ignore_index=True)
    present = [r.paths().assign(rank=k) for k, r in runs.items() if len(r.paths())]
    paths = pd.concat(present, ignore_index=True) if present else None
    meta = dict(next(iter(runs.values())).meta)
    meta["ranks"] = list(runs)
    return Run(frame, scalars, meta, paths=paths)


def _table_file(folder: Path, name: str, fmt: Any) -> Path:
    parquet = folder / f"{name}.parquet"
    return parquet if os.path.lexists(parquet) and fmt != "csv" else folder / f"{name}.csv"


def _read_paths(folder: Path, dtypes: Mapping[str, Any], fmt: str | None = None) -> pd.DataFrame | None:
    if not os.path.lexists(folder / "paths.parquet") and not os.path.lexists(folder / "paths.csv"):
        return None
    # a sink writes no dtypes for its paths table: step and length are integers, stack a name
    default = {"step": "int64", "stack": "object", "length": "int64"}
    return _read_table(folder / "paths", dtypes.get("paths") or default, fmt)


class _Damaged(Exception):
    pass


#: Bytes a chunk may have: per row (a frame row is under 1 kB as CSV; scalars rows hold what the
#: user logged) and for the file around them. A larger file is not read: it is no sink's chunk.
_CHUNK_ROW_BYTES = 64 * 1024
_CHUNK_BASE_BYTES = 2**20
_LEGACY_CHUNK_BYTES = 2**30


def _read_chunk(file: Path, rows: int, kind: str) -> pd.DataFrame:
    import pandas as pd

    limit = _CHUNK_BASE_BYTES + rows * _CHUNK_ROW_BYTES if rows >= 0 else _LEGACY_CHUNK_BYTES
    try:
        data = read_regular(file, limit, "chunk")
        if file.suffix == ".parquet":
            part = pd.read_parquet(io.BytesIO(data))
        else:
            if data and not data.endswith(b"\n"):
                raise _Damaged("cut mid-row")
            part = _read_csv(io.BytesIO(data), {})
    except _Damaged:
        raise
    except FileNotFoundError:
        raise
    except RunFormatError as exc:
        raise _Damaged(str(exc).replace(f"{file} ", "").replace(str(file), "it")) from None
    except Exception as exc:  # pyarrow and pandas raise many kinds on damaged files
        raise _Damaged(f"{type(exc).__name__}: {exc}") from None
    if rows >= 0 and len(part) != rows:
        raise _Damaged(f"{len(part)} rows, its name says {rows}")
    try:
        if kind == "frame":
            return check_frame(part, file, ("step", "block", "index", "calls"))
        return _check_scalars(part, file)
    except RunFormatError as exc:
        raise _Damaged(str(exc).replace(f"{file}: ", "").replace(f"{file} ", "")) from None


def _live_holder(folder: Path) -> dict[str, Any] | None:
    """The holder of the folder's sink lock when it is a live process (another host's process
    is taken as live: it cannot be checked from here); None when no live process writes there."""
    try:
        holder = parse_meta(folder / LOCK_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict):
        return None
    pid = holder.get("pid")
    if type(pid) is not int or pid <= 0:
        return None
    if holder.get("host") != socket.gethostname():
        return holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # alive, owned by another user
    return holder


def _load_streamed(folder: Path, meta: dict[str, Any], strict: bool) -> Run:
    import pandas as pd

    run_id = meta.get("run_id")
    holder = _live_holder(folder)  # read before the listing: what is listed then is a live state
    live = holder is not None
    found: dict[int, dict[str, tuple[Path, int]]] = {}
    stray: list[str] = []
    incomplete: list[str] = []
    for p in sorted(folder.iterdir()):
        m = _CHUNK.match(p.name)
        legacy = None if run_id else _LEGACY_CHUNK.match(p.name)
        if m and (not run_id or m[2] == run_id):
            pair = found.setdefault(int(m[3]), {})
            # a retried flush after a failed write may leave an older, shorter frame chunk: take the longer
            if m[1] not in pair or pair[m[1]][1] < int(m[4]):
                pair[m[1]] = (p, int(m[4]))
        elif legacy:  # no row count in the name: complete as far as can be told
            found.setdefault(int(legacy[2]), {})[legacy[1]] = (p, -1)
        elif unfinished_write(p.name):
            incomplete.append(p.name)
        elif p.name.startswith(("frame", "scalars")) and p.name not in _TABLE_FILES:
            stray.append(p.name)
    frames: list[pd.DataFrame] = []
    scalars: list[pd.DataFrame] = []
    damaged: list[str] = []
    unpaired: list[str] = []
    being_written = len(incomplete) if live else 0
    odd_columns: list[str] = []
    seen: set[int] = set()
    for seq in sorted(found):
        pair = found[seq]
        if set(pair) != {"frame", "scalars"}:
            if live:  # its other half is being written
                being_written += 1
            else:
                unpaired += [p.name for p, _ in pair.values()]
            continue
        try:
            f = _read_chunk(*pair["frame"], "frame")
            s = _read_chunk(*pair["scalars"], "scalars")
        except FileNotFoundError:
            if live:  # replaced while it was read (a retried write of the live sink)
                being_written += 1
            else:
                damaged.append(f"{pair['frame'][0].name} or its scalars (removed while read)")
            continue
        except _Damaged as exc:
            damaged.append(f"{pair['frame'][0].name} or its scalars ({exc})")
            continue
        steps = set(f["step"].tolist()) | set(s["step"].tolist())
        again = steps & seen
        if again:
            damaged.append(
                f"{pair['frame'][0].name} (steps {min(again)}..{max(again)} are already in an earlier chunk)"
            )
            continue
        seen |= steps
        unknown = [str(c) for c in f.columns if c not in FRAME_COLUMNS]
        absent = [c for c in FRAME_COLUMNS if c not in f.columns]
        if unknown or absent:
            odd_columns.append(
                f"{pair['frame'][0].name} (unknown: {', '.join(unknown) or 'none'}; "
                f"missing: {', '.join(absent) or 'none'})"
            )
        frames.append(f)
        scalars.append(s)
    if stray:
        warnings.warn(
            f"gradprobe.load: ignored {len(stray)} file(s) in {folder} that are not chunks of run {run_id}: "
            f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}",
            RuntimeWarning,
            stacklevel=3,
        )
    problems = []
    if damaged:
        problems.append(f"{len(damaged)} damaged chunk(s) skipped: {'; '.join(damaged[:3])}")
    if unpaired:
        problems.append(
            f"{len(unpaired)} unpaired chunk(s) dropped (a crash between a chunk's frame and scalars "
            f"writes): {', '.join(unpaired[:3])}"
        )
    if incomplete and not live:
        problems.append(f"{len(incomplete)} incomplete write(s) left by an interruption")
    if odd_columns:
        problems.append(
            f"{len(odd_columns)} chunk(s) with other columns than a sink writes (read, missing ones "
            f"are NaN): {'; '.join(odd_columns[:3])}"
        )
    if problems:
        message = (
            f"gradprobe.load: {folder}: read {len(frames)} complete chunk(s); " + "; ".join(problems) + "."
        )
        if strict:
            raise RunFormatError(message)
        warnings.warn(message + " Pass strict=True to fail instead.", RuntimeWarning, stacklevel=3)
    if meta.get("dropped_steps"):
        warnings.warn(
            f"gradprobe.load: {folder}: the sink dropped {meta['dropped_steps']} step(s) "
            f"({meta.get('dropped_rows', 0)} rows) while its folder could not be written",
            RuntimeWarning,
            stacklevel=3,
        )
    frame = pd.concat([p for p in frames if len(p)] or [empty_frame()], ignore_index=True)
    frame = frame.astype({"step": "int64", "index": "int64", "calls": "int64"})
    scalar_frame = pd.concat([p for p in scalars if len(p)] or [_empty_scalars()], ignore_index=True)
    if live and holder is not None and holder.get("pid") != os.getpid():
        warnings.warn(
            f"gradprobe.load: {folder} is being written by process {holder.get('pid')} on "
            f"{holder.get('host')} (run {run_id}): read {len(frame)} rows of "
            f"{frame['step'].nunique() if len(frame) else 0} steps so far"
            + (f"; {being_written} file(s) still being written were left out" if being_written else ""),
            RuntimeWarning,
            stacklevel=3,
        )
    return Run(frame, scalar_frame.astype({"step": "int64"}), meta)
