"""The README is short, current and runnable: its examples run as written, its set-up is what CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import HISTORY, python_blocks, run_blocks

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()

MAIN_JOB = (
    "python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 "
    "&& pip install -e . && gradprobe compare"
)
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'


def _python_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_readme_is_at_most_300_lines():
    assert len(README.splitlines()) <= 300


def test_quick_start_is_under_fifteen_lines():
    lines = [line for line in _python_block_after("## Quick start").splitlines() if line.strip()]
    assert len(lines) < 15


@pytest.mark.slow
def test_quick_start_runs_and_writes_its_report(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_python_block_after("## Quick start"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layer3.2" in out.stdout and "cum_gain" in out.stdout
    assert (tmp_path / "reports" / "quickstart" / "index.html").exists()


def test_other_python_examples_run_as_written(tmp_path, monkeypatch):
    quick = _python_block_after("## Quick start")
    others = [block for block in python_blocks(README) if block != quick]
    assert others, "the README has no example besides the quick start"
    run_blocks(others, tmp_path, monkeypatch, "README.md")


def test_set_up_clones_then_runs_the_main_job_after_its_marker():
    # CI extracts the block after the marker and runs it in a fresh clone.
    assert re.search(r"```bash\ngit clone \S.* gradprobe && cd gradprobe\n```", README)
    after = README.split("<!-- main-job -->", 1)[1]
    block = re.match(r"\s*```bash\n(.*?)\n```", after, re.S)
    assert block and block.group(1).strip() == MAIN_JOB
    assert README.index("git clone") < README.index("<!-- main-job -->")


def test_ci_runs_the_readme_test_command():
    assert any(TEST_COMMAND in line for line in README.splitlines())
    assert "pip install torch==2.13.0" in CI and 'pip install -e ".[test]"' in CI and "python -m pytest" in CI
    assert "venv" in CI


def test_ci_builds_the_docs_with_warnings_as_errors():
    assert 'pip install -e ".[docs]"' in CI
    assert re.search(r"sphinx-build -W --keep-going -b html docs \S+", CI)


def test_readme_names_the_progress_switch():
    assert "--no-progress" in README


def test_main_job_table_is_the_one_the_summary_prints():
    table = re.search(r"```text\n(model +train_loss.*?)```", README, re.S)
    assert table, "no summary table in the README"
    lines = table.group(1).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["plain-20", "plain-56", "resnet-20", "resnet-56"]


def test_links_into_the_docs_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links
    for link in links:
        assert (ROOT / link).exists(), link


def test_readme_states_current_facts():
    hits = [line for line in README.splitlines() if HISTORY.search(line)]
    assert not hits, hits[:3]
