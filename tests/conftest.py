"""Shared fixtures: hook-leak checks on every model a test builds, one torch thread, closed figures.

The reference nets live in ``tests/nets.py`` (``from nets import make``).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hook_snapshot(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Keys of every hook dictionary of every submodule (what 'no leaked hooks' compares)."""
    snap = {}
    for name, module in model.named_modules():
        snap[name] = {d: list(getattr(module, d, {}).keys()) for d in HOOK_DICTS}
        snap[name]["__dict__"] = sorted(vars(module).keys())
    return snap


@pytest.fixture
def no_leaks():
    """Call ``no_leaks(model)`` to register a model; the test fails if any hook or attribute is left on it."""
    models: list[tuple[nn.Module, dict]] = []

    def register(model: nn.Module) -> nn.Module:
        models.append((model, hook_snapshot(model)))
        return model

    yield register
    for model, before in models:
        assert hook_snapshot(model) == before, "hooks or attributes were left on the model"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's nets are tiny: a second torch thread only adds spin-waiting, and with
    # subprocess tests (pytester, DDP) running beside it, oversubscribes the 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    gc.collect()


@pytest.fixture(scope="module")
def frozen_heap():
    """For modules that import transformers, Lightning or tensorboard: the suite's autouse
    gc.collect() after every test walks every object of those libraries (about 0.8 s a test
    here). Objects alive now are moved out of the collector's reach for the module's tests,
    and back afterwards."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
