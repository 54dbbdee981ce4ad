"""gradprobe.rows: statistics -> rows, checked without hooks against hand-computed values and
float64 autograd references; the parameter snapshots behind update_ratio."""

from __future__ import annotations

import math

import pytest
import torch

from gradprobe import metrics
from gradprobe.records import FRAME_COLUMNS
from gradprobe.rows import (
    CallStats,
    ParamSnapshots,
    non_finite,
    param_columns,
    step_rows,
    to_host,
)


def one_stack(names):
    return dict.fromkeys(names, "s")


def call(block, fwd=None, gyy=None, bwd=None, numel=4, scale=1.0):
    t = lambda v: None if v is None else tuple(torch.tensor(e, dtype=torch.float64) for e in v)  # noqa: E731
    g = None if gyy is None else t(gyy)[0]
    return CallStats(block, fwd=t(fwd), gyy=g, bwd_x=t(bwd), numel_x=numel, numel_y=numel, scale=scale)


def test_step_rows_pools_the_calls_of_a_block_by_summing_their_squared_statistics():
    # Two calls of one block (weight sharing): |x|^2 4+12, |y|^2 16+20, |y-x|^2 4+5, |x|^2 4+12,
    # |g_y|^2 1+3, |g_x|^2 4+5, |g_x-g_y|^2 1+3, <g_x-g_y, g_y> 1+2.
    calls = [
        call("b", [4.0, 16.0, 4.0, 4.0], [1.0], [4.0, 1.0, 1.0]),
        call("b", [12.0, 20.0, 5.0, 12.0], [3.0], [5.0, 3.0, 2.0]),
    ]
    (row,) = step_rows(7, calls, {}, {}, {"b": 0}, one_stack)
    assert row["step"] == 7 and row["calls"] == 2 and row["stack"] == "s"
    assert row["grad_out"] == pytest.approx(2.0) and row["grad_in"] == pytest.approx(3.0)
    assert row["gain"] == pytest.approx(1.5)
    assert row["res_ratio"] == pytest.approx(3.0 / 4.0)
    assert row["cos_xy"] == pytest.approx(0.5 * (16 + 36 - 9) / (4 * 6))
    assert row["in_rms"] == pytest.approx(math.sqrt(16 / 8))
    assert row["out_rms"] == pytest.approx(math.sqrt(36 / 8))
    assert row["branch_grad"] == pytest.approx(2.0) and row["branch_cos"] == pytest.approx(3 / (2 * 2))
    assert row["cum_gain"] == pytest.approx(1.5)  # its own stack's last grad_out
    assert list(row) == list(FRAME_COLUMNS)


def test_step_rows_match_float64_autograd_references():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64) / 3
    y = x + torch.tanh(x @ w)
    u = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    g_y = u.clone()  # loss <y, u>
    (g_x,) = torch.autograd.grad((y * u).sum(), x)
    stats = CallStats("b")
    stats.add_forward(x.detach(), y.detach(), x.detach())
    stats.add_grad_out(g_y)
    stats.add_grad_in(g_x, g_y)
    (row,) = step_rows(0, [stats], {}, {}, {"b": 0}, one_stack)
    x, y = x.detach(), y.detach()
    assert row["gain"] == pytest.approx(float(g_x.norm() / g_y.norm()), rel=1e-12)
    assert row["res_ratio"] == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-12)
    cos = float((x * y).sum() / (x.norm() * y.norm()))
    assert row["cos_xy"] == pytest.approx(cos, rel=1e-12)
    b = g_x - g_y
    assert row["branch_cos"] == pytest.approx(float((b * g_y).sum() / (b.norm() * g_y.norm())), rel=1e-12)
    assert row["in_rms"] == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-12)
    assert row["out_rms"] == pytest.approx(float(y.pow(2).mean().sqrt()), rel=1e-12)


def test_loss_scale_divides_the_gradient_norms_and_leaves_their_ratios():
    unscaled = [call("b", [4.0, 4.0, 1.0, 4.0], [1.0], [4.0, 1.0, 1.0])]
    plain = step_rows(0, unscaled, {}, {}, {"b": 0}, one_stack)
    s = 1024.0
    big = [call("b", [4.0, 4.0, 1.0, 4.0], [s * s], [4 * s * s, s * s, s * s], scale=s)]
    scaled_rows = step_rows(0, big, {}, {}, {"b": 0}, one_stack)
    for c in ("grad_out", "grad_in", "gain", "branch_cos"):
        assert scaled_rows[0][c] == pytest.approx(plain[0][c], rel=1e-15)
    # the scale as a tensor (read in the step's one transfer, no sync per backward pass): the same
    big[0].scale = torch.tensor([s], dtype=torch.float32)
    (again,) = step_rows(0, big, {}, {}, {"b": 0}, one_stack)
    assert again.keys() == scaled_rows[0].keys()
    for k, v in again.items():  # equal, NaN where NaN
        assert v == scaled_rows[0][k] or (v != v and scaled_rows[0][k] != scaled_rows[0][k]), k


def test_rows_come_in_forward_order_and_cum_gain_runs_along_each_stack():
    calls = [
        call("dec.1", [1.0] * 4, [4.0], [1.0, 0.0, 0.0]),
        call("enc.0", [1.0] * 4, [1.0], [16.0, 0.0, 0.0]),
        call("dec.0", [1.0] * 4, [1.0], [9.0, 0.0, 0.0]),
        call("enc.1", [1.0] * 4, [1.0], [4.0, 0.0, 0.0]),
    ]
    index = {"enc.0": 0, "enc.1": 1, "dec.0": 2, "dec.1": 3}
    rows = step_rows(0, calls, {}, {}, index, lambda names: {n: n.split(".")[0] for n in names})
    assert [r["block"] for r in rows] == ["enc.0", "enc.1", "dec.0", "dec.1"]
    # cum_gain = grad_in / grad_out of the stack's last block: enc.1 has 1, dec.1 has 2
    assert [r["cum_gain"] for r in rows] == [4.0, 2.0, 1.5, 0.5]


def test_a_call_without_a_backward_pass_is_left_out_when_others_have_one():
    calls = [call("b", [4.0] * 4, [1.0], [4.0, 1.0, 1.0]), call("b", [9.0] * 4)]
    (row,) = step_rows(0, calls, {}, {}, {"b": 0}, one_stack)
    assert row["calls"] == 1 and row["in_rms"] == pytest.approx(1.0)
    (alone,) = step_rows(0, [call("b", [4.0] * 4)], {}, {}, {"b": 0}, one_stack)
    assert alone["calls"] == 1 and math.isnan(alone["grad_out"]) and math.isnan(alone["gain"])
    assert alone["in_rms"] == pytest.approx(1.0)


def test_missing_statistics_are_nan_never_zero():
    (row,) = step_rows(0, [CallStats("b")], {}, {}, {}, one_stack)
    assert row["index"] == -1
    assert all(math.isnan(row[c]) for c in ("grad_out", "gain", "res_ratio", "param_norm", "jac_fro"))
    assert step_rows(0, [], {}, {}, {}, one_stack) == []


def test_parameter_and_jacobian_columns_join_their_block_row():
    params = {"b": torch.tensor([16.0, 9.0, 4.0], dtype=torch.float64)}
    jac = {"b": {"jac_fro": 0.25, "jac_batch": 2.0}}
    (row,) = step_rows(0, [call("b", [1.0] * 4, [1.0], [1.0, 0.0, 0.0])], params, jac, {"b": 0}, one_stack)
    assert (row["param_norm"], row["param_grad_norm"], row["update_ratio"]) == (4.0, 3.0, 0.5)
    assert row["jac_fro"] == 0.25 and row["jac_batch"] == 2.0


def test_param_columns_of_a_block_without_parameters_are_nan():
    cols = param_columns(math.nan, math.nan, math.nan)
    assert all(math.isnan(v) for v in cols.values())
    assert math.isnan(param_columns(0.0, 0.0, 0.0)["update_ratio"])  # 0/0: no ratio


def test_to_host_keeps_float64_values_exact_across_dtypes():
    a = torch.tensor(1 / 3, dtype=torch.float64)
    b = torch.tensor([0.1, 0.2], dtype=torch.float32)
    c, d = torch.tensor(0.1, dtype=torch.float32), torch.tensor([[0.3]], dtype=torch.float32)
    values = to_host([a, b, c, d])  # 0-d and n-d tensors of two dtypes
    assert values[id(a)] == [1 / 3]
    assert values[id(b)] == [float(v) for v in b.double()]
    assert values[id(c)] == [float(c.double())] and values[id(d)] == [float(d.double())]
    big = torch.zeros(2, 3, dtype=torch.float32)
    assert list(to_host([big, c])[id(big)]) == [0.0] * 6  # larger tensors come back as arrays


def test_non_finite_names_the_first_block_and_skips_excused_ones():
    good = {"block": "a", "index": 0, "in_rms": 1.0, "out_rms": 1.0, "grad_out": 1.0, "grad_in": 1.0}
    bad = {**good, "block": "b", "index": 1, "grad_in": math.inf, "grad_out": math.nan}
    message = non_finite(4, [good, bad], lambda block: False)
    assert message is not None and "non-finite grad_out, grad_in at step 4, block b (index 1)" in message
    assert non_finite(4, [good, bad], lambda block: block == "b") is None
    assert non_finite(4, [good], lambda block: False) is None


def _row(stat):
    """A block's [|theta|^2, |grad|^2, |delta|^2] from ParamSnapshots.stats (a row of every block's)."""
    batch, i = stat
    return batch[i]


def test_param_snapshots_give_the_update_since_the_last_recorded_step():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    snaps = ParamSnapshots()
    first = _row(snaps.stats(["b"], [[p]])["b"]).tolist()
    assert first[:2] == [25.0, 4.0] and math.isnan(first[2])  # no previous step: NaN
    taken: dict[str, list[torch.Tensor]] = {}
    snaps.take(["b"], [[p]], taken)
    snaps.commit(taken)
    with torch.no_grad():
        p.add_(torch.tensor([0.0, -1.0], dtype=torch.float64))
    second = _row(snaps.stats(["b"], [[p]])["b"]).tolist()
    assert second == pytest.approx([18.0, 4.0, 1.0], rel=1e-15)  # norm, then squared
    assert param_columns(*second)["update_ratio"] == pytest.approx(1 / math.sqrt(18))
    # the copies are buffers reused from step to step: two sets at most
    again: dict[str, list[torch.Tensor]] = {}
    snaps.take(["b"], [[p]], again)
    snaps.commit(again)
    assert snaps.held() == 2


def test_param_snapshots_disabled_keep_no_copy():
    p = torch.nn.Parameter(torch.ones(3))
    snaps = ParamSnapshots(enabled=False)
    taken: dict[str, list[torch.Tensor]] = {}
    snaps.take(["b"], [[p]], taken)
    snaps.commit(taken)
    assert snaps.held() == 0 and taken == {}
    assert math.isnan(_row(snaps.stats(["b"], [[p]])["b"])[2].item())


def test_finalize_is_the_one_definition_rows_use():
    fwd, bwd = [4.0, 16.0, 4.0, 4.0], [4.0, 1.0, 1.0]
    (row,) = step_rows(0, [call("b", fwd, [1.0], bwd)], {}, {}, {"b": 0}, one_stack)
    expected = metrics.finalize(fwd, 4, 4, 1.0, bwd)
    assert {k: row[k] for k in expected} == expected


def test_to_host_copies_each_device_once_whatever_the_dtypes(monkeypatch):
    # One transfer per device and step (one synchronisation on a GPU), also with float32
    # statistics beside float64 signal moments.
    copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.dtype) or cpu(self, *a, **k)
    )
    a, b = torch.tensor(0.5), torch.tensor([1.0, 2.0])
    c, d = torch.tensor(1 / 3, dtype=torch.float64), torch.full((1, 2, 3, 2), 0.25, dtype=torch.float64)
    values = to_host([a, b, c, d])
    assert copies == [torch.float64]
    assert values[id(a)] == [0.5] and values[id(b)] == [1.0, 2.0] and values[id(c)] == [1 / 3]
    assert list(values[id(d)]) == [0.25] * 12
