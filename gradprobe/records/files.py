"""A run folder on disk: atomic writes, table files, chunk names, and the checks before writing.

Nothing lost: every file is written under a temporary name in its folder, flushed,
fsynced and renamed (:func:`atomic_write`). :func:`check_destination` refuses, before
any work, a folder that holds another run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schema import RunFormatError, has_parquet

if TYPE_CHECKING:
    import pandas as pd


def new_run_id() -> str:
    """A fresh run id (12 hex digits): stored in ``meta.json`` and in a sink's chunk names."""
    return uuid.uuid4().hex[:12]


#: The lock file of a sink folder in use: pid, host and run id of the probe holding it.
LOCK_FILE = ".gradprobe.lock"

#: What a run id looks like (:func:`new_run_id`). A run id read from a file builds chunk file
#: names only once it matches this: a crafted ``"/../x"`` must not name a file outside the run.
RUN_ID = re.compile(r"^[0-9a-f]{12}$")

#: Largest ``meta.json`` read (bytes), and deepest JSON nesting accepted in it.
MAX_META_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it exists and is not a regular file (``"a FIFO"``, ``"a character
    device"``, ...): gradprobe never writes to or replaces one. None for a regular file or no file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_kind(mode)


def read_regular(path: str | os.PathLike[str], limit: int | None, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    A FIFO, a device or a socket is refused before it is opened (reading one could block
    forever or never end), and again after (``fstat`` of the opened file: it may have been
    swapped); so is a file larger than ``limit``, before a byte is read. Raises
    :class:`RunFormatError` (one line naming the file) for those, ``OSError`` when it cannot be read.
    """
    kind = not_regular(path)
    if kind is not None:
        raise RunFormatError(f"{path} is {kind}, not a regular file; gradprobe reads only regular files")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunFormatError(
                f"{path} is {_file_kind(st.st_mode)}, not a regular file; gradprobe reads only regular files"
            )
        if limit is not None and st.st_size > limit:
            raise RunFormatError(f"{path} has {st.st_size} bytes, more than a {what} can have ({limit})")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise RunFormatError(f"{path} has more than {limit} bytes, more than a {what} can have")
    return data


class NotRegularFileError(OSError):
    """An output path that exists and is a folder, FIFO, device or socket: never written to or replaced."""


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (walked without recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            todo.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, level + 1) for v in item)
    return deepest


def parse_meta(file: Path) -> Any:
    """The parsed JSON of the ``meta.json`` file ``file``: a regular file of at most
    :data:`MAX_META_BYTES`, nested at most :data:`MAX_JSON_DEPTH` deep. ``RunFormatError``
    (one line naming the file) otherwise, ``OSError`` when it cannot be read."""
    data = read_regular(file, MAX_META_BYTES, "meta.json")
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        why = "nested too deep" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
        raise RunFormatError(f"{file} is not readable gradprobe metadata ({why})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise RunFormatError(
            f"{file} is not gradprobe metadata: JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )
    return value


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
    kind = not_regular(final)
    if kind is not None:  # renamed over, a device node or a FIFO would be replaced by a plain file
        raise NotRegularFileError(f"{final} is {kind}, not a regular file; gradprobe never writes over one")
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
    use_parquet = os.path.lexists(parquet) and (fmt != "csv" or not os.path.lexists(csv))
    if not use_parquet and not os.path.lexists(csv):
        raise FileNotFoundError(f"no {base.name}.parquet or {base.name}.csv in {base.parent}")
    file = parquet if use_parquet else csv
    if use_parquet and not has_parquet():
        raise ImportError(
            f"{parquet} is Parquet but pyarrow (a dependency of gradprobe) is not installed; "
            "install it with `pip install pyarrow`."
        )
    data = read_regular(file, None, "table")  # never a FIFO or a device: they would hang or never end
    try:
        frame = pd.read_parquet(io.BytesIO(data)) if use_parquet else _read_csv(io.BytesIO(data), dtypes)
        for col, dtype in dtypes.items():
            if col in frame.columns and str(frame[col].dtype) != dtype:
                frame[col] = frame[col].astype(dtype)  # type: ignore[call-overload]
    except Exception as exc:  # pyarrow and pandas raise many kinds on damaged files
        raise RunFormatError(f"{file} cannot be read ({type(exc).__name__}: {exc})") from None
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
    if not RUN_ID.match(run_id) or fmt not in ("parquet", "csv"):  # names from files never leave the folder
        raise RunFormatError(f"{folder}: run id {run_id!r} or table format {fmt!r} cannot name a chunk file")
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
        meta = _run_meta_at(folder)
        return str(meta.get("run_id") or "") if meta is not None else ""
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
        meta = parse_meta(folder / "meta.json")
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


def report_at(path: str | os.PathLike[str]) -> bool:
    """Whether the folder ``path`` holds a gradprobe HTML report (an ``index.html`` whose head names
    gradprobe as its generator), with or without the run's tables."""
    index = Path(path) / "index.html"
    if not_regular(index) is not None or not index.exists():
        return False
    try:
        with open(index, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'name="generator" content="gradprobe' in head


#: Temporary files of gradprobe's own writes (an interrupted atomic write, a write test).
_OWNED_TEMP = re.compile(r"^(\..*\.tmp|\.gradprobe-write-test-.*|\.gradprobe\.lock)$")


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
    if not str(path):
        raise FileNotFoundError("an empty path names no folder; pass a folder name ('.' for the current one)")
    out = Path(path)
    label = name or str(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{label} exists and is not a folder; a run is written as a folder")
    existing = run_id_at(out)
    if not overwrite and existing is None and out.is_dir() and not report_at(out):
        # Not a run, not a report: the user's own files. Even a report's own names (index.html,
        # PNGs) there are theirs, and would be written over.
        theirs = sorted(p.name for p in out.iterdir() if not _OWNED_TEMP.match(p.name))
        if theirs:
            shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
            raise FileExistsError(
                f"{label} is not empty and holds no gradprobe run or report ({shown}); choose a new or "
                f"empty folder, or pass {force} to write into it (its files of the same names are "
                "replaced, no other file is removed)"
            )
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
