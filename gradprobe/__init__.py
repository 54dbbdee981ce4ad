"""gradprobe: measure gradient propagation and identity behaviour of the blocks of deep PyTorch nets.

Names are imported on first use, so ``import gradprobe`` (and the pytest plugin it
registers) does not pay for importing torch, pandas or matplotlib until needed.

>>> import torch, torch.nn as nn, gradprobe
>>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
>>> with gradprobe.attach(net) as probe:
...     net(torch.randn(4, 8)).sum().backward()
>>> probe.blocks
['0', '1', '2']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # the names as the type checker and IDEs see them
    from . import data, export, metrics, models, plot, summary, testing
    from .analysis import analyze, paths
    from .blocks import select_blocks
    from .config import JacobianOptions, ProbeConfig
    from .experiment import compare
    from .jacobian import spectrum
    from .lesions import lesion
    from .path_lengths import paths_summary
    from .pooling import pool_ranks
    from .probe import Probe, attach, every_n
    from .records import Run, load
    from .reporting import report

# public name -> (submodule, attribute); None as attribute means the submodule itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "attach": ("probe", "attach"),
    "Probe": ("probe", "Probe"),
    "every_n": ("probe", "every_n"),
    "ProbeConfig": ("config", "ProbeConfig"),
    "JacobianOptions": ("config", "JacobianOptions"),
    "analyze": ("analysis", "analyze"),
    "spectrum": ("jacobian", "spectrum"),
    "compare": ("experiment", "compare"),
    "report": ("reporting", "report"),
    "paths": ("analysis", "paths"),
    "lesion": ("lesions", "lesion"),
    "paths_summary": ("path_lengths", "paths_summary"),
    "load": ("records", "load"),
    "pool_ranks": ("pooling", "pool_ranks"),
    "Run": ("records", "Run"),
    "select_blocks": ("blocks", "select_blocks"),
    "models": ("models", None),
    "data": ("data", None),
    "testing": ("testing", None),
    "plot": ("plot", None),
    "metrics": ("metrics", None),
    "summary": ("summary", None),  # the module: gradprobe.summary.summary(frame, scalars, paths)
    "export": ("export", None),
}

__all__ = [
    "JacobianOptions",
    "Probe",
    "ProbeConfig",
    "Run",
    "__version__",
    "analyze",
    "attach",
    "compare",
    "data",
    "every_n",
    "export",
    "lesion",
    "load",
    "metrics",
    "models",
    "paths",
    "paths_summary",
    "plot",
    "pool_ranks",
    "report",
    "select_blocks",
    "spectrum",
    "summary",
    "testing",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    # Bound on the package, so that this runs once per name. (No public function shares its
    # name with a submodule: the module of ``report`` is ``reporting``.)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
