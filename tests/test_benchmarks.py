"""The overhead harness refuses a ratio when its bare-vs-bare control is off (no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def overhead():
    return _load("overhead")


def test_a_ratio_is_refused_when_the_bare_control_is_outside_its_band(overhead):
    steady = overhead.Result("x", bare=[[1.0] * 4, [1.0] * 4], probed=[[1.5] * 4] * 2, blocks=2, recorded=1.0)
    assert steady.median_control() == 1.0 and steady.median_ratio() == 1.5
    assert overhead.ratio_text(steady.median_ratio(), steady.median_control()).startswith("1.500")
    assert steady.us_per_block() == pytest.approx(0.25e6)
    noisy = overhead.Result("x", bare=[[1.0] * 4, [1.2] * 4], probed=[[1.5] * 4] * 2, blocks=2, recorded=1.0)
    assert noisy.median_text().startswith("refused (control 0.833")
    assert not noisy.us_valid()
    noisy_probed = overhead.Result("x", [[1.0] * 4] * 2, [[1.5] * 4, [2.0] * 4], blocks=2, recorded=1.0)
    assert noisy_probed.median_text() == "refused (control 1.000, probed 0.750)"
    assert steady.us_valid() and steady.median_text() == "1.500 (control 1.000)"
    skewed = overhead.Result("x", [[1.0] * 4] * 2, [[1.5, 1.5, 1.5, 9.0]] * 2, blocks=2, recorded=1.0)
    assert skewed.median_text().startswith("refused (median 1.500 and total 3.375 disagree")
    assert not skewed.us_valid()


def test_the_harness_runs_and_prints_a_table_row(overhead, capsys):
    overhead.main(["--model", "mlp", "--config", "default", "--pairs", "2", "--chunk", "9", "--threads", "1"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| mlp | default |")]
    assert len(row) == 1 and "control" in row[0]
    assert "20 blocks, 1.00 recorded per step" in out
    assert overhead.chunk_for("every10", 9) == 11  # whole cycles of one recorded step in ten


def test_peers_report_a_missing_peer_instead_of_failing(capsys):
    peers = _load("peers")
    pytest.importorskip("gradprobe")
    peers.main(["--model", "mlp", "--tools", "naive", "--pairs", "2", "--chunk", "9", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| naive |" in out


def test_jacobian10_is_not_refused_for_a_median_and_total_that_differ_by_design(overhead):
    # One Jacobian step in ten moves the total ratio, not the median: that is no noise.
    steps = [1.5] * 9 + [6.0]
    periodic = overhead.Result("jacobian10", [[1.0] * 10] * 2, [steps] * 2, blocks=2, recorded=1.0)
    assert periodic.consistent()
    assert periodic.median_text().startswith("1.500") and periodic.total_text().startswith("1.950")
    assert not overhead.Result("default", [[1.0] * 10] * 2, [steps] * 2, blocks=2, recorded=1.0).consistent()


def test_the_scaling_benchmark_prints_a_row_per_depth(capsys):
    scaling = _load("scaling")
    scaling.main(["--blocks", "3", "6", "--pairs", "2", "--chunk", "9", "--count-steps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 3 |", "| 6 |"))]
    assert len(rows) == 2 and all(row.count("|") == 10 for row in rows)
