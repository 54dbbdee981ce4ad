"""Jacobian columns through the probe: against exact Jacobians, on steps chosen by jacobian=N, without
side effects on training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import make, make_input
from torch import nn

import gradprobe
from gradprobe.jacobian import capture_blocks, exact_columns


@pytest.mark.parametrize("kind", ["res_mlp", "res_cnn"])
def test_analyze_jacobian_columns_match_exact_jacobians(kind):
    net = make(kind, inplace=True)
    x = make_input(kind, batch=3)
    frame = gradprobe.analyze(net, x, probes=256, power_iters=30).set_index("block")
    twin = copy.deepcopy(net)
    _, caps = capture_blocks(twin, (x,))
    exact = exact_columns(caps)
    for name, cols in exact.items():
        for col in ("jac_fro", "jac_id", "prod_fro"):
            if math.isnan(cols[col]):
                assert math.isnan(frame.loc[name, col])
            else:
                assert frame.loc[name, col] == pytest.approx(cols[col], rel=0.05), (name, col)
        for col in ("jac_spec", "prod_spec"):
            assert frame.loc[name, col] == pytest.approx(cols[col], rel=0.02), (name, col)


def test_analyze_leaves_the_model_unchanged():
    net = make("res_cnn")
    x = make_input("res_cnn")
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    gradprobe.analyze(net, x, probes=2, power_iters=3)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_zero_initialised_branch_has_jac_id_zero_through_analyze():
    from conftest import ResMLPBlock

    net = nn.Sequential(*[ResMLPBlock(6, zero_init=True) for _ in range(3)]).double()
    f = gradprobe.analyze(net, make_input("res_mlp"), probes=4, power_iters=5)
    assert (f["jac_id"] == 0).all()
    np.testing.assert_allclose(f[["jac_fro", "jac_spec", "prod_fro", "prod_spec"]], 1.0, rtol=1e-9)


def test_jacobian_every_n_recorded_steps_and_training_is_bit_identical():
    base = make("res_cnn", dtype=torch.float32, inplace=True)
    runs = []
    for kwargs in (None, {"jacobian": 2, "every": 1}):
        net = copy.deepcopy(base)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(0)
        probe = gradprobe.attach(net, **kwargs) if kwargs else None
        losses = []
        for _ in range(5):
            x = torch.randn(4, 3, 6, 6, generator=gen)
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if probe is not None:
            probe.detach()
            frame = probe.frame()
        runs.append((losses, net.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    with_jac = sorted(frame.loc[frame["jac_fro"].notna(), "step"].unique())
    assert with_jac == [0, 2, 4]
    assert frame["jac_spec"].isna().all()  # spectral columns are opt-in during training
    assert (frame.loc[frame["jac_fro"].notna(), "prod_fro"] > 0).all()


def test_spectral_columns_during_training_when_asked():
    net = make("res_mlp")
    x = make_input("res_mlp")
    opts = {"spec": True, "power_iters": 5, "prod_spec": "shared"}
    with gradprobe.attach(net, jacobian=True, probes=2, jacobian_options=opts) as probe:
        net(x).pow(2).sum().backward()
    f = probe.frame()
    assert f["jac_spec"].notna().all() and f["prod_spec"].notna().all()
