"""Every Python example of the documentation site runs as written, and the site's pages are current.

Each page's ```python blocks run in order in one namespace (a page reads like one session),
in a fresh working folder. Blocks that cannot run here use another fence (```text).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)

# Pages whose examples train for longer than a few seconds (CI runs them; -m "not slow" skips them).
SLOW_PAGES = {"quickstart.md", "integrations.md"}


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _page_params() -> list[object]:
    params: list[object] = []
    for page in PAGES:
        if not python_blocks(page.read_text()):
            continue
        marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
        params.append(pytest.param(page, id=str(page.relative_to(DOCS)), marks=marks))
    return params


def run_blocks(blocks: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> dict:
    """Run the blocks in order in one fresh namespace, in ``cwd``, figures off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    namespace: dict = {"__name__": "__docs_example__"}
    try:
        for i, block in enumerate(blocks):
            code = compile(block, f"<{name} block {i + 1}>", "exec")
            exec(code, namespace)
    finally:
        plt.close("all")
    return namespace


def _is_test_file(block: str) -> bool:
    """A block that starts with ``# test_<name>.py`` is a pytest file, run by pytest, not exec."""
    return re.match(r"# test_\w+\.py\n", block) is not None


@pytest.mark.parametrize("page", _page_params())
def test_examples_run_as_written(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in python_blocks(page.read_text()) if not _is_test_file(b)]
    run_blocks(blocks, tmp_path, monkeypatch, page.name)


TEST_FILES = [
    pytest.param(page, block, id=f"{page.relative_to(DOCS)}:{block.split(chr(10), 1)[0][2:]}")
    for page in PAGES
    for block in python_blocks(page.read_text())
    if _is_test_file(block)
]


@pytest.mark.parametrize(("page", "block"), TEST_FILES)
def test_example_test_files_pass_under_pytest(page: Path, block: str, tmp_path: Path) -> None:
    name = block.split("\n", 1)[0][2:]
    (tmp_path / name).write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # The plugin by name: in a checkout without an installed entry point it is not registered.
    plugin = ["-p", "gradprobe.pytest_plugin"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout


def test_every_page_is_in_a_toctree() -> None:
    # toctree entries are paths relative to the page that holds them (all of them are in docs/).
    entries = set()
    for block in re.findall(r"^```\{toctree\}\n(.*?)^```", (DOCS / "index.md").read_text(), re.S | re.M):
        entries |= {line.strip() for line in block.splitlines() if line.strip() and not line.startswith(":")}
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in PAGES} - {"index"}
    assert pages <= entries, f"pages in no toctree: {sorted(pages - entries)}"


# Words that narrate change or point at the tracker; the pages state current facts only.
HISTORY = re.compile(
    r"\b(previous(ly)? (version|session|run)|today|no longer|used to|withdrawn|load average"
    r"|earlier (run|version))\b|\bissues? #?\d+|(?<![\w&])#\d{2,}\b",
    re.I,
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_pages_state_current_facts(page: Path) -> None:
    hits = [line for line in page.read_text().splitlines() if HISTORY.search(line)]
    assert not hits, f"{page.name} narrates history: {hits[:3]}"
