"""Jacobian columns and spectra against exact Jacobians (float64) and closed forms."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import numpy as np
import pytest
import torch
from reference import exact_columns
from torch import nn

from gradprobe.jacobian import (
    MAX_DENSE_ENTRIES,
    BlockCapture,
    capture_blocks,
    dense_jacobian,
    jacobian_columns,
    spectrum,
)

F64 = torch.float64


# ---------------------------------------------------------------------- small nets
class ResMLP(nn.Module):
    """y = x + W2 act(W1 x)."""

    def __init__(self, d: int, act: type[nn.Module] = nn.ReLU, zero: bool = False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d), act(), nn.Linear(d, d)
        if zero:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Plain(nn.Module):
    def __init__(self, d: int, act: type[nn.Module] = nn.Tanh):
        super().__init__()
        self.fc, self.act = nn.Linear(d, d), act()

    def forward(self, x):
        return self.act(self.fc(x))


class ConvBlock(nn.Module):
    """CIFAR-style residual block with BatchNorm, in-place ReLU and ``out += x``."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class LinearRes(nn.Module):
    """y = x + W x, so J = I + W exactly."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return x + x @ self.w.T


class Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x):
        return self.s * x


def _seeded(seed: int) -> None:
    # Tests build their nets from the global RNG; library code never does.
    torch.manual_seed(seed)


def res_mlp(depth: int = 6, d: int = 10, seed: int = 0) -> nn.Sequential:
    _seeded(seed)
    return nn.Sequential(*[ResMLP(d) for _ in range(depth)]).to(F64)


def plain_tanh(depth: int = 6, d: int = 10, seed: int = 0) -> nn.Sequential:
    _seeded(seed)
    return nn.Sequential(*[Plain(d) for _ in range(depth)]).to(F64)


def plain_relu(depth: int = 12, d: int = 8, seed: int = 0) -> nn.Sequential:
    _seeded(seed)
    return nn.Sequential(*[Plain(d, nn.ReLU) for _ in range(depth)]).to(F64)


def bn_cnn(depth: int = 4, c: int = 3, seed: int = 0) -> nn.Sequential:
    _seeded(seed)
    return nn.Sequential(*[ConvBlock(c) for _ in range(depth)]).to(F64).train()


def inputs_for(net: nn.Sequential, batch: int | None = None, seed: int = 1) -> torch.Tensor:
    """A batch with a few hundred elements: large enough for Hutchinson at 4 probes, small for dense J."""
    g = torch.Generator().manual_seed(seed)
    first = net[0]
    if isinstance(first, ConvBlock):
        return torch.randn(batch or 4, first.conv1.in_channels, 5, 5, generator=g, dtype=F64)
    d = next(m for m in first.modules() if isinstance(m, nn.Linear)).in_features
    return torch.randn(batch or 12, d, generator=g, dtype=F64)


NETS = {"res_mlp": res_mlp, "plain_tanh": plain_tanh, "plain_relu": plain_relu, "bn_cnn": bn_cnn}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def captured(net: nn.Module, x: torch.Tensor, blocks="auto") -> list[BlockCapture]:
    return capture_blocks(net, x, blocks)[1]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def functional_jacobian(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: torch.autograd.functional.jacobian on a copy (BN buffers of the copy change)."""
    module = copy.deepcopy(module)
    # the clone lets a block modify its input in place, as it does in the captured forward
    j = torch.autograd.functional.jacobian(lambda t: module(t.clone()), x.detach().clone())
    return j.reshape(-1, x.numel())


# ---------------------------------------------------------------------- the exact references
@pytest.mark.parametrize("name", sorted(NETS))
def test_graph_jacobians_match_functional_jacobians(name):
    net = NETS[name]()
    x = inputs_for(net)
    caps = captured(copy.deepcopy(net), x)
    assert [c.name for c in caps] == [str(i) for i in range(len(net))]
    ref_in = x
    for i, c in enumerate(caps):
        # the block's own Jacobian, and the product from its input to the last output
        torch.testing.assert_close(c.x.detach(), ref_in, rtol=0, atol=0)
        j = dense_jacobian(c.y, c.x_edge, x_like=c.x)
        torch.testing.assert_close(j, functional_jacobian(net[i], ref_in), rtol=1e-10, atol=1e-12)
        jp = dense_jacobian(caps[-1].y, c.x_edge, x_like=c.x)
        torch.testing.assert_close(jp, functional_jacobian(net[i:], ref_in), rtol=1e-10, atol=1e-12)
        ref_in = c.y.detach()


def test_exact_columns_closed_form():
    x = torch.randn(3, 2, dtype=F64, requires_grad=True)
    cols = exact_columns([BlockCapture("b", x, -2 * x, same_shape=True)])["b"]
    assert cols == pytest.approx({"jac_fro": 2, "jac_spec": 2, "jac_id": 3, "prod_fro": 2, "prod_spec": 2})


# ---------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("name", sorted(NETS))
def test_default_settings_accuracy(name):
    net = NETS[name]()
    caps = captured(net, inputs_for(net))
    exact = exact_columns(caps)
    est = jacobian_columns(caps, generator=gen(0))
    for c in caps:
        for col in ("jac_fro", "prod_fro", "jac_id"):
            if name == "plain_relu" and col == "prod_fro":
                continue  # a nearly rank-one product: see test_low_rank_products_need_more_probes
            assert rel(est[c.name][col], exact[c.name][col]) < 0.10, (c.name, col)
        for col in ("jac_spec", "prod_spec"):
            assert rel(est[c.name][col], exact[c.name][col]) < 0.02, (c.name, col)
            # Lanczos values are lower bounds
            assert est[c.name][col] <= exact[c.name][col] * (1 + 1e-9), (c.name, col)


def test_frobenius_error_shrinks_like_inverse_sqrt_probes():
    net = res_mlp(depth=3)
    caps = captured(net, inputs_for(net))
    exact = exact_columns(caps)

    def rms_error(probes: int, col: str, seeds: range) -> float:
        errs = []
        for s in seeds:
            est = jacobian_columns(caps, probes=probes, spec=False, generator=gen(s))
            errs += [est[c.name][col] ** 2 / exact[c.name][col] ** 2 - 1 for c in caps]
        return float(np.sqrt(np.mean(np.square(errs))))

    for col in ("jac_fro", "prod_fro"):
        e4, e64 = rms_error(4, col, range(40)), rms_error(64, col, range(40, 80))
        assert 2.5 < e4 / e64 < 6.5, (col, e4, e64)  # sqrt(64 / 4) = 4
    est = jacobian_columns(caps, probes=512, spec=False, generator=gen(1))
    for c in caps:
        for col in ("jac_fro", "prod_fro", "jac_id"):
            assert rel(est[c.name][col], exact[c.name][col]) < 0.02, (c.name, col)


def test_low_rank_products_need_more_probes():
    # Hutchinson's relative error is sqrt(2 (|C|_F^2 - sum C_ii^2) / probes) / tr C, C = J J^T: about
    # sqrt(2 / (probes * r)) with r the effective rank. The product of a deep plain ReLU net is nearly
    # low-rank, so 4 probes are not enough there, and the measured errors follow the formula.
    net = plain_relu()
    caps = captured(net, inputs_for(net))
    jp = dense_jacobian(caps[-1].y, caps[0].x_edge, x_like=caps[0].x)
    cov = jp @ jp.T
    exact_sq = cov.trace().item()
    n = jp.shape[0]
    rel_std = math.sqrt(2 * (cov.square().sum() - cov.diagonal().square().sum()).item()) / exact_sq
    assert rel_std > 0.3  # effective rank about 20, of 96 dimensions
    for probes in (4, 64):
        errs = [
            jacobian_columns(caps, probes=probes, spec=False, generator=gen(s))["0"]["prod_fro"] ** 2
            * n
            / exact_sq
            - 1
            for s in range(40)
        ]
        measured = float(np.sqrt(np.mean(np.square(errs))))
        assert measured == pytest.approx(rel_std / math.sqrt(probes), rel=0.35), probes


def test_hutchinson_is_unbiased():
    net = plain_tanh(depth=2)
    caps = captured(net, inputs_for(net, batch=3))
    n, trials = caps[0].y.numel(), 300
    for c in caps:
        j = dense_jacobian(c.y, c.x_edge, x_like=c.x)
        cov = j @ j.T
        # Rademacher u: E u^T C u = tr C and Var u^T C u = 2 (|C|_F^2 - sum_i C_ii^2)
        var = 2 * (cov.square().sum() - cov.diagonal().square().sum()).item()
        sq = [
            jacobian_columns([c], probes=1, spec=False, prod=False, generator=gen(s))[c.name]["jac_fro"] ** 2
            * n
            for s in range(trials)
        ]
        z = (np.mean(sq) - cov.trace().item()) / math.sqrt(var / trials)
        assert abs(z) < 4, z
        assert np.std(sq) == pytest.approx(math.sqrt(var), rel=0.25)


def test_shared_prod_spec_is_a_close_lower_bound():
    net = res_mlp()
    caps = captured(net, inputs_for(net))
    exact = exact_columns(caps)
    est = jacobian_columns(caps, prod_spec="shared", power_iters=16, tol=0.0, generator=gen(0))
    for c in caps:
        assert est[c.name]["prod_spec"] <= exact[c.name]["prod_spec"] * (1 + 1e-9)
        assert rel(est[c.name]["prod_spec"], exact[c.name]["prod_spec"]) < 0.15


def test_spectral_estimates_grow_with_iterations():
    net = plain_relu()
    caps = captured(net, inputs_for(net))
    exact = exact_columns(caps)
    errs = []
    for iters in (1, 3, 20):
        est = jacobian_columns(caps, power_iters=iters, tol=0.0, generator=gen(0))
        errs.append(max(rel(est[c.name]["prod_spec"], exact[c.name]["prod_spec"]) for c in caps))
    assert errs[0] >= errs[1] >= errs[2]
    assert errs[2] < 1e-3


def test_last_block_product_equals_its_block_columns():
    net = res_mlp()
    caps = captured(net, inputs_for(net))
    last = jacobian_columns(caps, generator=gen(0))[caps[-1].name]
    assert last["prod_fro"] == last["jac_fro"]
    assert last["prod_spec"] == last["jac_spec"]


# ---------------------------------------------------------------------- closed forms
def test_linear_residual_block_has_jacobian_identity_plus_w():
    g = gen(3)
    w = 0.3 * torch.randn(6, 6, generator=g, dtype=F64)
    net = nn.Sequential(LinearRes(w), LinearRes(w.T.contiguous()))
    x = torch.randn(5, 6, generator=g, dtype=F64)
    caps = captured(net, x)
    eye = torch.eye(6, dtype=F64)
    a, b = eye + w, eye + w.T
    # over the batch J = kron(I_5, I + W): same RMS and largest singular value as I + W
    torch.testing.assert_close(
        dense_jacobian(caps[0].y, caps[0].x_edge, x_like=caps[0].x), torch.kron(torch.eye(5), a)
    )
    want = {
        "0": {
            "jac_fro": float(torch.linalg.matrix_norm(a)) / math.sqrt(6),
            "jac_spec": float(torch.linalg.svdvals(a)[0]),
            "jac_id": float(torch.linalg.matrix_norm(w)) / math.sqrt(6),
            "prod_fro": float(torch.linalg.matrix_norm(b @ a)) / math.sqrt(6),
            "prod_spec": float(torch.linalg.svdvals(b @ a)[0]),
        }
    }
    exact = exact_columns(caps)
    for col, v in want["0"].items():
        assert exact["0"][col] == pytest.approx(v, rel=1e-12)
    est = jacobian_columns(caps, generator=gen(0))
    big = jacobian_columns(caps, probes=512, spec=False, generator=gen(1))
    for col in ("jac_fro", "jac_id", "prod_fro"):
        assert rel(est["0"][col], want["0"][col]) < 0.10
        assert rel(big["0"][col], want["0"][col]) < 0.02
    for col in ("jac_spec", "prod_spec"):
        # 6 distinct singular values repeated per sample: Lanczos is exact within 6 steps
        assert est["0"][col] == pytest.approx(want["0"][col], rel=1e-6)
    vals = spectrum(net, x, start="0", end="1")
    np.testing.assert_allclose(vals, np.repeat(torch.linalg.svdvals(b @ a).numpy(), 5), rtol=1e-10)


def test_zero_initialised_residual_branch_is_identity():
    _seeded(0)
    net = nn.Sequential(*[ResMLP(8, zero=True) for _ in range(4)]).to(F64)
    x = inputs_for(net)
    caps = captured(net, x)
    est = jacobian_columns(caps, generator=gen(0))
    for c in caps:
        assert est[c.name]["jac_id"] == 0.0
        for col in ("jac_fro", "jac_spec", "prod_fro", "prod_spec"):
            assert est[c.name][col] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(spectrum(net, x), np.ones(x.numel()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(spectrum(net, x, k=3), np.ones(3), rtol=0, atol=1e-8)


def test_deep_linear_orthogonal_net_is_isometric():
    g = gen(5)
    layers = []
    for _ in range(12):
        lin = nn.Linear(7, 7, bias=False).to(F64)
        with torch.no_grad():
            lin.weight.copy_(torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=F64))[0])
        layers.append(lin)
    net = nn.Sequential(*layers)
    x = torch.randn(3, 7, generator=g, dtype=F64)
    np.testing.assert_allclose(spectrum(net, x), np.ones(21), atol=1e-10)
    np.testing.assert_allclose(spectrum(net, x, start="3", end="9", k=4), np.ones(4), atol=1e-8)
    est = jacobian_columns(captured(net, x), generator=gen(0))
    for cols in est.values():
        for col in ("jac_fro", "jac_spec", "prod_fro", "prod_spec"):
            assert cols[col] == pytest.approx(1.0, abs=1e-10)
        assert cols["jac_id"] > 0.5  # an orthogonal map is far from the identity


@pytest.mark.parametrize("depth", [20, 50])
def test_chain_of_scalings_has_prod_spec_power(depth):
    net = nn.Sequential(*[Scale(0.8) for _ in range(depth)])
    x = torch.randn(4, 5, generator=gen(0), dtype=F64)
    est = jacobian_columns(captured(net, x, [str(i) for i in range(depth)]), generator=gen(0))
    for i in range(depth):
        cols = est[str(i)]
        for col in ("prod_spec", "prod_fro"):
            assert cols[col] == pytest.approx(0.8 ** (depth - i), rel=1e-9)
        assert cols["jac_spec"] == pytest.approx(0.8, rel=1e-12)
        assert cols["jac_id"] == pytest.approx(0.2, rel=1e-12)
    assert est["0"]["prod_spec"] == pytest.approx({20: 0.0115, 50: 1.43e-5}[depth], rel=0.01)


# ---------------------------------------------------------------------- spectrum
@pytest.mark.parametrize("name", ["res_mlp", "bn_cnn"])
def test_spectrum_matches_svdvals_of_the_exact_product(name):
    net = NETS[name]()
    x = inputs_for(net)
    caps = captured(copy.deepcopy(net), x)
    x1 = caps[1].x.detach()
    exact = torch.linalg.svdvals(functional_jacobian(net[1:3], x1)).numpy()
    vals = spectrum(net, x, start="1", end="2")
    assert vals.shape == exact.shape
    assert np.all(np.diff(vals) <= 0)
    np.testing.assert_allclose(vals, exact, rtol=1e-4, atol=1e-4 * exact[0] * 1e-3)
    top = spectrum(net, x, start="1", end="2", k=5)
    np.testing.assert_allclose(top, exact[:5], rtol=1e-4)
    # defaults: first and last block
    full = torch.linalg.svdvals(functional_jacobian(net, x)).numpy()
    np.testing.assert_allclose(spectrum(net, x)[:5], full[:5], rtol=1e-4)


class DropConvBlock(ConvBlock):
    def __init__(self, c: int):
        super().__init__(c)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return super().forward(self.drop(x))


def test_spectrum_changes_nothing(no_leaks):
    _seeded(0)
    # a random layer after the blocks too: the forward pass stops before it
    net = nn.Sequential(*[DropConvBlock(3) for _ in range(3)], nn.Dropout(0.3)).to(F64)
    no_leaks(net)
    x = inputs_for(net)
    blocks = ["0", "1", "2"]
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    first = spectrum(net, x, start="0", end="1", blocks=blocks)
    np.testing.assert_array_equal(first, spectrum(net, x, start="0", end="1", blocks=blocks))
    assert not np.array_equal(first, spectrum(net, x, start="0", end="1", seed=1, blocks=blocks))
    assert spectrum(net, x, k=3, blocks=blocks).shape == (3,)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert all(m.training for m in net.modules())
    net.eval()
    spectrum(net, x, blocks=blocks)
    assert not any(m.training for m in net.modules())


def test_spectrum_errors():
    net = res_mlp()
    x = inputs_for(net)
    with pytest.raises(ValueError, match="not a module of the model"):
        spectrum(net, x, start="nope")
    with pytest.raises(ValueError, match="did not run after"):
        spectrum(net, x, start="3", end="1")
    with pytest.raises(ValueError, match="k must be"):
        spectrum(net, x, k=0)
    with pytest.raises(ValueError, match="less than min"):
        spectrum(net, x, k=120)
    big = torch.randn(math.isqrt(MAX_DENSE_ENTRIES) // 10 + 1, 10, dtype=F64)
    with pytest.raises(ValueError, match=r"pass k=10"):
        spectrum(net, big)
    assert spectrum(net, big, k=2).shape == (2,)


# ---------------------------------------------------------------------- no side effects
def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inspecting every object touches deprecated torch attributes
        return sum(torch.is_tensor(o) for o in gc.get_objects())


def _bn_run(with_jacobian: bool):
    net = bn_cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = inputs_for(net, batch=6)
    out, caps = capture_blocks(net, x)
    loss = out.square().mean()
    state = {}
    if with_jacobian:
        for p in list(net.parameters())[:2]:
            p.grad = torch.full_like(p, 7.0)  # an existing gradient must stay untouched
        buffers = {k: v.clone() for k, v in net.named_buffers()}
        rng = torch.get_rng_state()
        n_tensors = _live_tensors()
        cols = jacobian_columns(caps, generator=gen(0))
        state["tensors"] = _live_tensors() - n_tensors
        state["cols"] = cols
        state["rng"] = torch.equal(rng, torch.get_rng_state())
        state["buffers"] = all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())
        state["grads"] = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
        for p in list(net.parameters())[:2]:
            p.grad = None
    loss.backward()
    opt.step()
    return net, state


def test_jacobian_columns_have_no_side_effects():
    bare, _ = _bn_run(False)
    probed, state = _bn_run(True)
    assert state["rng"] and state["buffers"]
    assert state["tensors"] == 0
    grads = state["grads"]
    assert all(torch.equal(g, torch.full_like(g, 7.0)) for g in grads[:2])
    assert all(g is None for g in grads[2:])
    # the user's backward afterwards sees the intact graph: bit-identical training step
    for (k, a), b in zip(bare.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert all(math.isfinite(v) for cols in state["cols"].values() for v in cols.values())


def test_dropout_block_uses_the_forward_mask():
    net = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5)).train()
    x = torch.randn(8, 16, generator=gen(0), dtype=F64)
    caps = captured(net, x, ["0", "1"])
    rng = torch.get_rng_state()
    est = jacobian_columns(caps, generator=gen(0))
    assert torch.equal(rng, torch.get_rng_state())
    kept = (caps[0].y != 0).double()  # J = diag(mask) / (1 - p)
    # Rademacher probes have u_i^2 = 1: Hutchinson is exact for a diagonal J
    assert est["0"]["jac_fro"] == pytest.approx(math.sqrt(kept.mean().item()) * 2, rel=1e-12)
    assert est["0"]["jac_spec"] == pytest.approx(2.0, rel=1e-12)
    assert est["0"]["prod_spec"] == pytest.approx(4.0, rel=1e-12)


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Square(nn.Module):
    def forward(self, x):
        return _OnceDifferentiable.apply(x)


def test_block_without_double_backward_gives_nan_spectra_and_a_warning():
    net = nn.Sequential(Plain(5).to(F64), Square(), Plain(5).to(F64))
    x = torch.randn(3, 5, generator=gen(0), dtype=F64)
    caps = captured(net, x, ["0", "1", "2"])
    exact = exact_columns(caps)
    with pytest.warns(RuntimeWarning, match="differentiated twice"):
        est = jacobian_columns(caps, probes=256, generator=gen(0))
    assert math.isnan(est["1"]["jac_spec"])
    assert math.isnan(est["0"]["prod_spec"]) and math.isnan(est["1"]["prod_spec"])
    assert est["2"]["jac_spec"] == pytest.approx(exact["2"]["jac_spec"], rel=1e-6)
    for name in "012":
        for col in ("jac_fro", "prod_fro"):
            assert rel(est[name][col], exact[name][col]) < 0.05


class DoubleInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)


def test_in_place_ops_around_blocks():
    _seeded(0)
    # mul_ modifies block 1's output after it returned; block 3 starts with relu_ on its input
    inner = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6))
    net = nn.Sequential(ResMLP(6), ResMLP(6), DoubleInPlace(), inner, ResMLP(6)).to(F64)
    x = torch.randn(12, 6, generator=gen(1), dtype=F64)
    names = ["0", "1", "3", "4"]
    caps = captured(net, x, names)
    with torch.no_grad():
        x1 = net[0](x)
        x3 = 2 * net[1](x1)
        ins = [x, x1, x3, inner(x3.clone())]
    exact = exact_columns(caps)
    for name, x_in in zip(names, ins, strict=True):
        j = functional_jacobian(net.get_submodule(name), x_in)
        assert exact[name]["jac_spec"] == pytest.approx(float(torch.linalg.svdvals(j)[0]), rel=1e-10)
        end = functional_jacobian(nn.Sequential(*net[int(name) :]), x_in)
        assert exact[name]["prod_spec"] == pytest.approx(float(torch.linalg.svdvals(end)[0]), rel=1e-10)
    est = jacobian_columns(caps, generator=gen(0))
    for name in names:
        assert rel(est[name]["jac_spec"], exact[name]["jac_spec"]) < 0.02
        assert rel(est[name]["prod_spec"], exact[name]["prod_spec"]) < 0.02


def test_projection_block_and_switches():
    _seeded(0)
    net = nn.Sequential(Plain(4).to(F64), nn.Linear(4, 6).to(F64), Plain(6).to(F64))
    x = torch.randn(3, 4, generator=gen(0), dtype=F64)
    caps = captured(net, x, ["0", "1", "2"])
    assert [c.same_shape for c in caps] == [True, False, True]
    est = jacobian_columns(caps, generator=gen(0))
    assert math.isnan(est["1"]["jac_id"]) and math.isfinite(est["1"]["jac_spec"])
    no_prod = jacobian_columns(caps, prod=False, generator=gen(0))
    assert all(math.isnan(c["prod_fro"]) and math.isnan(c["prod_spec"]) for c in no_prod.values())
    no_spec = jacobian_columns(caps, spec=False, generator=gen(0))
    assert all(math.isnan(c["jac_spec"]) and math.isnan(c["prod_spec"]) for c in no_spec.values())
    assert all(math.isfinite(c["jac_fro"]) and math.isfinite(c["prod_fro"]) for c in no_spec.values())
    no_ps = jacobian_columns(caps, prod_spec="none", generator=gen(0))
    assert math.isnan(no_ps["0"]["prod_spec"]) and math.isfinite(no_ps["0"]["jac_spec"])
    assert jacobian_columns([], generator=gen(0)) == {}


def test_spec_blocks_and_products_each_give_their_own_spectral_column_of_the_full_call():
    # The probe spreads a spectral cycle over two steps: "blocks" for jac_spec, "products" for
    # prod_spec. Each is the full call's estimate (the same probes, the same Lanczos runs), except
    # at a stack's end, where the full call keeps the better of its two lower bounds for both.
    net = bn_cnn()
    caps = captured(net, inputs_for(net))
    full = jacobian_columns(caps, generator=gen(3))
    blocks = jacobian_columns(caps, spec="blocks", generator=gen(3))
    products = jacobian_columns(caps, spec="products", generator=gen(3))
    exact = exact_columns(caps)
    end = caps[-1].name
    for c in caps:
        for col in ("jac_fro", "prod_fro"):
            assert blocks[c.name][col] == pytest.approx(full[c.name][col], rel=1e-12)
            assert products[c.name][col] == pytest.approx(full[c.name][col], rel=1e-12)
        assert math.isnan(blocks[c.name]["prod_spec"]) and math.isnan(products[c.name]["jac_spec"])
        assert blocks[c.name]["jac_spec"] <= exact[c.name]["jac_spec"] * (1 + 1e-9)
        assert products[c.name]["prod_spec"] <= exact[c.name]["prod_spec"] * (1 + 1e-9)
        if c.name != end:
            assert blocks[c.name]["jac_spec"] == pytest.approx(full[c.name]["jac_spec"], rel=1e-9)
            assert products[c.name]["prod_spec"] == pytest.approx(full[c.name]["prod_spec"], rel=1e-9)
    with pytest.raises(ValueError, match="spec must be"):
        jacobian_columns(caps, spec="both", generator=gen(3))  # type: ignore[arg-type]


def test_same_generator_same_values_and_float32():
    net = bn_cnn().float()
    x = inputs_for(net).float()
    caps = captured(net, x)
    a = jacobian_columns(caps, generator=gen(4))
    b = jacobian_columns(caps, generator=gen(4))
    assert a == b
    exact = exact_columns(caps)
    for c in caps:
        assert rel(a[c.name]["jac_spec"], exact[c.name]["jac_spec"]) < 0.02
        assert rel(a[c.name]["prod_spec"], exact[c.name]["prod_spec"]) < 0.02


def test_bad_arguments():
    x = torch.randn(2, 3, requires_grad=True)
    caps = [BlockCapture("b", x, 2 * x, same_shape=True)]
    for kwargs, match in [
        ({"probes": 0}, "probes"),
        ({"power_iters": -1}, "power_iters"),
        ({"tol": -1.0}, "tol"),
        ({"prod_spec": "all"}, "prod_spec"),
    ]:
        with pytest.raises(ValueError, match=match):
            jacobian_columns(caps, generator=gen(0), **kwargs)
    with pytest.raises(TypeError, match="Generator"):
        jacobian_columns(caps, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        jacobian_columns(caps * 2, generator=gen(0))
    with torch.no_grad():
        dead = [BlockCapture("b", x, 2 * x, same_shape=True)]
    with pytest.raises(ValueError, match="no autograd graph"):
        jacobian_columns(dead, generator=gen(0))


def test_capture_blocks_removes_its_hooks(no_leaks):
    net = no_leaks(res_mlp())
    out, caps = capture_blocks(net, inputs_for(net))
    assert out.shape == (12, 10) and len(caps) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jacobian_columns(caps, generator=gen(0))
