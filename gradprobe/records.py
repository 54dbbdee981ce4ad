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
      meta.json        versions, model class, block names, settings, dtypes

No pickle is used anywhere, so loading a run never executes code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
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

#: Jacobian columns (see ``jacobian.py``); NaN on steps where they were not computed.
JACOBIAN_COLUMNS: tuple[str, ...] = ("jac_fro", "jac_spec", "jac_id", "prod_fro", "prod_spec", "jac_batch")

#: Book-keeping columns: how many calls of the block were pooled into the row.
EXTRA_COLUMNS: tuple[str, ...] = ("calls",)

#: Every column of ``Probe.frame()``, in order.
FRAME_COLUMNS: tuple[str, ...] = (
    KEY_COLUMNS + EXTRA_COLUMNS + METRIC_COLUMNS + SIGNAL_COLUMNS + JACOBIAN_COLUMNS
)

#: Columns that the runner adds when several models are gathered in one :class:`Run`.
MODEL_COLUMNS: tuple[str, ...] = ("model", "depth", "residual")

_FORMAT_VERSION = 1


#: One line per column: what it measures. The README's glossary and the HTML report show these.
#: The formulas live in ``metrics.py`` (gradient/identity columns) and ``jacobian.py``.
GLOSSARY: dict[str, str] = {
    "step": "training step (each backward pass, or each explicit probe.step()); only recorded steps appear",
    "block": "qualified module name of the block, as in model.named_modules()",
    "index": "forward order of the block, 0 = nearest the input",
    "calls": "calls of the block pooled into the row (weight sharing, gradient accumulation)",
    "grad_out": "|dL/dy|: Euclidean norm of the loss gradient at the block output, over the whole batch",
    "grad_in": "|dL/dx|: norm of the loss gradient at the block input, through this block only",
    "gain": "grad_in / grad_out: how much the block amplifies (>1) or shrinks (<1) the gradient",
    "cum_gain": "grad_in of this block / grad_out of the last block: the product of gains from here to the "
    "output, i.e. prod(1 + dF/dx) along the gradient training uses",
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
    "prod_fro": "RMS singular value of the product of block Jacobians from this block's input to the last "
    "block's output",
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
    return frame.astype({"step": "int64", "block": "object", "index": "int64", "calls": "int64"})


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
            frame[c] = math.nan
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

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the run into the folder ``path`` (created if needed); return it."""
        return save_run(path, self._frame, self._scalars, self.meta, paths=self._paths)

    def __repr__(self) -> str:
        steps = self._frame["step"].nunique() if len(self._frame) else 0
        blocks = self._frame["block"].nunique() if len(self._frame) else 0
        models = f", models={self.models}" if self.models else ""
        return f"Run(steps={steps}, blocks={blocks}, rows={len(self._frame)}{models})"


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {str(c): str(t) for c, t in frame.dtypes.items()}


def _write_table(frame: pd.DataFrame, base: Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.to_parquet(base.with_suffix(".parquet"), index=False)
    else:
        frame.to_csv(base.with_suffix(".csv"), index=False)


def _read_table(base: Path, dtypes: Mapping[str, str]) -> pd.DataFrame:
    import pandas as pd

    if base.with_suffix(".parquet").exists():
        if not has_parquet():
            raise ImportError(
                f"{base.with_suffix('.parquet')} is Parquet but pyarrow is not installed; "
                "install it with `pip install pyarrow` (or `pip install gradprobe[parquet]`)."
            )
        frame = pd.read_parquet(base.with_suffix(".parquet"))
    elif base.with_suffix(".csv").exists():
        # keep_default_na=False + na_values=[""] so a block literally named "NA" stays a string
        frame = pd.read_csv(base.with_suffix(".csv"), keep_default_na=False, na_values=[""])
    else:
        raise FileNotFoundError(f"no {base.name}.parquet or {base.name}.csv in {base.parent}")
    for col, dtype in dtypes.items():
        if col in frame.columns and str(frame[col].dtype) != dtype:
            frame[col] = frame[col].astype(dtype)  # type: ignore[call-overload]
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


def save_run(
    path: str | os.PathLike[str],
    frame: pd.DataFrame,
    scalars: pd.DataFrame,
    meta: Mapping[str, Any],
    *,
    fmt: str | None = None,
    paths: pd.DataFrame | None = None,
) -> Path:
    """Write frame, scalars and metadata into the folder ``path``.

    ``fmt`` is ``"parquet"`` or ``"csv"``; by default Parquet when pyarrow is
    installed, CSV otherwise.
    """
    if fmt is None:
        fmt = "parquet" if has_parquet() else "csv"
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; a run is saved as a folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("frame", "scalars", "paths"):  # never leave a table of another format behind
        for suffix in (".parquet", ".csv"):
            (out / stale).with_suffix(suffix).unlink(missing_ok=True)
    _write_table(frame, out / "frame", fmt)
    _write_table(scalars, out / "scalars", fmt)
    if paths is not None:
        _write_table(paths, out / "paths", fmt)
    full_meta = dict(meta)
    full_meta["format_version"] = _FORMAT_VERSION
    full_meta["table_format"] = fmt
    full_meta["dtypes"] = {"frame": _dtypes(frame), "scalars": _dtypes(scalars)}
    if paths is not None:
        full_meta["dtypes"]["paths"] = _dtypes(paths)
    (out / "meta.json").write_text(json.dumps(_jsonable(full_meta), indent=2, sort_keys=True))
    return out


def load(path: str | os.PathLike[str]) -> Run:
    """Read a run saved by ``Probe.save``, ``Run.save`` or ``gradprobe compare``.

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
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{folder} has no meta.json; is it a gradprobe run folder?")
    meta = json.loads(meta_file.read_text())
    dtypes = meta.pop("dtypes", {})
    streamed = _read_chunks(folder, "frame")
    if streamed is not None:  # a run streamed by a sink: concatenate its chunks
        scalars_part = _read_chunks(folder, "scalars")
        frame = rows_to_frame([]) if not len(streamed) else streamed
        frame = frame.astype({"step": "int64", "index": "int64", "calls": "int64"})
        scalars = scalars_part if scalars_part is not None else _empty_scalars()
        return Run(frame, scalars.astype({"step": "int64"}), meta, paths=_read_paths(folder, dtypes))
    frame = _read_table(folder / "frame", dtypes.get("frame", {}))
    scalars = _read_table(folder / "scalars", dtypes.get("scalars", {}))
    return Run(frame, scalars, meta, paths=_read_paths(folder, dtypes))


# ---------------------------------------------------------------------- path-length tables
#: Columns of a paths table (``probe.paths_frame()``, ``Run.paths()``); see ``gradprobe/paths.py``.
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
        return frame.astype({"step": "int64", "stack": "int64", "length": "int64"})
    return pd.concat(parts, ignore_index=True)


def _read_paths(folder: Path, dtypes: Mapping[str, Any]) -> pd.DataFrame | None:
    if not (folder / "paths.parquet").exists() and not (folder / "paths.csv").exists():
        return None
    return _read_table(folder / "paths", dtypes.get("paths", {}))


def _empty_scalars() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"step": pd.Series(dtype="int64")})


#: Float columns of the block frame, in stored order (everything after the keys and ``calls``).
VALUE_COLUMNS: tuple[str, ...] = METRIC_COLUMNS + SIGNAL_COLUMNS + JACOBIAN_COLUMNS


class RowStore:
    """Recorded rows kept compactly in memory: one float64 array per step.

    A (step, block) row costs its 23 float64 values plus four int32 keys,
    200 bytes, instead of ~2 kB as a dict of Python floats.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[Any, Any]] = []  # (keys int32 (n, 4), values float64 (n, k)) per step
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
            [(r["step"], self._id(r["block"]), r["index"], r["calls"]) for r in rows], dtype=np.int32
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
        }
        data.update({c: values[:, i] for i, c in enumerate(VALUE_COLUMNS)})
        return pd.DataFrame(data, columns=list(FRAME_COLUMNS))

    def clear(self) -> None:
        self._chunks.clear()


class Sink:
    """Streams recorded rows to a run folder in chunks, so memory stays bounded on long runs.

    The folder holds ``frame-NNNNNN.parquet`` (or ``.csv``) and
    ``scalars-NNNNNN.*`` chunks plus ``meta.json``; every chunk is written to a
    temporary name and renamed, so an interrupted run leaves only complete
    chunks. :func:`load` reads such a folder as one run.
    """

    def __init__(self, path: str | os.PathLike[str], *, chunk_rows: int = 50_000, fmt: str | None = None):
        self.path = Path(path)
        self.fmt = fmt or ("parquet" if has_parquet() else "csv")
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows!r}")
        try:
            if self.path.exists() and not self.path.is_dir():
                raise NotADirectoryError(f"{self.path} exists and is not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
            if any(self.path.glob("frame-*")):
                raise FileExistsError(f"{self.path} already holds a streamed run; choose an empty folder")
            probe_file = self.path / ".write-test"
            probe_file.write_text("ok")
            probe_file.unlink()
        except OSError as exc:
            raise OSError(f"sink={str(path)!r} cannot be written ({exc}); pass a writable folder") from exc
        self._rows = RowStore()
        self._scalars: list[dict[str, Any]] = []
        self._chunk = 0
        self.meta: dict[str, Any] = {}

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._rows.append(rows)
        if len(self._rows) >= self.chunk_rows:
            self.flush()

    def append_scalars(self, row: Mapping[str, Any]) -> None:
        self._scalars.append(dict(row))

    def write_paths(self, frame: pd.DataFrame) -> None:
        """Write the whole paths table (small: one row per recorded step, stack and length), atomically."""
        final = self.path / f"paths.{self.fmt}"
        tmp = final.with_name("." + final.name + ".tmp")
        if self.fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, final)

    def _write(self, frame: pd.DataFrame, stem: str) -> None:
        final = self.path / f"{stem}-{self._chunk:06d}.{self.fmt}"
        tmp = final.with_name("." + final.name + ".tmp")
        if self.fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, final)

    def flush(self) -> None:
        """Write buffered rows and scalars as a new chunk (nothing if empty), and the metadata."""
        import pandas as pd

        if len(self._rows) or self._scalars:
            self._write(self._rows.frame(), "frame")
            scalars = (
                pd.DataFrame.from_records(self._scalars) if self._scalars else pd.DataFrame({"step": []})
            )
            self._write(scalars.astype({"step": "int64"}), "scalars")
            self._chunk += 1
            self._rows.clear()
            self._scalars.clear()
        meta = dict(self.meta)
        meta.update({"format_version": _FORMAT_VERSION, "table_format": self.fmt, "streamed": True})
        (self.path / "meta.json").write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True))


def _read_chunks(folder: Path, stem: str) -> pd.DataFrame | None:
    import pandas as pd

    files = sorted(folder.glob(f"{stem}-*.parquet")) + sorted(folder.glob(f"{stem}-*.csv"))
    if not files:
        return None
    parts = [
        pd.read_parquet(f)
        if f.suffix == ".parquet"
        else pd.read_csv(f, keep_default_na=False, na_values=[""])
        for f in files
    ]
    parts = [p for p in parts if len(p)] or parts[:1]
    return pd.concat(parts, ignore_index=True)
