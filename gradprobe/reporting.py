"""The self-contained HTML report of a run: what the run shows in words (:mod:`gradprobe.verdict`),
a summary table, figures with captions, a glossary and, last, the run's metadata.

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
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import _format, plot, records, verdict
from ._version import __version__
from .summary import GAIN_BAND, lesion_table, summary

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
    lesion: Any = None  # the run's block-lesion table (gradprobe.lesion), or None


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: file stem, heading, caption, and how to draw it (None: no data)."""

    name: str
    title: str
    caption: str
    draw: Callable[[_Inputs], Figure | None]
    #: What the figure shows in this run, from its numbers ("" when they say nothing)
    remark: Callable[[_Inputs, pd.DataFrame], str] | None = None


def _gradient_remark(d: _Inputs, table: pd.DataFrame) -> str:
    if "cum_gain_init" not in table.columns:
        return ""
    rows = table.sort_values([c for c in ("residual", "depth") if c in table.columns] or ["model"])
    clauses, _ = verdict.gradient_clauses(rows, "cum_gain_init")
    if not clauses:
        return ""
    return f"In this run, at the first recorded step, the gradient reaching the first block {clauses}."


def _identity_remark(d: _Inputs, table: pd.DataFrame) -> str:
    parts = [
        f"{_num(r['res_ratio_init'])} in {r['model']}"
        for _, r in table.iterrows()
        if np.isfinite(float(r["res_ratio_init"]))
    ]
    if not parts:
        return ""
    return (
        "In this run the largest res_ratio of the shape-preserving blocks at the first recorded step is "
        + ", ".join(parts)
        + "."
    )


def _signal_remark(d: _Inputs, table: pd.DataFrame) -> str:
    clauses = verdict.signal_clauses(d.frame)
    if not clauses:
        return ""
    return f"In this run the channel variance from the first to the last block {clauses}."


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
    return plot.path_lengths_figure(d.paths, palette=d.palette)


def _draw_signal(d: _Inputs) -> Figure | None:
    columns = ("chan_mean_sq", "chan_var", "branch_var")
    if not all(c in d.frame.columns for c in columns) or not _finite(d.frame, "chan_var"):
        return None
    return cast("Figure", plot.plot_signal_propagation(d.frame, step="first", palette=d.palette).figure)


def _draw_lesion(d: _Inputs) -> Figure | None:
    if d.lesion is None or not len(d.lesion):
        return None
    return plot.lesion_figure(d.lesion, palette=d.palette)


def _draw_jacobian(d: _Inputs) -> Figure | None:
    if not plot.has_jacobian(d.frame) and d.spectra is None:
        return None
    return plot.jacobian_figure(d.frame, spectrum=d.spectra, palette=d.palette)


#: The report's figures, in page order. A figure whose columns hold no values is left out.
#: Captions say how to read a figure (conditionally: "a line that falls means ..."); what this
#: run's figure shows is computed by its ``remark`` from the numbers.
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
        "axis, at the first and at the last recorded step; models with different numbers of blocks are "
        "drawn against relative depth (0 = first block, 1 = last). A flat line near 1 (dotted) is a "
        "working gradient highway: the first blocks get as much gradient as the last. A line that falls "
        "towards the input (left) means vanishing gradients, one that rises means exploding gradients.",
        _draw_highway,
        _gradient_remark,
    ),
    FigureSpec(
        "gain",
        "Block gain over training",
        "Block gain |dL/dx| / |dL/dy| for every block (rows, input at the top) and recorded step "
        "(columns), on a log colour scale centred on 1 (white). Red blocks amplify the gradient on its "
        "way back to the input, blue ones shrink it; grey is not measured. Gains compound: a run of blue "
        "blocks makes the gradient vanish, a run of red ones makes it explode.",
        _draw_gain,
        _gradient_remark,
    ),
    FigureSpec(
        "identity",
        "Distance from identity",
        "How far each block is from the identity map during training, one line per block coloured from "
        "the input (dark) to the output (light). res_ratio = |y - x| / |x| is the forward distance (0: the "
        "block passes its input through unchanged); jac_id, when Jacobians were recorded, measures the "
        "same for the block as a linear map. A residual block with a zero-initialised branch starts at "
        "exactly 0 and moves away as it learns; a plain block has no identity path to start from.",
        _draw_identity,
        _identity_remark,
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
        "of the block output, and the variance of the residual branch's output y - x. In a residual net "
        "each branch adds its variance to the signal, so the channel variance grows with depth unless "
        "the branches add little (a zero-initialised branch adds nothing). A mean that grows with depth "
        "means the channels share an offset; a branch variance near 0 means the block is close to the "
        "identity.",
        _draw_signal,
        _signal_remark,
    ),
    FigureSpec(
        "paths",
        "Gradient by path length",
        "The gradient at the first block's input split by path length k, the number of residual "
        "branches a path goes through (Veit, Wilber and Belongie, 2016, Fig. 6): |c_k| / sum_j |c_j| "
        "for the stack with the most blocks, one panel per model, at the first (dashed) and the last "
        "(solid) decomposed step. Dotted grey: the binomial distribution of the number of paths of each "
        "length, C(L, k) / 2^L for the model's L branching blocks, what the shares would be if every "
        "path carried the same gradient; a curve left of it means short paths carry more of the "
        "gradient. Plain blocks are read as a skip plus a branch too (F = H - I), so their "
        "decomposition is exact but describes a fictitious split.",
        _draw_paths,
    ),
    FigureSpec(
        "lesion",
        "Deleting blocks",
        "Test accuracy with blocks deleted after training (Veit, Wilber and Belongie, 2016): each block's "
        "output replaced by its shortcut (the identity, or the projection of a downsampling block), "
        "evaluated in eval mode on the test split. Left: one block at a time, against the block's "
        "position; hollow rings mark downsampling blocks, the dotted line the intact net; a block "
        "without a shortcut (a plain net's downsampling block) cannot be removed and is a gap. Right: "
        "k blocks deleted at random, the mean over random subsets with a band of one standard "
        "deviation. A net that behaves like an ensemble of paths loses little when one block goes and "
        "degrades smoothly with k; a plain net has no path around a block and collapses.",
        _draw_lesion,
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


def _cell(
    text: str, *, num: bool = True, title: str = "", details: str = "", column: str = ""
) -> dict[str, Any]:
    """A table cell: its text; ``num`` cells never wrap; ``title`` a tooltip; ``details`` a list to
    unfold; ``column`` the summary column it shows (its ``data-column`` attribute)."""
    return {"text": text, "num": num, "title": title, "details": details, "column": column}


def _forward(names: Sequence[str], order: Mapping[str, int]) -> list[str]:
    return sorted(dict.fromkeys(names), key=lambda n: (order.get(n, 1 << 30), n))


def _block_list(names: Sequence[str], order: Mapping[str, int], total: int | None = None) -> dict[str, Any]:
    """'14 of 27 blocks', the full list in forward order unfolding below it."""
    names = _forward(names, order)
    if not names:
        return _cell("0")
    of = f" of {total}" if total else ""
    full = ", ".join(names)
    return _cell(f"{len(names)}{of}", title=full, details=full)


def _blocks_text(names: Sequence[str]) -> str:
    """'9 blocks: layer1.0–layer3.2' (forward order), for the metadata table."""
    names = list(names)
    if len(names) <= 3:
        return ", ".join(names)
    return f"{len(names)} blocks: {names[0]}–{names[-1]}"


#: Column pairs of the summary table: (heading, the summary's column at the first and the last step).
_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("cum_gain at the first block", "cum_gain_init", "cum_gain_end"),
    ("res_ratio, largest", "res_ratio_init", "res_ratio_end"),
    ("effective path length", "effective_length_init", "effective_length_end"),
)


def _summary_rows(
    table: pd.DataFrame, band: tuple[float, float], frame: pd.DataFrame
) -> tuple[list[dict[str, Any]], list[str], list[list[dict[str, Any]]]]:
    """The report's summary table from :func:`gradprobe.summary.summary`: two header rows and cells.

    Returns the top header (``{"text", "span"}`` each), the second header row and the body. Column
    pairs (first and last recorded step) that hold no value for any model are left out; depth and
    residual are in the models table (and the swatch's colour), not here, so the table fits the page.
    """
    if not len(table):
        return [], [], []
    has = set(table.columns)
    top: list[dict[str, Any]] = [{"text": "model", "span": 1, "rows": 2}]
    sub: list[str] = []
    top += [{"text": "train loss", "span": 1, "rows": 2}, {"text": "test accuracy", "span": 1, "rows": 2}]
    pairs = [p for p in _PAIRS if table[[p[1], p[2]]].notna().to_numpy().any()]
    ranges = bool(table[["cum_gain_min_init", "cum_gain_max_end"]].notna().to_numpy().any())
    for heading, _, _ in pairs:
        top.append({"text": heading, "span": 2, "rows": 1})
        sub += ["first step", "last step"]
        if heading.startswith("cum_gain") and ranges:
            top.append({"text": "cum_gain, all blocks", "span": 2, "rows": 1})
            sub += ["first step", "last step"]
    top.append({"text": f"blocks with gain outside [{band[0]:g}, {band[1]:g}]", "span": 1, "rows": 2})
    top.append({"text": "largest res_ratio (block)", "span": 1, "rows": 2})

    body = []
    for _, r in table.iterrows():
        model = str(r["model"])
        part = frame[frame["model"].astype(str) == model] if "model" in frame.columns else frame
        order = {}
        if {"block", "index"} <= set(part.columns):
            order = dict(part.drop_duplicates("block")[["block", "index"]].itertuples(index=False, name=None))
        cells = [_cell(model, num=False, column="model")]
        cells += [
            _cell(_num(r["train_loss"]), column="train_loss"),
            _cell(_format.percent(r["test_acc"], nan=_NAN), column="test_acc"),
        ]
        for heading, first, last in pairs:
            cells += [_cell(_num(r[first]), column=first), _cell(_num(r[last]), column=last)]
            if heading.startswith("cum_gain") and ranges:
                for tag in ("init", "end"):
                    lo, hi = r[f"cum_gain_min_{tag}"], r[f"cum_gain_max_{tag}"]
                    text = _NAN if _num(lo) == _NAN else f"{_num(lo)}–{_num(hi)}"
                    cells.append(
                        _cell(
                            text,
                            title="smallest–largest cum_gain over every block",
                            column=f"cum_gain_{tag}_band",
                        )
                    )
        outside = [b for b in str(r["gain_outside_blocks"]).split(", ") if b]
        cells.append(_block_list(outside, order, int(r["blocks"]) if "blocks" in has else None))
        cells[-1]["column"] = "gain_outside"
        block = str(r["max_res_ratio_block"] or "")
        cells.append(
            _cell(_num(r["max_res_ratio"]) + (f" ({block})" if block else ""), column="max_res_ratio")
        )
        body.append(cells)
    return top, sub, body


# ----------------------------------------------------------------------------- metadata

#: Human labels of the run's metadata, in the order the table shows them; other keys follow.
_RUN_LABELS: dict[str, str] = {
    "created": "run created",
    "command": "command line",
    "kind": "kind of run",
    "data": "data",
    "data_shape": "input shape",
    "n_train": "training samples",
    "n_test": "test samples",
    "epochs": "epochs",
    "steps": "training steps",
    "batch_size": "batch size",
    "lr": "peak learning rate",
    "schedule": "learning-rate schedule",
    "warmup": "warm-up steps",
    "momentum": "momentum",
    "weight_decay": "weight decay",
    "seed": "seed",
    "width": "width",
    "zero_init_residual": "zero-initialised residual branches",
    "every": "recorded every N-th step",
    "jacobian": "Jacobian columns",
    "jacobian_options": "Jacobian options",
    "probes": "Jacobian probe vectors",
    "update_ratio": "update ratio recorded",
    "paths": "path-length decomposition",
    "device": "device",
    "threads": "CPU threads",
    "seconds": "training time (s)",
    "gradprobe_version": "gradprobe version",
    "torch_version": "torch version",
    "format_version": "table format version",
    "table_format": "table files",
    "run_id": "run id",
}

#: Metadata shown elsewhere (the models table, the column types of the tables) or not at all.
_HIDDEN_META = {"dtypes", "models", "model_info", "model_class", "blocks"}

#: Columns of the models table: field of the run's per-model metadata -> label.
_MODEL_LABELS: dict[str, str] = {
    "spec": "spec",
    "model_class": "class",
    "depth": "depth",
    "residual": "residual",
    "parameters": "parameters",
    "blocks": "blocks",
    "seconds": "training time (s)",
}


def _value(value: Any) -> str | None:
    """A metadata value as text; None for a value that says nothing (None, empty)."""
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return _format.number(value)
    if isinstance(value, (list, tuple)):
        parts = [p for p in (_value(v) for v in value) if p is not None]
        text = " × ".join(parts) if all(isinstance(v, int) for v in value) else ", ".join(parts)
    elif isinstance(value, Mapping):
        parts = [f"{k}: {v}" for k, v in ((k, _value(v)) for k, v in value.items()) if v is not None]
        text = "; ".join(parts)
    else:
        text = str(value)
    return text if len(text) <= 300 else text[:297] + "..."


def _every(value: Any) -> str | None:
    """A schedule that is a flag (compare: True/False) or a period (a probe: every N-th step, 0 = off)."""
    if isinstance(value, bool) or value in (0, None):
        return "yes" if value else "no"
    if isinstance(value, int):
        return "every step" if value == 1 else f"every {value}th step"
    return _value(value)


def model_name(meta: Mapping[str, Any], name: str | None = None) -> str:
    """The name a single-model run is shown under: ``name``, else the class name of the model."""
    if name:
        return str(name)
    cls = meta.get("model_class")
    return str(cls).rsplit(".", 1)[-1] if cls else "model"


def _meta_rows(meta: Mapping[str, Any], generated: str) -> list[tuple[str, str, bool]]:
    """(label, value, is_code) of the run's metadata; fields that were not recorded are left out."""
    meta = dict(meta)
    if "format_version" not in meta:
        meta["format_version"] = records.FORMAT_VERSION
    command = meta.get("command")
    if isinstance(command, (list, tuple)):
        meta["command"] = " ".join(map(str, command))
    rows: list[tuple[str, str, bool]] = []
    keys = [k for k in _RUN_LABELS if k in meta] + sorted(k for k in meta if k not in _RUN_LABELS)
    for key in keys:
        if key in _HIDDEN_META or (key in ("probes", "jacobian_options") and not meta.get("jacobian")):
            continue
        text = _every(meta[key]) if key in ("jacobian", "paths") else _value(meta[key])
        if text is not None:
            rows.append((_RUN_LABELS.get(key, str(key).replace("_", " ")), text, key == "command"))
    rows.append(("report generated", generated, False))
    if "gradprobe_version" not in meta:
        rows.append(("gradprobe version", f"{__version__} (at report time)", False))
    if "torch_version" not in meta and "torch" in sys.modules:  # never import torch for this
        rows.append(("torch version", f"{sys.modules['torch'].__version__} (at report time)", False))
    return rows


def _model_rows(
    meta: Mapping[str, Any], models: Sequence[str], table: pd.DataFrame
) -> tuple[list[str], list[list[str]]]:
    """The models table: a row per model, a column per recorded field (human labels)."""
    info = meta.get("model_info")
    per_model: dict[str, dict[str, Any]] = {}
    if isinstance(info, Mapping):
        per_model = {str(m): dict(v) for m, v in info.items() if isinstance(v, Mapping)}
    elif len(models) == 1:  # a probe's run: its model's fields sit in the run's metadata
        per_model = {models[0]: {k: meta[k] for k in ("model_class", "blocks") if k in meta}}
    summary_of = table.set_index("model") if "model" in table.columns else None
    for m in models:
        fields = per_model.setdefault(m, {})
        if summary_of is not None and m in summary_of.index:
            for extra in ("depth", "residual"):
                if extra in summary_of.columns and extra not in fields:
                    fields[extra] = summary_of.loc[m, extra]
    columns = [k for k in _MODEL_LABELS if any(per_model[m].get(k) is not None for m in models)]
    columns = [k for k in columns if not (k == "spec" and all(per_model[m].get(k) == m for m in models))]
    rows = []
    for m in models:
        fields = per_model[m]
        cells = [m]
        for key in columns:
            value = fields.get(key)
            if key == "blocks" and isinstance(value, (list, tuple)):
                cells.append(_blocks_text([str(b) for b in value]))
            elif key == "model_class" and value:
                cells.append(str(value).rsplit(".", 1)[-1])
            elif key == "parameters" and isinstance(value, (int, float)):
                cells.append(f"{int(value):,}")
            else:
                plain = value.item() if value is not None and hasattr(value, "item") else value
                cells.append(_value(plain) or _NAN)
        rows.append(cells)
    return ["model"] + [_MODEL_LABELS[k] for k in columns], rows


# ----------------------------------------------------------------------------- rendering


def _kinds(table: pd.DataFrame, models: Sequence[str]) -> Any:
    """What the palette is chosen from: the summary's model/depth/residual columns when it has them."""
    if {"model", "residual"} <= set(table.columns) and set(models) <= set(table["model"].astype(str)):
        return table[[c for c in ("model", "depth", "residual") if c in table.columns]]
    return list(models)


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
    name: str | None = None,
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
    ``overwrite=True``. A run of one model without a ``model`` column (a probe's) is shown
    under ``name``, by default the class name of its model.

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
            name=name,
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
    name: str | None,
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

    paths = the_run.paths()
    if "model" not in frame.columns:  # one model (a probe's run): shown under its name, not "run"
        single = model_name(the_run.meta, name)
        frame = frame.assign(model=single)
        scalars = scalars.assign(model=single)
        if len(paths) and "model" not in paths.columns:
            paths = paths.assign(model=single)
    models = list(dict.fromkeys(map(str, frame["model"])))
    if "model" in scalars.columns:
        models += [m for m in dict.fromkeys(map(str, scalars["model"])) if m not in models]
    lesion = lesion_table(the_run.meta.get("lesions"))
    table = summary(frame, scalars, paths, band=band, lesion=lesion)
    inputs = _Inputs(frame, scalars, plot.model_palette(_kinds(table, models)), spectra, paths, lesion)

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
            remark = spec.remark(inputs, table) if spec.remark is not None else ""
            drawn.append(
                {
                    "name": spec.name,
                    "title": spec.title,
                    "caption": spec.caption,
                    "remark": remark,
                    "file": png.name,
                    "data": base64.b64encode(data).decode("ascii"),
                    "width": width,
                    "height": height,
                }
            )

    titles = {d["name"]: d["title"] for d in drawn}
    story = [
        {
            "text": f.text,
            "figure": f.figure if f.figure in titles else None,
            "title": titles.get(f.figure or ""),
        }
        for f in verdict.findings(table, frame, scalars, paths, lesion)
    ]
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    top, sub, body = _summary_rows(table, band, frame)
    swatches = [_hex(inputs.palette.get(row[0]["text"], (0.5, 0.5, 0.5))) for row in body]
    model_header, model_rows = _model_rows(the_run.meta, models, table)
    version = the_run.meta.get("format_version", records.FORMAT_VERSION)
    html = _template().render(
        title=title or ("gradprobe report: " + ", ".join(models) if models else "gradprobe report"),
        story=story,
        meta=_meta_rows(the_run.meta, generated),
        model_header=model_header,
        model_rows=model_rows,
        model_swatches=[_hex(inputs.palette.get(row[0], (0.5, 0.5, 0.5))) for row in model_rows],
        summary_top=top,
        summary_sub=sub,
        summary_rows=body,
        swatches=swatches,
        band=band,
        figures=drawn,
        glossary=list(records.GLOSSARY.items()),
        verdict_glossary=list(verdict.GLOSSARY.items()),
        version=__version__,
        format_version=version,
        generated=generated,
        tables_written=tables,
        table_format="Parquet" if records.has_parquet() else "CSV",
    )
    return records.atomic_write_text(folder / "index.html", html)  # last: the report is complete
