"""Jacobian columns through the probe: against exact Jacobians, on steps chosen by jacobian=N, without
side effects on training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from nets import make, make_input
from reference import exact_columns
from torch import nn

import gradprobe
from gradprobe.jacobian import capture_blocks


def _assert_close_to_exact(frame, exact):
    """The issue's tolerances: Frobenius columns within 5% at many probes, spectral ones within 2%."""
    for name, cols in exact.items():
        for col in ("jac_fro", "jac_id", "prod_fro"):
            if math.isnan(cols[col]):
                assert math.isnan(frame.loc[name, col])
            else:
                assert frame.loc[name, col] == pytest.approx(cols[col], rel=0.05), (name, col)
        for col in ("jac_spec", "prod_spec"):
            assert frame.loc[name, col] == pytest.approx(cols[col], rel=0.02), (name, col)


@pytest.mark.parametrize("kind", ["res_mlp", "res_cnn"])
def test_analyze_jacobian_columns_match_exact_jacobians(kind):
    net = make(kind, inplace=True)
    x = make_input(kind, batch=3)
    frame = gradprobe.analyze(net, x, probes=256, power_iters=30).set_index("block")
    twin = copy.deepcopy(net)
    _, caps = capture_blocks(twin, (x,))
    exact = exact_columns(caps)
    _assert_close_to_exact(frame, exact)


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
    from nets import ResMLPBlock

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
    # spectral columns once in 20 Jacobian steps: jac_spec on the second, prod_spec on the third
    assert sorted(frame.loc[frame["jac_spec"].notna(), "step"].unique()) == [2]
    assert sorted(frame.loc[frame["prod_spec"].notna(), "step"].unique()) == [4]
    assert (frame.loc[frame["jac_fro"].notna(), "prod_fro"] > 0).all()


@pytest.mark.parametrize(
    ("spec", "jac", "prod"),
    [
        (True, [0, 2, 4, 6], [0, 2, 4, 6]),
        (False, [], []),
        (1, [0, 2, 4, 6], [0, 2, 4, 6]),
        (2, [2, 6], [2, 6]),
        (3, [2], [4]),
        (20, [2], [4]),
    ],
)
def test_spectral_columns_follow_their_schedule_among_jacobian_steps(spec, jac, prod):
    net = make("res_mlp")
    opts = {"spec": spec, "power_iters": 3}
    with gradprobe.attach(net, jacobian=2, probes=1, jacobian_options=opts) as probe:
        for _ in range(8):
            net(make_input("res_mlp")).pow(2).sum().backward()
    f = probe.frame()
    assert sorted(f.loc[f["jac_spec"].notna(), "step"].unique()) == jac
    assert sorted(f.loc[f["prod_spec"].notna(), "step"].unique()) == prod
    assert sorted(f.loc[f["jac_fro"].notna(), "step"].unique()) == [0, 2, 4, 6]


def test_spectral_columns_during_training_when_asked():
    net = make("res_mlp")
    x = make_input("res_mlp")
    opts = {"spec": True, "power_iters": 5, "prod_spec": "shared"}
    with gradprobe.attach(net, jacobian=True, probes=2, jacobian_options=opts) as probe:
        net(x).pow(2).sum().backward()
    f = probe.frame()
    assert f["jac_spec"].notna().all() and f["prod_spec"].notna().all()


# ---------------------------------------------------------------------- sub-batch route
class _DropoutCNN(nn.Module):
    """The BatchNorm CNN with dropout between its stages: both kinds of forward-pass side effect."""

    def __init__(self):
        super().__init__()
        self.net = make("res_cnn", dtype=torch.float32, inplace=True)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        n = self.net
        h = self.drop(n.layer1(n.stem(x)))
        return n.head(self.drop(n.layer2(h)).mean((2, 3)))


def _train(net, attach_kwargs, steps, batch=8):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    probe = gradprobe.attach(net, **attach_kwargs) if attach_kwargs is not None else None
    losses, rng = [], []
    torch.manual_seed(0)  # dropout masks: the same global RNG stream for every run
    try:
        for _ in range(steps):
            x = torch.randn(batch, 3, 6, 6, generator=gen)
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            rng.append(torch.get_rng_state())
    finally:
        if probe is not None:
            probe.detach()
    return losses, rng, net.state_dict(), probe


@pytest.mark.parametrize("sub_batch", [3, None])
def test_jacobian_true_training_is_bit_identical_with_batchnorm_and_dropout(sub_batch):
    base = _DropoutCNN()
    saved = torch.get_rng_state()
    bare = _train(copy.deepcopy(base), None, 20)
    opts = {"sub_batch": sub_batch}
    probed = _train(copy.deepcopy(base), {"jacobian": True, "jacobian_options": opts}, 20)
    torch.set_rng_state(saved)
    assert bare[0] == probed[0]  # losses
    assert all(torch.equal(a, b) for a, b in zip(bare[1], probed[1], strict=True))  # global RNG, every step
    assert all(torch.equal(bare[2][k], probed[2][k]) for k in bare[2])  # weights and BatchNorm buffers
    frame = probed[3].frame()
    assert frame["jac_fro"].notna().all() and (frame["jac_fro"] > 0).all()
    assert (frame["jac_batch"] == (sub_batch or 8)).all()


def test_sub_batch_columns_are_the_jacobians_of_the_first_samples():
    # BatchNorm in training mode: the sub-batch Jacobian couples the k samples through their
    # own batch statistics, exactly as a forward pass on x[:k] would.
    net = make("res_cnn", inplace=True)
    x = make_input("res_cnn", batch=9)
    opts = {"sub_batch": 3, "spec": True, "power_iters": 30, "tol": 1e-3, "prod_spec": "each"}
    twin = copy.deepcopy(net)
    with gradprobe.attach(twin, jacobian=True, probes=256, jacobian_options=opts) as probe:
        twin(x).pow(2).sum().backward()
    frame = probe.frame().set_index("block")
    _, caps = capture_blocks(copy.deepcopy(net), (x[:3],))
    exact = exact_columns(caps)
    assert (frame["jac_batch"] == 3).all()
    _assert_close_to_exact(frame, exact)


def test_sub_batch_is_skipped_when_the_batch_is_not_larger():
    net = make("res_mlp")
    with gradprobe.attach(net, jacobian=True, jacobian_options={"sub_batch": 5}) as probe:
        net(make_input("res_mlp", batch=5)).pow(2).sum().backward()
    assert (probe.frame()["jac_batch"] == 5).all()


class _Log:
    """A stateful object passed into the forward call, as a key/value cache is."""

    def __init__(self):
        self.calls = 0


class _LoggingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = make("res_mlp")

    def forward(self, x, log=None):
        if log is not None:
            log.calls += 1
        return self.blocks(x)


def test_a_call_carrying_a_stateful_object_uses_the_training_graph_and_leaves_it_alone():
    net = _LoggingNet()
    log = _Log()
    with gradprobe.attach(net, jacobian=True, jacobian_options={"sub_batch": 2}) as probe:
        net(make_input("res_mlp", batch=6), log=log).pow(2).sum().backward()
    assert log.calls == 1  # not re-run
    f = probe.frame()
    assert (f["jac_batch"] == 6).all() and f["jac_fro"].notna().all()


class _FixedBatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = make("res_mlp")

    def forward(self, x):
        if x.shape[0] != 6:
            raise ValueError("this model only takes batches of 6")
        return self.blocks(x)


def test_failed_sub_batch_pass_falls_back_to_the_training_graph_with_one_warning():
    net = _FixedBatchNet()
    opts = {"sub_batch": 2}
    warns = pytest.warns(RuntimeWarning, match="sub-batch forward pass .* only takes batches of 6")
    with warns as record, gradprobe.attach(net, jacobian=True, jacobian_options=opts) as probe:
        for _ in range(3):
            net(make_input("res_mlp", batch=6)).pow(2).sum().backward()
    assert sum("sub-batch" in str(w.message) for w in record) == 1
    f = probe.frame()
    assert len(f) == 12 and (f["jac_batch"] == 6).all() and f["jac_fro"].notna().all()
    strict = gradprobe.attach(net, jacobian=True, strict=True, jacobian_options=opts)
    with strict, pytest.raises(ValueError, match="only takes batches of 6"):
        net(make_input("res_mlp", batch=6))


@pytest.mark.parametrize(
    ("key", "bad"),
    [("sub_batch", b) for b in (0, -1, 2.5, True, "32")] + [("spec", b) for b in (0, -1, 2.5, "20")],
)
def test_bad_sub_batch_or_spec_schedule_is_rejected_at_attach(key, bad, no_leaks):
    net = no_leaks(make("res_mlp"))
    with pytest.raises(ValueError, match=key):
        gradprobe.attach(net, jacobian=True, jacobian_options={key: bad})


def test_misspelt_jacobian_option_is_rejected_at_attach(no_leaks):
    net = no_leaks(make("res_mlp"))
    message = r"unknown jacobian_options \['sub_bacth'\]; the options are .*sub_batch"
    with pytest.raises(ValueError, match=message):
        gradprobe.attach(net, jacobian=True, jacobian_options={"sub_bacth": 8})
    with pytest.raises(ValueError, match="unknown jacobian_options"):
        gradprobe.analyze(net, make_input("res_mlp"), power_iter=3)


def test_jac_batch_is_nan_on_steps_without_jacobian_columns():
    net = make("res_mlp")
    with gradprobe.attach(net, jacobian=2) as probe:
        for _ in range(2):
            net(make_input("res_mlp")).pow(2).sum().backward()
    f = probe.frame()
    assert f.loc[f["step"] == 0, "jac_batch"].eq(5).all()
    assert f.loc[f["step"] == 1, "jac_batch"].isna().all()


def test_saved_run_keeps_jac_batch_and_the_jacobian_settings(tmp_path):
    net = make("res_mlp")
    with gradprobe.attach(net, jacobian=True, jacobian_options={"sub_batch": 2}) as probe:
        net(make_input("res_mlp", batch=6)).pow(2).sum().backward()
    probe.save(tmp_path / "run")
    run = gradprobe.load(tmp_path / "run")
    assert (run.frame()["jac_batch"] == 2).all()
    opts = run.meta["jacobian_options"]
    assert opts["sub_batch"] == 2 and opts["spec"] == 20 and opts["prod_spec"] == "shared"
