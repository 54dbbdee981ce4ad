"""Tests of gradprobe.testing: the assertions, check(), the failure messages and the listener hook point.

The three examples of the issue are here as tests (deep plain MLP vs residual MLP with
PyTorch's default init, zero-init ResNet-56, log of a negative activation). Expected
values come from closed forms or from the frame itself, never from constants copied
out of a run.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from nets import make, make_input
from torch import nn

import gradprobe
from gradprobe import records
from gradprobe.analysis import analyze
from gradprobe.models import resnet_cifar
from gradprobe.testing import (
    GradientAssertionError,
    Violation,
    add_frame_listener,
    assert_finite_gradients,
    assert_gradient_flow,
    assert_jacobian_bounded,
    assert_near_identity,
    check,
    format_violations,
)

# ----------------------------------------------------------------------------- models


class MLPBlock(nn.Module):
    """``F(x) = fc(relu(x))``; plain: ``y = F(x)``, residual: ``y = x + F(x)``.

    A chain of plain blocks is Linear+ReLU layers: with PyTorch's default init
    (weights uniform with variance 1/(3 fan_in)) the expected squared gradient gain
    per layer is fan_in * 1/(3 fan_in) * 1/2 = 1/6.
    """

    def __init__(self, width: int, residual: bool):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.residual = residual

    def forward(self, x):
        out = self.fc(torch.relu(x))
        return x + out if self.residual else out


def default_init_mlp(depth: int, residual: bool, width: int = 64, seed: int = 0) -> nn.Sequential:
    """PyTorch's default initialisation, deterministic for ``seed`` (global RNG forked and restored)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*[MLPBlock(width, residual) for _ in range(depth)])


def batch(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Act(nn.Module):
    """A block ``y = act(fc(x))`` whose activation is chosen per block."""

    def __init__(self, width: int, act):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


def act_net(acts, width: int = 8, seed: int = 0, head: nn.Module | None = None) -> nn.Module:
    """stem -> blocks (one per activation) -> head, PyTorch default init."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(4, width),
            nn.Sequential(*[Act(width, a) for a in acts]),
            head if head is not None else nn.Linear(width, 3),
        )


def frame_of(rows: list[dict]) -> pd.DataFrame:
    return records.rows_to_frame([{"calls": 1, **r} for r in rows])


# ----------------------------------------------------------------------------- example 1: gradient flow


def test_plain_mlp_with_default_init_fails_gradient_flow():
    net = default_init_mlp(50, residual=False)
    with pytest.raises(GradientAssertionError) as info:
        assert_gradient_flow(net, batch(32, 64))
    exc = info.value
    assert isinstance(exc, AssertionError)
    frame = exc.frame
    # The gradient vanishes geometrically: towards the input, cum_gain shrinks by sqrt(1/6) per block
    # on average, so log cum_gain rises by log sqrt(6) per block of index.
    slope = np.polyfit(frame["index"], np.log(frame["cum_gain"]), 1)[0]
    assert slope == pytest.approx(math.log(math.sqrt(6.0)), rel=0.2)
    expected = frame.loc[frame["cum_gain"] < 1e-3]
    assert [v.block for v in exc.violations] == expected["block"].tolist()
    assert [v.value for v in exc.violations] == expected["cum_gain"].tolist()
    assert {v.rule for v in exc.violations} == {"min_cum_gain"}
    assert {v.threshold for v in exc.violations} == {1e-3}
    # the message, as a user reads it
    text = str(exc)
    lines = text.splitlines()
    n = len(expected)
    assert lines[0] == f"assert_gradient_flow failed for Sequential: {n} of 50 blocks are outside the band"
    assert lines[1] == "rule: 0.001 <= cum_gain <= 1000 at every block"
    assert "cum_gain = grad_in of this block / grad_out of the last block" in lines[2]
    header = next(
        i for i, line in enumerate(lines) if line.split() == ["index", "block", "cum_gain", "violates"]
    )
    rows = lines[header + 1 : header + 11]
    assert [r.split()[0] for r in rows] == [str(i) for i in range(10)]  # the 10 worst: nearest the input
    for r, (_, row) in zip(rows, expected.head(10).iterrows(), strict=True):
        assert r.split()[2] == f"{row['cum_gain']:.2e}"
        assert r.endswith("min_cum_gain = 0.001")
    assert lines[header + 11].startswith(f"  ... and {n - 10} more: 10, 11, 12, ..., ")
    assert f"(index 10 to {n - 1})" in lines[header + 11]
    assert lines[-1].startswith(
        "advice: the gradient vanishes on its way to the input: plain nets of this depth"
    )
    assert "(50 blocks)" in lines[-1] and "residual connections" in lines[-1]


def test_residual_mlp_of_the_same_depth_passes_gradient_flow():
    net = default_init_mlp(50, residual=True)
    frame = assert_gradient_flow(net, batch(32, 64))
    assert isinstance(frame, pd.DataFrame)
    assert frame["block"].tolist() == [str(i) for i in range(50)]
    assert frame["cum_gain"].between(1e-3, 1e3).all()
    # each residual block adds to the gradient: cum_gain grows towards the input
    assert frame["cum_gain"].iloc[0] > frame["cum_gain"].iloc[-1]


def test_gradient_flow_gain_bands_and_explosion():
    net = default_init_mlp(6, residual=True, width=16)
    x = batch(8, 16)
    frame = analyze(net, x, jacobian=False)
    low = float(frame["gain"].median())
    with pytest.raises(GradientAssertionError) as info:
        assert_gradient_flow(net, x, min_gain=low)
    assert [v.block for v in info.value.violations] == frame.loc[frame["gain"] < low, "block"].tolist()
    assert "rule: 0.001 <= cum_gain <= 1000; gain >= " in str(info.value)
    assert "advice: these blocks shrink the gradient" in str(info.value)
    top = float(frame["cum_gain"].max())
    with pytest.raises(GradientAssertionError, match="advice: the gradient explodes") as info:
        assert_gradient_flow(net, x, max_cum_gain=top / 1.01)
    assert {v.rule for v in info.value.violations} == {"max_cum_gain"}
    assert assert_gradient_flow(net, x, max_gain=float(frame["gain"].max())).equals(frame)


# ----------------------------------------------------------------------------- example 2: near identity


def test_zero_init_resnet56_passes_near_identity():
    net = resnet_cifar(56, zero_init_residual=True)
    frame = assert_near_identity(net, batch(4, 3, 16, 16))
    assert len(frame) == 27  # the whole frame comes back, projection blocks included
    identity = frame.loc[~frame["block"].isin(["layer2.0", "layer3.0"])]
    # relu(0 + x) = x for the non-negative input of every block: exactly the identity
    assert (identity["res_ratio"] == 0).all()


def test_resnet56_without_zero_init_fails_near_identity_readably():
    net = resnet_cifar(56)
    with pytest.raises(GradientAssertionError) as info:
        assert_near_identity(net, batch(4, 3, 16, 16))
    exc = info.value
    frame = exc.frame
    identity = frame.loc[~frame["block"].isin(["layer2.0", "layer3.0"])]
    assert len(exc.violations) == 25 == (identity["res_ratio"] > 0.05).sum()
    assert {v.rule for v in exc.violations} == {"max_res_ratio"}
    assert "layer2.0" not in {v.block for v in exc.violations}  # shape-changing blocks are skipped
    text = str(exc)
    lines = text.splitlines()
    assert lines[0] == "assert_near_identity failed for ResNetCIFAR: 25 of 25 blocks are outside the band"
    assert lines[1] == "rule: res_ratio <= 0.05 at every block whose output has its input's shape"
    assert "skipped (output shape differs from input shape): layer2.0, layer3.0" in lines
    worst = identity.sort_values("res_ratio", ascending=False).head(10)
    table = [line for line in lines if line.endswith("max_res_ratio = 0.05")]
    assert sorted(line.split()[1] for line in table) == sorted(worst["block"])
    assert "and 15 more" in text
    assert lines[-1].startswith("advice: the residual branches are far from zero at initialisation")
    assert "zero_init_residual=True" in lines[-1]


def test_near_identity_with_jacobian_distance():
    net = nn.Sequential(*[make_res_block(8, zero=True) for _ in range(4)])
    frame = assert_near_identity(net, batch(6, 8), max_res_ratio=None, max_jac_id=1e-6)
    assert (frame["jac_id"] == 0).all() and (frame["jac_fro"] - 1).abs().max() < 1e-6
    net = nn.Sequential(*[make_res_block(8, zero=False) for _ in range(4)])
    with pytest.raises(GradientAssertionError) as info:
        assert_near_identity(net, batch(6, 8), max_jac_id=1e-6)
    rules = {v.rule for v in info.value.violations}
    assert rules == {"max_res_ratio", "max_jac_id"}
    assert "jac_id = |J - I|_F / sqrt(n)" in str(info.value)


def make_res_block(width: int, zero: bool, seed: int = 0) -> nn.Module:
    block = MLPBlock(width, residual=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.fc.weight.copy_(torch.randn(width, width, generator=gen) / math.sqrt(width))
        block.fc.bias.zero_()
        if zero:
            block.fc.weight.zero_()
    return block


def test_near_identity_needs_an_identity_shaped_block():
    net = nn.Sequential(*[nn.Sequential(nn.Linear(8 - i, 7 - i), nn.ReLU()) for i in range(3)])
    with pytest.raises(ValueError, match="every selected block of Sequential changes the shape"):
        assert_near_identity(net, batch(4, 8))
    with pytest.raises(ValueError, match="both are None"):
        assert_near_identity(net, batch(4, 8), max_res_ratio=None)


# ----------------------------------------------------------------------------- example 3: finite gradients


def test_log_of_negative_activation_fails_naming_the_block():
    net = act_net([torch.relu, torch.relu, torch.log, torch.relu, torch.relu])
    with pytest.raises(GradientAssertionError) as info:
        assert_finite_gradients(net, batch(16, 4))
    exc = info.value
    lines = str(exc).splitlines()
    assert lines[0] == (
        "assert_finite_gradients failed for Sequential: non-finite values first appear in the forward pass "
        "of block '1.2' (index 2): its input is finite, its output is nan"
    )
    assert lines[-1].startswith("advice: look at the forward pass of '1.2' for log, sqrt")
    blocks = {v.block for v in exc.violations}
    assert {"1.0", "1.1"}.isdisjoint(blocks)  # nothing is reported before the block that made the nan
    first = exc.violations[0]
    assert (first.block, first.index, first.column, first.rule) == ("1.2", 2, "out_rms", "finite")
    assert math.isnan(first.value)
    # the nan flows on: later activations, the head's weight gradient and the loss are reported too
    assert ("2.weight", "param_grad", -1) in {(v.block, v.column, v.index) for v in exc.violations}
    assert ("<loss>", "loss") in {(v.block, v.column) for v in exc.violations}
    table = "\n".join(lines)
    assert re.search(r"^\s+-\s+<loss>\s+loss\s+nan\s+finite$", table, re.M)


def where_sqrt(x):
    # finite forward (the nan of sqrt(x < 0) is masked), but the masked branch's gradient is 0 * nan = nan
    return torch.where(x > 0, x.sqrt(), torch.zeros_like(x))


def test_backward_only_nan_names_the_block_where_the_gradient_turns_nonfinite():
    net = act_net([torch.tanh, torch.tanh, where_sqrt, torch.tanh])
    with pytest.raises(GradientAssertionError) as info:
        assert_finite_gradients(net, batch(16, 4))
    exc = info.value
    grad_in = {v.index for v in exc.violations if v.column == "grad_in"}
    assert grad_in == {0, 1, 2}  # the nan reaches every block between its origin and the input ...
    first_line = str(exc).splitlines()[0]  # ... but the origin is named
    assert first_line.endswith(
        "the forward pass is finite; in the backward pass the gradient first turns non-finite in "
        "block '1.2' (index 2): its output gradient is finite, its input gradient is nan"
    )
    assert "torch.where / masking" in str(exc).splitlines()[-1]


class ScaledHead(nn.Module):
    """``y = fc(x) + sqrt(|s|)`` with s = 0: finite forward, d sqrt(|s|)/ds = inf * sign(0) = nan."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.s = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fc(x) + self.s.abs().sqrt()


def test_nonfinite_parameter_gradient_outside_blocks_names_the_parameter():
    net = act_net([torch.tanh, torch.tanh], head=ScaledHead())
    with pytest.raises(GradientAssertionError) as info:
        assert_finite_gradients(net, batch(16, 4))
    (v,) = info.value.violations
    assert (v.block, v.index, v.column) == ("2.s", -1, "param_grad")
    assert str(v) == "step 0, parameter '2.s' (outside the probed blocks): gradient = nan is not finite"
    assert "but the gradient of parameter '2.s' (outside the probed blocks) is nan" in str(info.value)


def test_nonfinite_input_and_nonfinite_loss():
    net = act_net([torch.tanh, torch.tanh])
    x = batch(16, 4)
    x[3, 1] = math.nan
    with pytest.raises(GradientAssertionError, match=r"the model's input already holds nan") as info:
        assert_finite_gradients(net, x)
    assert "check the data pipeline" in str(info.value).splitlines()[-1]
    # only the loss is non-finite: blocks and gradients are fine
    with pytest.raises(GradientAssertionError) as info:
        assert_finite_gradients(net, batch(16, 4), loss_fn=lambda out: (out.sum() - 1e6).log())
    assert [(v.block, v.column) for v in info.value.violations] == [("<loss>", "loss")]
    assert "every block's output is finite but the loss is nan" in str(info.value)


def test_finite_gradients_passes_and_matches_analyze():
    net = make("res_mlp")
    x = make_input("res_mlp")
    frame = assert_finite_gradients(net, x)
    # the assertion reproduces analyze's default loss: same frame, bit for bit
    pd.testing.assert_frame_equal(frame, analyze(net, x, jacobian=False))
    pd.testing.assert_frame_equal(frame, analyze(net, x, jacobian=False, seed=0))
    other = assert_finite_gradients(net, x, seed=3)
    pd.testing.assert_frame_equal(other, analyze(net, x, jacobian=False, seed=3))


def test_finite_gradients_on_a_recorded_frame():
    rows = [
        {"step": s, "block": b, "index": i, "in_rms": 1.0, "out_rms": 1.0, "grad_out": 1.0, "grad_in": g}
        for s, g2 in ((0, 1.0), (1, math.inf))
        for i, (b, g) in enumerate((("a", 1.0), ("b", g2)))
    ]
    frame = frame_of(rows)
    with pytest.raises(GradientAssertionError) as info:
        assert_finite_gradients(frame)
    (v,) = info.value.violations
    assert (v.block, v.step, v.column, v.value) == ("b", 1, "grad_in", math.inf)
    assert str(info.value).splitlines()[0] == (
        "assert_finite_gradients failed for the given frame: at step 1, the forward pass is finite; in the "
        "backward pass the gradient first turns non-finite in block 'b' (index 1): its output gradient is "
        "finite, its input gradient is inf"
    )


# ----------------------------------------------------------------------------- no side effects


@pytest.mark.parametrize(
    "assertion",
    [
        lambda net, x: assert_gradient_flow(net, x, min_cum_gain=None, max_cum_gain=None, max_gain=1e9),
        lambda net, x: assert_near_identity(net, x, max_res_ratio=1e9),
        lambda net, x: assert_finite_gradients(net, x),
        lambda net, x: assert_jacobian_bounded(net, x, max_spec=1e9, probes=1, power_iters=1),
    ],
    ids=["flow", "identity", "finite", "jacobian"],
)
def test_assertions_leave_the_model_untouched(assertion, no_leaks):
    net = no_leaks(make("res_cnn", inplace=True))
    x = make_input("res_cnn")
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)  # a user's accumulated gradient must survive
    grads = [p.grad for p in net.parameters()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assertion(net, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is g for p, g in zip(net.parameters(), grads, strict=True))
    assert all((g == 7.0).all() for g in grads)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running statistics included
    assert net.training


# ----------------------------------------------------------------------------- Jacobian bounds


class Scale(nn.Module):
    """``y = c x`` as a Linear layer with weight c I and no bias: every singular value is c."""

    def __init__(self, width: int, c: float):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(c * torch.eye(width))

    def forward(self, x):
        return self.fc(x)


def test_jacobian_bounded_on_a_chain_of_contractions():
    depth = 20
    net = nn.Sequential(*[Scale(6, 0.8) for _ in range(depth)])
    x = batch(5, 6)
    frame = assert_jacobian_bounded(net, x, max_spec=0.85)
    assert frame["jac_spec"].to_numpy() == pytest.approx(0.8, rel=1e-4)
    # the product from block i to the output is 0.8^(depth - i): 0.8^20 is about 0.0115
    assert frame["prod_spec"].to_numpy() == pytest.approx(
        0.8 ** (depth - frame["index"].to_numpy()), rel=1e-3
    )
    with pytest.raises(GradientAssertionError) as info:
        assert_jacobian_bounded(net, x, max_spec=0.75)
    assert len(info.value.violations) == depth
    assert "spectral normalisation" in str(info.value).splitlines()[-1]
    # 0.8^k < 0.5 for k >= 4: every block but the last three
    with pytest.raises(GradientAssertionError) as info:
        assert_jacobian_bounded(net, x, min_prod_spec=0.5, max_prod_spec=1.0)
    assert [v.index for v in info.value.violations] == list(range(depth - 3))
    assert {v.rule for v in info.value.violations} == {"min_prod_spec"}
    assert "0.5 <= prod_spec <= 1" in str(info.value)
    assert "residual connections keep the product's spectrum near 1" in str(info.value)
    with pytest.raises(ValueError, match="at least one of max_spec="):
        assert_jacobian_bounded(net, x)


def test_jacobian_bound_on_a_frame_without_jacobian_columns_is_an_error():
    frame = analyze(default_init_mlp(3, True, width=8), batch(4, 8), jacobian=False)
    with pytest.raises(ValueError, match=r"column 'jac_spec' has no values .*jacobian=True"):
        assert_jacobian_bounded(frame, max_spec=1.0)


# ----------------------------------------------------------------------------- check()


def band_frame() -> pd.DataFrame:
    rows = []
    for step in (0, 10):
        for i, (cum, res) in enumerate([(2e-4, 0.5), (0.5, math.nan), (math.nan, 0.01), (math.inf, 0.02)]):
            cum = 1.0 if step == 0 and i == 0 else cum
            rows.append({"step": step, "block": f"layer{i}", "index": i, "cum_gain": cum, "res_ratio": res})
    return frame_of(rows)


def test_check_reports_every_row_outside_a_band():
    frame = band_frame()
    got = check(frame, min_cum_gain=1e-3, max_cum_gain=1e3)
    assert [(v.step, v.block, v.rule) for v in got] == [
        (0, "layer2", "min_cum_gain"),  # nan cum_gain: a broken gradient, reported once
        (0, "layer3", "max_cum_gain"),
        (10, "layer0", "min_cum_gain"),
        (10, "layer2", "min_cum_gain"),
        (10, "layer3", "max_cum_gain"),
    ]
    v = got[2]
    assert (v.index, v.value, v.threshold, v.column, v.model) == (0, 2e-4, 1e-3, "cum_gain", None)
    assert str(v) == "step 10, block 'layer0' (index 0): cum_gain = 2.00e-04 is below min_cum_gain = 0.001"
    assert (
        str(got[0])
        == "step 0, block 'layer2' (index 2): cum_gain is nan, so min_cum_gain = 0.001 cannot hold"
    )
    assert str(got[1]).endswith("cum_gain = inf is above max_cum_gain = 1000")
    # res_ratio NaN means "not applicable" (a block that changes shape) and is skipped
    assert [(v.step, v.block) for v in check(frame, max_res_ratio=0.05)] == [(0, "layer0"), (10, "layer0")]
    skipped = check(frame, max_res_ratio=None, min_cum_gain=1e-5)  # None skips a band
    assert [str(v) for v in skipped] == [str(v) for v in check(frame, min_cum_gain=1e-5)]
    for no_band in ({}, {"max_res_ratio": None}):
        with pytest.raises(ValueError, match="no band given"):
            check(frame, **no_band)  # a check that checks nothing must not pass silently


def test_check_accepts_any_numeric_column_aliases_runs_and_models():
    frame = frame_of(
        [
            {"step": 0, "block": "a", "index": 0, "update_ratio": 0.2, "jac_spec": 1.5},
            {"step": 0, "block": "b", "index": 1, "update_ratio": 0.01, "jac_spec": 0.9},
        ]
    )
    assert [v.block for v in check(frame, max_update_ratio=0.1)] == ["a"]
    assert [(v.rule, v.column) for v in check(frame, max_spec=1.0)] == [("max_jac_spec", "jac_spec")]
    run = records.Run(frame, pd.DataFrame({"step": [0]}), {})
    assert check(run, max_spec=1.0) == check(frame, max_spec=1.0)
    multi = pd.concat([frame.assign(model="plain-20"), frame.assign(model="resnet-20")], ignore_index=True)
    got = check(multi, max_update_ratio=0.1)
    assert [(v.model, v.block) for v in got] == [("plain-20", "a"), ("resnet-20", "a")]
    assert str(got[0]).startswith("model 'plain-20', step 0, block 'a'")
    assert format_violations(got).splitlines()[0].split() == [
        "index",
        "model",
        "block",
        "update_ratio",
        "violates",
    ]


def test_check_finite():
    frame = frame_of(
        [
            {
                "step": 0,
                "block": "a",
                "index": 0,
                "in_rms": 1.0,
                "out_rms": 1.0,
                "grad_out": 1.0,
                "grad_in": 1.0,
            },
            {
                "step": 0,
                "block": "b",
                "index": 1,
                "in_rms": 1.0,
                "out_rms": math.inf,
                "grad_out": 1.0,
                "grad_in": 1.0,
            },
        ]
    )
    # param_grad_norm is NaN for blocks without trainable parameters (param_norm NaN too): not a violation
    assert [(v.block, v.column) for v in check(frame, finite=True)] == [("b", "out_rms")]
    frame.loc[0, ["param_norm", "param_grad_norm"]] = [2.0, math.nan]
    assert [(v.block, v.column) for v in check(frame, finite=True)] == [
        ("a", "param_grad_norm"),
        ("b", "out_rms"),
    ]


def test_check_errors_say_what_to_do():
    frame = band_frame()
    with pytest.raises(TypeError, match=r"unknown band cum_gain_max=.*min_<column>=.*cum_gain, skip_grad"):
        check(frame, cum_gain_max=1.0)
    with pytest.raises(ValueError, match="checks the column 'jac_id', which this frame does not have"):
        check(frame.drop(columns=["jac_id"]), max_jac_id=0.1)
    with pytest.raises(ValueError, match=r"min_cum_gain=2\.0 is larger than max_cum_gain=1\.0"):
        check(frame, min_cum_gain=2.0, max_cum_gain=1.0)
    with pytest.raises(ValueError, match="must be a number"):
        check(frame, max_cum_gain="1e3")
    with pytest.raises(ValueError, match="must be a number"):
        check(frame, max_cum_gain=math.nan)
    with pytest.raises(ValueError, match="needs a numeric column"):
        check(frame, max_block=1.0)
    with pytest.raises(ValueError, match=r"column 'jac_spec' has no values in this frame \(all NaN\)"):
        check(frame, max_spec=1.0)
    with pytest.raises(ValueError, match="the frame is empty"):
        check(records.empty_frame(), max_gain=1.0)
    with pytest.raises(TypeError, match="needs a block frame"):
        check([1, 2, 3], max_gain=1.0)
    with pytest.raises(TypeError, match="finite= must be True or False"):
        check(frame, finite="yes")


def test_check_on_a_recorded_training_run():
    net = default_init_mlp(8, residual=False, width=16)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    with gradprobe.attach(net) as probe:
        for _ in range(5):
            x = torch.randn(16, 16, generator=gen)
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe.log(loss=loss)
    frame = probe.frame()
    low = float(frame["cum_gain"].quantile(0.3))
    got = check(probe.run(), min_cum_gain=low)
    expected = frame.loc[frame["cum_gain"] < low, ["step", "block"]]
    assert [(v.step, v.block) for v in got] == list(expected.itertuples(index=False, name=None))
    with pytest.raises(GradientAssertionError) as info:
        assert_gradient_flow(frame, min_cum_gain=low)
    text = str(info.value)
    assert "(over 5 recorded steps)" in text and "at every block and step" in text
    assert text.splitlines()[4].split()[:4] == ["index", "block", "step", "cum_gain"]
    assert assert_gradient_flow(frame, min_cum_gain=None) is frame  # a frame comes back as is


# ----------------------------------------------------------------------------- messages


def test_format_violations_shows_the_worst_ten_in_forward_order_aligned():
    violations = [Violation("max_gain", f"stage.{i}", i, 0, 1.0 + (i % 7), 0.5, "gain") for i in range(23)]
    text = format_violations(violations)
    lines = text.splitlines()
    assert len(lines) == 1 + 10 + 1
    shown = [int(line.split()[0]) for line in lines[1:11]]
    assert shown == sorted(shown)
    worst = sorted(range(23), key=lambda i: (-(i % 7), i))[:10]
    assert sorted(shown) == sorted(worst)
    # right-aligned numbers: every value ends in the same column as its header
    end = lines[0].index("gain") + len("gain")
    assert all(line[end - 1] != " " and line[end] == " " for line in lines[:11])
    assert lines[-1].startswith("  ... and 13 more: stage.0, stage.1, stage.2, ..., ")
    assert lines[-1].endswith("gain from 1 to 4")
    assert format_violations([]) == "  (no violations)"
    assert len(format_violations(violations, limit=3).splitlines()) == 1 + 3 + 1


def test_messages_mix_rules_with_a_metric_column():
    frame = band_frame()
    violations = check(frame, min_cum_gain=1e-3, max_res_ratio=0.05)
    header = format_violations(violations).splitlines()[0].split()
    assert header == ["index", "block", "step", "metric", "value", "violates"]


def test_gradient_assertion_error_is_an_assertion_error_that_pickles():
    frame = band_frame()
    with pytest.raises(GradientAssertionError) as info:
        assert_gradient_flow(frame)
    exc = info.value
    assert isinstance(exc, AssertionError)
    assert exc.frame is frame and len(exc.violations) == 5
    again = pickle.loads(pickle.dumps(exc))  # e.g. pytest-xdist, multiprocessing
    assert str(again) == str(exc)


# ----------------------------------------------------------------------------- frames, blocks, bad calls


def test_frames_runs_and_blocks_filter():
    frame = band_frame()
    run = records.Run(frame, pd.DataFrame({"step": [0, 10]}), {})
    with pytest.raises(GradientAssertionError) as info:
        assert_gradient_flow(run, blocks=["layer0", "layer1"])
    assert {v.block for v in info.value.violations} == {"layer0"}
    with pytest.raises(GradientAssertionError) as info:
        assert_gradient_flow(frame, blocks=["layer2", "lay*3"])
    assert {v.block for v in info.value.violations} == {"layer2", "layer3"}
    with pytest.raises(ValueError, match="matches no block of the frame; its blocks are: layer0, layer1"):
        assert_gradient_flow(frame, blocks="conv*")
    with pytest.raises(TypeError, match="with a frame, blocks= must be 'auto' or block names"):
        assert_gradient_flow(frame, blocks=nn.Linear)
    with pytest.raises(TypeError, match="inputs=, loss_fn= and analysis options apply to a model"):
        assert_gradient_flow(frame, batch(2, 2))


def test_bad_calls():
    net = default_init_mlp(3, True, width=8)
    with pytest.raises(TypeError, match=r"assert_gradient_flow\(model, inputs\) needs the inputs"):
        assert_gradient_flow(net)
    with pytest.raises(TypeError, match=r"assert_finite_gradients\(model, inputs\) needs the inputs"):
        assert_finite_gradients(net)
    with pytest.raises(ValueError, match="selected no module"):
        assert_gradient_flow(net, batch(2, 8), blocks="nothing*")
    with pytest.raises(TypeError, match="needs a block frame"):
        assert_near_identity("not a model")


def test_blocks_and_options_reach_analyze():
    net = default_init_mlp(4, True, width=8)
    frame = assert_gradient_flow(net, batch(4, 8), blocks=["1", "2"], seed=5)
    pd.testing.assert_frame_equal(frame, analyze(net, batch(4, 8), blocks=["1", "2"], seed=5, jacobian=False))


# ----------------------------------------------------------------------------- the hook point of the plugin


def test_frame_listeners_see_every_checked_frame():
    seen: list[tuple[str, int]] = []
    remove = add_frame_listener(lambda source, frame: seen.append((source, len(frame))))
    try:
        net = default_init_mlp(3, True, width=8)
        assert_gradient_flow(net, batch(4, 8))
        with pytest.raises(GradientAssertionError):
            assert_near_identity(net, batch(4, 8))
        check(band_frame(), max_gain=None, min_cum_gain=1e-3)
    finally:
        remove()
    assert seen == [("assert_gradient_flow", 3), ("assert_near_identity", 3), ("check", 8)]
    check(band_frame(), min_cum_gain=1e-3)
    assert len(seen) == 3  # removed
    remove()  # twice is harmless
    with pytest.raises(TypeError, match="needs a callable"):
        add_frame_listener("not callable")  # type: ignore[arg-type]


def test_a_failing_listener_only_warns():
    def broken(source, frame):
        raise RuntimeError("listener bug")

    remove = add_frame_listener(broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert check(band_frame(), max_res_ratio=1.0) == []
    finally:
        remove()
    assert any("listener bug" in str(w.message) for w in caught)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, gradprobe.testing; print('pytest' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"  # never pytest
