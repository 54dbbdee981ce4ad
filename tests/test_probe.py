"""The probe engine against float64 autograd references, closed forms and its guarantees."""

from __future__ import annotations

import copy
import gc
import math
import tracemalloc
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from nets import deep_res_mlp, make, make_input, python_calls
from reference import reference_rows
from torch import nn

import gradprobe
from gradprobe import batching, metrics

REL = 1e-6
COLUMNS = [
    "grad_out",
    "grad_in",
    "gain",
    "cum_gain",
    "skip_grad",
    "branch_grad",
    "branch_cos",
    "res_ratio",
    "cos_xy",
    "in_rms",
    "out_rms",
    "param_norm",
    "param_grad_norm",
]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    # A loss with a non-trivial gradient direction (not all-ones).
    w = torch.linspace(-1.0, 2.0, out.shape[-1], dtype=out.dtype)
    return (out * w).sum() + 0.5 * out.pow(2).sum()


def assert_rows_match(frame: pd.DataFrame, ref: dict, columns=COLUMNS, rel=REL) -> None:
    assert set(frame["block"]) == set(ref)
    for _, row in frame.iterrows():
        expected = ref[row["block"]]
        assert row["index"] == expected["index"]
        for col in columns:
            want, got = expected[col], row[col]
            if math.isnan(want):
                assert math.isnan(got), (row["block"], col, got)
            else:
                assert got == pytest.approx(want, rel=rel, abs=1e-12), (row["block"], col, got, want)


@pytest.mark.parametrize("kind", ["plain_mlp", "res_mlp", "res_cnn", "plain_cnn"])
def test_every_metric_matches_float64_autograd_reference(kind, no_leaks):
    # The probed net uses in-place ops (ReLU(inplace=True), out += identity); the
    # reference runs the same weights without them.
    net = no_leaks(make(kind, inplace=True))
    twin = make(kind, inplace=False)
    twin.load_state_dict(net.state_dict())
    x = make_input(kind)
    with gradprobe.attach(net) as probe:
        loss_of(net(x)).backward()
    frame = probe.frame()
    shortcuts = {n: "shortcut" for n, m in twin.named_modules() if getattr(m, "shortcut", None) is not None}
    ref = reference_rows(twin, probe.blocks, x, loss_of, shortcuts)
    assert_rows_match(frame, ref)
    assert (frame["step"] == 0).all() and (frame["calls"] == 1).all()


def test_residual_cnn_reads_projection_blocks_against_their_shortcut():
    net = make("res_cnn")
    x = make_input("res_cnn")
    # by hand, in float64, on a copy: the block's input, its 1x1 projection shortcut s(x), its output
    twin = copy.deepcopy(net)
    with torch.no_grad():
        block_in = twin.layer1(twin.stem(x))
        s, y = twin.layer2[0].shortcut(block_in), twin.layer2[0](block_in)
    with gradprobe.attach(net) as probe:
        loss_of(net(x)).backward()
    row = probe.frame().set_index("block").loc["layer2.0"]
    assert math.isnan(row["skip_grad"]) and math.isnan(row["branch_grad"])  # shapes differ
    assert 0 < row["res_ratio"] < 10
    # compared with shortcut(x): the values of s, not NaN and not anything near
    assert row["res_ratio"] == pytest.approx(float((y - s).norm() / s.norm()), rel=1e-10)
    cos = float((s * y).sum() / (s.norm() * y.norm()))
    assert row["cos_xy"] == pytest.approx(cos, rel=1e-10)


def test_a_projection_block_that_does_not_apply_its_shortcut_is_nan_with_one_warning():
    net = make("plain_cnn")  # the same blocks, with a shortcut child that forward never calls
    with (
        pytest.warns(RuntimeWarning, match=r"\['layer2.0'\].*no shortcut applied") as caught,
        gradprobe.attach(net) as probe,
    ):
        loss_of(net(make_input("plain_cnn"))).backward()
    assert sum("no shortcut applied" in str(w.message) for w in caught) == 1
    f = probe.frame().set_index("block")
    assert math.isnan(f.loc["layer2.0", "res_ratio"]) and math.isnan(f.loc["layer2.0", "cos_xy"])
    assert f.drop(index="layer2.0")[["res_ratio", "cos_xy"]].notna().all().all()


def _shape_warnings(model: nn.Module, x: torch.Tensor, **options) -> tuple[list[str], pd.DataFrame]:
    with warnings.catch_warnings(record=True) as caught, gradprobe.attach(model, **options) as probe:
        warnings.simplefilter("always")
        loss_of(model(x)).backward()
    return [str(w.message) for w in caught if "change the shape" in str(w.message)], probe.frame()


@pytest.mark.parametrize("residual", [False, True])
def test_the_plain_reference_nets_raise_no_shortcut_warning(residual):
    """Regression: every gradprobe compare run warned that plain-20/plain-56 lack the shortcut
    that plain nets have none of by design."""
    gen = torch.Generator().manual_seed(0)
    net = gradprobe.models.resnet_cifar(
        8, residual=residual, width=4, in_channels=1, num_classes=3, generator=gen
    )
    found, frame = _shape_warnings(net, torch.randn(4, 1, 8, 8, generator=gen))
    assert found == []
    ratio = frame.set_index("block").loc["layer2.0", "res_ratio"]
    assert math.isnan(ratio) if not residual else ratio > 0  # plain: still nothing to compare with
    mlp = gradprobe.models.mlp(4, in_features=6, num_classes=3, residual=residual, generator=gen)
    assert _shape_warnings(mlp, torch.randn(4, 6, generator=gen))[0] == []


def test_shortcuts_none_declares_a_user_block_without_a_shortcut():
    net = make("plain_cnn")  # layer2.0 changes shape and never applies its shortcut child
    x = make_input("plain_cnn")
    found, _ = _shape_warnings(net, x)
    assert len(found) == 1 and "['layer2.0']" in found[0] and "shortcuts={block: None}" in found[0]
    found, frame = _shape_warnings(make("plain_cnn"), x, shortcuts={"layer2.0": None})
    assert found == []  # declared: no shortcut by design
    assert math.isnan(frame.set_index("block").loc["layer2.0", "res_ratio"])


def test_a_user_block_wrapping_a_plain_reference_block_still_warns():
    """The declaration belongs to gradprobe's own plain blocks, not to whatever holds them."""
    inner = gradprobe.models.resnet_cifar(8, residual=False, width=4, in_channels=1, num_classes=3)

    class Wrapper(nn.Module):
        def __init__(self, block: nn.Module):
            super().__init__()
            self.inner = block

        def forward(self, x):
            return self.inner(x)

    net = nn.Sequential(inner.conv1, Wrapper(inner.layer1[0]), Wrapper(inner.layer2[0]))
    found, _ = _shape_warnings(net, torch.randn(2, 1, 8, 8), blocks=["1", "2"])
    assert len(found) == 1 and "['2']" in found[0]


class Scale(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the Sequential a parameter

    def forward(self, x):
        return self.c * x + 0 * self.dummy


@pytest.mark.parametrize("depth", [20, 50])
def test_chain_of_scaling_blocks_has_gain_point_eight_to_the_l(depth):
    net = nn.Sequential(*[Scale(0.8) for _ in range(depth)]).double()
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with gradprobe.attach(net) as probe:
        net(x).sum().backward()
    f = probe.frame()
    np.testing.assert_allclose(f["gain"], 0.8, rtol=1e-12)
    assert f["cum_gain"].iloc[0] == pytest.approx(0.8**depth, rel=1e-10)
    np.testing.assert_allclose(f["res_ratio"], 0.2, rtol=1e-12)
    np.testing.assert_allclose(f["cos_xy"], 1.0, rtol=1e-12)


def test_zero_initialised_residual_branch_is_exactly_the_identity():
    from nets import ResMLPBlock

    net = nn.Sequential(*[ResMLPBlock(6, zero_init=True) for _ in range(5)])
    with gradprobe.attach(net) as probe:
        loss_of(net(torch.randn(4, 6, generator=torch.Generator().manual_seed(3)))).backward()
    f = probe.frame()
    assert (f["res_ratio"] == 0).all()
    assert (f["branch_grad"] == 0).all()
    assert (f["gain"] == 1).all() and (f["cum_gain"] == 1).all()
    np.testing.assert_allclose(f["cos_xy"], 1.0, atol=1e-6)


class Residual(nn.Module):
    """H(x) = x + F(x) with F the child ``branch``: the skip lives outside the probed block."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


def test_grad_in_is_through_the_block_only_when_the_skip_is_outside_it():
    torch.manual_seed(0)
    net = nn.Sequential(*[Residual(nn.Sequential(nn.Linear(5, 5), nn.Tanh())) for _ in range(3)]).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with gradprobe.attach(net, blocks="*.branch") as probe:
        loss_of(net(x)).backward()
    ref = reference_rows(net, probe.blocks, x, loss_of)
    assert_rows_match(probe.frame(), ref)
    # The total gradient at the block input would include the skip: make sure we do not report it.
    f = probe.frame()
    assert (f["gain"] < 1.0).all()


def test_first_block_whose_input_does_not_require_grad_gets_its_true_input_gradient():
    net = make("plain_mlp")
    x = make_input("plain_mlp")
    assert not x.requires_grad
    with gradprobe.attach(net) as probe:
        loss_of(net(x)).backward()
    first = probe.frame().iloc[0]
    ref = reference_rows(net, probe.blocks, x, loss_of)[first["block"]]
    assert first["grad_in"] == pytest.approx(ref["grad_in"], rel=REL)
    assert first["grad_in"] != pytest.approx(first["grad_out"], rel=1e-3)
    assert not x.requires_grad and x.grad is None


def test_block_that_modifies_its_input_in_place():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6)) for _ in range(3)]
    net = nn.Sequential(nn.Linear(6, 6), *blocks).double()
    twin = copy.deepcopy(net)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = make_input("plain_mlp")
    with gradprobe.attach(net, blocks=["1", "2", "3"]) as probe:
        loss_of(net(x)).backward()
    ref = reference_rows(twin, probe.blocks, x, loss_of)
    assert_rows_match(
        probe.frame(), ref, columns=["grad_out", "grad_in", "gain", "cum_gain", "param_grad_norm"]
    )


class TupleBlock(nn.Module):
    """A transformer-like layer: extra positional and keyword arguments, tuple output."""

    def __init__(self, d):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None, *, scale=1.0, cache=None):
        h = hidden_states + scale * torch.tanh(self.attn(hidden_states)) * attention_mask
        out = h + self.mlp(h)
        return out, {"attn": h.detach()}


class TupleNet(nn.Module):
    def __init__(self, d=6, n=3, kwargs_only=False):
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock(d) for _ in range(n)])
        self.kwargs_only = kwargs_only

    def forward(self, x):
        mask = torch.ones_like(x)
        for layer in self.layers:
            if self.kwargs_only:
                x = layer(hidden_states=x, attention_mask=mask, scale=0.5)[0]
            else:
                x = layer(x, mask, scale=0.5)[0]
        return x


@pytest.mark.parametrize("kwargs_only", [False, True])
def test_blocks_with_extra_arguments_and_tuple_outputs(kwargs_only, no_leaks):
    torch.manual_seed(0)
    net = no_leaks(TupleNet(kwargs_only=kwargs_only).double())
    x = make_input("plain_mlp")
    with gradprobe.attach(net) as probe:
        loss_of(net(x)).backward()
    assert probe.blocks == ["layers.0", "layers.1", "layers.2"]
    if kwargs_only:
        # the reference captures args[0]; use the positional twin for it
        twin = TupleNet(kwargs_only=False).double()
        twin.load_state_dict(net.state_dict())
    else:
        twin = net
    assert_rows_match(probe.frame(), reference_rows(twin, probe.blocks, x, loss_of))


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(2)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](self.blocks[0](x)))  # blocks.0 runs twice


def test_weight_shared_block_pools_its_calls_as_one_concatenated_tensor():
    torch.manual_seed(0)
    net = SharedNet().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with gradprobe.attach(net) as probe:
        loss_of(net(x)).backward()
    f = probe.frame().set_index("block")
    assert f.loc["blocks.0", "calls"] == 2 and f.loc["blocks.1", "calls"] == 1
    # reference: the two calls of blocks.0 by hand
    xa = x.clone().requires_grad_(True)
    y1 = net.blocks[0](xa)
    x2 = y1.detach().requires_grad_(True)
    y2 = net.blocks[0](x2)
    out = net.blocks[1](y2)
    loss = loss_of(out)
    g_y2, g_x2 = torch.autograd.grad(loss, [y2, x2], retain_graph=True)
    (g_y1,) = torch.autograd.grad(y1, [y1], g_x2)
    (g_x1,) = torch.autograd.grad(y1, xa, g_y1)
    grad_out = math.sqrt(g_y1.pow(2).sum() + g_y2.pow(2).sum())
    grad_in = math.sqrt(g_x1.pow(2).sum() + g_x2.pow(2).sum())
    assert f.loc["blocks.0", "grad_out"] == pytest.approx(grad_out, rel=REL)
    assert f.loc["blocks.0", "grad_in"] == pytest.approx(grad_in, rel=REL)
    in_rms = math.sqrt((x.pow(2).sum() + y1.detach().pow(2).sum()) / (2 * x.numel()))
    assert f.loc["blocks.0", "in_rms"] == pytest.approx(in_rms, rel=REL)
    assert f.loc["blocks.0", "index"] == 0 and f.loc["blocks.1", "index"] == 1


def test_gradient_accumulation_pools_micro_batches_into_one_explicit_step():
    net = make("res_mlp")
    x = make_input("res_mlp", batch=8)
    with gradprobe.attach(net, auto_step=False) as probe:
        for part in (x[:4], x[4:]):
            loss_of(net(part)).backward()
        probe.log(loss=1.5)
        probe.step()
        loss_of(net(x[:4])).backward()
        probe.step()
    f = probe.frame()
    assert f["step"].tolist() == [0] * 4 + [1] * 4
    first = f[f["step"] == 0].set_index("block")
    assert (first["calls"] == 2).all()
    # the pooled statistics equal those of the full batch (loss is a sum over samples)
    net.zero_grad()
    with gradprobe.attach(net) as full:
        loss_of(net(x)).backward()
    whole = full.frame().set_index("block")
    for col in ["grad_out", "grad_in", "gain", "res_ratio", "in_rms", "branch_cos", "param_grad_norm"]:
        np.testing.assert_allclose(first[col], whole[col], rtol=1e-9)
    assert probe.scalars()["loss"].tolist()[0] == 1.5


def test_default_stepping_one_step_per_backward_and_log_after_backward_belongs_to_it():
    net = make("plain_mlp")
    x = make_input("plain_mlp")
    with gradprobe.attach(net) as probe:
        for i in range(3):
            loss_of(net(x)).backward()
            probe.log(loss=float(i), lr=0.1)
        assert probe.current_step == 2  # the last step closes lazily
    assert probe.frame()["step"].unique().tolist() == [0, 1, 2]
    s = probe.scalars()
    assert s["step"].tolist() == [0, 1, 2] and s["loss"].tolist() == [0.0, 1.0, 2.0]


def test_explicit_step_after_each_backward_matches_default_stepping():
    net = make("res_mlp")
    x = make_input("res_mlp")
    frames = []
    for explicit in (False, True):
        with gradprobe.attach(net) as probe:
            for _ in range(3):
                net.zero_grad()
                loss_of(net(x)).backward()
                if explicit:
                    probe.step()
        frames.append(probe.frame())
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_every_n_records_only_scheduled_steps_and_counts_all():
    net = make("plain_mlp")
    x = make_input("plain_mlp")
    with gradprobe.attach(net, every=3) as probe:
        for i in range(7):
            loss_of(net(x)).backward()
            probe.log(i=i)
    assert sorted(probe.frame()["step"].unique()) == [0, 3, 6]
    assert probe.current_step == 7
    assert probe.scalars()["step"].tolist() == list(range(7))


def test_schedule_callable():
    net = make("plain_mlp")
    with gradprobe.attach(net, every=lambda s: s in (1, 2)) as probe:
        for _ in range(4):
            loss_of(net(make_input("plain_mlp"))).backward()
    assert sorted(probe.frame()["step"].unique()) == [1, 2]


def test_update_ratio_is_parameter_change_between_recorded_steps():
    net = make("res_mlp")
    x = make_input("res_mlp")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    snaps = []
    with gradprobe.attach(net) as probe:
        for _ in range(3):
            snaps.append([p.detach().clone() for p in net[1].parameters()])
            opt.zero_grad()
            loss_of(net(x)).backward()
            opt.step()
    f = probe.frame()
    row = f[(f["block"] == "1")].set_index("step")
    assert math.isnan(row.loc[0, "update_ratio"])
    delta = math.sqrt(sum((a - b).pow(2).sum() for a, b in zip(snaps[2], snaps[1], strict=False)))
    norm = math.sqrt(sum(a.pow(2).sum() for a in snaps[2]))
    assert row.loc[2, "update_ratio"] == pytest.approx(delta / norm, rel=REL)
    assert row.loc[2, "param_norm"] == pytest.approx(norm, rel=REL)


def test_eval_and_no_grad_passes_are_not_recorded():
    net = make("res_mlp")
    x = make_input("res_mlp")
    with gradprobe.attach(net) as probe:
        with torch.no_grad():
            net(x)
        net.eval()
        loss_of(net(x)).backward()
        net.train()
        loss_of(net(x)).backward()
    f = probe.frame()
    assert f["step"].unique().tolist() == [0] and (f["calls"] == 1).all()


def test_blocks_are_listed_in_forward_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])

        def forward(self, x):
            for layer in reversed(self.layers):
                x = layer(x)
            return x

    net = Reversed()
    with gradprobe.attach(net) as probe:
        assert probe.blocks == ["layers.0", "layers.1", "layers.2"]
        net(torch.randn(2, 4)).sum().backward()
        assert probe.blocks == ["layers.2", "layers.1", "layers.0"]
    f = probe.frame()
    assert f.sort_values("index")["block"].tolist() == ["layers.2", "layers.1", "layers.0"]


def test_non_finite_values_are_recorded_and_flagged_not_raised():
    net = make("plain_mlp")
    x = make_input("plain_mlp")
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite in_rms.*step 0, block 0") as record:
        with gradprobe.attach(net) as probe:
            for _ in range(2):
                loss_of(net(x)).backward()
        f = probe.frame()
    assert len(record) == 1  # flagged once, not per step
    assert f["grad_out"].isna().all() and f["in_rms"].isna().all()


def _run_training(net, probe_kwargs=None, steps=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    probe = gradprobe.attach(net, **probe_kwargs) if probe_kwargs is not None else None
    try:
        for _ in range(steps):
            x = torch.randn(8, 3, 8, 8, generator=gen)
            target = torch.randint(0, 5, (8,), generator=gen)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if probe is not None:
                probe.log(loss=loss)
    finally:
        if probe is not None:
            probe.detach()
    return losses, probe


class DropoutResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        from nets import ResCNN

        self.body = ResCNN(inplace=True)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


def test_probe_changes_nothing_in_training_bit_identical(no_leaks):
    torch.manual_seed(123)
    base = DropoutResCNN()
    results = []
    for kwargs in (None, {}, {"every": 3}):
        net = no_leaks(copy.deepcopy(base))
        torch.manual_seed(7)  # dropout draws from the global RNG: same start for each run
        losses, _ = _run_training(net, kwargs)
        rng_after = torch.get_rng_state()
        results.append((losses, net.state_dict(), rng_after))
    (l0, s0, r0) = results[0]
    for losses, state, rng in results[1:]:
        assert losses == l0  # exact float equality
        for k in s0:
            assert torch.equal(s0[k], state[k]), k  # weights and BN buffers
        assert torch.equal(r0, rng)


def test_probe_leaves_requires_grad_flags_and_grads_alone():
    net = make("res_cnn")
    x = make_input("res_cnn")
    flags = [p.requires_grad for p in net.parameters()]
    with gradprobe.attach(net):
        loss_of(net(x)).backward()
    assert [p.requires_grad for p in net.parameters()] == flags
    assert not x.requires_grad and x.grad is None


def test_hooks_are_removed_on_exit_also_when_the_body_raises(no_leaks):
    net = no_leaks(make("res_cnn"))
    with pytest.raises(RuntimeError, match="boom"), gradprobe.attach(net):
        net(make_input("res_cnn"))
        raise RuntimeError("boom")
    probe = gradprobe.attach(net)
    probe.detach()
    probe.detach()  # idempotent


def test_wrong_input_shape_raises_the_models_own_error_and_leaves_no_hooks(no_leaks):
    net = no_leaks(make("plain_mlp"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), gradprobe.attach(net):
        net(torch.randn(3, 11, dtype=torch.float64))


def test_two_probes_on_one_model_do_not_interfere():
    net = make("res_mlp")
    x = make_input("res_mlp")
    with gradprobe.attach(net) as alone:
        loss_of(net(x)).backward()
    net.zero_grad()
    with gradprobe.attach(net) as a, gradprobe.attach(net, every=2) as b:
        loss_of(net(x)).backward()
    pd.testing.assert_frame_equal(alone.frame(), a.frame())
    pd.testing.assert_frame_equal(alone.frame(), b.frame())


def test_attach_detach_cycles_leak_no_memory():
    net = make("res_mlp")
    x = make_input("res_mlp")

    def cycle():
        with gradprobe.attach(net) as probe:
            loss_of(net(x)).backward()
            net.zero_grad(set_to_none=True)
        probe.frame()
        return weakref.ref(probe)

    for _ in range(50):  # warm-up: caches, lazy imports
        cycle()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    refs = [cycle() for _ in range(1000)]
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert all(r() is None for r in refs), "probes are kept alive after detach"
    assert after - before < 200_000, f"{after - before} bytes retained after 1000 attach/detach cycles"


def test_a_failing_metric_warns_once_records_nan_and_training_goes_on(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("metric exploded")

    # call_stats: the forward statistics of a block call (forward_stats and signal_stats)
    monkeypatch.setattr(metrics, "call_stats", broken)
    net = make("res_mlp")
    x = make_input("res_mlp")
    with pytest.warns(RuntimeWarning, match="metric exploded") as record, gradprobe.attach(net) as probe:
        for _ in range(3):
            loss_of(net(x)).backward()
    assert len([w for w in record if "forward metrics" in str(w.message)]) == 1
    f = probe.frame()
    assert f["res_ratio"].isna().all() and f["grad_out"].notna().all()


def test_strict_mode_raises_metric_errors(monkeypatch):
    def bad(*args):
        raise ValueError("bad grad")

    monkeypatch.setattr(metrics, "grad_out_stat", bad)  # taken at once
    monkeypatch.setattr(batching, "_reduce_grads", bad)  # taken in the end-of-backward batch
    net = make("res_mlp")
    with pytest.raises(ValueError, match="bad grad"), gradprobe.attach(net, strict=True):
        loss_of(net(make_input("res_mlp"))).backward()


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        gradprobe.attach("not a model")
    with pytest.raises(ValueError, match=r"blocks='nope\*' selected no module.*Candidate module names"):
        gradprobe.attach(make("res_cnn"), blocks="nope*")
    with pytest.raises(ValueError, match="every="):
        gradprobe.attach(make("res_mlp"), every=0)
    with pytest.raises(ValueError, match="shortcuts="):
        gradprobe.attach(make("res_mlp"), shortcuts={"zzz": "shortcut"})
    with pytest.raises(ValueError, match="has no child module"):
        gradprobe.attach(make("res_mlp"), shortcuts={"0": "zzz"})
    with pytest.raises(ValueError, match="'step' is reserved"), gradprobe.attach(make("res_mlp")) as probe:
        probe.log(step=3)


def test_half_precision_model_records_finite_float32_statistics():
    net = make("res_mlp", dtype=torch.bfloat16)
    x = make_input("res_mlp", dtype=torch.bfloat16)
    with gradprobe.attach(net) as probe:
        net(x).float().pow(2).sum().backward()
    f = probe.frame()
    assert np.isfinite(f[["grad_out", "grad_in", "res_ratio", "in_rms", "param_norm"]].to_numpy()).all()


def test_frame_stores_python_floats_not_tensors():
    net = make("res_mlp")
    with gradprobe.attach(net) as probe:
        loss_of(net(make_input("res_mlp"))).backward()
    f = probe.frame()
    assert all(f[c].dtype == np.float64 for c in COLUMNS)
    _keys, values = probe._out.store._chunks[0]
    assert isinstance(values, np.ndarray) and values.dtype == np.float64
    # compact: 23 float64 values and five int32 keys (step, block, index, calls, stack) = 204 bytes
    assert probe._out.store.nbytes / len(f) <= 204


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_save_and_load_round_trip(tmp_path, fmt):
    from gradprobe.records import save_run

    net = make("res_cnn")
    with gradprobe.attach(net, every=2) as probe:
        for i in range(4):
            loss_of(net(make_input("res_cnn"))).backward()
            probe.log(loss=0.1 * i, note="NA")
    save_run(tmp_path / "run", probe.frame(), probe.scalars(), probe.meta(), fmt=fmt)
    run = gradprobe.load(tmp_path / "run")
    pd.testing.assert_frame_equal(run.frame(), probe.frame())
    pd.testing.assert_frame_equal(run.scalars(), probe.scalars())
    assert run.meta["blocks"] == probe.blocks and run.meta["every"] == 2
    assert run.meta["torch_version"] == torch.__version__
    assert run.meta["model_class"].endswith("ResCNN")
    assert (tmp_path / "run" / f"frame.{fmt}").exists()


def test_probe_save_uses_parquet_and_load_gives_equal_frames(tmp_path):
    net = make("res_mlp")
    with gradprobe.attach(net) as probe:
        loss_of(net(make_input("res_mlp"))).backward()
    probe.save(tmp_path / "r")
    assert (tmp_path / "r" / "frame.parquet").exists()
    pd.testing.assert_frame_equal(gradprobe.load(tmp_path / "r").frame(), probe.frame())


def test_load_gives_a_clear_error_for_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved gradprobe run"):
        gradprobe.load(tmp_path / "nothing")


def test_update_ratio_off_keeps_no_parameter_copies_and_changes_nothing_else():
    base = make("res_cnn")
    frames = {}
    for flag in (True, False):
        net = copy.deepcopy(base)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with gradprobe.attach(net, update_ratio=flag) as probe:
            for _ in range(3):
                opt.zero_grad()
                net(make_input("res_cnn")).pow(2).mean().backward()
                opt.step()
            if not flag:
                assert probe._snapshots.held() == 0  # no copy of the weights held
        frames[flag] = probe.frame()
        assert probe.run().meta["update_ratio"] is flag
    on, off = frames[True], frames[False]
    assert on.loc[on["step"] > 0, "update_ratio"].gt(0).all()
    assert off["update_ratio"].isna().all()
    cols = [c for c in on.columns if c != "update_ratio"]
    pd.testing.assert_frame_equal(on[cols], off[cols])


def test_attach_and_the_first_steps_calls_grow_linearly_with_the_blocks():
    # Attaching (blocks="auto", the nesting of the stacks) and the first recorded step (stack
    # detection) made calls in the square of the blocks: 2,000 blocks took seconds to attach and
    # more to record the first step. Eight times the blocks now make at most eight times the calls.
    def calls(blocks: int) -> int:
        net = deep_res_mlp(blocks)
        x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

        def run() -> None:
            with gradprobe.attach(net) as probe:
                for _ in range(2):
                    net(x).pow(2).sum().backward()
                assert len(probe.last_rows()) == blocks

        return python_calls(run)

    calls(2)  # what the first attach of a process imports is no cost of the blocks
    assert calls(320) / calls(40) < 9
