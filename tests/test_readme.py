"""The README's quick start runs as written, and its set-up commands are what CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


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


def test_ci_runs_the_readme_test_command():
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert command in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci and 'pip install -e ".[test]"' in ci and "python -m pytest" in ci
    assert "venv" in ci
