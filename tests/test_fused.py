"""gradprobe.fused: the statistics of large calls taken by compiled kernels (attach(..., fused=True))
equal the float64 autograd reference, compile once for every shape, leave training unchanged, and
fall back to the eager path with one warning where they cannot run."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
from nets import make, make_input
from reference import reference_rows
from test_probe import COLUMNS, assert_rows_match, loss_of

import gradprobe
from gradprobe import fused

pytestmark = pytest.mark.slow  # compiling the kernels takes seconds (once per machine, then cached)

BATCH = 64  # the blocks' outputs are then larger than batching.CPU_DEFER_BYTES: fused, not batched


def _train(net, x, steps=1, **options):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated")  # torch's own, while compiling
        with gradprobe.attach(net, **options) as probe:
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_of(net(x))
                loss.backward()
                opt.step()
                losses.append(loss.item())
    return probe, losses


def _spy(monkeypatch) -> dict[str, int]:
    """Counts of the calls the fused kernels took."""
    taken = {"forward": 0, "grad_in": 0}
    for name in taken:
        original = getattr(fused.Fused, name)

        def spy(self, *args, _original=original, _name=name):
            got = _original(self, *args)
            taken[_name] += got is not None
            return got

        monkeypatch.setattr(fused.Fused, name, spy)
    return taken


def test_fused_statistics_equal_the_float64_autograd_reference(monkeypatch):
    taken = _spy(monkeypatch)
    net, twin = make("res_cnn"), make("res_cnn")
    x = make_input("res_cnn", batch=BATCH)
    probe, _ = _train(net, x, fused=True)
    assert taken["forward"] >= 2 and taken["grad_in"] >= 2  # the same-shape blocks' calls
    frame = probe.frame()
    shortcuts = {n: "shortcut" for n, m in twin.named_modules() if getattr(m, "shortcut", None) is not None}
    ref = reference_rows(twin, probe.blocks, x, loss_of, shortcuts)
    assert_rows_match(frame, ref, columns=COLUMNS, rel=1e-9)


def test_fused_signal_moments_equal_the_eager_ones():
    x = make_input("res_cnn", batch=BATCH)
    eager, _ = _train(make("res_cnn"), x)
    compiled, _ = _train(make("res_cnn"), x, fused=True)
    a, b = eager.frame(), compiled.frame()
    for column in ("chan_mean_sq", "chan_var", "branch_var", "res_ratio", "branch_cos"):
        for want, got in zip(a[column], b[column], strict=True):
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-9), column


def test_fused_kernels_compile_once_and_never_again_per_step():
    net, x = make("res_cnn"), make_input("res_cnn", batch=BATCH)
    _train(net, x, fused=True)  # compiled (or read from the cache) here
    counters = torch._dynamo.utils.counters
    before = sum(counters["stats"].values())
    other = make_input("res_cnn", batch=BATCH + 8)  # another batch size: dynamic shapes, no recompile
    _train(net, x, steps=3, fused=True)
    _train(net, other, steps=2, fused=True)
    assert sum(counters["stats"].values()) == before


def test_training_is_bit_identical_with_the_fused_kernels():
    x = make_input("res_cnn", batch=BATCH)
    bare, probed = make("res_cnn"), make("res_cnn")
    opt = torch.optim.SGD(bare.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(bare(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _, fused_losses = _train(probed, x, steps=3, fused=True)
    assert fused_losses == losses
    for p, q in zip(bare.parameters(), probed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_kernels_that_cannot_compile_give_one_warning_and_the_eager_values(monkeypatch):
    def broken(name):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused, "_kernel", broken)
    x = make_input("res_cnn", batch=BATCH)
    eager, _ = _train(make("res_cnn"), x, steps=2)
    with pytest.warns(RuntimeWarning, match="fused=True could not compile") as caught:
        probe, _ = _train(make("res_cnn"), x, steps=2, fused=True)
    assert sum("fused=True" in str(w.message) for w in caught) == 1
    assert probe._taps._signal.fused.failed
    pd.testing.assert_frame_equal(eager.frame(), probe.frame())


def test_fused_must_be_a_bool():
    with pytest.raises(ValueError, match="fused= must be True or False"):
        gradprobe.attach(make("res_mlp"), fused="yes")
