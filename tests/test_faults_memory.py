"""Nothing kept, nothing left behind: memory stays bounded in every loop shape (forward passes
without a backward pass, forwards that raise, several forwards before one backward), the
numbers stay right after such loops, and a copy or pickle of a probed model carries no
gradprobe hooks.

Memory is measured as resident memory in a child process (a fresh interpreter: what the
test process allocated before does not blur it).
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.hooks import Copied

LINUX = sys.platform.startswith("linux")  # /proc/self/statm

# ----------------------------------------------------------------------------- resident memory

# 3 residual blocks of width 256 on a batch of 128: each pass keeps about 0.75 MiB of activations
# in its graph (the inputs of the Linear layers and the outputs of tanh). Each loop shape runs
# 1,000 times after 50 passes of warm-up; the child prints the resident growth in MiB per shape.
# glibc keeps freed memory in its arenas, so where it can the child hands that back
# (malloc_trim) before each reading.
_CHILD = r"""
import ctypes, json, os, sys
import torch, torch.nn as nn
import gradprobe

try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _trim = lambda pad: 0

def rss():
    _trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin, self.fail = nn.Linear(width, width), False
    def forward(self, x):
        y = x + torch.tanh(self.lin(x))
        if self.fail:
            raise RuntimeError("out of memory")  # an OOM-retry loop's failing block
        return y

torch.manual_seed(0)
net = nn.Sequential(*[Block(256) for _ in range(3)])
x = torch.randn(128, 256)
probe = gradprobe.attach(net) if sys.argv[1] == "probe" else None

def forward_only(i):  # a loss computed and dropped (not finite, an RL rollout)
    loss = net(x).pow(2).mean()

def raises(i):
    net[2].fail = True
    try:
        net(x)
    except RuntimeError:
        pass
    finally:
        net[2].fail = False

def skipped_backward(i):  # a training step, then losses skipped
    loss = net(x).pow(2).mean()
    if i % 10 == 0:
        loss.backward()

def several_forwards(i):  # several forwards, then one backward
    a, b = net(x), net(x[:64])
    if i % 5 == 4:
        (a.pow(2).mean() + b.pow(2).mean()).backward()

def blocks_alone(i):  # the blocks called one by one, not through the model
    y = x
    for block in net:
        y = block(y)

growth = {}
for shape in (forward_only, raises, skipped_backward, several_forwards, blocks_alone):
    for i in range(50):
        shape(i)
    before = rss()
    for i in range(1000):
        shape(i)
    growth[shape.__name__] = rss() - before
print(json.dumps(growth))
"""


def _growth(mode: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
        cwd=Path(__file__).parent.parent,  # this checkout's gradprobe
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/statm")
def test_memory_stays_flat_in_loops_without_backward():
    # Without the fix the probe kept each such pass's first-block graph and held output: 240 MiB
    # over the 1,000 forward-only passes, 170 MiB over the raising ones.
    growth = _growth("probe")
    assert set(growth) == {"forward_only", "raises", "skipped_backward", "several_forwards", "blocks_alone"}
    assert all(mib < 20 for mib in growth.values()), growth


# ----------------------------------------------------------------------------- numbers after such loops


class Res(nn.Module):
    def __init__(self, width: int = 6, fail: bool = False) -> None:
        super().__init__()
        self.lin, self.fail = nn.Linear(width, width), fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + torch.tanh(self.lin(x))
        if self.fail:
            raise RuntimeError("out of memory")
        return y


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Res() for _ in range(3)]).double()


def _data(seed: int, batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _forward_only(net: nn.Module, i: int) -> None:
    net(_data(100 + i)).pow(2).mean()


def _raises(net: nn.Module, i: int) -> None:
    net[2].fail = True
    try:
        net(_data(100 + i))
    except RuntimeError:
        pass
    finally:
        net[2].fail = False


def _kept_output(net: nn.Module, i: int) -> None:
    # outputs kept alive (a list of validation outputs): their graphs live on, without a backward
    _kept.append(net(_data(100 + i)))


_kept: list[torch.Tensor] = []


class _Saved:
    """What autograd saves for backward, wrapped (saved_tensors_hooks) so that a weak reference
    tells when the graph that saved it is freed."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t.detach()  # (a saved output with its grad_fn would tie its node to itself)


def _blocks_alone(net: nn.Module, i: int) -> None:
    y = _data(100 + i)
    for block in net:
        y = block(y)


@pytest.mark.parametrize("loop", ["forward", "raises", "blocks_alone"])
def test_forward_passes_without_backward_free_their_graphs(loop):
    # The probe's hooks tied each such pass's first-block graph to itself (its output's gradient
    # edge, held by the call that the output's hook holds): no graph of those passes was freed.
    net, saved = _net(), []

    def pack(t: torch.Tensor) -> _Saved:
        box = _Saved(t)
        saved.append(weakref.ref(box))
        return box

    shape = {"forward": _forward_only, "raises": _raises, "blocks_alone": _blocks_alone}[loop]
    with gradprobe.attach(net) as probe:
        _train(net, 1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            for i in range(20):
                shape(net, i)
        assert len(saved) >= 20  # the blocks saved tensors in every pass
        net(_data(0)).pow(2).mean().backward()  # the next pass frees what the last one left
        assert [r for r in saved if r() is not None] == []
    assert len(probe.frame()) == 6  # the two training steps, each 3 rows


def _backward(net: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()


def _grad_params(net: nn.Module, loss: torch.Tensor) -> None:
    # differentiates with respect to the parameters only: the first block's g_x comes by a
    # vector-Jacobian product the probe runs itself
    for p, g in zip(net.parameters(), torch.autograd.grad(loss, list(net.parameters())), strict=True):
        p.grad = g


def _step(net: nn.Module, train: Callable[[nn.Module, torch.Tensor], None], several: bool) -> None:
    loss = net(_data(1)).pow(2).mean()
    if several:
        loss = loss + net(_data(2, batch=3)).pow(2).mean()
    train(net, loss)


def _frame(loop: Callable[[nn.Module, int], None] | None, train: Any, several: bool) -> pd.DataFrame:
    net = _net()
    with gradprobe.attach(net) as probe:
        for i in range(50 if loop is not None else 0):
            loop(net, i)
        _step(net, train, several)
    _kept.clear()
    return probe.frame()


@pytest.mark.parametrize("several", [False, True], ids=["one-forward", "several-forwards"])
@pytest.mark.parametrize("train", [_backward, _grad_params], ids=["backward", "autograd.grad"])
@pytest.mark.parametrize("loop", [_forward_only, _raises, _kept_output], ids=["forward", "raises", "kept"])
def test_training_step_after_forward_only_passes_records_the_same_row(loop, train, several):
    fresh = _frame(None, train, several)
    after = _frame(loop, train, several)
    assert len(fresh) == 3 and fresh["calls"].tolist() == [1 + several] * 3
    assert np.isfinite(fresh["grad_in"]).all()
    pd.testing.assert_frame_equal(after, fresh)


# ----------------------------------------------------------------------------- copies and pickles

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def user_hook(module: nn.Module, args: Any, output: Any) -> None:
    """A user's own forward hook (module level: it pickles)."""


def user_pre_hook(module: nn.Module, args: Any) -> None:
    """A user's own forward pre-hook."""


def _hooks(net: nn.Module) -> dict[tuple[str, str], dict[int, Any]]:
    """Every hook dict of every module: what the user's handles made, by identity of the hook."""
    return {
        (name, d): {key: getattr(hook, "__name__", hook) for key, hook in getattr(m, d).items()}
        for name, m in net.named_modules()
        for d in _HOOK_DICTS
    }


def _user_net() -> nn.Sequential:
    net = _net()
    net[1].register_forward_hook(user_hook)
    net.register_forward_pre_hook(user_pre_hook)
    return net


def _train(net: nn.Module, steps: int = 2) -> None:
    for i in range(steps):
        net(_data(i)).pow(2).mean().backward()


def test_deepcopy_while_attached_carries_no_gradprobe_hooks():
    net = _user_net()
    users = _hooks(net)
    probe = gradprobe.attach(net, jacobian=1, paths=1)
    ema = copy.deepcopy(net)  # the EMA pattern
    assert _hooks(ema) == users  # as soon as deepcopy returns
    _train(net)
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
            pe.lerp_(p, 0.5)
    ema.load_state_dict(net.state_dict())
    steps = len(probe.frame())
    _train(ema)  # the copy is not probed
    assert len(probe.frame()) == steps
    probe.detach()
    _train(ema)
    assert _hooks(ema) == users
    assert _hooks(net) == users
    torch.testing.assert_close(ema(_data(3)), net(_data(3)), rtol=0, atol=0)


def test_deepcopy_of_a_probed_module_alone_leaves_stand_ins_that_remove_themselves():
    net = _user_net()
    users = _hooks(net[1])
    with gradprobe.attach(net):
        hooks = copy.deepcopy(net[1]._forward_hooks)  # a dict without its module: no memo entry
        assert any(isinstance(h, Copied) for h in hooks.values())
        block = copy.deepcopy(net[1])
        assert _hooks(block) == users


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_pickled_probed_model_loads_without_gradprobe_hooks_after_first_use(save):
    net = _user_net()
    users = _hooks(net)
    with gradprobe.attach(net):
        _train(net, 1)
        if save == "pickle":
            loaded = pickle.loads(pickle.dumps(net))
        else:
            buf = io.BytesIO()
            torch.save(net, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
    stand_ins = [h for d in _hooks(loaded).values() for h in d.values() if isinstance(h, Copied)]
    assert stand_ins  # a pickle cannot run code as it finishes: they go on first use
    expected = net(_data(4))
    torch.testing.assert_close(loaded(_data(4)), expected, rtol=0, atol=0)  # the stand-ins change nothing
    assert _hooks(loaded) == users
    loaded(_data(4)).sum().backward()
    assert _hooks(loaded) == users


_LOAD_WITHOUT_GRADPROBE = r"""
import json, pickle, sys
import torch
sys.modules["gradprobe"] = None  # as where gradprobe is not installed: importing it fails
with open(sys.argv[1], "rb") as f:
    net = pickle.load(f)
y = net(torch.ones(2, 6, dtype=torch.float64))
left = [type(h).__qualname__ for m in net.modules() for h in m._forward_hooks.values()]
imported = sorted(name for name in sys.modules if name.startswith("gradprobe") and sys.modules[name])
del sys.modules["gradprobe"]
import gradprobe
gradprobe.attach(net).detach()  # attaching removes what an earlier probe left in the pickle
after = [h for m in net.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()]
print(json.dumps({"left": left, "imported": imported, "after": len(after), "y": y.sum().item()}))
"""


def test_model_pickled_while_attached_loads_where_gradprobe_is_not_installed(tmp_path):
    torch.manual_seed(0)  # modules of torch only: the child can load them
    net = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]).double()
    with gradprobe.attach(net):
        (tmp_path / "net.pkl").write_bytes(pickle.dumps(net))
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_GRADPROBE, str(tmp_path / "net.pkl")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).parent.parent,  # this checkout's gradprobe, once the child imports it
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["imported"] == []
    assert seen["left"] and set(seen["left"]) == {"method"}  # nullcontext().__exit__: a no-op
    assert seen["after"] == 0
    assert seen["y"] == pytest.approx(net(torch.ones(2, 6, dtype=torch.float64)).sum().item(), abs=0)
