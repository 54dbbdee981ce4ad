"""TensorBoard export: a saved ``compare --quick`` run, streamed while it trains and exported after,
read back with tensorboard's EventAccumulator and compared value for value with the run's frame."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gradprobe
from gradprobe import export
from gradprobe.cli import main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


# transformers, Lightning and tensorboard: see conftest.frozen_heap
pytestmark = pytest.mark.usefixtures("frozen_heap")


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def events(folder: Path) -> event_accumulator.EventAccumulator:
    files = list(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    guidance = {"scalars": 0, "histograms": 0}
    return event_accumulator.EventAccumulator(str(files[0]), size_guidance=guidance).Reload()


def assert_column_equal(acc, frame: pd.DataFrame, column: str) -> None:
    for block, rows in frame.groupby("block"):
        finite = rows[np.isfinite(rows[column].to_numpy(float))]
        tag = f"gradprobe/{column}/{block}"
        if finite.empty:
            assert tag not in acc.Tags()["scalars"]
            continue
        points = acc.Scalars(tag)
        assert [p.step for p in points] == finite["step"].tolist()
        # event files hold float32
        np.testing.assert_allclose([p.value for p in points], finite[column].to_numpy(float), rtol=1e-6)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A small ``compare --quick`` run (MLPs, one epoch, Jacobian columns), streamed to TensorBoard."""
    root = tmp_path_factory.mktemp("export")
    out, live = root / "run", root / "live"
    code, _, stderr = run_cli(
        "compare", "--quick", "--families", "mlp", "--depths", "5", "--epochs", "1", "--jacobian",
        "--no-report", "--no-progress", "--out", str(out), "--tensorboard", str(live),
    )  # fmt: skip
    assert code == 0, stderr
    return root, out, live


def test_compare_streams_the_per_block_scalars_while_it_trains(quick_run):
    _, out, live = quick_run
    run = gradprobe.load(out)
    assert sorted(p.name for p in live.iterdir()) == sorted(run.models)
    for model in run.models:
        frame = run.frame()[run.frame()["model"] == model]
        acc = events(live / model)
        for column in export.LOG_COLUMNS:
            assert_column_equal(acc, frame, column)
        first = frame[frame["index"] == 0]["cum_gain"].to_numpy(float)
        got = [p.value for p in acc.Scalars("gradprobe/summary/first_cum_gain")]
        np.testing.assert_allclose(got, first, rtol=1e-6)
        scalars = run.scalars()[run.scalars()["model"] == model]
        losses = acc.Scalars("gradprobe/train_loss")
        assert [p.step for p in losses] == scalars["step"].tolist()
        np.testing.assert_allclose([p.value for p in losses], scalars["train_loss"], rtol=1e-6)
        assert len(acc.Scalars("gradprobe/test_acc")) == 1  # one epoch


def test_export_of_the_saved_run_equals_its_frame(quick_run):
    root, out, _ = quick_run
    logdir = root / "exported"
    code, stdout, stderr = run_cli("export", "tensorboard", str(out), str(logdir))
    assert code == 0, stderr
    assert str(logdir) in stdout
    run = gradprobe.load(out)
    assert sorted(p.name for p in logdir.iterdir()) == sorted(run.models)  # no temporary folder left
    for model in run.models:
        frame = run.frame()[run.frame()["model"] == model]
        acc = events(logdir / model)
        for column in export.EXPORT_COLUMNS:
            assert_column_equal(acc, frame, column)
        # the Jacobian steps (first and last) have the blocks' largest singular values as a histogram
        jac = frame[np.isfinite(frame["jac_spec"].to_numpy(float))]
        histograms = acc.Histograms("gradprobe/jac_spec")
        assert [h.step for h in histograms] == sorted(jac["step"].unique().tolist()) and len(histograms) == 2
        for h in histograms:
            values = jac[jac["step"] == h.step]["jac_spec"]
            assert h.histogram_value.num == len(values)
            assert h.histogram_value.min == pytest.approx(values.min())
            assert h.histogram_value.max == pytest.approx(values.max())
        scalars = run.scalars()[run.scalars()["model"] == model]
        np.testing.assert_allclose(
            [p.value for p in acc.Scalars("gradprobe/lr")], scalars["lr"].to_numpy(float), rtol=1e-6
        )


def test_export_takes_a_frame_a_run_and_columns_and_spectra(quick_run, tmp_path):
    _, out, _ = quick_run
    run = gradprobe.load(out)
    single = run.frame()[run.frame()["model"] == run.models[-1]].drop(columns=["model"])
    sv = np.linspace(0.5, 1.5, 11)
    export.tensorboard(single, tmp_path / "frame", columns=["gain"], spectra={"init": sv})
    acc = events(tmp_path / "frame")
    tags = acc.Tags()["scalars"]
    assert {t.split("/")[1] for t in tags} == {"gain", "summary"}  # no model subfolder, one column
    assert_column_equal(acc, single, "gain")
    (spectrum,) = acc.Histograms("gradprobe/spectrum/init")
    assert spectrum.histogram_value.num == 11 and spectrum.histogram_value.max == pytest.approx(1.5)


def test_export_errors_say_what_was_wrong(quick_run, tmp_path):
    _, out, _ = quick_run
    with pytest.raises(ValueError, match=r"columns \['gian'\] are not in the run"):
        export.tensorboard(out, tmp_path / "x", columns=["gian"])
    with pytest.raises(TypeError, match="takes a probe, a gradprobe Run"):
        export.tensorboard([1, 2], tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        export.tensorboard(out, tmp_path / "file")
    code, _, stderr = run_cli("export", "tensorboard", str(tmp_path / "missing"), str(tmp_path / "y"))
    assert code == 2 and "is not a saved gradprobe run" in stderr
    code, _, stderr = run_cli("export", "tensorboard", str(out), str(tmp_path / "y"), "--columns", "gian")
    assert code == 2 and "gian" in stderr and "\n" not in stderr.strip()


def test_summaries_skip_nan_and_name_the_first_block():
    nan = math.nan
    rows = [
        {"block": "b", "index": 1, "gain": 0.5, "cum_gain": 0.5, "res_ratio": nan},
        {"block": "a", "index": 0, "gain": nan, "cum_gain": 0.25, "res_ratio": 0.3},
    ]
    assert export.summaries(rows) == {
        "gradprobe/summary/min_gain": 0.5,
        "gradprobe/summary/max_gain": 0.5,
        "gradprobe/summary/first_cum_gain": 0.25,
        "gradprobe/summary/max_res_ratio": 0.3,
    }
    assert "gradprobe/gain/a" not in export.step_scalars(rows)
