"""Sphinx configuration of the gradprobe documentation site.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``tox -e docs``).
"""

from __future__ import annotations

import sys
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

# The integrations import their framework on use; the docs build needs none of them installed.
autodoc_mock_imports = ["lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard"]
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
