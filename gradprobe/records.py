"""Tables of a run: the column schema, the :class:`Run` container, and save/load.

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
files gradprobe did not write are never removed.
A :class:`Sink` streams a run to disk from its first step (see its docstring
for what a crash can lose and how :func:`load` reports damage).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported lazily so that ``import gradprobe`` stays light
    import pandas as pd

#: Identifying columns of the block frame, in order.
KEY_COLUMNS: tuple[str, ...] = ("step", "block", "index")

#: Gradient and identity metrics recorded by the probe engine (see ``metrics.py``).
METRIC_COLUMNS: tuple[str, ...] = (
    "grad_out",
    "grad_in",
    "gain",
    "cum_gain",
    "skip_grad",
    "branch_grad",
    "branch_cos",
    "res_ratio",
    "cos_xy",
    "in_rms",
    "out_rms",
    "param_norm",
    "param_grad_norm",
    "update_ratio",
)

#: Signal propagation columns (Brock et al. 2021; see ``metrics.py``): per-channel moments of the output.
SIGNAL_COLUMNS: tuple[str, ...] = ("chan_mean_sq", "chan_var", "branch_var")

#: Jacobian columns (see ``jacobian/estimate.py``); NaN on steps where they were not computed.
JACOBIAN_COLUMNS: tuple[str, ...] = ("jac_fro", "jac_spec", "jac_id", "prod_fro", "prod_spec", "jac_batch")

#: Book-keeping columns: how many calls of the block were pooled into the row, and the
#: chain of blocks (``stack``) that ``cum_gain``, ``prod_fro`` and ``prod_spec`` run along.
EXTRA_COLUMNS: tuple[str, ...] = ("calls", "stack")

#: Every column of ``Probe.frame()``, in order.
FRAME_COLUMNS: tuple[str, ...] = (
    KEY_COLUMNS + EXTRA_COLUMNS + METRIC_COLUMNS + SIGNAL_COLUMNS + JACOBIAN_COLUMNS
)

#: Columns that the runner adds when several models are gathered in one :class:`Run`.
MODEL_COLUMNS: tuple[str, ...] = ("model", "depth", "residual")

# Version of a run folder's layout, stored in its meta.json. 2: meta.json holds ``run_id``,
# the path-length table is saved as paths.parquet|csv.
_FORMAT_VERSION = 2


#: One line per column: what it measures. The README's glossary and the HTML report show these.
#: The formulas live in ``metrics.py`` (gradient/identity columns) and ``jacobian/estimate.py``.
GLOSSARY: dict[str, str] = {
    "step": "training step (each backward pass, or each explicit probe.step()); only recorded steps appear",
    "block": "qualified module name of the block, as in model.named_modules()",
    "index": "forward order of the block, 0 = nearest the input",
    "calls": "calls of the block pooled into the row (weight sharing, gradient accumulation)",
    "stack": "the chain of blocks this block belongs to (each block's input computed from the previous "
    "one's output; an encoder and a decoder are two stacks); products run to the stack's last block",
    "grad_out": "|dL/dy|: Euclidean norm of the loss gradient at the block output, over the whole batch",
    "grad_in": "|dL/dx|: norm of the loss gradient at the block input, through this block only",
    "gain": "grad_in / grad_out: how much the block amplifies (>1) or shrinks (<1) the gradient",
    "cum_gain": "grad_in of this block / grad_out of the last block of its stack: the product of gains "
    "from here to the stack's output, i.e. prod(1 + dF/dx) along the gradient training uses",
    "skip_grad": "|g_y|: gradient carried by the identity path (the gradient highway); NaN if shapes change",
    "branch_grad": "|g_x - g_y| = |(dF/dx)^T g_y|: gradient carried by the learned branch F; "
    "NaN if shapes change",
    "branch_cos": "cosine between the skip gradient g_y and the branch gradient g_x - g_y",
    "res_ratio": "|y - x| / |x| (|y - s(x)| / |s(x)| with a shortcut s): forward distance from the identity",
    "cos_xy": "cosine between block input x (or shortcut output) and output y",
    "in_rms": "root mean square of the block input x",
    "out_rms": "root mean square of the block output y (layer response, He et al. 2016, Fig. 7)",
    "param_norm": "norm of the block's own parameters",
    "param_grad_norm": "norm of the gradient of the block's own parameters",
    "update_ratio": "|parameter change since the previous recorded step| / |parameters|",
    "chan_mean_sq": "mean over channels of the squared per-channel mean of the block output y (channel: "
    "dim 1 of 4-d outputs, the last dim of 2-d/3-d ones; mean over batch and positions); Brock et al. 2021",
    "chan_var": "mean over channels of the per-channel variance of y (population, ddof=0); "
    "chan_var + chan_mean_sq is the mean squared activation",
    "branch_var": "mean per-channel variance of y - x (y - s(x) with a shortcut s): the residual branch's "
    "output; NaN when shapes change without a known shortcut",
    "jac_fro": "|J|_F / sqrt(n): RMS singular value of the block Jacobian J = dy/dx (Hutchinson estimate)",
    "jac_spec": "largest singular value of the block Jacobian",
    "jac_id": "|J - I|_F / sqrt(n): RMS of dF/dx, the block's distance from identity as a linear map",
    "prod_fro": "RMS singular value of the product of block Jacobians from this block's input to the "
    "output of the last block of its stack",
    "prod_spec": "largest singular value of that product",
    "jac_batch": "samples (leading dimension of the block input) the Jacobian columns were taken on: "
    "the sub-batch during training, the whole batch otherwise",
}


def has_parquet() -> bool:
    """Whether pyarrow is importable, so runs are stored as Parquet rather than CSV."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def empty_frame() -> pd.DataFrame:
    """An empty block frame with every column of the schema and its dtype."""
    import pandas as pd

    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in FRAME_COLUMNS})
    return frame.astype(
        {"step": "int64", "block": "object", "index": "int64", "calls": "int64", "stack": "object"}
    )


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a block frame from row dicts, filling absent metrics with NaN.

    >>> float(rows_to_frame([{"step": 0, "block": "b", "index": 0, "calls": 1, "gain": 0.5}])["gain"].iloc[0])
    0.5
    """
    import pandas as pd

    rows = list(rows)
    if not rows:
        return empty_frame()
    frame = pd.DataFrame.from_records(rows)
    extra = [c for c in frame.columns if c not in FRAME_COLUMNS]
    for c in FRAME_COLUMNS:
        if c not in frame.columns:
            # rows without a stack (older runs, hand-made frames) are one chain
            frame[c] = "" if c == "stack" else math.nan
    frame = frame[list(FRAME_COLUMNS) + extra]
    return frame.astype({"step": "int64", "index": "int64", "calls": "int64"})


class Run:
    """The tables of one or several probed training runs, plus metadata.

    ``Probe.save`` and ``gradprobe.compare`` produce runs; ``gradprobe.load``
    reads them back. Frames come back equal to the saved ones (values, dtypes
    and column order).

    >>> import pandas as pd
    >>> run = Run(rows_to_frame([]), pd.DataFrame({"step": [0], "loss": [1.0]}), {"every": 1})
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


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {str(c): str(t) for c, t in frame.dtypes.items()}


# ----------------------------------------------------------------------------- atomic files


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
    full_meta["format_version"] = _FORMAT_VERSION
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
    >>> _ = Run(rows_to_frame([]), pd.DataFrame({"step": [0]}), {"every": 3}).save(d)
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
    >>> _ = Run(rows_to_frame([]), pd.DataFrame({"step": [0]}), {}).save(d)
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


# ---------------------------------------------------------------------- path-length tables
#: Columns of a paths table (``probe.paths_frame()``, ``Run.paths()``); see ``gradprobe/path_lengths.py``.
PATHS_COLUMNS: tuple[str, ...] = (
    "step",
    "stack",
    "length",
    "path_grad",
    "share",
    "n_paths",
    "per_path",
    "cum_share",
)


def paths_table(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate path-length frames; an empty table with the columns when there are none.

    >>> list(paths_table([]).columns)[:3]
    ['step', 'stack', 'length']
    """
    import pandas as pd

    parts = [p for p in parts if len(p)]
    if not parts:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in PATHS_COLUMNS})
        return frame.astype({"step": "int64", "stack": "object", "length": "int64"})
    return pd.concat(parts, ignore_index=True)


def _read_paths(folder: Path, dtypes: Mapping[str, Any], fmt: str | None = None) -> pd.DataFrame | None:
    if not (folder / "paths.parquet").exists() and not (folder / "paths.csv").exists():
        return None
    # a sink writes no dtypes for its paths table: step and length are integers, stack a name
    default = {"step": "int64", "stack": "object", "length": "int64"}
    return _read_table(folder / "paths", dtypes.get("paths") or default, fmt)


def _empty_scalars() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"step": pd.Series(dtype="int64")})


#: Float columns of the block frame, in stored order (everything after the keys and ``calls``).
VALUE_COLUMNS: tuple[str, ...] = METRIC_COLUMNS + SIGNAL_COLUMNS + JACOBIAN_COLUMNS


class RowStore:
    """Recorded rows kept compactly in memory: one float64 array per step.

    A (step, block) row costs its 23 float64 values plus five int32 keys,
    204 bytes, instead of ~2 kB as a dict of Python floats.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[Any, Any]] = []  # (keys int32 (n, 5), values float64 (n, k)) per step
        self._names: list[str] = []
        self._ids: dict[str, int] = {}

    def _id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = len(self._names)
            self._names.append(name)
        return self._ids[name]

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add the rows of one step (dicts with every column of FRAME_COLUMNS)."""
        import numpy as np

        if not rows:
            return
        keys = np.array(
            [(r["step"], self._id(r["block"]), r["index"], r["calls"], self._id(r["stack"])) for r in rows],
            dtype=np.int32,
        )
        values = np.array([[r[c] for c in VALUE_COLUMNS] for r in rows], dtype=np.float64)
        self._chunks.append((keys, values))

    def __len__(self) -> int:
        return sum(len(c[0]) for c in self._chunks)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays."""
        return sum(c[0].nbytes + c[1].nbytes for c in self._chunks)

    def frame(self) -> pd.DataFrame:
        """The stored rows as a block frame."""
        import numpy as np
        import pandas as pd

        if not self._chunks:
            return empty_frame()
        keys = np.concatenate([c[0] for c in self._chunks]).astype(np.int64)
        values = np.concatenate([c[1] for c in self._chunks])
        names = np.array(self._names, dtype=object)
        data: dict[str, Any] = {
            "step": keys[:, 0],
            "block": names[keys[:, 1]],
            "index": keys[:, 2],
            "calls": keys[:, 3],
            "stack": names[keys[:, 4]],
        }
        data.update({c: values[:, i] for i, c in enumerate(VALUE_COLUMNS)})
        return pd.DataFrame(data, columns=list(FRAME_COLUMNS))

    def clear(self) -> None:
        self._chunks.clear()


#: A sink's chunk files: ``frame-<run id>-<sequence>-r<rows>.<fmt>`` and the same for scalars.
#: The row count in the name lets :func:`load` tell a complete chunk from one cut short.
_CHUNK = re.compile(r"^(frame|scalars)-([0-9a-f]{12})-(\d{6})-r(\d+)\.(parquet|csv)$")

#: Chunk names of sinks before run ids (``frame-NNNNNN.parquet``), still read.
_LEGACY_CHUNK = re.compile(r"^(frame|scalars)-(\d{6})\.(parquet|csv)$")

#: Sinks not closed yet: written out at interpreter exit (a script that never called detach()).
_OPEN_SINKS: weakref.WeakSet[Sink] = weakref.WeakSet()


@atexit.register
def _close_open_sinks() -> None:
    for sink in list(_OPEN_SINKS):
        with contextlib.suppress(Exception):
            sink.close()


#: The lock file of a sink folder in use: pid, host and run id of the probe holding it.
LOCK_FILE = ".gradprobe.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _release_lock(lock: Path, token: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(lock.read_text()).get("token") == token:
            lock.unlink()


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
        self.fmt = fmt if fmt is not None else ("parquet" if has_parquet() else "csv")
        if self.fmt not in ("parquet", "csv"):
            raise ValueError(f"sink_options['fmt'] must be 'parquet' or 'csv', got {fmt!r}")
        if self.fmt == "parquet" and not has_parquet():
            raise ImportError("sink_options['fmt']='parquet' needs pyarrow; install it or pass fmt='csv'")
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows!r}")
        if not isinstance(flush_seconds, (int, float)) or not flush_seconds >= 0:
            raise ValueError(f"flush_seconds must be a number >= 0, got {flush_seconds!r}")
        self.flush_seconds = float(flush_seconds)
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
        self._failures = 0
        self._retry_at: float | None = None
        self._orphan: Path | None = None
        self._warned = False
        self.dropped_steps = 0
        self.dropped_rows = 0
        self.closed = False
        self._lock: Path | None = None
        try:
            if self.path.exists() and not self.path.is_dir():
                raise NotADirectoryError(f"{self.path} exists and is not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"sink={str(path)!r} cannot be written ({exc}); pass a writable folder") from exc
        self._take_lock()
        try:
            self._adopt_folder(resume)
            atomic_write_text(self.path / "meta.json", _meta_text(self._full_meta()))
            _OPEN_SINKS.add(self)
        except OSError as exc:
            self._drop_lock()
            if isinstance(exc, FileExistsError):
                raise
            raise OSError(f"sink={str(path)!r} cannot be written ({exc}); pass a writable folder") from exc
        except BaseException:
            self._drop_lock()
            raise

    # -------------------------------------------------------------- the folder
    def _take_lock(self) -> None:
        lock = self.path / LOCK_FILE
        token = uuid.uuid4().hex
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": self.run_id,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": token,
        }
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text())
                    if not isinstance(holder, dict):
                        raise ValueError(holder)
                except (OSError, ValueError):
                    holder = None
                stale = (
                    (holder is None and time.time() - lock.stat().st_mtime > 10)  # a lock cut short long ago
                    or (
                        holder is not None
                        and holder.get("host") == info["host"]
                        and not _pid_alive(int(holder.get("pid", 0)))
                    )
                )
                if stale:
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
                    f"sink folder {self.path} is in use by another probe ({who}); detach that probe first, "
                    f"or pass another folder (a stale lock of a dead process is removed automatically; "
                    f"delete {lock} by hand only if no probe writes there)"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
            self._lock = lock
            self._lock_token = token
            # A probe dropped without detach() still frees the folder (at garbage collection or exit).
            self._finalizer = weakref.finalize(self, _release_lock, lock, token)
            return
        raise FileExistsError(f"sink folder {self.path}: cannot take its lock file {lock}")

    def _drop_lock(self) -> None:
        if self._lock is not None:
            self._finalizer()
            self._lock = None

    def _adopt_folder(self, resume: bool) -> None:
        names = [p.name for p in self.path.iterdir()]
        chunks = [m for m in map(_CHUNK.match, names) if m]
        has_tables = any(n in _TABLE_FILES for n in names)
        meta: dict[str, Any] | None = None
        if "meta.json" in names:
            try:
                meta = read_meta(self.path)
            except ValueError as exc:
                raise FileExistsError(
                    f"{self.path} holds a damaged run ({exc}); choose an empty folder"
                ) from None
        if meta is None and not chunks and not has_tables:
            return  # a new folder
        if meta is None or not meta.get("streamed") or has_tables:
            raise FileExistsError(
                f"sink folder {self.path} holds a saved run (meta.json/frame tables); a sink never writes "
                "over one: choose an empty folder"
            )
        desc = f"run {meta.get('run_id')} of {meta.get('model_class', '?')}, {len(chunks)} chunk files"
        if not resume:
            raise FileExistsError(
                f"sink folder {self.path} already holds a streamed run ({desc}); pass "
                "sink_options={'resume': True} to append to it, or choose an empty folder"
            )
        for key in ("model_class", "blocks"):
            mine, theirs = self.meta.get(key), meta.get(key)
            if key == "blocks" and mine is not None and theirs is not None:
                mine, theirs = sorted(mine), sorted(theirs)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"resume: the run in {self.path} was recorded with {key}={meta.get(key)!r}, this probe "
                    f"has {self.meta.get(key)!r}; resume appends only to a run of the same model and blocks"
                )
        if meta.get("table_format") not in (None, self.fmt):
            self.fmt = str(meta["table_format"])
        self.run_id = str(meta.get("run_id") or self.run_id)
        own = [m for m in chunks if m[2] == self.run_id]
        self._seq = max((int(m[3]) for m in own), default=-1) + 1
        self.resumed_steps = max(int(meta.get("steps_written", 0) or 0), int(meta.get("steps", 0) or 0))
        # A kill between a chunk pair and the meta.json that counts it leaves steps on disk that
        # meta.json does not know of: number on from the last step the complete chunks hold.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load reports the damage to whoever reads the run
            on_disk = _load_streamed(self.path, {**meta, "run_id": self.run_id}, strict=False)
        for table in (on_disk.frame(), on_disk.scalars()):
            if len(table) and "step" in table:
                self.resumed_steps = max(self.resumed_steps, int(table["step"].max()) + 1)
        self._steps_written = self.resumed_steps
        self.dropped_steps = int(meta.get("dropped_steps", 0) or 0)
        self.dropped_rows = int(meta.get("dropped_rows", 0) or 0)
        if self._lock is not None:  # the lock names the run it writes
            _release_lock(self._lock, self._lock_token)
            self._finalizer.detach()
            self._lock = None
            self._take_lock()
        for name in names:  # writes a dead process left unfinished
            if name.startswith((".frame-", ".scalars-", ".meta.json.")) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()

    def _full_meta(self) -> dict[str, Any]:
        meta = dict(self.meta)
        meta.update(
            {
                "format_version": _FORMAT_VERSION,
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
        if (not rows and not scalars) or self.closed:
            return
        if self._retry_at is not None and len(self._rows) + len(rows) > self.max_buffer_rows:
            self.dropped_steps += 1
            self.dropped_rows += len(rows)
            return
        self._rows.append(rows)
        self._scalars.extend(scalars)
        steps = [int(r["step"]) for r in (*rows, *scalars)]
        self._steps_written = max(self._steps_written, max(steps) + 1)
        now = time.monotonic()
        if self._retry_at is not None:
            if now >= self._retry_at:
                self.flush()
        elif len(self._rows) >= self.chunk_rows or now - self._last_flush >= self.flush_seconds:
            self.flush()

    def write_paths(self, frame: pd.DataFrame) -> None:
        """Write the whole paths table (small: one row per recorded step, stack and length), atomically.
        Never raises: a failed write warns once, like a chunk's."""
        try:
            atomic_write(self.path / f"paths.{self.fmt}", lambda tmp: _write_table(frame, tmp, self.fmt))
        except OSError as exc:
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

    def _chunk_name(self, stem: str, rows: int) -> Path:
        return self.path / f"{stem}-{self.run_id}-{self._seq:06d}-r{rows}.{self.fmt}"

    def flush(self) -> bool:
        """Write what is buffered as one chunk pair, then ``meta.json``. Never raises on a write error:
        warns once, keeps the rows and schedules a retry; returns whether everything was written."""
        import pandas as pd

        try:
            if self._orphan is not None:  # a frame chunk whose scalars could not be written
                self._orphan.unlink(missing_ok=True)
                self._orphan = None
            if len(self._rows) or self._scalars:
                frame = self._rows.frame()
                scalars = (
                    pd.DataFrame.from_records(self._scalars) if self._scalars else pd.DataFrame({"step": []})
                ).astype({"step": "int64"})
                first = self._chunk_name("frame", len(frame))
                atomic_write(first, lambda tmp: _write_table(frame, tmp, self.fmt))
                self._orphan = first
                second = self._chunk_name("scalars", len(scalars))
                atomic_write(second, lambda tmp: _write_table(scalars, tmp, self.fmt))
                self._orphan = None
                self._seq += 1
                self._rows.clear()
                self._scalars.clear()
            atomic_write_text(self.path / "meta.json", _meta_text(self._full_meta()))
        except OSError as exc:
            self._write_failed(exc)
            with contextlib.suppress(OSError):  # the counts of dropped steps, if a small file still fits
                atomic_write_text(self.path / "meta.json", _meta_text(self._full_meta()))
            return False
        if self._retry_at is not None:
            warnings.warn(
                f"gradprobe: writing the sink folder {self.path} works again; every buffered row is on disk "
                f"({self.dropped_steps} steps were dropped meanwhile, counted in meta.json)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._retry_at = None
        self._failures = 0
        self._last_flush = time.monotonic()
        return True

    def _write_failed(self, exc: OSError) -> None:
        self._failures += 1
        delay = min(60.0, 2.0 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
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

    def close(self) -> bool:
        """Write what is left and free the folder's lock; never raises. Rows that could not be
        written stay readable through :meth:`run`."""
        if self.closed:
            return not len(self._rows)
        self.end_step()
        ok = self.flush()
        self.closed = True
        _OPEN_SINKS.discard(self)
        self._drop_lock()
        if not ok:
            warnings.warn(
                f"gradprobe: {len(self._rows)} rows could not be written to the sink folder {self.path}; "
                "they are still in probe.frame() -- save them elsewhere with probe.save(OTHER_FOLDER)",
                RuntimeWarning,
                stacklevel=3,
            )
        return ok

    def run(self) -> Run:
        """The whole run: what is on disk plus what is still buffered in memory. Never raises on
        a write error (the buffered rows come from memory then)."""
        import pandas as pd

        if not self.closed and (self._retry_at is None or time.monotonic() >= self._retry_at):
            self.flush()
        try:
            disk = load(self.path)
        except (OSError, ValueError):
            disk = Run(empty_frame(), _empty_scalars(), self._full_meta())
        if not len(self._rows) and not self._scalars:
            return disk
        frame = pd.concat([disk.frame(), self._rows.frame()], ignore_index=True)
        frame = frame.astype({"step": "int64", "index": "int64", "calls": "int64"})
        scalars = pd.concat([disk.scalars(), pd.DataFrame.from_records(self._scalars)], ignore_index=True)
        return Run(frame, scalars.astype({"step": "int64"}), disk.meta)


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
        elif p.name.startswith((".frame-", ".scalars-", ".meta.json.")) and p.name.endswith(".tmp"):
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


class RecordedTables:
    """The tables a probe has recorded so far, read back through its :class:`Recorder` ``_out``.

    A base of :class:`gradprobe.Probe`: each view first closes a finished step (``_flush``).
    """

    _out: Recorder

    def _flush(self) -> None:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def last_rows(self) -> list[dict[str, Any]]:
        """The rows of the latest recorded step that has closed, one dict per block (for live logging).

        Closes a finished step first, as :meth:`frame` does; empty before the first recorded step
        closes. Cheap (no DataFrame), so a training-loop callback can call it on every step.

        >>> import torch, torch.nn as nn, gradprobe
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> with gradprobe.attach(net, ["0", "1"]) as probe:
        ...     net(torch.randn(2, 4)).sum().backward()
        ...     [(r["step"], r["block"]) for r in probe.last_rows()]
        [(0, '0'), (0, '1')]
        """
        self._flush()
        return [dict(row) for row in self._out.last_rows]

    def frame(self, gather: bool = False) -> pd.DataFrame:
        """One row per (recorded step, block), columns as in :data:`gradprobe.records.FRAME_COLUMNS`.

        Under ``torch.distributed`` a ``rank`` column is added; ``gather=True`` returns
        every rank's rows on rank 0 (a collective: call it on every rank; other ranks
        get their own rows).
        """
        self._flush()
        return rank_view(self._out.frame(), gather)

    def scalars(self, gather: bool = False) -> pd.DataFrame:
        """One row per step with the logged scalars (every step, recorded or not)."""
        self._flush()
        return rank_view(self._out.scalars(), gather)

    def paths_frame(self) -> pd.DataFrame:
        """The path-length decompositions of ``attach(..., paths=N)``: one row per (step, stack,
        length), columns ``step`` and those of :func:`gradprobe.paths`; empty without ``paths=``."""
        self._flush()
        return self._out.paths()

    def run(self) -> Run:
        """The recorded tables as a :class:`gradprobe.records.Run`."""
        paths = self.paths_frame() if self._out.paths_on else None
        return Run(self.frame(), self.scalars(), self.meta(), paths=paths)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> os.PathLike[str]:
        """Save frame, scalars and metadata into the folder ``path``; read back with ``gradprobe.load``.

        Saving again updates the folder; a folder holding another run needs ``overwrite=True``.
        """
        return self.run().save(path, overwrite=overwrite)


class Recorder:
    """Where a probe's closed steps go, and how they are read back as frames.

    Rows and scalars go into memory (a :class:`RowStore`) or, given a ``sink``, stream into
    its folder; ``meta()`` is called whenever the sink's metadata must be current.
    """

    def __init__(self, sink: Sink | None, meta: Callable[[], dict[str, Any]], paths: bool = False) -> None:
        self.sink = sink
        self.paths_on = paths  # whether path-length decompositions are taken (a run has their table)
        self.store = RowStore()
        self._meta = meta
        self._scalar_rows: list[dict[str, Any]] = []
        self.last_rows: list[dict[str, Any]] = []  # of the latest recorded step
        self.paths_parts: list[pd.DataFrame] = []

    def add_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """The scalars logged in ``step`` (kept for every step, recorded or not)."""
        if self.sink is not None:
            self.sink.append_scalars({"step": step, **scalars})
        else:
            self._scalar_rows.append({"step": step, **scalars})

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """The rows of one recorded step."""
        self.last_rows = rows
        (self.sink or self.store).append(rows)

    def end_step(self) -> None:
        """A step closed: its rows and scalars reach the sink as one unit."""
        if self.sink is not None:
            self.sink.end_step()

    def _streamed(self) -> Run | None:
        """With a sink: write what is buffered and read the run back (what is on disk plus what
        a failing disk left in memory)."""
        if self.sink is None:
            return None
        self.sink.meta = self._meta()
        if self.paths_parts:
            self.sink.write_paths(self.paths())
        return self.sink.run()

    def frame(self) -> pd.DataFrame:
        """The recorded rows (see :meth:`gradprobe.Probe.frame`)."""
        streamed = self._streamed()
        return streamed.frame() if streamed is not None else self.store.frame()

    def scalars(self) -> pd.DataFrame:
        """The logged scalars, one row per step."""
        import pandas as pd

        streamed = self._streamed()
        if streamed is not None:
            return streamed.scalars()
        frame = (
            pd.DataFrame.from_records(self._scalar_rows) if self._scalar_rows else pd.DataFrame({"step": []})
        )
        return frame.astype({"step": "int64"})

    def paths(self) -> pd.DataFrame:
        """The path-length decompositions taken so far."""
        return paths_table(self.paths_parts)

    def close(self) -> None:
        """Write what is left and close the sink (never raises: a sink that cannot write warns)."""
        if self.sink is not None and not self.sink.closed:
            if self.paths_parts:
                self.sink.write_paths(self.paths())
            self.sink.meta = self._meta()
            self.sink.close()


def rank_view(frame: pd.DataFrame, gather: bool) -> pd.DataFrame:
    """Under ``torch.distributed``: the frame with a ``rank`` column; ``gather=True`` returns
    every rank's rows on rank 0 (a collective: call it on every rank). Else the frame as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return frame
    frame = frame.assign(rank=dist.get_rank())
    if not gather:
        return frame
    import pandas as pd

    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(frame, parts, dst=0)
    if parts is None:
        return frame
    return pd.concat(parts, ignore_index=True)
