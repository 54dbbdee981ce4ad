"""The package namespace: lazy public names, a light import, and the callable ``gradprobe.report``."""

from __future__ import annotations

import subprocess
import sys

import gradprobe


def test_every_public_name_resolves():
    assert set(gradprobe.__all__) - {"__version__"} == set(gradprobe._LAZY)
    for name in gradprobe.__all__:
        assert getattr(gradprobe, name) is not None


def test_import_gradprobe_does_not_import_torch_or_pandas():
    code = "import sys, gradprobe; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_report_stays_callable_after_the_submodule_is_imported():
    code = "import gradprobe.reporting, gradprobe; print(callable(gradprobe.report))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
