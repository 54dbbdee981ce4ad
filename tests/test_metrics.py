"""gradprobe/metrics.py: every public function against float64 references and closed forms.

The references are written with numpy or ``torch.autograd`` in float64, independently of
the sufficient-statistics route the metrics take (sums of squares pooled across calls).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import metrics
from gradprobe.metrics import (
    channel_axis,
    cum_gain,
    finalize,
    forward_stats,
    grad_in_stats,
    grad_out_stats,
    param_stats,
    pool_moments,
    signal_columns,
    signal_stats,
)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _np(t):
    return t.detach().double().numpy().reshape(-1)


# ----------------------------------------------------------------------------- forward, backward


def test_forward_stats_equal_numpy_sums_of_squares():
    x, y = _randn(3, 4, 5), _randn(3, 4, 5, seed=1)
    xx, yy, dd, rr = forward_stats(x, y, x).tolist()
    nx, ny = _np(x), _np(y)
    np.testing.assert_allclose(
        [xx, yy, dd, rr], [nx @ nx, ny @ ny, (ny - nx) @ (ny - nx), nx @ nx], rtol=1e-12
    )


def test_forward_stats_compare_with_a_shortcut_output_of_another_tensor():
    x, y, s = _randn(2, 3), _randn(2, 6, seed=1), _randn(2, 6, seed=2)
    xx, yy, dd, rr = forward_stats(x, y, s).tolist()
    nx, ny, ns = _np(x), _np(y), _np(s)
    np.testing.assert_allclose(
        [xx, yy, dd, rr], [nx @ nx, ny @ ny, (ny - ns) @ (ny - ns), ns @ ns], rtol=1e-12
    )


@pytest.mark.parametrize("ref", ["none", "other shape"])
def test_forward_stats_without_a_comparable_reference_are_nan(ref):
    x, y = _randn(2, 3), _randn(2, 6, seed=1)
    stats = forward_stats(x, y, None if ref == "none" else x).tolist()
    assert stats[:2] == pytest.approx([float(x.square().sum()), float(y.square().sum())], rel=1e-12)
    assert math.isnan(stats[2]) and math.isnan(stats[3])


def test_forward_stats_near_the_identity_keep_the_small_difference_exactly():
    # |y - x|^2 formed from the difference: the expansion |y|^2 + |x|^2 - 2<x, y> would cancel
    x = _randn(1000, dtype=torch.float32)
    delta = 1e-4 * _randn(1000, seed=3, dtype=torch.float32)
    y = x + delta
    xx, _, dd, _ = forward_stats(x, y, x).tolist()
    exact = float(((y.double() - x.double()) ** 2).sum())
    assert dd == pytest.approx(exact, rel=1e-5)
    assert math.sqrt(dd / xx) == pytest.approx(math.sqrt(exact) / float(x.double().norm()), rel=1e-5)


def test_half_precision_statistics_accumulate_in_float32():
    x = torch.full((4096,), 3.0, dtype=torch.float16)  # |x|^2 = 36864 is past float16's 2048 step
    stats = forward_stats(x, x, x)
    assert stats.dtype == torch.float32
    assert stats.tolist() == [36864.0, 36864.0, 0.0, 36864.0]
    assert grad_out_stats(x).dtype == torch.float32


def test_complex_statistics_are_those_of_the_real_vector_of_pairs():
    x = torch.complex(_randn(3, 4), _randn(3, 4, seed=1))
    y = torch.complex(_randn(3, 4, seed=2), _randn(3, 4, seed=3))
    as_real = [torch.view_as_real(t) for t in (x, y)]
    np.testing.assert_allclose(
        forward_stats(x, y, x).tolist(),
        forward_stats(as_real[0], as_real[1], as_real[0]).tolist(),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        grad_in_stats(x, y).tolist(), grad_in_stats(as_real[0], as_real[1]).tolist(), rtol=1e-12
    )


def test_grad_stats_equal_numpy():
    gx, gy = _randn(4, 6), _randn(4, 6, seed=1)
    (gyy,) = grad_out_stats(gy).tolist()
    gxx, bb, bg = grad_in_stats(gx, gy).tolist()
    nx, ny = _np(gx), _np(gy)
    np.testing.assert_allclose([gyy, gxx, bb, bg], [ny @ ny, nx @ nx, (nx - ny) @ (nx - ny), (nx - ny) @ ny])


@pytest.mark.parametrize("g_y", [None, "other shape"])
def test_grad_in_stats_without_a_same_shape_output_gradient_give_only_the_norm(g_y):
    gx = _randn(4, 6)
    stats = grad_in_stats(gx, None if g_y is None else _randn(4, 3)).tolist()
    assert stats[0] == pytest.approx(float(gx.square().sum()), rel=1e-12)
    assert math.isnan(stats[1]) and math.isnan(stats[2])


# ----------------------------------------------------------------------------- finalize against autograd


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(5, 5).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(5, 5, generator=gen, dtype=torch.float64) * 0.5)

    def branch(self, x):
        return torch.tanh(self.fc(x))

    def forward(self, x):
        return x + self.branch(x)


def test_finalize_of_a_residual_block_equals_the_float64_autograd_definitions():
    block = _Residual()
    x = _randn(7, 5, seed=4).requires_grad_()
    y = block(x)
    weights = _randn(7, 5, seed=5)
    (y * weights).sum().backward()  # g_y = weights
    g_y, g_x = weights, x.grad
    # the learned branch alone: (dF/dx)^T g_y, from autograd on F, not as g_x - g_y
    x2 = x.detach().clone().requires_grad_()
    (branch_grad,) = torch.autograd.grad(block.branch(x2), x2, g_y)
    f = (y - x).detach()

    row = finalize(
        forward_stats(x, y, x).tolist(),
        x.numel(),
        y.numel(),
        float(grad_out_stats(g_y)),
        grad_in_stats(g_x, g_y).tolist(),
    )
    xd, yd = x.detach(), y.detach()
    expected = {
        "grad_out": g_y.norm(),
        "grad_in": g_x.norm(),
        "gain": g_x.norm() / g_y.norm(),
        "skip_grad": g_y.norm(),
        "branch_grad": branch_grad.norm(),
        "branch_cos": torch.nn.functional.cosine_similarity(g_y.reshape(-1), branch_grad.reshape(-1), dim=0),
        "res_ratio": f.norm() / xd.norm(),
        "cos_xy": torch.nn.functional.cosine_similarity(xd.reshape(-1), yd.reshape(-1), dim=0),
        "in_rms": xd.square().mean().sqrt(),
        "out_rms": yd.square().mean().sqrt(),
    }
    assert set(row) == set(expected)
    for key, value in expected.items():
        assert row[key] == pytest.approx(float(value), rel=1e-10), key


def test_finalize_closed_forms_at_the_identity_and_at_zero():
    # y = x exactly: distance 0, cosine 1; g_x = g_y: gain 1, no branch gradient
    row = finalize([4.0, 4.0, 0.0, 4.0], 4, 4, 9.0, [9.0, 0.0, 0.0])
    assert (row["res_ratio"], row["cos_xy"], row["gain"], row["branch_grad"]) == (0.0, 1.0, 1.0, 0.0)
    assert math.isnan(row["branch_cos"])  # the cosine of a zero vector is undefined, not 0
    # y = -x: cosine -1, |y - x| = 2|x|
    row = finalize([1.0, 1.0, 4.0, 1.0], 1, 1, 1.0, [1.0, 0.0, 0.0])
    assert (row["res_ratio"], row["cos_xy"]) == (2.0, -1.0)
    # no output gradient: gain is undefined (0/0) or infinite, never 0
    assert math.isnan(finalize([1.0] * 4, 1, 1, 0.0, [0.0, 0.0, 0.0])["gain"])
    assert finalize([1.0] * 4, 1, 1, 0.0, [4.0, 4.0, 0.0])["gain"] == math.inf


def test_finalize_of_a_shape_changing_block_without_gradient_is_nan_where_undefined():
    row = finalize([4.0, 9.0, math.nan, math.nan], 4, 9, 1.0, [math.nan, math.nan, math.nan])
    assert row["grad_out"] == 1.0 and row["in_rms"] == 1.0 and row["out_rms"] == 1.0
    for key in ("grad_in", "gain", "skip_grad", "branch_grad", "branch_cos", "res_ratio", "cos_xy"):
        assert math.isnan(row[key]), key


def test_cum_gain_is_the_product_of_the_gains_of_a_chain():
    # a chain of three plain layers: grad_in of each is grad_out of the one before it
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(6, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    x = _randn(4, 6).requires_grad_()
    acts = [x]
    for w in layers:
        acts.append(torch.tanh(acts[-1] @ w))
    for a in acts:
        a.retain_grad()
    acts[-1].square().sum().backward()
    norms = [float(a.grad.norm()) for a in acts]  # norms[i]: grad at the input of layer i
    gains = [norms[i] / norms[i + 1] for i in range(3)]
    assert cum_gain(norms[0], norms[3]) == pytest.approx(math.prod(gains), rel=1e-12)
    assert cum_gain(norms[1], norms[3]) == pytest.approx(gains[1] * gains[2], rel=1e-12)
    assert math.isnan(cum_gain(0.0, 0.0)) and cum_gain(1.0, 0.0) == math.inf


# ----------------------------------------------------------------------------- signal propagation


@pytest.mark.parametrize(
    ("shape", "channel_dim", "axis"),
    [
        ((2, 3, 4, 4), None, 1),
        ((2, 3, 4, 4, 4), None, 1),
        ((2, 5, 3), None, 2),
        ((4, 3), None, 1),
        ((3,), None, None),
        ((), None, None),
        ((2, 3, 4, 4), -1, 3),
        ((2, 5, 3), 1, 1),
        ((), 0, None),
    ],
)
def test_channel_axis(shape, channel_dim, axis):
    assert channel_axis(torch.zeros(shape), channel_dim) == axis


def _moments(t: np.ndarray, axis: int) -> np.ndarray:
    """(3, C): count, mean and sum of squared deviations per channel, in float64."""
    c = np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis])
    return np.stack([np.full(c.shape[1], c.shape[0], float), c.mean(0), ((c - c.mean(0)) ** 2).sum(0)])


@pytest.mark.parametrize(
    ("shape", "axis"), [((3, 4, 5, 2), 1), ((6, 5, 4), 2), ((9, 3), 1), ((8, 1, 1, 1), 1)]
)
def test_signal_stats_equal_numpy_per_channel_moments(shape, axis):
    y, ref = _randn(*shape), _randn(*shape, seed=1)
    got = signal_stats(y, ref).numpy()
    np.testing.assert_allclose(got[0], _moments(y.numpy(), axis), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], _moments((y - ref).numpy(), axis), rtol=1e-10, atol=1e-12)


def test_signal_stats_keep_a_small_variance_under_a_large_mean_in_float32():
    y = 1e4 + 1e-2 * _randn(64, 3, dtype=torch.float32)
    got = signal_stats(y, None)
    exact = _moments(y.double().numpy(), 1)
    np.testing.assert_allclose(got[0, 2].numpy(), exact[2], rtol=1e-3)
    assert np.isnan(got[1].numpy()).all()


def test_signal_stats_need_a_channel_axis_and_a_same_shape_reference():
    assert signal_stats(torch.ones(5), None) is None
    assert np.isnan(signal_stats(torch.ones(2, 3), torch.ones(2, 2))[1].numpy()).all()


def test_pooled_moments_equal_those_of_the_concatenated_calls():
    calls = [(_randn(n, 4, seed=n), _randn(n, 4, seed=10 + n)) for n in (3, 5, 1)]
    pooled = pool_moments([signal_stats(y, r).reshape(-1).tolist() for y, r in calls])
    y_all = torch.cat([y for y, _ in calls])
    r_all = torch.cat([r for _, r in calls])
    np.testing.assert_allclose(pooled, signal_stats(y_all, r_all).numpy(), rtol=1e-10, atol=1e-12)
    cols = signal_columns(pooled)
    # closed forms: the columns of the concatenated tensor, and chan_var + chan_mean_sq = mean(y^2)
    yn = y_all.numpy()
    assert cols["chan_mean_sq"] == pytest.approx(float((yn.mean(0) ** 2).mean()), rel=1e-10)
    assert cols["chan_var"] == pytest.approx(float(yn.var(0).mean()), rel=1e-10)
    assert cols["branch_var"] == pytest.approx(float((yn - r_all.numpy()).var(0).mean()), rel=1e-10)
    assert cols["chan_var"] + cols["chan_mean_sq"] == pytest.approx(float((yn**2).mean()), rel=1e-10)


def test_pool_moments_refuses_calls_that_disagree_in_size():
    assert pool_moments([]) is None
    assert pool_moments([[0.0] * 6, [0.0] * 12]) is None
    assert pool_moments([[0.0] * 5]) is None
    assert math.isnan(signal_columns(None)["chan_var"])


# ----------------------------------------------------------------------------- parameters


def test_param_stats_equal_the_squared_norms_of_all_parameters_together():
    params = [_randn(3, 4), _randn(4, seed=1), _randn(2, seed=2)]
    params[0].grad, params[1].grad = _randn(3, 4, seed=3), _randn(4, seed=4)  # params[2]: no grad -> 0
    previous = [p + 0.1 * _randn(*p.shape, seed=9) for p in params]
    sq, gsq, dsq = (float(v) for v in param_stats(params, previous))
    flat = np.concatenate([_np(p) for p in params])
    grads = np.concatenate([_np(params[0].grad), _np(params[1].grad)])
    diffs = np.concatenate([_np(p - q) for p, q in zip(params, previous, strict=True)])
    np.testing.assert_allclose([sq, gsq, dsq], [flat @ flat, grads @ grads, diffs @ diffs], rtol=1e-12)
    # update_ratio = |theta - theta_prev| / |theta| is their root ratio
    assert math.sqrt(dsq / sq) == pytest.approx(np.linalg.norm(diffs) / np.linalg.norm(flat), rel=1e-12)


def test_param_stats_are_nan_where_there_is_nothing_to_measure():
    assert all(math.isnan(float(v)) for v in param_stats([], None))
    sq, gsq, dsq = param_stats([_randn(3)], None)  # no gradient at all, no previous step
    assert float(sq) == pytest.approx(float(_randn(3).square().sum()))
    assert math.isnan(float(gsq)) and math.isnan(float(dsq))


def test_param_stats_of_complex_parameters_count_both_parts():
    p = torch.complex(_randn(5), _randn(5, seed=1))
    sq, _, _ = param_stats([p], None)
    assert sq.dtype == torch.float64
    assert float(sq) == pytest.approx(float((p.real**2 + p.imag**2).sum()), rel=1e-12)


def test_real_dtype_of_statistics():
    assert metrics.real_dtype(torch.bfloat16) == torch.float32
    assert metrics.real_dtype(torch.complex64) == torch.float32
    assert metrics.real_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_call_stats_sharing_the_residual_equals_the_two_functions_bit_for_bit(dtype, layout):
    # call_stats forms y - r once for forward_stats and signal_stats; the values must be the
    # ones of the two functions called apart, for every dtype and memory layout.
    g = torch.Generator().manual_seed(3)
    shape = (6, 4, 5, 5) if layout != "transposed" else (12, 7)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    y = (torch.randn(shape, generator=g, dtype=torch.float64) + 3).to(dtype)
    if layout == "channels_last":
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
    elif layout == "transposed":
        x = x.t().contiguous().t()
    axis = metrics.channel_axis(y)
    for ref in (x, None, y * 0.5):
        with torch.no_grad():
            fwd, residual = metrics.call_stats(x, y, ref)
            assert torch.equal(
                metrics.stacked(fwd).nan_to_num(7.0), metrics.forward_stats(x, y, ref).nan_to_num(7.0)
            )
            sig = metrics.signal_many([y], [residual], axis)[0]
            assert torch.equal(sig.nan_to_num(7.0), metrics.signal_stats(y, ref).nan_to_num(7.0))


def test_call_stats_of_a_complex_block_has_no_signal_moments():
    z = torch.randn(3, 4, dtype=torch.complex64)
    fwd, residual = metrics.call_stats(z, 2 * z, z)
    assert residual is None
    assert torch.equal(metrics.stacked(fwd), metrics.forward_stats(z, 2 * z, z))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (12, 7), (3, 9, 10), (4, 3, 5, 5, 2), (999, 3)])
def test_signal_many_equals_signal_stats_of_each_call_bit_for_bit(dtype, shape):
    # The batch of a step's small blocks must give each call the bits it gets alone, with and
    # without a reference, for every rank (channel axis 1 or last) and dtype.
    g = torch.Generator().manual_seed(5)
    ys = [
        (torch.randn(shape, generator=g, dtype=torch.float64) * (i + 1) + 3 * i).to(dtype) for i in range(5)
    ]
    refs = [(torch.randn(shape, generator=g, dtype=torch.float64) + 2).to(dtype) for _ in range(5)]
    axis = metrics.channel_axis(ys[0])
    residuals = [metrics.call_stats(r, y, r)[1] for y, r in zip(ys, refs, strict=True)]
    with_ref = metrics.signal_many(ys, residuals, axis)
    without = metrics.signal_many(ys, [None] * 5, axis)
    for i, (y, r) in enumerate(zip(ys, refs, strict=True)):
        assert torch.equal(with_ref[i], metrics.signal_stats(y, r))
        assert torch.equal(without[i].nan_to_num(7.0), metrics.signal_stats(y, None).nan_to_num(7.0))


@pytest.mark.parametrize("shape", [(64, 32), (16, 8, 24)])
def test_channels_last_signal_moments_match_numpy_to_float64_rounding(shape):
    # The channel-last path sums exact float64 squares: equal to numpy's float64 moments to a
    # few ulps, also under a large mean.
    g = torch.Generator().manual_seed(9)
    y = torch.randn(shape, generator=g) * 0.01 + 1000.0
    moments = metrics.signal_stats(y, None)[0].numpy()
    a = y.double().numpy().reshape(-1, shape[-1])
    np.testing.assert_array_equal(moments[0], a.shape[0])
    np.testing.assert_allclose(moments[1], a.mean(0), rtol=1e-15)
    np.testing.assert_allclose(moments[2] / a.shape[0], a.var(0), rtol=1e-9)
