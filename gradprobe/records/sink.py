"""The :class:`Sink`: a run streamed to its folder from the first step, under a lock.

Its pieces, each named: :class:`FolderLock` (the lock file that keeps a second probe out),
:func:`resume_point` (what a sink takes over from the streamed run already in its folder,
checked to be of the same model and blocks), :class:`Backoff` (when a failed write is
retried) and :class:`Sink` itself (buffering whole steps and flushing chunk pairs).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import (
    _CHUNK,
    _TABLE_FILES,
    LOCK_FILE,
    RUN_ID,
    _meta_text,
    _write_table,
    atomic_write,
    atomic_write_text,
    chunk_name,
    new_run_id,
    parse_meta,
    unfinished_write,
)
from .run import Run, _load_streamed, load, read_meta
from .schema import FORMAT_VERSION, _empty_scalars, empty_frame, has_parquet
from .store import RowStore

if TYPE_CHECKING:
    import pandas as pd

#: Sinks not closed yet: written out at interpreter exit (a script that never called detach()),
#: and on SIGTERM/SIGHUP.
_OPEN_SINKS: weakref.WeakSet[Sink] = weakref.WeakSet()


@atexit.register
def _close_open_sinks() -> None:
    for sink in list(_OPEN_SINKS):
        with contextlib.suppress(Exception):
            sink.close()


def _disarm_in_child() -> None:
    """After ``os.fork()``, in the child: the parent's sinks are the parent's. The child never
    writes, closes or unlinks anything of theirs (its exit would otherwise remove the parent's
    lock and write chunks under the parent's sequence numbers)."""
    global _pending_signal
    for sink in list(_OPEN_SINKS):
        sink._disown()
    _OPEN_SINKS.clear()
    # the child keeps the signal handlers: with no sink of its own they chain to the previous ones
    _pending_signal = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disarm_in_child)


# ---------------------------------------------------------------------- termination signals
#: Signals that end a process that a sink writes out first: SIGTERM (SLURM, Kubernetes,
#: ``docker stop``) and SIGHUP (a closed terminal). SIGINT raises KeyboardInterrupt, which
#: ``detach()`` and the ``with`` block already handle.
_TERM_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_previous_handlers: dict[int, Any] = {}
_pending_signal: int | None = None


def _install_signal_handlers() -> None:
    """Handle the termination signals while a sink is open: from the main thread only, where no
    handler is installed from outside Python and the signal is not ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _TERM_SIGNALS:
        if signum in _previous_handlers:
            continue
        current = signal.getsignal(signum)
        if current is None or current == signal.SIG_IGN or current is _on_term_signal:
            continue  # None: a handler from C, which cannot be chained
        try:
            signal.signal(signum, _on_term_signal)
        except (ValueError, OSError):
            continue
        _previous_handlers[signum] = current


def _restore_signal_handlers() -> None:
    """Put back the handlers found when the first sink opened (once the last one has closed),
    unless another handler has been installed over ours since."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous_handlers.items()):
        if signal.getsignal(signum) is _on_term_signal:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, previous)
        del _previous_handlers[signum]


def _on_term_signal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: write out every open sink of this process and free its lock, then let the
    previous handler, or the signal's default action, end the process."""
    global _pending_signal
    if any(sink._writing for sink in list(_OPEN_SINKS)):
        _pending_signal = signum  # inside a sink's write: it finishes the write, then terminates
        return
    _terminate(signum, frame)


def _terminate(signum: int, frame: Any) -> None:
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    name = signal.Signals(signum).name
    for sink in list(_OPEN_SINKS):
        sink._close_on_signal(name)
    if callable(previous):
        previous(signum, frame)
        return
    # The default action, so that the exit status says "killed by SIGTERM".
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _deliver_pending_signal() -> None:
    global _pending_signal
    signum, _pending_signal = _pending_signal, None
    if signum is not None:
        _terminate(signum, None)


# ---------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _release_lock(lock: Path, token: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child: the lock is its parent's
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if parse_meta(lock).get("token") == token:
            lock.unlink()


class FolderLock:
    """The lock file (:data:`LOCK_FILE`) of a sink folder: created exclusively, naming the pid,
    host and run id of its holder, and removed only by its holder (a token in the file says
    whose it is). A lock of a dead process on this host, or one cut short long ago, is stale
    and taken over. Dropped without :meth:`release`, the lock is freed when this object is
    garbage collected or at exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._finalizer: weakref.finalize[Any, FolderLock] | None = None
        self._info: dict[str, Any] = {}

    def take(self, run_id: str) -> None:
        """Create the lock file for ``run_id``; ``FileExistsError`` (one line) if another probe holds it."""
        lock = self.path
        token = uuid.uuid4().hex
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": run_id,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": token,
        }
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder, str(info["host"])):
                    with contextlib.suppress(OSError):
                        lock.unlink()
                    continue
                who = (
                    f"run {holder.get('run_id')} of process {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('since')}"
                    if holder
                    else "a probe starting up"
                )
                raise FileExistsError(
                    f"sink folder {self.folder} is in use by another probe ({who}); detach that probe first, "
                    f"or pass another folder (a stale lock of a dead process is removed automatically; "
                    f"delete {lock} by hand only if no probe writes there)"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
            self._info = info
            self._finalizer = weakref.finalize(self, _release_lock, lock, token, os.getpid())
            return
        raise FileExistsError(f"sink folder {self.folder}: cannot take its lock file {lock}")

    def _holder(self) -> dict[str, Any] | None:
        """What the lock file says about its holder; None when it cannot be read (being written)
        or names no process."""
        try:
            holder = parse_meta(self.path)
        except (OSError, ValueError):
            return None
        if not isinstance(holder, dict) or type(holder.get("pid")) is not int or holder["pid"] <= 0:
            return None
        return holder

    def _stale(self, holder: dict[str, Any] | None, host: str) -> bool:
        """Whether the lock may be taken over: its holder is a dead process of this host (a live
        one, or one of another host, never), or it was cut short long ago."""
        if holder is None:
            try:
                return time.time() - self.path.stat().st_mtime > 10  # a lock cut short long ago
            except OSError:
                return True  # gone meanwhile
        return holder.get("host") == host and not _pid_alive(int(holder["pid"]))

    def rename_run(self, run_id: str) -> None:
        """Say in the lock file that it is held for ``run_id`` (a resumed run), without letting go of it."""
        if self._finalizer is None or not self._info:
            return
        self._info = {**self._info, "run_id": run_id}
        atomic_write_text(self.path, json.dumps(self._info))

    def disown(self) -> None:
        """Forget the lock without removing it (a forked child: it is the parent's)."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def release(self) -> None:
        """Remove the lock file if this object holds it."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


# ---------------------------------------------------------------------- resuming
@dataclass(frozen=True)
class Resumed:
    """What a sink takes over from the streamed run already in its folder."""

    run_id: str
    fmt: str
    seq: int  # the number of the next chunk pair
    steps: int  # steps already on disk
    dropped_steps: int
    dropped_rows: int


def resume_point(
    folder: Path, mine: Mapping[str, Any], fmt: str, run_id: str, resume: bool
) -> Resumed | None:
    """None for a new folder; the run to append to with ``resume``; ``FileExistsError`` for a
    folder holding a saved or damaged run, or a streamed one without ``resume``; ``ValueError``
    for a streamed run of another model class or other blocks than ``mine`` (the sink's meta)."""
    names = [p.name for p in folder.iterdir()]
    chunks = [m for m in map(_CHUNK.match, names) if m]
    has_tables = any(n in _TABLE_FILES for n in names)
    meta: dict[str, Any] | None = None
    if "meta.json" in names:
        try:
            meta = read_meta(folder)
        except ValueError as exc:
            raise FileExistsError(f"{folder} holds a damaged run ({exc}); choose an empty folder") from None
    if meta is None and not chunks and not has_tables:
        return None  # a new folder
    if meta is None or not meta.get("streamed") or has_tables:
        raise FileExistsError(
            f"sink folder {folder} holds a saved run (meta.json/frame tables); a sink never writes "
            "over one: choose an empty folder"
        )
    desc = f"run {meta.get('run_id')} of {meta.get('model_class', '?')}, {len(chunks)} chunk files"
    if not resume:
        raise FileExistsError(
            f"sink folder {folder} already holds a streamed run ({desc}); pass "
            "sink_options={'resume': True} to append to it, or choose an empty folder"
        )
    for key in ("model_class", "blocks"):
        ours, theirs = mine.get(key), meta.get(key)
        if key == "blocks" and ours is not None and theirs is not None:
            ours, theirs = sorted(ours), sorted(theirs)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"resume: the run in {folder} was recorded with {key}={meta.get(key)!r}, this probe "
                f"has {mine.get(key)!r}; resume appends only to a run of the same model and blocks"
            )
    run_id = str(meta.get("run_id") or run_id)
    if not RUN_ID.match(run_id):  # it names the chunk files: never a path
        raise FileExistsError(
            f"{folder} holds a streamed run with the run id {run_id[:40]!r}, not a gradprobe run id "
            "(12 hexadecimal digits); choose an empty folder"
        )
    own = [m for m in chunks if m[2] == run_id]
    steps = max(int(meta.get("steps_written", 0) or 0), int(meta.get("steps", 0) or 0))
    # A kill between a chunk pair and the meta.json that counts it leaves steps on disk that
    # meta.json does not know of: number on from the last step the complete chunks hold.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load reports the damage to whoever reads the run
        on_disk = _load_streamed(folder, {**meta, "run_id": run_id}, strict=False)
    for table in (on_disk.frame(), on_disk.scalars()):
        if len(table) and "step" in table:
            steps = max(steps, int(table["step"].max()) + 1)
    return Resumed(
        run_id=run_id,
        fmt=str(meta["table_format"]) if meta.get("table_format") not in (None, fmt) else fmt,
        seq=max((int(m[3]) for m in own), default=-1) + 1,
        steps=steps,
        dropped_steps=int(meta.get("dropped_steps", 0) or 0),
        dropped_rows=int(meta.get("dropped_rows", 0) or 0),
    )


# ---------------------------------------------------------------------- retrying
class Backoff:
    """When to retry after failed writes: 1 s after the first, then 2 s, 4 s, ... up to a minute."""

    def __init__(self) -> None:
        self.failures = 0
        self.retry_at: float | None = None

    @property
    def failing(self) -> bool:
        """Whether the last write failed (and none has worked since)."""
        return self.retry_at is not None

    def due(self) -> bool:
        """Whether a write may be tried now: none failed, or the delay has passed."""
        return self.retry_at is None or time.monotonic() >= self.retry_at

    def failed(self) -> None:
        self.failures += 1
        self.retry_at = time.monotonic() + min(60.0, 2.0 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = None


# ---------------------------------------------------------------------- the sink
def _options(fmt: str | None, chunk_rows: int, flush_seconds: float) -> tuple[str, int, float]:
    """A sink's table format, chunk size and flush interval, checked (one-line errors)."""
    fmt_ = fmt if fmt is not None else ("parquet" if has_parquet() else "csv")
    if fmt_ not in ("parquet", "csv"):
        raise ValueError(f"sink_options['fmt'] must be 'parquet' or 'csv', got {fmt!r}")
    if fmt_ == "parquet" and not has_parquet():
        raise ImportError("sink_options['fmt']='parquet' needs pyarrow; install it or pass fmt='csv'")
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows!r}")
    if not isinstance(flush_seconds, (int, float)) or not flush_seconds >= 0:
        raise ValueError(f"flush_seconds must be a number >= 0, got {flush_seconds!r}")
    return fmt_, int(chunk_rows), float(flush_seconds)


def _make_folder(path: Path) -> None:
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"sink={str(path)!r} cannot be written ({exc}); pass a writable folder") from exc


class Sink:
    """Streams recorded rows to a run folder from the first step, so memory stays bounded and a
    crash loses at most one flush interval.

    The folder holds ``meta.json`` (written at attach and replaced atomically at every
    flush) and pairs of chunks ``frame-<run>-<seq>-r<rows>.<fmt>`` /
    ``scalars-<run>-<seq>-r<rows>.<fmt>``, each written atomically. A chunk pair holds
    whole steps (a step's rows and scalars are never split) and is written when
    ``chunk_rows`` rows are buffered or ``flush_seconds`` have passed since the last
    flush, at the end of a step. :func:`load` reads every complete pair and reports
    the rest. A lock file (:data:`LOCK_FILE`) keeps a second probe out of the folder;
    ``resume=True`` appends to the run already there (same model class and blocks).

    When a write fails (a full disk), the sink warns once with the path and the error,
    keeps rows in memory up to ``max_buffer_rows`` (later steps are dropped and
    counted in ``meta.json`` as ``dropped_steps``/``dropped_rows``) and retries with
    a growing delay (1 s, 2 s, ... up to a minute) rather than at every step. It never
    raises during training.

    On SIGTERM and SIGHUP an open sink writes what it holds and frees its lock, then the
    previous handler or the signal's default action runs. A sink belongs to the process
    that opened it: in a forked child it never writes, closes or removes anything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunk_rows: int = 50_000,
        fmt: str | None = None,
        flush_seconds: float = 5.0,
        max_buffer_rows: int = 1_000_000,
        resume: bool = False,
        meta: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ):
        self.path = Path(path)
        self.fmt, self.chunk_rows, self.flush_seconds = _options(fmt, chunk_rows, flush_seconds)
        self.max_buffer_rows = max(int(max_buffer_rows), self.chunk_rows)
        self.meta: dict[str, Any] = dict(meta or {})
        self.run_id = run_id or new_run_id()
        self.resumed_steps = 0  # steps already in the folder when resuming
        self._seq = 0
        self._rows = RowStore()
        self._scalars: list[dict[str, Any]] = []
        self._step_rows: list[Mapping[str, Any]] = []
        self._step_scalars: list[dict[str, Any]] = []
        self._steps_written = 0
        self._last_flush = time.monotonic()
        self._backoff = Backoff()
        self._orphan: Path | None = None
        self._warned = False
        self._said: set[str] = set()
        self.dropped_steps = 0
        self.dropped_rows = 0
        self.closed = False
        self._pid = os.getpid()  # the process the sink belongs to: a forked child never writes its files
        self._writing = False  # inside a write: a termination signal waits for its end
        self._ended_by: str | None = None  # why a closed sink drops later steps (a signal, a fork)
        _make_folder(self.path)
        self._lock = FolderLock(self.path)
        self._lock.take(self.run_id)
        try:
            self._adopt_folder(resume)
            atomic_write_text(self.path / "meta.json", _meta_text(self._full_meta()))
            _OPEN_SINKS.add(self)
            _install_signal_handlers()
        except OSError as exc:
            self._lock.release()
            if isinstance(exc, FileExistsError):
                raise
            raise OSError(f"sink={str(path)!r} cannot be written ({exc}); pass a writable folder") from exc
        except BaseException:
            self._lock.release()
            raise

    # -------------------------------------------------------------- the folder
    def _adopt_folder(self, resume: bool) -> None:
        """Take over the streamed run in the folder (with ``resume``), or refuse the folder."""
        resumed = resume_point(self.path, self.meta, self.fmt, self.run_id, resume)
        if resumed is None:
            return
        self.fmt, self.run_id, self._seq = resumed.fmt, resumed.run_id, resumed.seq
        self.resumed_steps = self._steps_written = resumed.steps
        self.dropped_steps, self.dropped_rows = resumed.dropped_steps, resumed.dropped_rows
        self._lock.rename_run(self.run_id)  # the lock names the run it writes; it is never let go meanwhile
        for file in self.path.iterdir():  # writes a dead process left unfinished
            if unfinished_write(file.name):
                with contextlib.suppress(OSError):
                    file.unlink()

    def _full_meta(self) -> dict[str, Any]:
        meta = dict(self.meta)
        meta.update(
            {
                "format_version": FORMAT_VERSION,
                "table_format": self.fmt,
                "streamed": True,
                "run_id": self.run_id,
                "chunks": self._seq,
                "steps_written": self._steps_written,
                "dropped_steps": self.dropped_steps,
                "dropped_rows": self.dropped_rows,
            }
        )
        return meta

    # -------------------------------------------------------------- recording
    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Buffer the rows of the step being closed (written with :meth:`end_step`)."""
        self._step_rows.extend(rows)

    def append_scalars(self, row: Mapping[str, Any]) -> None:
        """Buffer the scalars of the step being closed."""
        self._step_scalars.append(dict(row))

    def end_step(self) -> None:
        """The step is complete: buffer it as one unit and flush when a chunk is due. Never raises."""
        rows, self._step_rows = self._step_rows, []
        scalars, self._step_scalars = self._step_scalars, []
        if not rows and not scalars:
            return
        if self.closed:
            self._after_close()
            return
        if self._backoff.failing and len(self._rows) + len(rows) > self.max_buffer_rows:
            self.dropped_steps += 1
            self.dropped_rows += len(rows)
            return
        try:
            self._rows.append(rows)
        except (OverflowError, ValueError, TypeError, KeyError) as exc:  # never raises during training
            self.dropped_steps += 1
            self.dropped_rows += len(rows)
            self._warn_once(
                "rows", f"a step's rows cannot be stored ({type(exc).__name__}: {exc}); it is dropped"
            )
            return
        self._scalars.extend(scalars)
        steps = [int(r["step"]) for r in (*rows, *scalars)]
        self._steps_written = max(self._steps_written, max(steps) + 1)
        if self._backoff.failing:
            if self._backoff.due():
                self.flush()
        elif len(self._rows) >= self.chunk_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def write_paths(self, frame: pd.DataFrame) -> None:
        """Write the whole paths table (small: one row per recorded step, stack and length), atomically.
        Never raises: a failed write warns once, like a chunk's."""
        if self.closed or os.getpid() != self._pid:
            return
        try:
            atomic_write(self.path / f"paths.{self.fmt}", lambda tmp: _write_table(frame, tmp, self.fmt))
        except Exception as exc:
            warnings.warn(
                f"gradprobe: cannot write the paths table into the sink folder {self.path} ({exc}); "
                "it stays in memory (probe.paths_frame())",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def buffered_rows(self) -> int:
        """Rows held in memory, not yet on disk."""
        return len(self._rows)

    # -------------------------------------------------------------- writing
    def flush(self) -> bool:
        """Write what is buffered as one chunk pair, then ``meta.json``. Never raises on a write error:
        warns once, keeps the rows and schedules a retry; returns whether everything was written."""
        if os.getpid() != self._pid:  # a forked child: the folder is its parent's
            self._disown()
            return False
        self._writing = True
        try:
            self._write_chunk_pair()
            atomic_write_text(self.path / "meta.json", _meta_text(self._full_meta()))
        except Exception as exc:
            self._write_failed(exc)
            with contextlib.suppress(Exception):  # the counts of dropped steps, if a small file still fits
                atomic_write_text(self.path / "meta.json", _meta_text(self._full_meta()))
            return False
        finally:
            self._writing = False
            if _pending_signal is not None:
                _deliver_pending_signal()
        if self._backoff.failing:
            warnings.warn(
                f"gradprobe: writing the sink folder {self.path} works again; every buffered row is on disk "
                f"({self.dropped_steps} steps were dropped meanwhile, counted in meta.json)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._backoff.succeeded()
        self._last_flush = time.monotonic()
        return True

    def _write_chunk_pair(self) -> None:
        """The buffered rows and scalars as chunk pair ``_seq``: the frame chunk first, and removed
        again on the next try if its scalars could not be written (a frame chunk alone is an orphan)."""
        import pandas as pd

        if self._orphan is not None:  # a frame chunk whose scalars could not be written
            self._orphan.unlink(missing_ok=True)
            self._orphan = None
        if not len(self._rows) and not self._scalars:
            return
        frame = self._rows.frame()
        scalars = (
            pd.DataFrame.from_records(self._scalars) if self._scalars else pd.DataFrame({"step": []})
        ).astype({"step": "int64"})
        first = chunk_name(self.path, "frame", self.run_id, self._seq, len(frame), self.fmt)
        atomic_write(first, lambda tmp: _write_table(frame, tmp, self.fmt))
        self._orphan = first
        second = chunk_name(self.path, "scalars", self.run_id, self._seq, len(scalars), self.fmt)
        atomic_write(second, lambda tmp: _write_table(scalars, tmp, self.fmt))
        self._orphan = None
        self._seq += 1
        self._rows.clear()
        self._scalars.clear()

    def _write_failed(self, exc: Exception) -> None:
        self._backoff.failed()
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"gradprobe: cannot write the sink folder {self.path} ({type(exc).__name__}: {exc}). Keeping up "
            f"to {self.max_buffer_rows} rows in memory and retrying with a growing delay; later steps are "
            "dropped and counted in meta.json (dropped_steps). Free space there, or save what is recorded "
            "with probe.save(OTHER_FOLDER).",
            RuntimeWarning,
            stacklevel=4,
        )

    # -------------------------------------------------------------- closing and reading back
    def close(self) -> bool:
        """Write what is left and free the folder's lock; never raises. Rows that could not be
        written stay readable through :meth:`run`."""
        if self.closed:
            return not len(self._rows)
        if os.getpid() != self._pid:
            self._disown()
            return False
        try:
            self.end_step()
        except Exception:
            self._step_rows, self._step_scalars = [], []
        ok = self.flush()
        self.closed = True
        _OPEN_SINKS.discard(self)
        self._lock.release()
        if not _OPEN_SINKS:
            _restore_signal_handlers()
        if not ok:
            warnings.warn(
                f"gradprobe: {len(self._rows)} rows could not be written to the sink folder {self.path}; "
                "they are still in probe.frame() -- save them elsewhere with probe.save(OTHER_FOLDER)",
                RuntimeWarning,
                stacklevel=3,
            )
        return ok

    def _close_on_signal(self, name: str) -> None:
        """A termination signal: drop the step being closed (it may be half recorded), write what
        is buffered, free the lock. Later steps are not recorded (a warning says so once)."""
        self._step_rows, self._step_scalars = [], []
        self.close()
        self._ended_by = f"it was closed on {name}"

    def _disown(self) -> None:
        """In a forked child: this sink is the parent's. Never write, close or unlink its files."""
        self.closed = True
        self._ended_by = f"it belongs to process {self._pid}; a forked child records into a sink of its own"
        self._lock.disown()
        self._rows = RowStore()
        self._scalars = []
        _OPEN_SINKS.discard(self)

    def _after_close(self) -> None:
        """A step recorded after the sink closed: dropped, with a warning (once) saying why."""
        if os.getpid() != self._pid:
            self._disown()
        if self._ended_by is not None:
            self._warn_once("closed", f"steps recorded from now on are not written, as {self._ended_by}")

    def _warn_once(self, key: str, what: str) -> None:
        """Warn of ``what``, once per ``key`` (a kind of problem) over the sink's life."""
        if key in self._said:
            return
        self._said.add(key)
        warnings.warn(f"gradprobe: sink folder {self.path}: {what}", RuntimeWarning, stacklevel=4)

    def run(self) -> Run:
        """The whole run: what is on disk plus what is still buffered in memory. Never raises on
        a write error (the buffered rows come from memory then)."""
        import pandas as pd

        if not self.closed and self._backoff.due():
            self.flush()
        try:
            with warnings.catch_warnings():
                if os.getpid() != self._pid:  # a forked child reads its parent's live run
                    warnings.simplefilter("ignore")
                disk = load(self.path)
        except (OSError, ValueError):
            disk = Run(empty_frame(), _empty_scalars(), self._full_meta())
        if not len(self._rows) and not self._scalars:
            return disk
        frame = pd.concat([disk.frame(), self._rows.frame()], ignore_index=True)
        frame = frame.astype({"step": "int64", "index": "int64", "calls": "int64"})
        scalars = pd.concat([disk.scalars(), pd.DataFrame.from_records(self._scalars)], ignore_index=True)
        return Run(frame, scalars.astype({"step": "int64"}), disk.meta)
