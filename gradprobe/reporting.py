"""The self-contained HTML report of a run: summary table, figures with captions, glossary.

The function is ``gradprobe.report``; this module is named ``reporting`` so that the
two never collide. :func:`report` reads only tables (a :class:`~gradprobe.records.Run`, a saved
run folder, a frame, or any object with ``frame()``/``scalars()`` such as a
probe) and writes into one folder::

    out/
      index.html        one file that opens offline: figures embedded as PNG data URIs,
                        inline CSS, no scripts, fonts or stylesheets from elsewhere
      highway.png ...   each figure as a PNG
      frame.parquet     the tables (CSV without pyarrow) and meta.json, so that
      scalars.parquet   ``gradprobe.load(out)`` reads the run back
      meta.json

Nothing is lost: a report into a new folder is built under a temporary name and
renamed into place when complete; into an existing folder every file is replaced
atomically, ``index.html`` last. A report into the folder of the run it shows
only adds files (the run's tables are never rewritten), and a folder holding a
different run is written only with ``overwrite=True``.

The page is rendered by Jinja2 with autoescaping, so model and block names are
shown literally (never interpreted as HTML).
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import _format, plot, records
from ._version import __version__
from .summary import GAIN_BAND, summary

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["FIGURES", "FigureSpec", "report"]

#: Largest change of a colour channel (0..255) that PNG palette quantisation may make.
_MAX_QUANTIZE_ERROR = 24


@dataclass(frozen=True)
class _Inputs:
    frame: pd.DataFrame
    scalars: pd.DataFrame
    palette: dict[str, Any]
    spectra: Any
    paths: Any = None  # the run's path-length table (Run.paths()), possibly empty


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: file stem, heading, caption, and how to draw it (None: no data)."""

    name: str
    title: str
    caption: str
    draw: Callable[[_Inputs], Figure | None]


def _finite(frame: pd.DataFrame, *columns: str) -> bool:
    return any(c in frame.columns and bool(np.isfinite(np.asarray(frame[c], float)).any()) for c in columns)


def _draw_highway(d: _Inputs) -> Figure | None:
    return plot.highway_figure(d.frame, palette=d.palette) if _finite(d.frame, "cum_gain") else None


def _draw_gain(d: _Inputs) -> Figure | None:
    return plot.gain_heatmaps(d.frame, palette=d.palette) if _finite(d.frame, "gain") else None


def _draw_identity(d: _Inputs) -> Figure | None:
    ok = _finite(d.frame, "res_ratio", "jac_id")
    return plot.identity_figure(d.frame, palette=d.palette) if ok else None


def _draw_skip_branch(d: _Inputs) -> Figure | None:
    ok = _finite(d.frame, "skip_grad", "branch_grad")
    return plot.skip_branch_figure(d.frame, palette=d.palette) if ok else None


def _draw_training(d: _Inputs) -> Figure | None:
    s = d.scalars
    if "step" not in s.columns or (plot.loss_column(s) is None and plot.accuracy_column(s) is None):
        return None
    return plot.training_figure(s, palette=d.palette)


def _draw_responses(d: _Inputs) -> Figure | None:
    return plot.responses_figure(d.frame, palette=d.palette) if _finite(d.frame, "out_rms") else None


def _draw_paths(d: _Inputs) -> Figure | None:
    if d.paths is None or not len(d.paths) or not _finite(d.paths, "share"):
        return None
    return cast("Figure", plot.plot_path_lengths(d.paths, palette=d.palette).figure)


def _draw_signal(d: _Inputs) -> Figure | None:
    columns = ("chan_mean_sq", "chan_var", "branch_var")
    if not all(c in d.frame.columns for c in columns) or not _finite(d.frame, "chan_var"):
        return None
    return cast("Figure", plot.plot_signal_propagation(d.frame, step="first", palette=d.palette).figure)


def _draw_jacobian(d: _Inputs) -> Figure | None:
    if not plot.has_jacobian(d.frame) and d.spectra is None:
        return None
    return plot.jacobian_figure(d.frame, spectrum=d.spectra, palette=d.palette)


#: The report's figures, in page order. A figure whose columns hold no values is left out.
FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "training",
        "Training curves",
        "Training loss (log axis; faint: every step, solid: rolling mean) and accuracy per model. "
        "The degradation problem shows when a deeper plain net ends with a higher training loss than a "
        "shallower one (on the training set itself, so it is not overfitting) while the residual net of "
        "the same depth does not.",
        _draw_training,
    ),
    FigureSpec(
        "highway",
        "Gradient highway",
        "Cumulative gain from each block to the output of its stack, cum_gain = |dL/dx| at the block / "
        "|dL/dy| at the stack's last block (an encoder and a decoder are two stacks, two lines), on a log "
        "axis, at the first and at the last recorded step. A flat line near 1 "
        "(dotted) is a working gradient highway: the first blocks get as much gradient as the last. A "
        "line that falls towards the input (left) means vanishing gradients, one that rises means "
        "exploding gradients. Compare plain and residual nets of the same depth.",
        _draw_highway,
    ),
    FigureSpec(
        "gain",
        "Block gain over training",
        "Block gain |dL/dx| / |dL/dy| for every block (rows, input at the top) and recorded step "
        "(columns), on a log colour scale centred on 1 (white). Red blocks amplify the gradient on its "
        "way back to the input, blue ones shrink it; grey is not measured. Gains compound: a long run of "
        "pale-blue blocks in a deep plain net is how gradients vanish. Residual blocks should stay pale.",
        _draw_gain,
    ),
    FigureSpec(
        "identity",
        "Distance from identity",
        "How far each block is from the identity map during training, one line per block coloured from "
        "the input (dark) to the output (light). res_ratio = |y - x| / |x| is the forward distance (0: the "
        "block passes its input through unchanged); jac_id, when Jacobians were recorded, measures the "
        "same for the block as a linear map. Residual blocks start close to 0 (exactly 0 with "
        "zero-initialised branches) and move away as they learn; plain blocks are far from it.",
        _draw_identity,
    ),
    FigureSpec(
        "skip_branch",
        "Skip versus branch",
        "Gradient reaching each block's input through the identity skip (|g_y|, solid) and through the "
        "learned branch (|g_x - g_y|, dashed), at the last recorded step. Where the solid line lies above "
        "the dashed one most of the gradient takes the highway. A plain block has no skip: its solid line "
        "only shows the gradient arriving at the block, for reference. Gaps are blocks that change shape "
        "(projections), where the split is undefined.",
        _draw_skip_branch,
    ),
    FigureSpec(
        "responses",
        "Layer responses",
        "RMS of each block's output at the last recorded step, in forward order (left) and sorted from "
        "the largest to the smallest (right), after He et al. (2016), Fig. 7. In a residual net the "
        "output of a block includes its input, so responses accumulate with depth when branches add "
        "little; sudden jumps point at blocks that amplify or shrink the signal.",
        _draw_responses,
    ),
    FigureSpec(
        "signal",
        "Signal propagation",
        "Signal propagation plot (Brock, De and Smith, 2021) at the first recorded step (initialisation): "
        "per block, the average over channels of the squared channel mean and of the channel variance "
        "of the block output, and the variance of the residual branch's output y - x. In a normalised "
        "residual net the variance grows about linearly with depth while each branch adds a similar "
        "amount; a mean that grows with depth means the channels share an offset, and a branch variance "
        "near 0 means the block is close to the identity (zero-initialised branches are exactly 0).",
        _draw_signal,
    ),
    FigureSpec(
        "paths",
        "Gradient by path length",
        "The gradient at the first block's input split by path length k, the number of residual "
        "branches a path goes through (Veit, Wilber and Belongie, 2016, Fig. 6): |c_k| / sum_j |c_j| "
        "for the stack with the most blocks, at the first (dashed) and the last (solid) decomposed "
        "step, one colour per model. Grey: the binomial distribution of the number of paths of each "
        "length, C(L, k) / 2^L, what the shares would be if every path carried the same gradient. "
        "Veit et al. found that in a trained ResNet-110 almost all the gradient comes from paths of 5 to "
        "17 of its 54 blocks. Plain blocks are read as a skip plus a branch too (F = H - I), so their "
        "decomposition is exact but describes a fictitious split.",
        _draw_paths,
    ),
    FigureSpec(
        "jacobian",
        "Jacobian singular values",
        "Singular values of each block's Jacobian J = dy/dx (RMS singular value solid, largest dashed) "
        "and of the product of the Jacobians from each block to the output, at the last step where they "
        "were computed; and, when given, a histogram of singular values from gradprobe.spectrum. Near 1 "
        "(dotted) a map is an isometry: signals and gradients keep their size. Products far from 1 at "
        "the input end are the Jacobian view of vanishing or exploding gradients.",
        _draw_jacobian,
    ),
)


# ----------------------------------------------------------------------------- inputs


def _as_run(run: Any) -> records.Run:
    import pandas as pd

    if isinstance(run, records.Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return records.load(run)
    if isinstance(run, pd.DataFrame):
        return records.Run(run, pd.DataFrame({"step": pd.Series(dtype="int64")}), {})
    if callable(getattr(run, "frame", None)) and callable(getattr(run, "scalars", None)):
        meta = getattr(run, "meta", None)
        if callable(meta):  # Probe.meta() is a method; Run.meta a dict
            meta = meta()
        paths = run.paths_frame() if callable(getattr(run, "paths_frame", None)) else None
        return records.Run(run.frame(), run.scalars(), meta if isinstance(meta, Mapping) else {}, paths=paths)
    raise TypeError(
        "report() takes a gradprobe Run, a probe (anything with .frame() and .scalars()), the folder "
        f"of a saved run, or a block frame (pandas DataFrame); got {type(run).__name__}"
    )


#: How the report shows a missing value.
_NAN = "–"


def _num(value: Any) -> str:
    return _format.number(value, nan=_NAN)


def _hex(colour: Any) -> str:
    return "#" + "".join(f"{round(255 * float(c)):02x}" for c in tuple(colour)[:3])


def _summary_rows(table: pd.DataFrame, band: tuple[float, float]) -> tuple[list[str], list[list[str]]]:
    """The report's summary table: the columns of :func:`gradprobe.summary.summary`, as text."""
    has = set(table.columns)
    header = ["model"] + [c for c in ("depth", "residual") if c in has]
    header += [
        "train loss",
        "test accuracy",
        "cum_gain at init: first block (all blocks min – max)",
        "cum_gain at end: first block (all blocks min – max)",
        "res_ratio at init",
        "res_ratio at end",
        "effective length at init",
        "effective length at end",
        f"blocks with gain outside [{band[0]:g}, {band[1]:g}]",
        "max res_ratio (block)",
    ]
    body = []
    for _, r in table.iterrows():
        cells = [str(r["model"])]
        if "depth" in has:
            cells.append(_num(r["depth"]))
        if "residual" in has:
            cells.append("yes" if bool(r["residual"]) else "no")
        outside = str(r["gain_outside_blocks"])
        if len(outside) > 120:
            outside = outside[:117] + "..."
        cells += [_num(r["train_loss"]), _format.percent(r["test_acc"], nan=_NAN)]
        for tag in ("init", "end"):
            cells.append(
                f"{_num(r[f'cum_gain_{tag}'])} "
                f"({_num(r[f'cum_gain_min_{tag}'])} – {_num(r[f'cum_gain_max_{tag}'])})"
            )
        cells += [_num(r[c]) for c in ("res_ratio_init", "res_ratio_end")]
        cells += [_num(r[c]) for c in ("effective_length_init", "effective_length_end")]
        cells += [
            f"{int(r['gain_outside'])}" + (f": {outside}" if outside else ""),
            _num(r["max_res_ratio"]) + (f" ({r['max_res_ratio_block']})" if r["max_res_ratio_block"] else ""),
        ]
        body.append(cells)
    return header, body


# ----------------------------------------------------------------------------- metadata


_HIDDEN_META = {"dtypes", "format_version", "table_format", "models", "created", "seed", "command"}


def _meta_rows(run: records.Run, generated: str) -> list[tuple[str, str]]:
    meta = run.meta
    torch_version = meta.get("torch_version")
    if torch_version is None and "torch" in sys.modules:  # only if already imported: never pay for it here
        torch_version = f"{sys.modules['torch'].__version__} (at report time; not recorded in the run)"
    command = meta.get("command")
    if isinstance(command, (list, tuple)):
        command = " ".join(map(str, command))
    rows = [
        ("run created", str(meta.get("created", "not recorded"))),
        ("report generated", generated),
        ("gradprobe version", str(meta.get("gradprobe_version", f"{__version__} (at report time)"))),
        ("torch version", str(torch_version or "not recorded")),
        ("models", ", ".join(run.models) or plot.SINGLE_MODEL),
        ("seed", str(meta.get("seed", "not recorded"))),
        ("command line", str(command or "not recorded")),
    ]
    for key in sorted(meta):
        if key in _HIDDEN_META or key in ("gradprobe_version", "torch_version"):
            continue
        value = meta[key]
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > 300:
            text = text[:297] + "..."
        rows.append((str(key), text))
    return rows


# ----------------------------------------------------------------------------- rendering


def _png(fig: Figure, dpi: int, quantize: bool) -> bytes:
    """The figure as PNG bytes; ``quantize`` maps it to a 256-colour palette (about 3x smaller).

    Line plots and heatmaps use few distinct colours apart from anti-aliasing,
    so the palette image looks the same; the committed reference report has to
    stay small. "Max coverage" quantisation keeps every pixel within a few
    levels of the original; should an image lose more, the full-colour PNG is kept.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    full = buffer.getvalue()
    if not quantize:
        return full
    from PIL import Image  # a dependency of matplotlib

    image = Image.open(io.BytesIO(full)).convert("RGB")
    small = image.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    error = np.abs(np.asarray(small.convert("RGB"), dtype=np.int16) - np.asarray(image, dtype=np.int16))
    if int(error.max()) > _MAX_QUANTIZE_ERROR:
        return full
    packed = io.BytesIO()
    small.save(packed, format="PNG", optimize=True)
    return packed.getvalue() if len(packed.getvalue()) < len(full) else full


def _png_size(data: bytes) -> tuple[int, int]:
    # the IHDR chunk: width and height are the big-endian ints at bytes 16..24
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _template() -> Any:
    from importlib import resources

    import jinja2

    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    text = resources.files("gradprobe").joinpath("templates", "report.html").read_text(encoding="utf-8")
    return env.from_string(text)


def report(
    run: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    band: tuple[float, float] = GAIN_BAND,
    spectra: Any = None,
    tables: bool = True,
    dpi: int = 100,
    quantize: bool = True,
    progress: bool = True,
    figures: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the HTML report of ``run`` into the folder ``out``; return the path of ``out/index.html``.

    ``run`` is a :class:`~gradprobe.records.Run`, a probe (anything with
    ``frame()`` and ``scalars()``), the folder of a saved run (``out``
    defaults to that folder), or a block frame. ``band`` is the gain band of
    the summary table; ``spectra`` (an array of singular values, or a mapping
    name -> array, e.g. from ``gradprobe.spectrum``) adds a histogram;
    ``tables=False`` skips writing the tables; ``figures`` picks figures by
    name (see :data:`FIGURES`); ``dpi`` and ``quantize`` (256-colour PNGs,
    about 3x smaller) set the image size; ``progress=False`` hides the
    progress bar. ``out`` holding a different run is an error unless
    ``overwrite=True``.

    >>> import tempfile, pandas as pd
    >>> f = pd.DataFrame({"step": [0, 0], "block": ["a", "b"], "index": [0, 1], "gain": [0.5, 1.0],
    ...                   "cum_gain": [0.5, 1.0], "res_ratio": [0.1, 0.2], "out_rms": [1.0, 1.1]})
    >>> report(f, tempfile.mkdtemp(), progress=False).name
    'index.html'
    """
    if out is None:
        if not isinstance(run, (str, os.PathLike)):
            raise TypeError("report() needs out= (the folder to write into) unless run is a saved run folder")
        out = run
    the_run = _as_run(run)
    frame, scalars = the_run.frame(), the_run.scalars()
    missing = [c for c in ("step", "block", "index") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"report(): the block frame lacks {missing}; it has {list(map(str, frame.columns))}. "
            "Pass probe.frame() or a Run (gradprobe.compare / gradprobe.load)."
        )
    specs = list(FIGURES)
    if figures is not None:
        known = {s.name for s in FIGURES}
        unknown = [f for f in figures if f not in known]
        if unknown:
            raise ValueError(f"unknown figure(s) {unknown}; choose from {sorted(known)}")
        specs = [s for s in specs if s.name in figures]

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; report() writes a folder")
    # The report of a saved run into its own folder only adds files: its tables stay as they are.
    source = isinstance(run, (str, os.PathLike)) and folder.resolve() == Path(run).resolve()
    if not source:
        the_run.meta.setdefault("run_id", records.new_run_id())
        records.check_destination(folder, the_run.meta["run_id"], overwrite=overwrite)
    fresh = not folder.exists()
    target = folder
    if fresh:  # built aside, renamed into place when complete
        folder.parent.mkdir(parents=True, exist_ok=True)
        target = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp")
        target.mkdir()
    try:
        index = _write_report(
            target,
            the_run,
            frame,
            scalars,
            specs,
            tables,
            not source,
            overwrite,
            title=title,
            band=band,
            spectra=spectra,
            dpi=dpi,
            quantize=quantize,
            progress=progress,
        )
        if fresh:
            os.rename(target, folder)
            index = folder / index.name
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return index


def _write_report(
    folder: Path,
    the_run: records.Run,
    frame: Any,
    scalars: Any,
    specs: list[Any],
    tables: bool,
    write_tables: bool,
    overwrite: bool,
    *,
    title: str | None,
    band: tuple[float, float],
    spectra: Any,
    dpi: int,
    quantize: bool,
    progress: bool,
) -> Path:
    from tqdm.auto import tqdm

    # An earlier report's PNG of a figure not drawn now is removed; in a folder that held no run or
    # report (written into with overwrite=True) a PNG of that name is the user's, and stays.
    earlier = records.run_id_at(folder) is not None or records.report_at(folder)
    if tables and write_tables:
        path_table = the_run.paths()
        records.save_run(
            folder,
            frame,
            scalars,
            the_run.meta,
            overwrite=overwrite,
            paths=path_table if len(path_table) else None,
        )

    models = list(dict.fromkeys(map(str, frame["model"]))) if "model" in frame.columns else []
    if "model" in scalars.columns:
        models += [m for m in dict.fromkeys(map(str, scalars["model"])) if m not in models]
    inputs = _Inputs(
        frame, scalars, plot.model_palette(models or [plot.SINGLE_MODEL]), spectra, the_run.paths()
    )

    drawn = []
    with plot.offscreen():
        for spec in tqdm(specs, desc="report figures", unit="figure", disable=not progress, leave=False):
            png = folder / f"{spec.name}.png"
            fig = spec.draw(inputs)
            if fig is None:
                if earlier:
                    png.unlink(missing_ok=True)  # a figure of an earlier report of this folder would mislead
                continue
            data = _png(fig, dpi, quantize)
            records.atomic_write_bytes(png, data)
            width, height = _png_size(data)
            drawn.append(
                {
                    "name": spec.name,
                    "title": spec.title,
                    "caption": spec.caption,
                    "file": png.name,
                    "data": base64.b64encode(data).decode("ascii"),
                    "width": width,
                    "height": height,
                }
            )

    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    header, body = _summary_rows(summary(frame, scalars, the_run.paths(), band=band), band)
    swatches = [_hex(inputs.palette.get(row[0], (0.5, 0.5, 0.5))) for row in body]
    html = _template().render(
        title=title or ("gradprobe report: " + ", ".join(models) if models else "gradprobe report"),
        meta=_meta_rows(the_run, generated),
        summary_header=header,
        summary_rows=body,
        swatches=swatches,
        band=band,
        figures=drawn,
        glossary=list(records.GLOSSARY.items()),
        version=__version__,
        generated=generated,
        tables_written=tables,
        table_format="Parquet" if records.has_parquet() else "CSV",
    )
    return records.atomic_write_text(folder / "index.html", html)  # last: the report is complete
