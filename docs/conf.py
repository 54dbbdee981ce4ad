"""Sphinx configuration of the gradprobe documentation site.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``tox -e docs``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this checkout, installed or not

import gradprobe  # noqa: E402

project = "gradprobe"
author = "the gradprobe developers"
copyright = "the gradprobe developers"
release = gradprobe.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# The integrations need their framework to import; the docs build needs none of them
# installed (tox -e docs installs only the docs extra). A missing framework is replaced:
# transformers by autodoc's mock, Lightning by a module holding a plain ``Callback`` class,
# because the Lightning callback's class is built with ``type()``, which a mock base breaks.
autodoc_mock_imports = [name for name in ("transformers", "accelerate") if not _installed(name)]
if not (_installed("pytorch_lightning") or _installed("lightning")):
    _stub = types.ModuleType("pytorch_lightning")

    class Callback:
        """Stand-in for Lightning's ``Callback`` in a docs build without Lightning."""

    Callback.__module__ = "pytorch_lightning"
    _stub.Callback = Callback  # type: ignore[attr-defined]
    sys.modules["pytorch_lightning"] = _stub
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
# Docstrings here are plain reStructuredText-ish prose with doctest examples, not numpydoc sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "pydata_sphinx_theme"
html_title = "gradprobe"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path: list[str] = []
# The user guide pages have no section navigation of their own: no empty left sidebar there.
html_sidebars = {
    page: []
    for page in (
        "index",
        "quickstart",
        "measurements",
        "blocks",
        "jacobians",
        "paths",
        "reports",
        "assertions",
        "integrations",
        "large-runs",
        "compatibility",
        "main-job",
        "performance",
        "development",
    )
}
