"""The per-model summary (gradprobe.summary): its definitions; the CLI and the HTML report agree."""

from __future__ import annotations

import contextlib
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

import gradprobe
from gradprobe import _format
from gradprobe.cli import main
from gradprobe.summary import summary

nan = math.nan


def two_stack_frame() -> pd.DataFrame:
    """Model "m": an encoder stack of 2 blocks (index 0, 1) and a decoder stack of 3 (index 2..4),
    recorded at steps 0 and 10; model "n": one block at step 0 only."""
    rows = []
    gains = {  # block -> (cum_gain at step 0, at step 10)
        "enc.0": (0.5, 0.6),
        "enc.1": (1.0, 1.0),
        "dec.0": (0.1, 0.3),
        "dec.1": (4.0, 0.9),
        "dec.2": (1.0, 1.0),
    }
    ratios = {
        "enc.0": (0.0, 0.2),
        "enc.1": (0.1, 0.3),
        "dec.0": (nan, nan),
        "dec.1": (0.0, 0.7),
        "dec.2": (0.0, 0.1),
    }
    for step, at in ((0, 0), (10, 1)):
        for index, block in enumerate(gains):
            rows.append(
                {
                    "model": "m",
                    "depth": 5,
                    "residual": True,
                    "step": step,
                    "block": block,
                    "index": index,
                    "stack": block.split(".")[0],
                    "gain": 3.0 if (block, step) == ("dec.1", 0) else 1.0,
                    "cum_gain": gains[block][at],
                    "res_ratio": ratios[block][at],
                    # dec.0 changes the shape: no skip, its res_ratio is undefined
                    "skip_grad": nan if block == "dec.0" else 1.0,
                }
            )
    rows.append(
        {"model": "n", "depth": 1, "residual": False, "step": 0, "block": "b", "index": 0, "stack": "b"}
        | {"gain": 0.1, "cum_gain": 0.1, "res_ratio": 0.9, "skip_grad": 1.0}
    )
    return pd.DataFrame(rows)


def test_summary_definitions_on_a_hand_made_frame():
    scalars = pd.DataFrame(
        {
            "model": ["m"] * 4 + ["n"],
            "step": [0, 5, 10, 11, 0],
            "epoch": [0, 0, 1, 1, 0],
            "train_loss": [3.0, 2.0, 1.0, 0.5, 9.0],
            "test_acc": [nan, 0.5, nan, 0.75, nan],
        }
    )
    paths = pd.DataFrame(
        {  # per step, the stack with the most branching blocks (n_paths at length 1) counts
            "model": "m",
            "step": [0, 0, 0, 0, 10, 10],
            "stack": [0, 0, 1, 1, 1, 1],
            "length": [0, 1, 0, 1, 0, 1],
            "share": [1.0, 0.0, 0.5, 0.5, 0.25, 0.75],
            "n_paths": [1.0, 2.0, 1.0, 3.0, 1.0, 3.0],
        }
    )
    table = summary(two_stack_frame(), scalars, paths, band=(0.5, 2.0)).set_index("model")
    assert list(table.index) == ["m", "n"]
    m, n = table.loc["m"], table.loc["n"]
    assert (m["depth"], bool(m["residual"]), m["blocks"], m["steps"]) == (5, True, 5, 2)
    assert m["train_loss"] == 0.75  # mean over the last epoch
    assert m["test_acc"] == 0.75  # the last accuracy logged
    # first block of the main stack (the decoder: 3 blocks against 2), at the first and the last step
    assert (m["cum_gain_init"], m["cum_gain_end"]) == (0.1, 0.3)
    # the band over every block of every stack
    assert (m["cum_gain_min_init"], m["cum_gain_max_init"]) == (0.1, 4.0)
    assert (m["cum_gain_min_end"], m["cum_gain_max_end"]) == (0.3, 1.0)
    # the largest res_ratio over the blocks with a skip
    assert (m["res_ratio_init"], m["res_ratio_end"]) == (0.1, 0.7)
    assert (m["max_res_ratio"], m["max_res_ratio_block"]) == (0.7, "dec.1")
    assert (m["gain_outside"], m["gain_outside_blocks"]) == (1, "dec.1")
    assert (m["effective_length_init"], m["effective_length_end"]) == (0.5, 0.75)
    # a model with one recorded step: init and end are that step; no paths: NaN
    assert (n["cum_gain_init"], n["cum_gain_end"]) == (0.1, 0.1)
    assert (n["gain_outside"], n["gain_outside_blocks"]) == (1, "b")
    assert n["train_loss"] == 9.0 and math.isnan(n["test_acc"])
    assert math.isnan(n["effective_length_init"]) and math.isnan(n["effective_length_end"])


def test_summary_of_a_bare_frame_is_one_model_with_nans():
    frame = pd.DataFrame({"step": [0, 0], "block": ["a", "b"], "index": [0, 1], "cum_gain": [nan, 1.0]})
    row = summary(frame).iloc[0]
    assert row["model"] == "run" and row["blocks"] == 2 and row["steps"] == 1
    assert math.isnan(row["cum_gain_init"])  # the first block's value, not the next finite one
    assert (row["cum_gain_min_init"], row["cum_gain_max_init"]) == (1.0, 1.0)
    for column in ("train_loss", "test_acc", "res_ratio_init", "max_res_ratio", "effective_length_end"):
        assert math.isnan(row[column]), column
    assert row["gain_outside"] == 0 and row["max_res_ratio_block"] == ""
    with pytest.raises(ValueError, match="0 < low < high"):
        summary(frame, band=(0.0, 2.0))


# ----------------------------------------------------------------------------- CLI and HTML agree


class _SummaryTable(HTMLParser):
    """The rows of ``<table class="summary">`` of a report page: summary column -> cell text."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.rows: list[dict[str, str]] = []
        self.column: str | None = None
        self.cell: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("class", "summary") in attrs:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append({})
        elif self.inside and tag == "td":
            self.column, self.cell = dict(attrs).get("data-column"), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif self.inside and tag == "td" and self.column:
            self.rows[-1][self.column] = "".join(self.cell).strip()
            self.column = None

    def handle_data(self, data: str) -> None:
        if self.column:
            self.cell.append(data)


def _html_value(text: str) -> float:
    if text == "–":
        return nan
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def _cli_value(text: str) -> float:
    return nan if text == "-" else float(text)


def test_cli_and_html_summaries_show_the_same_numbers(tmp_path: Path):
    out = tmp_path / "compare"
    args = ["compare", "--families", "mlp", "--depths", "4", "--epochs", "1", "--width", "8"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--out", str(out), "--no-progress"]) == 0
    lines = stdout.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    header = lines[start].split()
    printed = {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in (line.split() for line in lines[start + 1 :])
        if len(cells) == len(header)
    }

    page = _SummaryTable()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    shown = {row["model"]: row for row in page.rows if row}

    run = gradprobe.load(out)
    assert list(printed) == list(shown) == run.models == ["plain-mlp-4", "resnet-mlp-4"]
    columns = {c: c for c in header if c != "model"}  # the HTML cells name the summary column they show
    assert list(columns) == [
        "train_loss",
        "test_acc",
        "cum_gain_init",
        "cum_gain_end",
        "res_ratio_init",
        "res_ratio_end",
        "effective_length_init",
        "effective_length_end",
    ]
    table = summary(run.frame(), run.scalars(), run.paths()).set_index("model")
    for model in run.models:
        for cli, html in columns.items():
            a, b = _cli_value(printed[model][cli]), _html_value(shown[model][html])
            assert a == pytest.approx(b, rel=1e-3, nan_ok=True), (model, cli)
            if cli != "test_acc":  # the same formatter: the same text
                assert printed[model][cli] == _format.number(table.loc[model, cli])
                assert shown[model][html] == _format.number(table.loc[model, cli], nan="–")
        # the numbers are real: finite where the run measured them
        assert math.isfinite(_cli_value(printed[model]["cum_gain_init"]))
        assert math.isfinite(_cli_value(printed[model]["effective_length_end"]))
    assert _cli_value(printed["resnet-mlp-4"]["effective_length_init"]) == 0.0  # zero-initialised branches


def test_summary_has_lesion_columns_only_with_a_lesion_table():
    import pandas as pd

    from gradprobe.summary import summary

    frame = pd.DataFrame({"step": 0, "block": ["a", "b"], "index": [0, 1], "cum_gain": [1.0, 1.0]})
    assert not any(c.startswith("lesion_") for c in summary(frame).columns)
    lesion = pd.DataFrame({
        "kind": ["none", "single", "single", "single"], "block": [None, "a", "b", "c"],
        "downsampling": [False, False, True, False], "removable": [True, True, True, False],
        "acc": [0.9, 0.85, 0.7, float("nan")],
    })  # fmt: skip
    row = summary(frame, lesion=lesion).iloc[0]
    assert row["lesion_worst_block"] == "b"  # c is not removable: never the worst
    assert row["lesion_worst_drop"] == pytest.approx(0.2)
    assert row["lesion_median_drop"] == pytest.approx(0.05)
