"""The :class:`Run` container, and saving and loading runs (saved whole or streamed by a sink)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import (
    _CHUNK,
    _LEGACY_CHUNK,
    _TABLE_FILES,
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
    run_id_at,
    unfinished_write,
)
from .schema import FORMAT_VERSION, _dtypes, _empty_scalars, empty_frame, has_parquet, paths_table

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
    """The metadata of the run folder ``path``; a one-line ``ValueError`` naming the file if damaged.

    >>> import tempfile, pandas as pd
    >>> d = tempfile.mkdtemp()
    >>> _ = Run(empty_frame(), pd.DataFrame({"step": [0]}), {"every": 3}).save(d)
    >>> read_meta(d)["every"]
    3
    """
    import pandas as pd

    meta_file = Path(path) / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{Path(path)} has no meta.json; is it a gradprobe run folder?")
    if meta_file.is_dir():
        raise ValueError(f"{meta_file} is a folder, not gradprobe metadata (a JSON file)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{meta_file} is not readable gradprobe metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{meta_file} holds a JSON {type(meta).__name__}, not gradprobe metadata (a JSON object)"
        )
    dtypes = meta.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(isinstance(d, dict) for d in dtypes.values()):
        raise ValueError(f"{meta_file}: 'dtypes' must map table -> {{column: dtype}}, got {dtypes!r}")
    for table, columns in dtypes.items():
        for col, dtype in columns.items():
            try:
                pd.api.types.pandas_dtype(dtype)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{meta_file}: unknown dtype {dtype!r} of column {col!r} ({table})"
                ) from None
    return meta


def load(path: str | os.PathLike[str], *, strict: bool = False) -> Run:
    """Read a run saved by ``Probe.save``, ``Run.save`` or ``gradprobe compare``, or streamed by a sink.

    A streamed run is read chunk by chunk: every complete chunk loads; damaged ones
    (cut short, unreadable, a frame chunk without its scalars) are skipped with one
    ``RuntimeWarning`` that counts them, and stray files are ignored with a warning.
    ``strict=True`` raises ``ValueError`` on damage instead.

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
    meta = read_meta(folder)
    dtypes = meta.pop("dtypes", {})
    if meta.get("streamed") or any(_CHUNK.match(p.name) for p in folder.iterdir()):
        run = _load_streamed(folder, meta, strict)
        return Run(run.frame(), run.scalars(), run.meta, paths=_read_paths(folder, dtypes))
    fmt = meta.get("table_format")
    frame = _read_table(folder / "frame", dtypes.get("frame", {}), fmt)
    scalars = _read_table(folder / "scalars", dtypes.get("scalars", {}), fmt)
    return Run(frame, scalars, meta, paths=_read_paths(folder, dtypes, fmt))


def _read_paths(folder: Path, dtypes: Mapping[str, Any], fmt: str | None = None) -> pd.DataFrame | None:
    if not (folder / "paths.parquet").exists() and not (folder / "paths.csv").exists():
        return None
    # a sink writes no dtypes for its paths table: step and length are integers, stack a name
    default = {"step": "int64", "stack": "object", "length": "int64"}
    return _read_table(folder / "paths", dtypes.get("paths") or default, fmt)


class _Damaged(Exception):
    pass


def _read_chunk(file: Path, rows: int) -> pd.DataFrame:
    import pandas as pd

    try:
        if file.suffix == ".parquet":
            part = pd.read_parquet(file)
        else:
            data = file.read_bytes()
            if data and not data.endswith(b"\n"):
                raise _Damaged("cut mid-row")
            part = _read_csv(io.BytesIO(data), {})
    except _Damaged:
        raise
    except Exception as exc:  # pyarrow and pandas raise many kinds on damaged files
        raise _Damaged(f"{type(exc).__name__}: {exc}") from None
    if rows >= 0 and len(part) != rows:
        raise _Damaged(f"{len(part)} rows, its name says {rows}")
    return part


def _load_streamed(folder: Path, meta: dict[str, Any], strict: bool) -> Run:
    import pandas as pd

    run_id = meta.get("run_id")
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
    for seq in sorted(found):
        pair = found[seq]
        if set(pair) != {"frame", "scalars"}:
            unpaired += [p.name for p, _ in pair.values()]
            continue
        try:
            f, s = _read_chunk(*pair["frame"]), _read_chunk(*pair["scalars"])
        except _Damaged as exc:
            damaged.append(f"{pair['frame'][0].name} or its scalars ({exc})")
            continue
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
    if incomplete:
        problems.append(f"{len(incomplete)} incomplete write(s) left by an interruption")
    if problems:
        message = (
            f"gradprobe.load: {folder}: read {len(frames)} complete chunk(s); " + "; ".join(problems) + "."
        )
        if strict:
            raise ValueError(message)
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
    return Run(frame, scalar_frame.astype({"step": "int64"}), meta)
