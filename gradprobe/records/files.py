"""A run folder on disk: atomic writes, table files, chunk names, and the checks before writing.

Nothing lost: every file is written under a temporary name in its folder, flushed,
fsynced and renamed (:func:`atomic_write`). :func:`check_destination` refuses, before
any work, a folder that holds another run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schema import has_parquet

if TYPE_CHECKING:
    import pandas as pd


def new_run_id() -> str:
    """A fresh run id (12 hex digits): stored in ``meta.json`` and in a sink's chunk names."""
    return uuid.uuid4().hex[:12]


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once the folder's own entry list is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write the file ``path`` all at once: ``write(tmp)`` fills a temporary file in the same
    folder, which is flushed, fsynced and renamed onto ``path``.

    A crash leaves the old file or the new one, never a part of one (at worst a
    ``.NAME.*.tmp`` file, which :func:`load` reports as an incomplete write).

    >>> import tempfile, pathlib
    >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a.txt", lambda tmp: tmp.write_text("hi"))
    >>> p.read_text()
    'hi'
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)
    return final


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`atomic_write` of bytes."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _replace_together(folder: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill`` on a temporary sibling folder, then move each file it wrote into ``folder``
    (same file system: each move an atomic rename), ``meta.json`` last."""
    staging = folder / f".update-{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp"
    staging.mkdir()
    try:
        fill(staging)
        names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "meta.json")
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(folder)


def _write_table(frame: pd.DataFrame, file: Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.to_parquet(file, index=False)
    else:
        frame.to_csv(file, index=False)


def _str_columns(dtypes: Mapping[str, str]) -> dict[str, type]:
    # Names stay strings whatever they look like: a block "0" must not come back as the int 0.
    cols: dict[str, type] = {"block": str, "model": str, "stack": str}
    cols.update({c: str for c, t in dtypes.items() if t in ("object", "str", "string")})
    return cols


def _read_csv(file: Any, dtypes: Mapping[str, str]) -> pd.DataFrame:
    import pandas as pd

    # keep_default_na=False + na_values=[""] so a block literally named "NA" stays a string
    return pd.read_csv(file, keep_default_na=False, na_values=[""], dtype=_str_columns(dtypes))


def _read_table(base: Path, dtypes: Mapping[str, str], fmt: str | None = None) -> pd.DataFrame:
    import pandas as pd

    parquet, csv = base.with_suffix(".parquet"), base.with_suffix(".csv")
    # meta.json, written last, names the format: a table of the other format is a leftover
    use_parquet = parquet.exists() and (fmt != "csv" or not csv.exists())
    if not use_parquet and not csv.exists():
        raise FileNotFoundError(f"no {base.name}.parquet or {base.name}.csv in {base.parent}")
    file = parquet if use_parquet else csv
    if use_parquet and not has_parquet():
        raise ImportError(
            f"{parquet} is Parquet but pyarrow (a dependency of gradprobe) is not installed; "
            "install it with `pip install pyarrow`."
        )
    try:
        frame = pd.read_parquet(file) if use_parquet else _read_csv(file, dtypes)
        for col, dtype in dtypes.items():
            if col in frame.columns and str(frame[col].dtype) != dtype:
                frame[col] = frame[col].astype(dtype)  # type: ignore[call-overload]
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{file} cannot be read ({type(exc).__name__}: {exc})") from None
    return frame


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _meta_text(meta: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(meta), indent=2, sort_keys=True)


#: File names of a saved run's tables.
_TABLE_FILES = ("frame.parquet", "frame.csv", "scalars.parquet", "scalars.csv")


#: A sink's chunk files: ``frame-<run id>-<sequence>-r<rows>.<fmt>`` and the same for scalars.
#: The row count in the name lets :func:`load` tell a complete chunk from one cut short.
_CHUNK = re.compile(r"^(frame|scalars)-([0-9a-f]{12})-(\d{6})-r(\d+)\.(parquet|csv)$")

#: Chunk names of sinks before run ids (``frame-NNNNNN.parquet``), still read.
_LEGACY_CHUNK = re.compile(r"^(frame|scalars)-(\d{6})\.(parquet|csv)$")


def chunk_name(folder: Path, stem: str, run_id: str, seq: int, rows: int, fmt: str) -> Path:
    """The file of chunk ``seq`` (``rows`` rows) of a sink's ``stem`` table, ``"frame"`` or ``"scalars"``.

    >>> name = chunk_name(Path("run"), "frame", "0123456789ab", 7, 40, "csv").name
    >>> name, bool(_CHUNK.match(name))
    ('frame-0123456789ab-000007-r40.csv', True)
    """
    return folder / f"{stem}-{run_id}-{seq:06d}-r{rows}.{fmt}"


def unfinished_write(name: str) -> bool:
    """Whether the file ``name`` in a sink folder is a chunk or ``meta.json`` write cut short
    (the temporary file of :func:`atomic_write`)."""
    return name.startswith((".frame-", ".scalars-", ".meta.json.")) and name.endswith(".tmp")


def run_id_at(path: str | os.PathLike[str]) -> str | None:
    """The run id of the run saved or streamed in the folder ``path``.

    None when the folder holds no run; ``""`` for a run without a readable id (saved by an
    older gradprobe, or with damaged metadata).

    >>> import tempfile
    >>> run_id_at(tempfile.mkdtemp()) is None
    True
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    meta_file = folder / "meta.json"
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        return str(meta.get("run_id") or "") if isinstance(meta, dict) else ""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return None
    if any(n in _TABLE_FILES or _CHUNK.match(n) for n in names):
        return ""
    return None


def _run_meta_at(folder: Path) -> dict[str, Any] | None:
    """The parsed ``meta.json`` of ``folder``; None when it has none or it cannot be read."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def run_kind(meta: Mapping[str, Any] | None) -> str | None:
    """The kind of run a ``meta.json`` describes (``"compare"``, ``"probe"``, ...), None if it does not say.

    A ``meta.json`` without a kind whose command is ``gradprobe compare ...`` describes a compare run.

    >>> run_kind({"kind": "compare"}), run_kind({"command": "gradprobe compare --no-progress"})
    ('compare', 'compare')
    """
    if not meta:
        return None
    kind = meta.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    command = meta.get("command")
    if isinstance(command, str) and command.split()[:2] == ["gradprobe", "compare"]:
        return "compare"
    return None


def _describe_run(folder: Path) -> str:
    """The run saved in ``folder`` in a few words, for messages: its kind, id and date."""
    meta = _run_meta_at(folder)
    if meta is None:
        state = "an unreadable meta.json" if (folder / "meta.json").exists() else "no meta.json"
        return f"tables with {state}"
    kind = run_kind(meta)
    details = [f"run {meta['run_id']}" if meta.get("run_id") else "no run id"]
    if meta.get("created"):
        details.append(f"created {meta['created']}")
    return f"{f'a {kind} run' if kind else 'a gradprobe run'} ({', '.join(details)})"


#: Names of the files gradprobe writes into a run folder besides the tables and chunks: the
#: metadata, a sink's lock, the HTML report and its figures, and temporary files of writes.
_OWNED_FILE = re.compile(
    r"^(meta\.json|index\.html|[^/]+\.png|(frame|scalars|paths)\.(parquet|csv)|\.gradprobe\.lock"
    r"|\..*\.tmp|\.gradprobe-write-test-.*)$"
)


def foreign_files(path: str | os.PathLike[str]) -> list[str]:
    """Names in the folder ``path`` that gradprobe did not write (sorted; [] for a missing folder).

    gradprobe's files are ``meta.json``, the tables, a sink's chunks and lock, the report
    (``index.html``, PNG figures) and temporary files of interrupted writes.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "notes.txt").write_text("mine")
    >>> _ = (d / "meta.json").write_text("{}"); foreign_files(d)
    ['notes.txt']
    """
    folder = Path(path)
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if not (
            (p.is_file() or p.name.endswith(".tmp")) and (_OWNED_FILE.match(p.name) or _CHUNK.match(p.name))
        )
    )


def check_destination(
    path: str | os.PathLike[str],
    run_id: str | None = None,
    *,
    overwrite: bool = False,
    kind: str | None = None,
    name: str | None = None,
    force: str = "overwrite=True",
) -> Path:
    """Check, before any work, that a run (or report) can be written into the folder ``path``.

    It must be a folder or a path where one can be made, writable, and not hold a run with
    another id than ``run_id`` unless ``overwrite``. Raises an ``OSError`` with a one-line
    message otherwise; creates nothing.

    ``kind`` is the kind of the run to be written (``meta["kind"]``, e.g. ``"compare"``). Given,
    a folder that holds an earlier run of that kind and no file gradprobe did not write may be
    replaced without ``overwrite``, and a folder holding anything else (another kind of run,
    files gradprobe did not write) is refused unless ``overwrite``. Files gradprobe did not
    write are never removed, with ``overwrite`` neither. ``name`` (default: the path) and
    ``force`` word the message: the command line passes ``"--out DIR"`` and ``"--force"``.

    >>> import tempfile
    >>> check_destination(tempfile.mkdtemp()).is_dir()
    True
    """
    out = Path(path)
    label = name or str(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{label} exists and is not a folder; a run is written as a folder")
    existing = run_id_at(out)
    if not overwrite and existing is not None and (not existing or existing != run_id):
        earlier = kind is not None and run_kind(_run_meta_at(out)) == kind
        if not earlier:
            raise FileExistsError(
                f"{label} holds another gradprobe run: {_describe_run(out)}; pass {force} to replace it "
                "(files gradprobe did not write are kept), or choose another folder"
            )
    if not overwrite and kind is not None:
        foreign = foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise FileExistsError(
                f"{label} holds files gradprobe did not write ({shown}); pass {force} to write the "
                f"{kind} run beside them (they are kept), or choose another folder"
            )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{label} cannot be created: {parent} is a file, not a folder")
    try:
        try_write(parent)
    except OSError as exc:
        raise PermissionError(
            f"{label} cannot be written ({exc.strerror or exc}); pass a writable folder"
        ) from None
    return out


def try_write(folder: str | os.PathLike[str]) -> None:
    """Create and remove a temporary file in ``folder``: raises the ``OSError`` a write would.

    (Permission bits do not tell: root, ACLs and read-only mounts decide.)
    """
    fd, name = tempfile.mkstemp(dir=folder, prefix=".gradprobe-write-test-")
    os.close(fd)
    os.unlink(name)
