"""The probe's numbers on models whose structure is hard: blocks that are never called, blocks
with extra outputs, nested residuals, long skips and weight sharing, each against a
plain-autograd reference (float64 unless the case is about rounding).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.blocks import auto_blocks

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(d_in: int, d_out: int, gen: torch.Generator, scale: float = 1.0) -> nn.Linear:
    fc = nn.Linear(d_in, d_out).to(DT)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=DT) * scale / math.sqrt(d_in))
        fc.bias.copy_(0.1 * torch.randn(d_out, generator=gen, dtype=DT))
    return fc


def _warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


# ---------------------------------------------------------------------- never-called blocks
class _FF(nn.Module):
    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        self.a, self.b = _linear(d, d, gen), _linear(d, d, gen)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class XTransformersLike(nn.Module):
    """``layers`` is a ModuleList of ModuleLists [norm, f], run as ``x = x + f(norm(x))``."""

    def __init__(self, d: int = 8, depth: int = 3, seed: int = 0):
        super().__init__()
        gen = _gen(seed)
        self.layers = nn.ModuleList(
            [nn.ModuleList([nn.LayerNorm(d).to(DT), _FF(d, gen)]) for _ in range(depth)]
        )
        self.head = _linear(d, 2, gen)

    def forward(self, x):
        for norm, f in self.layers:
            x = x + f(norm(x))
        return self.head(x)


def test_auto_picks_called_modules_inside_lists_of_lists():
    net = XTransformersLike()
    assert [b.name for b in auto_blocks(net)] == ["layers.0.1", "layers.1.1", "layers.2.1"]


def test_auto_on_lists_of_lists_gives_the_branch_gradients():
    net, x = XTransformersLike(), torch.randn(6, 8, dtype=DT, generator=_gen(1))
    frame = gradprobe.analyze(net, x, jacobian=False, loss_fn=lambda out: out.pow(2).sum())
    assert len(frame) == 3 and frame["grad_in"].notna().all()
    # reference: g_x of f at each layer, by plain autograd
    xs: list[torch.Tensor] = []

    def alias(module, args):  # the gradient through f only: a view of f's input
        xs.append(args[0].view_as(args[0]))
        xs[-1].retain_grad()
        return (xs[-1],)

    hooks = [f.register_forward_pre_hook(alias) for _, f in net.layers]
    net(x).pow(2).sum().backward()
    for h in hooks:
        h.remove()
    for row, x_in in zip(frame.itertuples(), xs, strict=True):
        assert row.grad_in == pytest.approx(float(x_in.grad.norm()), rel=1e-9)


def test_never_called_blocks_are_named_in_one_warning_with_what_ran_inside():
    net, x = XTransformersLike(), torch.randn(4, 8, dtype=DT)
    probe = gradprobe.attach(net, blocks="layers.*")

    def train():
        for _ in range(2):
            net(x).sum().backward()
        probe.frame()

    messages = [m for m in _warnings(train) if "never called" in m]
    probe.detach()
    assert len(messages) == 1
    (message,) = messages
    assert "['layers.0', 'layers.1', 'layers.2']" in message
    assert "layers.0.0 (LayerNorm), layers.0.1 (_FF)" in message
    assert "blocks=['layers.0.1', 'layers.1.1', 'layers.2.1']" in message
    assert "ModuleList" in message


def test_paths_names_blocks_it_never_captured():
    net = XTransformersLike()
    messages = _warnings(lambda: gradprobe.paths(net, torch.randn(4, 8, dtype=DT), blocks="layers.*"))
    assert any("['layers.0', 'layers.1', 'layers.2'] were not called" in m for m in messages)


class FrozenTrunk(nn.Module):
    """Its blocks run under no_grad (a frozen feature extractor); only the head trains."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        with torch.no_grad():
            h = self.blocks(x)
        return self.head(h)


def test_a_recorded_step_without_rows_warns():
    net = FrozenTrunk()
    probe = gradprobe.attach(net, blocks="blocks.*")

    def train():
        for _ in range(3):
            net(torch.randn(2, 4)).sum().backward()
        probe.frame()

    messages = _warnings(train)
    frame = probe.frame()
    probe.detach()
    assert frame.empty
    assert sum("no probed block ran with gradients" in m for m in messages) == 1
    assert not any("never called" in m for m in messages)


def test_no_warning_when_every_block_runs():
    net = XTransformersLike()
    probe = gradprobe.attach(net)
    messages = _warnings(lambda: (net(torch.randn(3, 8, dtype=DT)).sum().backward(), probe.frame()))
    probe.detach()
    assert not [m for m in messages if "gradprobe" in m]
