"""What a run shows, in words: a few sentences computed from the run's own numbers.

:func:`findings` reads only tables (the per-model :func:`~gradprobe.summary.summary`, the block
frame, the scalars and the path-length table) and returns :class:`Finding` s, each a sentence
and the name of the report figure that shows it. A sentence is written only when the numbers
support it: the thresholds below decide, and :data:`GLOSSARY` states them for the reader.

For a comparison of plain and residual nets (``gradprobe compare``) it says whether the deep
plain net trains worse than the shallow one (degradation), whether the gradient reaching the
first block vanishes or explodes in the plain nets and stays near 1 in the residual ones, whether
the residual blocks start as the identity and how long the gradient's paths are. For any other
run it says where the gradient vanishes or explodes and which blocks are near the identity.
Non-finite values are always reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _format

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEGRADATION_MARGIN",
    "DEGRADATION_RATIO",
    "EXPLODE",
    "GLOSSARY",
    "IDENTITY",
    "LESION_COLLAPSE",
    "LESION_HARMLESS",
    "NEAR_ONE",
    "VANISH",
    "Finding",
    "findings",
    "gradient_clauses",
    "gradient_word",
    "signal_clauses",
]

#: ``cum_gain`` below this: the gradient reaching a block has vanished (shrunk by over a decade).
VANISH = 0.1
#: ``cum_gain`` above this: the gradient reaching a block has exploded (grown by over a decade).
EXPLODE = 10.0
#: ``cum_gain`` within [1 / NEAR_ONE, NEAR_ONE]: the gradient stays near 1 (a working highway).
NEAR_ONE = 2.0
#: ``res_ratio`` at most this: the block is the identity map (to this relative precision).
IDENTITY = 0.01
#: The deep plain net's final training loss over the shallow one's, at least: degradation ...
DEGRADATION_RATIO = 1.5
#: ... and at least this much higher in absolute terms (two nearly perfect fits are no degradation).
DEGRADATION_MARGIN = 0.05

#: A block deletion that lowers the test accuracy by at most this (absolute) barely matters.
LESION_HARMLESS = 0.01
#: A block deletion that leaves at most this fraction of the intact test accuracy collapses the net.
LESION_COLLAPSE = 0.5

#: The words of the findings and the thresholds behind them; the HTML report's glossary shows these.
GLOSSARY: dict[str, str] = {
    "vanishes": f"cum_gain below {VANISH:g}: the gradient reaching the block is less than a tenth of the "
    "gradient at its stack's output",
    "explodes": f"cum_gain above {EXPLODE:g}: the gradient reaching the block is more than ten times the "
    "gradient at its stack's output",
    "near 1": f"cum_gain between {1 / NEAR_ONE:g} and {NEAR_ONE:g}: the gradient arrives about as large as "
    "it left the output (the gradient highway)",
    "identity": f"res_ratio = |y - x| / |x| at most {IDENTITY:g}: the block passes its input through "
    "(nearly) unchanged",
    "degradation": f"the deeper plain net ends with a training loss at least {DEGRADATION_RATIO:g} times and "
    f"{DEGRADATION_MARGIN:g} above the shallower one's (mean over the last epoch): it fits the training "
    "set worse, so it is not overfitting",
    "barely matters": f"deleting the block (gradprobe.lesion: its output replaced by its shortcut) lowers "
    f"the test accuracy by at most {LESION_HARMLESS:g}",
    "collapses": f"deleting the block leaves at most {LESION_COLLAPSE:g} of the intact net's test accuracy",
    "effective length": "share-weighted mean number of residual branches on the gradient's paths "
    "(gradprobe.paths); half the branching blocks when every path carries the same gradient",
}

#: Gradient columns that a recorded row always has a value for; NaN there means it was lost.
_GRADIENT_COLUMNS: tuple[str, ...] = ("grad_out", "grad_in", "gain", "cum_gain")


@dataclass(frozen=True)
class Finding:
    """One sentence about the run, and the report figure that shows it (None: no figure)."""

    text: str
    figure: str | None = None


def _num(value: float) -> str:
    return _format.number(value)


def gradient_word(cum_gain: float) -> str:
    """How the gradient reaching a block compares with the output's, in words (see :data:`GLOSSARY`).

    >>> [gradient_word(v) for v in (0.01, 0.3, 1.2, 4.0, 300.0, float("nan"))]
    ['vanishes', 'shrinks', 'stays near 1', 'grows', 'explodes', '']
    """
    if not math.isfinite(cum_gain):
        return ""
    if cum_gain < VANISH:
        return "vanishes"
    if cum_gain > EXPLODE:
        return "explodes"
    if 1 / NEAR_ONE <= cum_gain <= NEAR_ONE:
        return "stays near 1"
    return "shrinks" if cum_gain < 1 else "grows"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def gradient_clauses(rows: pd.DataFrame, column: str) -> tuple[str, set[str]]:
    """How the ``column`` (a cum_gain) of each row's model reads in words, grouped by word.

    Returns e.g. 'explodes (cum_gain 14.4 in plain-20, 2.9e+03 in plain-56); it stays near 1
    (cum_gain 1.2 in resnet-56)' and the set of words used.
    """
    by_word: dict[str, list[str]] = {}
    for _, r in rows.iterrows():
        value = float(r[column])
        word = gradient_word(value)
        if word:
            by_word.setdefault(word, []).append(f"{_num(value)} in {r['model']}")
    clauses = [f"{word} (cum_gain {', '.join(items)})" for word, items in by_word.items()]
    return "; it ".join(clauses), set(by_word)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_compare(table: pd.DataFrame) -> bool:
    if not {"residual", "depth"} <= set(table.columns) or table["residual"].isna().any():
        return False
    kinds = set(table["residual"].astype(bool))
    return kinds == {False, True}


def findings(
    table: pd.DataFrame,
    frame: pd.DataFrame,
    scalars: pd.DataFrame | None = None,
    paths: pd.DataFrame | None = None,
    lesion: pd.DataFrame | None = None,
) -> list[Finding]:
    """The sentences that the run's numbers support, in reading order.

    ``table`` is ``gradprobe.summary.summary(frame, scalars, paths)``; ``frame``, ``scalars`` and
    ``paths`` are the run's tables, ``lesion`` its block-lesion table (:func:`gradprobe.lesion`).
    Figures are named as in ``gradprobe.reporting.FIGURES``.

    >>> import pandas as pd
    >>> from gradprobe.summary import summary
    >>> f = pd.DataFrame({"step": 0, "block": ["a", "b"], "index": [0, 1], "cum_gain": [0.01, 1.0],
    ...                   "gain": [0.01, 1.0], "grad_in": [0.01, 1.0], "grad_out": [1.0, 1.0]})
    >>> print(findings(summary(f), f)[0].text)  # doctest: +NORMALIZE_WHITESPACE
    The gradient reaching the first block vanishes at the recorded step (cum_gain 0.01).
    At the first recorded step it has vanished at 1 of 2 blocks (a).
    """
    out: list[Finding] = []
    if not len(table):
        return out
    if _is_compare(table):
        out += _degradation(table)
        out += _highway(table)
        out += _identity_at_start(table)
        out += _path_lengths(table, paths)
    else:
        for _, row in table.iterrows():
            out += _gradient_of_model(row, frame, several=len(table) > 1)
            out += _identity_blocks(row, frame, several=len(table) > 1)
    if lesion is not None and len(lesion):
        out += lesion_findings(lesion)
    out += _non_finite(frame, scalars)
    return out


def lesion_findings(lesion: pd.DataFrame) -> list[Finding]:
    """One sentence per model of a lesion table: whether deleting one block barely matters
    (:data:`LESION_HARMLESS`) or collapses the net (:data:`LESION_COLLAPSE`), and what k random
    deletions do.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"kind": ["none", "single", "single", "random", "random"],
    ...                   "k": [0, 1, 1, 1, 2], "block": [None, "a", "b", None, None],
    ...                   "downsampling": [False, False, True, False, False],
    ...                   "removable": [True] * 5, "acc": [0.9, 0.895, 0.6, 0.75, 0.6]})
    >>> print(lesion_findings(t)[0].text)  # doctest: +NORMALIZE_WHITESPACE
    Deleting one block at a time barely matters for 1 of its 1 shape-preserving blocks (median accuracy
    drop 0.005); the largest drop is 0.3, at b (downsampling). Deleting k random blocks takes the accuracy
    from 0.9 (intact) to 0.75 at k = 1 and 0.6 at k = 2.
    """
    if not {"kind", "acc", "removable"} <= set(lesion.columns):
        return []
    models = list(dict.fromkeys(lesion["model"].astype(str))) if "model" in lesion.columns else [None]
    out = []
    for model in models:
        part = lesion if model is None else lesion[lesion["model"].astype(str) == model]
        base_rows = part.loc[part["kind"] == "none", "acc"]
        single = part[(part["kind"] == "single") & part["removable"].astype(bool) & part["acc"].map(_finite)]
        if not len(base_rows) or not len(single) or not _finite(base_rows.iloc[0]):
            continue
        base = float(base_rows.iloc[0])
        acc = single["acc"].to_numpy(dtype="float64")
        drops = base - acc
        down = (
            single["downsampling"].to_numpy(dtype=bool)
            if "downsampling" in single.columns
            else np.zeros(len(single), dtype=bool)
        )
        same = drops[~down]
        where = f" of {model}" if model is not None else ""
        collapsed = int((acc <= LESION_COLLAPSE * base).sum())
        text = f"Deleting one block{where} at a time"
        if collapsed and collapsed >= len(single) / 2:
            text += (
                f": {collapsed} of {len(single)} removable blocks collapse the net (accuracy from "
                f"{_num(base)} to between {_num(float(acc.min()))} and {_num(float(acc.max()))})"
            )
        else:
            harmless = int((same <= LESION_HARMLESS).sum())
            text += (
                f" barely matters for {harmless} of its {len(same)} shape-preserving blocks"
                f" (median accuracy drop {_num(float(np.median(same)) if len(same) else math.nan)})"
            )
            worst = int(np.argmax(drops))
            text += f"; the largest drop is {_num(float(drops[worst]))}, at {single['block'].iloc[worst]}"
            if bool(down[worst]):
                text += " (downsampling)"
        text += "."
        random = part[part["kind"] == "random"].sort_values("k", kind="stable")
        random = random[random["acc"].map(_finite)]
        if len(random):
            steps = [f"{_num(float(r['acc']))} at k = {int(r['k'])}" for _, r in random.iterrows()]
            text += (
                f" Deleting k random blocks takes the accuracy from {_num(base)} (intact) to {_join(steps)}."
            )
        out.append(Finding(text, "lesion"))
    return out


# ----------------------------------------------------------------------------- compare runs


def _degradation(table: pd.DataFrame) -> list[Finding]:
    plain = table[~table["residual"].astype(bool) & table["train_loss"].map(_finite)]
    plain = plain.sort_values("depth", kind="stable")
    if plain["depth"].nunique() < 2:
        return []
    shallow, deep = plain.iloc[0], plain.iloc[-1]
    lo, hi = float(shallow["train_loss"]), float(deep["train_loss"])
    pair = f"{deep['model']} ends with a training loss of {_num(hi)}, {shallow['model']} with {_num(lo)}"
    if not (hi >= DEGRADATION_RATIO * lo and hi - lo >= DEGRADATION_MARGIN):
        return [
            Finding(
                f"No degradation in this run: {pair}, not higher by the factor {DEGRADATION_RATIO:g} and "
                f"the margin {DEGRADATION_MARGIN:g} that count as the deeper plain net training worse.",
                "training",
            )
        ]
    text = f"The deeper plain net trains worse on the training set itself (degradation): {pair}."
    res = table[table["residual"].astype(bool) & table["train_loss"].map(_finite)]
    deep_res = res[res["depth"] == deep["depth"]]
    shallow_res = res[res["depth"] == shallow["depth"]]
    if len(deep_res) and len(shallow_res):
        r_hi, r_lo = float(deep_res["train_loss"].iloc[0]), float(shallow_res["train_loss"].iloc[0])
        deep_name, shallow_name = deep_res["model"].iloc[0], shallow_res["model"].iloc[0]
        numbers = f"{deep_name} ends at {_num(r_hi)}, {shallow_name} at {_num(r_lo)}"
        if r_hi >= DEGRADATION_RATIO * r_lo and r_hi - r_lo >= DEGRADATION_MARGIN:
            text += f" The residual nets degrade too: {numbers}."
        else:
            text += f" The residual nets of the same depths do not: {numbers}."
    return [Finding(text, "training")]


def _highway(table: pd.DataFrame) -> list[Finding]:
    out = []
    for residual, kind in ((False, "plain"), (True, "residual")):
        rows = table[(table["residual"].astype(bool) == residual) & table["cum_gain_init"].map(_finite)]
        if not len(rows):
            continue
        clauses, words = gradient_clauses(rows.sort_values("depth", kind="stable"), "cum_gain_init")
        text = (
            f"In the {kind} nets the gradient reaching the first block at the first recorded step {clauses}"
        )
        if residual and words == {"stays near 1"}:
            text += ": it arrives about as large as it left the output, the gradient highway"
        out.append(Finding(text + ".", "highway"))
    return out


def _identity_at_start(table: pd.DataFrame) -> list[Finding]:
    rows = table[table["residual"].astype(bool) & table["res_ratio_init"].map(_finite)]
    if not len(rows):
        return []
    at_identity = rows[rows["res_ratio_init"] <= IDENTITY]
    away = rows[rows["res_ratio_init"] > IDENTITY]
    out = []
    if len(at_identity):
        largest = float(at_identity["res_ratio_init"].max())
        out.append(
            Finding(
                f"The residual blocks of {_join(at_identity['model'].astype(str).tolist())} start as the "
                f"identity: at the first recorded step the largest res_ratio of their shape-preserving "
                f"blocks is {_num(largest)}.",
                "identity",
            )
        )
    if len(away):
        parts = [f"{r['model']} (largest res_ratio {_num(r['res_ratio_init'])})" for _, r in away.iterrows()]
        out.append(
            Finding(
                f"The residual blocks of {_join(parts)} do not start as the identity.",
                "identity",
            )
        )
    return out


def _path_lengths(table: pd.DataFrame, paths: pd.DataFrame | None) -> list[Finding]:
    if paths is None or not len(paths) or "n_paths" not in paths.columns:
        return []
    parts, sides = [], set()
    for _, r in table[table["residual"].astype(bool)].iterrows():
        length = float(r["effective_length_end"])
        branching = _branching(paths, str(r["model"]))
        if not (math.isfinite(length) and branching > 0):
            continue
        parts.append(f"{_num(length)} of {r['model']}'s {branching}")
        sides.add("fewer" if length < branching / 2 else "more" if length > branching / 2 else "half")
    if not parts:
        return []
    text = (
        "At the last decomposed step the gradient at the first block goes on average through "
        f"{_join(parts)} branching blocks (effective length)"
    )
    if sides == {"fewer"}:
        text = (
            "Short paths carry more of the gradient than their number alone would give. "
            + text
            + ", fewer than the half of them"
        )
    elif sides == {"more"}:
        text = (
            "Long paths carry more of the gradient than their number alone would give. "
            + text
            + ", more than the half of them"
        )
    else:
        text += "; half of them"
    return [Finding(text + " that paths all carrying the same gradient would give.", "paths")]


def _branching(paths: pd.DataFrame, model: str) -> int:
    """Branching blocks of the model's stack with the most of them (n_paths at length 1 is that count)."""
    part = paths[paths["model"].astype(str) == model] if "model" in paths.columns else paths
    ones = part.loc[part["length"] == 1, "n_paths"].to_numpy(dtype="float64")
    ones = ones[np.isfinite(ones)]
    return int(ones.max()) if ones.size else 0


# ----------------------------------------------------------------------------- any run


def _model_rows(frame: pd.DataFrame, model: str) -> pd.DataFrame:
    if "model" not in frame.columns:
        return frame
    return frame[frame["model"].astype(str) == model]


def _blocks_text(names: Sequence[str]) -> str:
    names = list(names)
    if len(names) <= 4:
        return _join(names)
    return f"{names[0]} ... {names[-1]}"


def _gradient_of_model(row: pd.Series, frame: pd.DataFrame, *, several: bool) -> list[Finding]:
    first, last = float(row["cum_gain_init"]), float(row["cum_gain_end"])
    w_first, w_last = gradient_word(first), gradient_word(last)
    if not w_first and not w_last:
        return []
    who = f"In {row['model']} the gradient" if several else "The gradient"
    if int(row.get("steps", 2)) <= 1:
        text = f"{who} reaching the first block {w_first} at the recorded step (cum_gain {_num(first)})."
    elif w_first == w_last:
        text = (
            f"{who} reaching the first block {w_first} at the first and at the last recorded step "
            f"(cum_gain {_num(first)} and {_num(last)})."
        )
    else:
        bits = []
        if w_first:
            bits.append(f"{w_first} at the first recorded step (cum_gain {_num(first)})")
        if w_last:
            bits.append(f"{w_last} at the last (cum_gain {_num(last)})")
        text = f"{who} reaching the first block {' and '.join(bits)}."
    text += _where(frame, str(row["model"]), several)
    return [Finding(text, "highway")]


def _where(frame: pd.DataFrame, model: str, several: bool) -> str:
    """Which blocks have a vanished or exploded gradient at the first recorded step, if any."""
    part = _model_rows(frame, model)
    if not len(part) or "cum_gain" not in part.columns:
        return ""
    rows = part[part["step"] == part["step"].min()].sort_values("index", kind="stable")
    gains = rows["cum_gain"].to_numpy(dtype="float64")
    names = rows["block"].astype(str).tolist()
    out = []
    for word, mask in (("vanished", gains < VANISH), ("exploded", gains > EXPLODE)):
        hit = [n for n, m in zip(names, mask, strict=True) if m]
        if hit:
            out.append(f"it has {word} at {len(hit)} of {len(names)} blocks ({_blocks_text(hit)})")
    return (" At the first recorded step " + "; ".join(out) + ".") if out else ""


def _identity_blocks(row: pd.Series, frame: pd.DataFrame, *, several: bool) -> list[Finding]:
    part = _model_rows(frame, str(row["model"]))
    if not len(part) or "res_ratio" not in part.columns:
        return []
    last = part[part["step"] == part["step"].max()].sort_values("index", kind="stable")
    ratio = last["res_ratio"].to_numpy(dtype="float64")
    measured = np.isfinite(ratio)
    if not measured.any():
        return []
    names = last["block"].astype(str).to_numpy()
    near = names[measured & (ratio <= IDENTITY)].tolist()
    of = f" of {row['model']}" if several else ""
    total = int(measured.sum())
    if near:
        text = (
            f"At the last recorded step {len(near)} of {total} measured blocks{of} are the identity "
            f"(res_ratio at most {IDENTITY:g}): {_blocks_text(near)}."
        )
    else:
        text = (
            f"No block{of} is the identity at the last recorded step: the smallest res_ratio is "
            f"{_num(float(np.min(ratio[measured])))}."
        )
    return [Finding(text, "identity")]


def _non_finite(frame: pd.DataFrame, scalars: pd.DataFrame | None) -> list[Finding]:
    out = []
    # NaN is "not measured" in most columns (skip metrics of a projection, sparse Jacobians); only a
    # gradient column of a recorded row and a logged loss have no such reading
    for name, table, must in (("block frame", frame, _GRADIENT_COLUMNS), ("logged scalars", scalars, None)):
        if table is None or not len(table):
            continue
        numeric = table.select_dtypes("number").drop(columns=["step", "index"], errors="ignore")
        values = numeric.to_numpy(dtype="float64")
        infinite = np.isinf(values)
        lost = np.zeros_like(infinite)
        for i, c in enumerate(numeric.columns):
            if (c in must) if must is not None else "loss" in str(c):
                lost[:, i] = np.isnan(values[:, i])
        bad = infinite | lost
        if not bad.any():
            continue
        cols = [str(c) for c, hit in zip(numeric.columns, bad.any(axis=0), strict=True) if hit]
        rows = table[bad.any(axis=1)]
        where = ""
        if "model" in rows.columns:
            where = f" in {_join(list(dict.fromkeys(rows['model'].astype(str))))}"
        step = f", first at step {int(rows['step'].min())}" if "step" in rows.columns and len(rows) else ""
        counts = []
        if infinite.any():
            counts.append(f"{int(infinite.sum())} infinite")
        if lost.any():
            counts.append(f"{int(lost.sum())} NaN")
        out.append(
            Finding(
                f"The {name} {'hold' if name.endswith('s') else 'holds'} non-finite values{where}: "
                f"{' and '.join(counts)} in {_join(cols)}{step}.",
                "highway" if name == "block frame" else "training",
            )
        )
    return out


def signal_clauses(frame: pd.DataFrame, column: str = "chan_var") -> str:
    """How ``column`` changes from the first to the last block at the first recorded step, per model:
    'grows 8.1-fold in resnet-56; stays within a factor 2 in resnet-20' ('' without values).

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": 0, "block": ["a", "b"], "index": [0, 1], "chan_var": [1.0, 9.0]})
    >>> signal_clauses(f)
    'grows 9-fold in model'
    """
    if column not in frame.columns or "index" not in frame.columns:
        return ""
    part = frame if "model" in frame.columns else frame.assign(model="model")
    by_word: dict[str, list[str]] = {}
    for model, rows in part.groupby("model", sort=False):
        rows = rows[rows["step"] == rows["step"].min()].sort_values("index", kind="stable")
        values = rows[column].to_numpy(dtype="float64")
        values = values[np.isfinite(values)]
        if values.size < 2 or values[0] <= 0:
            continue
        ratio = float(values[-1] / values[0])
        if ratio > NEAR_ONE:
            by_word.setdefault(f"grows {_num(ratio)}-fold", []).append(str(model))
        elif ratio < 1 / NEAR_ONE:
            by_word.setdefault(f"shrinks to {_num(ratio)} of its value", []).append(str(model))
        else:
            by_word.setdefault(f"stays within a factor {NEAR_ONE:g}", []).append(str(model))
    return "; ".join(f"{word} in {_join(models)}" for word, models in by_word.items())
