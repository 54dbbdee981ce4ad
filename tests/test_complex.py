"""Complex-valued blocks: every column is right (float64 reference) or NaN with a warning saying why."""

from __future__ import annotations

import math

import pytest
import torch
from test_capture import assert_rows_match, chain_reference
from torch import nn

import gradprobe
from gradprobe import metrics

C128 = torch.complex128


class ComplexBlock(nn.Module):
    """y = x + W2 (h * sigmoid(|h|)), h = W1 x: complex Linear layers, a real-valued gate."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(width, width, dtype=C128)
        self.fc2 = nn.Linear(width, width, dtype=C128)

    def forward(self, x):
        h = self.fc1(x)
        return x + self.fc2(h * torch.sigmoid(h.abs()))


def _net(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*[ComplexBlock() for _ in range(3)])


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 4, dtype=C128, generator=torch.Generator().manual_seed(seed))


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (y.abs() ** 2).sum() + y.real.sum()


def test_complex_residual_net_matches_the_reference_and_jacobian_columns_are_nan_with_a_warning(no_leaks):
    net = no_leaks(_net())
    x = _x()
    reference = chain_reference(list(net), x, _loss)
    probe = gradprobe.attach(net, jacobian=True)
    with pytest.warns(RuntimeWarning, match="complex") as caught, probe:
        _loss(net(x)).backward()
    assert not any("Check the data" in str(w.message) for w in caught)
    frame = probe.frame()
    columns = ("grad_out", "grad_in", "gain", "cum_gain", "res_ratio", "cos_xy", "in_rms", "out_rms")
    assert_rows_match(frame, reference, (*columns, "branch_cos"))
    for _, row in frame.iterrows():
        params = list(net[int(row["block"])].parameters())
        norm = math.sqrt(sum(float(p.detach().abs().pow(2).sum()) for p in params))
        assert row["param_norm"] == pytest.approx(norm)
        assert row["param_grad_norm"] == pytest.approx(
            math.sqrt(sum(float(p.grad.abs().pow(2).sum()) for p in params))
        )
        # skip_grad = |g_y| and branch_grad = |g_x - g_y| with |z|^2 norms
        assert row["skip_grad"] == pytest.approx(row["grad_out"])
    assert frame[["jac_fro", "jac_spec", "jac_id", "prod_fro", "prod_spec"]].isna().all().all()
    # signal propagation moments are defined for real activations: NaN, with a warning
    assert frame[["chan_mean_sq", "chan_var", "branch_var"]].isna().all().all()
    assert any("complex output: chan_mean_sq" in str(w.message) for w in caught)


def test_complex_update_ratio_matches_the_weights_and_analyze_runs():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    theta0 = [p.detach().clone() for p in net[0].parameters()]
    with gradprobe.attach(net) as probe:
        for _ in range(2):
            opt.zero_grad()
            _loss(net(_x())).backward()
            opt.step()
            if probe.current_step == 0:
                theta1 = [p.detach().clone() for p in net[0].parameters()]
    frame = probe.frame()
    row = frame[(frame["step"] == 1) & (frame["block"] == "0")].iloc[0]
    change = math.sqrt(sum(float((a - b).abs().pow(2).sum()) for a, b in zip(theta1, theta0, strict=True)))
    norm = math.sqrt(sum(float(a.abs().pow(2).sum()) for a in theta1))
    assert change > 0 and row["update_ratio"] == pytest.approx(change / norm, rel=1e-9)
    with pytest.warns(RuntimeWarning, match="complex"):
        f = gradprobe.analyze(_net(), _x(), loss_fn=_loss)
    reference = chain_reference(list(_net()), _x(), _loss)
    assert_rows_match(f, reference, ("grad_out", "grad_in", "cum_gain", "res_ratio", "cos_xy"))


def test_complex_statistics_use_modulus_norms_and_real_inner_products():
    x = torch.tensor([1 + 1j, 2 - 1j], dtype=C128)
    y = torch.tensor([1j, 1 + 0j], dtype=C128)
    xx, yy, dd, rr = metrics.forward_stats(x, y, x).tolist()
    assert (xx, yy, rr) == pytest.approx((7.0, 2.0, 7.0))
    assert dd == pytest.approx(float((y - x).abs().pow(2).sum()))
    gx, bb, bg = metrics.grad_in_stats(x, y).tolist()
    b = x - y
    assert (gx, bb, bg) == pytest.approx((7.0, float(b.abs().pow(2).sum()), float(torch.vdot(b, y).real)))
    assert metrics.grad_out_stats(y).tolist() == [2.0]


def test_spectrum_of_a_complex_net_says_it_is_complex():
    with pytest.raises(ValueError, match="complex"):
        gradprobe.spectrum(_net(), _x())
