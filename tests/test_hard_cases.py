"""The probe's numbers on hard cases, each against a plain-autograd reference.

Float32 nets where the case is about float32 (tiny and huge norms); float64 elsewhere. The
references take the block gradients with plain hooks and ``torch.autograd`` and their norms
in float64, independently of the probe's sufficient statistics.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import metrics


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain(depth: int, width: int, *, seed: int = 0, gain: float = 1.0, dtype=torch.float32) -> nn.Sequential:
    gen = _gen(seed)
    blocks = []
    for _ in range(depth):
        fc = nn.Linear(width, width).to(dtype)
        with torch.no_grad():
            fc.weight.copy_(torch.randn(width, width, generator=gen, dtype=dtype) * gain / math.sqrt(width))
            fc.bias.zero_()
        blocks.append(nn.Sequential(fc, nn.Tanh()))
    return nn.Sequential(*blocks)


class _Res(nn.Module):
    def __init__(self, width: int, gen: torch.Generator, dtype=torch.float32):
        super().__init__()
        self.fc = nn.Linear(width, width).to(dtype)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(width, width, generator=gen, dtype=dtype) / math.sqrt(width))

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def _residual(depth: int, width: int, *, seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    gen = _gen(seed)
    return nn.Sequential(*[_Res(width, gen, dtype) for _ in range(depth)])


def _block_gradients(model: nn.Sequential, x: torch.Tensor, loss_fn) -> list[dict[str, float]]:
    """Per block (one call each): float64 norms of g_y, g_x (through the block only), x and the
    branch cosine, from plain hooks and torch.autograd in the model's own dtype."""
    xs, ys = [], []
    handles = []
    for block in model:
        handles.append(block.register_forward_pre_hook(lambda m, a: xs.append(a[0])))
        handles.append(block.register_forward_hook(lambda m, a, out: ys.append(out)))
    x = x.clone().requires_grad_(True)
    try:
        loss = loss_fn(model(x))
    finally:
        for h in handles:
            h.remove()
    g_ys = torch.autograd.grad(loss, ys, retain_graph=True)
    rows = []
    for xi, yi, gy in zip(xs, ys, g_ys, strict=True):
        (gx,) = torch.autograd.grad(yi, xi, gy, retain_graph=True)
        gy64, gx64 = gy.double(), gx.double()
        row = {
            "grad_out": gy64.norm().item(),
            "grad_in": gx64.norm().item(),
            "in_rms": (xi.detach().double().norm() / math.sqrt(xi.numel())).item(),
        }
        if xi.shape == yi.shape:
            b = gx64 - gy64
            row["branch_cos"] = (b.flatten() @ gy64.flatten() / (b.norm() * gy64.norm())).item()
        rows.append(row)
    last = rows[-1]["grad_out"]
    for row in rows:
        row["cum_gain"] = row["grad_in"] / last
    return rows


def _probe_frame(model: nn.Module, x: torch.Tensor, loss_fn, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradprobe.attach(model, blocks=[str(i) for i in range(len(model))], **options) as probe:
            loss_fn(model(x)).backward()
    return probe.frame(), [str(w.message) for w in caught if "gradprobe" in str(w.message)]


# ----------------------------------------------------------------------------- float32 range


def test_float32_squared_sums_neither_underflow_nor_overflow():
    tiny = torch.full((300,), 1e-27)
    huge = torch.full((300,), 1e20)
    assert metrics.grad_out_stat(tiny).item() == pytest.approx(300 * 1e-54, rel=1e-6, abs=0)
    assert metrics.grad_out_stat(huge).item() == pytest.approx(300 * 1e40, rel=1e-6, abs=0)
    xx, yy, dd, rr = metrics.forward_stats(huge, 2 * huge, huge).tolist()
    assert [xx, yy, dd, rr] == pytest.approx([3e42, 1.2e43, 3e42, 3e42], rel=1e-6, abs=0)
    # exact zeros stay zero, in float32
    assert metrics.grad_out_stat(torch.zeros(5)).dtype == torch.float32


def test_float32_branch_cosine_of_tiny_gradients_is_the_float64_one():
    gen = _gen(3)
    gy = torch.randn(64, generator=gen) * 1e-26
    gx = gy + torch.randn(64, generator=gen) * 1e-27
    gxx, bb, bg = metrics.grad_in_stats(gx, gy).tolist()
    gy64, gx64 = gy.double(), gx.double()
    b = gx64 - gy64
    assert gxx == pytest.approx((gx64 @ gx64).item(), rel=1e-6, abs=0)
    assert bb == pytest.approx((b @ b).item(), rel=1e-5, abs=0)
    assert bg / math.sqrt(bb * (gy64 @ gy64).item()) == pytest.approx(
        (b @ gy64 / (b.norm() * gy64.norm())).item(), abs=1e-5
    )


def test_loss_scaled_by_1e_25_reads_its_true_gradient_norms():
    model = _residual(4, 8)
    x = torch.randn(16, 8, generator=_gen(1))

    def loss_fn(out):
        return out.pow(2).mean() * 1e-25

    ref = _block_gradients(model, x, loss_fn)
    frame, warned = _probe_frame(model, x, loss_fn)
    assert not warned
    for i, row in enumerate(ref):
        got = frame.iloc[i]
        assert 1e-28 < row["grad_out"] < 1e-23  # the case: float32 squares of these underflow
        for col in ("grad_out", "grad_in", "cum_gain"):
            assert got[col] == pytest.approx(row[col], rel=1e-5, abs=0), col
        assert got["gain"] == pytest.approx(row["grad_in"] / row["grad_out"], rel=1e-5, abs=0)
        assert got["branch_cos"] == pytest.approx(row["branch_cos"], abs=1e-4)
        assert got["param_grad_norm"] > 0


def test_deep_plain_net_cum_gain_is_not_flushed_to_zero():
    model = _plain(120, 16, gain=0.6)
    x = torch.randn(8, 16, generator=_gen(2))

    def loss_fn(out):
        return out.sum()

    ref = _block_gradients(model, x, loss_fn)
    frame, _ = _probe_frame(model, x, loss_fn)
    assert 0 < ref[0]["cum_gain"] < 1e-20  # the case: float32 squares of the first grad_in underflow
    assert frame.iloc[0]["cum_gain"] == pytest.approx(ref[0]["cum_gain"], rel=1e-5, abs=0)
    assert frame.iloc[0]["grad_in"] == pytest.approx(ref[0]["grad_in"], rel=1e-5, abs=0)


def test_activations_of_1e18_read_their_rms_without_a_non_finite_warning():
    model = _residual(3, 8)
    x = torch.randn(64, 8, generator=_gen(4)) * 1e18  # 1e36 * 512 squared sums overflow float32

    def loss_fn(out):
        return out.mean()

    ref = _block_gradients(model, x, loss_fn)
    frame, warned = _probe_frame(model, x, loss_fn)
    assert not any("non-finite" in w for w in warned), warned
    for i, row in enumerate(ref):
        assert frame.iloc[i]["in_rms"] == pytest.approx(row["in_rms"], rel=1e-6, abs=0)
        assert math.isfinite(frame.iloc[i]["out_rms"])


def test_non_finite_warning_fires_when_the_tensor_holds_nan():
    model = _residual(2, 8)
    x = torch.randn(16, 8, generator=_gen(4))
    x[0, 0] = math.inf
    _, warned = _probe_frame(model, x, lambda out: out.mean())
    assert any("non-finite" in w for w in warned)


# ----------------------------------------------------------------------------- assertions on broken models


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


class _Broken(nn.Module):
    """``y = h + scale * tanh(fc(h))``; ``h`` is x with a NaN backward, or y is NaN in forward."""

    def __init__(self, scale: float, *, nan_backward: bool = False, nan_forward: bool = False):
        super().__init__()
        gen = _gen(7)
        self.fc = nn.Linear(8, 8).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(8, 8, generator=gen, dtype=torch.float64))
        self.scale, self.nan_backward, self.nan_forward = scale, nan_backward, nan_forward

    def forward(self, x):
        h = _NanBackward.apply(x) if self.nan_backward else x
        y = h + self.scale * torch.tanh(self.fc(h))
        return y * math.nan if self.nan_forward else y


def _broken_net(**kind) -> nn.Sequential:
    return nn.Sequential(_Broken(0.0), _Broken(1.0, **kind), _Broken(0.0))


@pytest.mark.parametrize("kind", ["nan_backward", "nan_forward"])
@pytest.mark.parametrize("assertion", ["assert_near_identity", "assert_gradient_flow"])
def test_assertions_fail_a_non_finite_block_naming_it(kind, assertion):
    from gradprobe import testing

    net = _broken_net(**{kind: True})
    x = torch.randn(4, 8, generator=_gen(8), dtype=torch.float64)
    # the broken block is far from the identity in forward (the case: it passed as a shape change)
    with torch.no_grad():
        assert (net[1](x) - x).norm() / x.norm() > 0.3 or kind == "nan_forward"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(AssertionError) as info:
            getattr(testing, assertion)(net, x)
    message = str(info.value)
    assert "non-finite activations or gradients" in message
    assert "assert_finite_gradients" in message and "vanishes" not in message
    named = {v.block for v in info.value.violations}
    assert "1" in named and named <= {"0", "1", "2"}
    assert all(v.rule == "finite" for v in info.value.violations)


# ----------------------------------------------------------------------------- torch.autograd.grad training


def test_training_with_autograd_grad_records_like_backward():
    model = _residual(3, 8, dtype=torch.float64)
    x = torch.randn(16, 8, generator=_gen(5), dtype=torch.float64)

    def loss_fn(out):
        return out.pow(2).mean()

    ref = _block_gradients(model, x, loss_fn)
    names = ["0", "1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "non-finite" warning
        with gradprobe.attach(model, blocks=names) as probe:
            grads = torch.autograd.grad(loss_fn(model(x)), list(model.parameters()))
    by_grad = probe.frame()
    with gradprobe.attach(model, blocks=names) as probe:
        loss_fn(model(x)).backward()
    by_backward = probe.frame()
    cols = ["grad_out", "grad_in", "gain", "cum_gain", "skip_grad", "branch_grad", "branch_cos"]
    for i, row in enumerate(ref):
        for col in ("grad_out", "grad_in", "cum_gain"):
            assert by_grad.iloc[i][col] == pytest.approx(row[col], rel=1e-12), col
        assert by_grad.iloc[i][cols].tolist() == pytest.approx(by_backward.iloc[i][cols].tolist(), rel=1e-12)
    # the probe did not change what autograd.grad returned
    again = torch.autograd.grad(loss_fn(model(x)), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))


# ----------------------------------------------------------------------------- several backward passes


_GRAD_COLUMNS = ("grad_out", "grad_in", "cum_gain", "branch_cos")


def _assert_rows(frame, ref, rel=1e-10):
    for i, row in enumerate(ref):
        for col in _GRAD_COLUMNS:
            assert frame.iloc[i][col] == pytest.approx(row[col], rel=rel, abs=0), (i, col)
        assert frame.iloc[i]["calls"] == 1


def _run(model, x, train, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradprobe.attach(model, blocks=[str(i) for i in range(len(model))], **options) as probe:
            train(probe)
    return probe.frame(), [str(w.message) for w in caught if "gradprobe" in str(w.message)]


def test_two_backward_passes_through_one_output_add_as_vectors():
    model = _residual(3, 8, dtype=torch.float64)
    x = torch.randn(16, 8, generator=_gen(6), dtype=torch.float64)

    def train(probe):
        out = model(x)
        first, second = out.pow(2).mean(), (out * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum()
        first.backward(retain_graph=True)
        second.backward()

    ref = _block_gradients(
        model, x, lambda out: out.pow(2).mean() + (out * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum()
    )
    frame, warned = _run(model, x, train)
    assert not warned
    _assert_rows(frame, ref)


def test_a_gradient_penalty_pass_is_not_a_training_gradient():
    model = _residual(3, 8, dtype=torch.float64)
    x = torch.randn(16, 8, generator=_gen(7), dtype=torch.float64).requires_grad_()

    def total(out, inputs):
        loss = out.pow(2).mean()
        (g,) = torch.autograd.grad(loss, inputs, create_graph=True)
        return loss + g.pow(2).sum()

    def train(probe):
        total(model(x), x).backward()

    # the reference: the gradient training applies (of the whole loss, penalty included)
    xs, ys = [], []
    handles = [b.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for b in model]
    handles += [b.register_forward_hook(lambda m, a, out: ys.append(out)) for b in model]
    loss = total(model(x), x)
    for h in handles:
        h.remove()
    # Each block input feeds only its block (and the penalty's graph through that block's saved
    # tensors): the loss gradient at it is the gradient through this block.
    g_ys = torch.autograd.grad(loss, ys, retain_graph=True)
    g_xs = torch.autograd.grad(loss, xs, retain_graph=True)
    frame, warned = _run(model, x, train)
    assert not warned
    for i, (gy, gx) in enumerate(zip(g_ys, g_xs, strict=True)):
        assert frame.iloc[i]["grad_out"] == pytest.approx(gy.norm().item(), rel=1e-10)
        assert frame.iloc[i]["grad_in"] == pytest.approx(gx.norm().item(), rel=1e-10)


def test_passes_beyond_the_held_memory_pool_as_squares_and_say_so():
    model = _residual(2, 8, dtype=torch.float64)
    x = torch.randn(16, 8, generator=_gen(8), dtype=torch.float64)

    def train(probe):
        probe._taps._hold_bytes = 0  # nothing may be held
        loss = model(x).pow(2).mean()
        loss.backward(retain_graph=True)
        loss.backward()

    ref = _block_gradients(model, x, lambda out: out.pow(2).mean())
    frame, warned = _run(model, x, train)
    assert any("sqrt(|g1|^2 + |g2|^2)" in w for w in warned), warned
    for i, row in enumerate(ref):  # two equal passes: sqrt(2) |g|, not 2 |g|
        assert frame.iloc[i]["grad_out"] == pytest.approx(math.sqrt(2) * row["grad_out"], rel=1e-10)


@pytest.mark.parametrize("how", ["inputs", "create_graph"])
def test_a_step_without_a_training_pass_records_the_other_passes_and_says_so(how):
    model = _residual(2, 8, dtype=torch.float64)
    x = torch.randn(16, 8, generator=_gen(9), dtype=torch.float64).requires_grad_()

    def loss_fn(out):
        return out.pow(2).mean()

    def train(probe):
        loss = loss_fn(model(x))
        if how == "inputs":  # a saliency map: the gradient with respect to the input only
            torch.autograd.grad(loss, x)
        else:  # a meta-learning inner step
            torch.autograd.grad(loss, list(model.parameters()), create_graph=True)

    ref = _block_gradients(model, x.detach(), loss_fn)
    frame, warned = _run(model, x, train)
    assert any("do not train its parameters" in w for w in warned), warned
    _assert_rows(frame, ref)


# ----------------------------------------------------------------------------- torch.func transforms


def test_torch_func_transforms_are_stepped_around_with_one_warning():
    from torch.func import functional_call, grad, jacrev, vmap

    model = _residual(3, 8, dtype=torch.float64)
    x = torch.randn(6, 8, generator=_gen(10), dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi):
        return functional_call(model, p, (xi[None],)).pow(2).mean()

    def loss_fn(out):
        return out.pow(2).mean()

    expected = (vmap(grad(loss_one), in_dims=(None, 0))(params, x), jacrev(model)(x[0]))

    def train(probe):
        for _ in range(2):
            loss_fn(model(x)).backward()
            per_sample = vmap(grad(loss_one), in_dims=(None, 0))(params, x)
            jac = jacrev(model)(x[0])
            assert all(torch.equal(per_sample[k], expected[0][k]) for k in params)
            assert torch.equal(jac, expected[1])

    ref = _block_gradients(model, x, loss_fn)
    frame, warned = _run(model, x, train)
    assert len(warned) == 1 and "torch.func transform" in warned[0], warned
    assert frame["step"].unique().tolist() == [0, 1]
    for step in (0, 1):
        rows = frame[frame["step"] == step].reset_index(drop=True)
        for i, row in enumerate(ref):  # each step: its backward() pass only (weights unchanged)
            for col in ("grad_out", "grad_in", "cum_gain"):
                assert rows.iloc[i][col] == pytest.approx(row[col], rel=1e-10)
            assert rows.iloc[i]["calls"] == 1


# ----------------------------------------------------------------------------- sequence-first sub-batch


class _SeqFirst(nn.Module):
    """A sequence-first (T, N, C) stack without any ``batch_first`` attribute: mixes along time."""

    def __init__(self, width: int = 6, depth: int = 2):
        super().__init__()
        gen = _gen(11)
        self.blocks = nn.ModuleList(_Res(width, gen, torch.float64) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x + x.mean(0, keepdim=True))  # time mixing: slicing T would change y
        return x


def _sliced_shapes(monkeypatch):
    from gradprobe.jacobian import schedule

    seen = []
    real = schedule.sub_batch_captures

    def spy(model, named, args, kwargs, k, seed, **kw):
        caps = real(model, named, args, kwargs, k, seed, **kw)
        seen.extend((tuple(c.x.shape), c.x.detach().clone()) for c in caps or ())
        return caps

    monkeypatch.setattr(schedule, "sub_batch_captures", spy)
    return seen


def _jacobian_frame(model, x, **jacobian_options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = {"spec": False, **jacobian_options}
        with gradprobe.attach(model, jacobian=True, jacobian_options=options) as probe:
            model(x).pow(2).mean().backward()
    return probe.frame(), [str(w.message) for w in caught if "gradprobe" in str(w.message)]


def test_sequence_first_transformer_sub_batch_slices_the_batch_axis(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False: (T, N, C)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    x = torch.randn(40, 6, 8, generator=_gen(12), dtype=torch.float64)
    seen = _sliced_shapes(monkeypatch)
    frame, _ = _jacobian_frame(model, x)  # 6 samples: no larger than the sub-batch, the training graph
    assert frame["jac_batch"].tolist() == [6.0, 6.0] and not seen
    frame, _ = _jacobian_frame(model, x, sub_batch=4)
    assert frame["jac_batch"].tolist() == [4.0, 4.0]
    assert seen and all(shape == (40, 4, 8) for shape, _ in seen)  # time kept whole


def test_sequence_first_model_without_flags_takes_batch_dim(monkeypatch):
    model = _SeqFirst()
    x = torch.randn(40, 6, 6, generator=_gen(13), dtype=torch.float64)
    seen = _sliced_shapes(monkeypatch)
    frame, _ = _jacobian_frame(model, x, sub_batch=3, batch_dim=1)
    assert frame["jac_batch"].tolist() == [3.0, 3.0]
    assert seen and all(shape == (40, 3, 6) for shape, _ in seen)
    # the first block saw the first 3 sequences whole (its input mixes along time)
    first_in = x[:, :3] + x[:, :3].mean(0, keepdim=True)
    assert torch.equal(seen[0][1], first_in)


def test_a_model_with_both_batch_axes_is_refused_with_a_message():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.GRU(4, 4)  # sequence first
            self.b = nn.GRU(4, 4, batch_first=True)
            self.blocks = nn.ModuleList([_Res(4, _gen(14), torch.float64) for _ in range(2)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Mixed().double()
    x = torch.randn(40, 6, 4, generator=_gen(15), dtype=torch.float64)
    frame, warned = _jacobian_frame(model, x, sub_batch=3)
    assert any("batch_dim" in w and "cannot be told" in w for w in warned), warned
    assert frame["jac_batch"].isna().all() and frame["jac_fro"].notna().all()


def test_batch_dim_option_is_validated_and_slices_that_axis():
    from gradprobe.config import JacobianOptions
    from gradprobe.jacobian.rerun import _slice_batch, batch_size

    with pytest.raises(ValueError, match="batch_dim"):
        JacobianOptions(batch_dim=-1)
    t = torch.arange(24.0).reshape(2, 4, 3)
    assert batch_size((t,), {}, dim=1) == 4
    assert torch.equal(_slice_batch((t,), 4, 2, 1)[0], t[:, :2])
