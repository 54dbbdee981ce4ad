"""Small reference nets for the tests, deterministic for a seed and built without the global RNG.

``make(kind)`` builds one (``plain_mlp``, ``res_mlp``, ``res_cnn``, ``plain_cnn``, float64 by
default) and ``make_input(kind)`` a batch for it. ``ResMLPBlock``, ``BasicBlock`` and
``ResCNN`` are the blocks they are made of. ``deep_res_mlp(n)`` is a chain of ``n`` small
residual blocks, and ``python_calls(fn)`` counts the function calls (Python and built-in) of
``fn()``: how the tests check that a cost grows linearly with the number of blocks, without a timing.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ResMLPBlock(nn.Module):
    """y = x + W2 act(W1 x): a residual block whose branch is a two-layer MLP."""

    def __init__(self, width: int, inplace: bool = False, zero_init: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(width, width)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class BasicBlock(nn.Module):
    """CIFAR-style residual block: BatchNorm, optional projection shortcut, in-place ReLU, ``out += x``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, inplace: bool = True, residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.inplace = inplace
        self.residual = residual
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            identity = x if self.shortcut is None else self.shortcut(x)
            if self.inplace:
                out += identity
            else:
                out = out + identity
        return self.relu(out)


class ResCNN(nn.Module):
    def __init__(self, inplace: bool = True, residual: bool = True, width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace)
        )
        self.layer1 = nn.Sequential(
            BasicBlock(width, width, inplace=inplace, residual=residual),
            BasicBlock(width, width, inplace=inplace, residual=residual),
        )
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, 2, inplace=inplace, residual=residual),
            BasicBlock(2 * width, 2 * width, inplace=inplace, residual=residual),
        )
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def make(kind: str, *, seed: int = 0, inplace: bool = False, dtype=torch.float64) -> nn.Module:
    """Small reference nets, deterministic for a seed, built without the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "plain_mlp":
            net = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)])
        elif kind == "res_mlp":
            net = nn.Sequential(*[ResMLPBlock(6, inplace=inplace) for _ in range(4)])
        elif kind == "res_cnn":
            net = ResCNN(inplace=inplace)
        elif kind == "plain_cnn":
            net = ResCNN(inplace=inplace, residual=False)
        else:
            raise ValueError(kind)
    return net.to(dtype)


def make_input(kind: str, *, seed: int = 1, batch: int = 5, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 6, 6) if "cnn" in kind else (batch, 6)
    return torch.randn(shape, generator=g, dtype=dtype)


def deep_res_mlp(blocks: int, width: int = 4) -> nn.Sequential:
    """``blocks`` residual blocks ``x + W2 relu(W1 x)`` in one ``nn.Sequential``, float64."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(*[ResMLPBlock(width) for _ in range(blocks)]).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def python_calls(fn: Callable[[], Any]) -> int:
    """The number of function calls, Python and built-in, that ``fn()`` makes (``cProfile``)."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats: Any = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    return sum(v[1] for v in stats.values())
