"""Path-length decomposition: exactness against autograd, closed forms and brute-force enumeration."""

from __future__ import annotations

import copy
import importlib
import itertools
import math

import numpy as np
import pytest
import torch
from nets import ResMLPBlock, make, make_input
from torch import nn

import gradprobe
from gradprobe.blocks import select_blocks, shortcut_modules
from gradprobe.capture import capturing

paths_module = importlib.import_module("gradprobe.path_lengths")


class Scale(nn.Module):
    """y = x + a x."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.dummy = nn.Parameter(torch.zeros(()))  # a parameter, so the auto rule selects the blocks

    def forward(self, x):
        return x + self.a * x + 0 * self.dummy


class LinearRes(nn.Module):
    """y = x + x W^T with a fixed random matrix."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return x + x @ self.w.T


def coefficients(model, x, loss_fn, blocks="auto", max_length=None):
    """c_0..c_m of the first stack (tensors), straight from the decomposition's internals."""
    named = select_blocks(model, blocks)
    sc = shortcut_modules(named)
    extra = [(n + paths_module._SHORTCUT, m) for n, m in sc.items()]
    with torch.enable_grad(), capturing(lambda: model(x), [*named, *extra]) as (out, got):
        caps = [c for c in got if not c.name.endswith(paths_module._SHORTCUT)]
        scs = {
            c.name[: -len(paths_module._SHORTCUT)]: c for c in got if c.name.endswith(paths_module._SHORTCUT)
        }
        stack = paths_module.group_stacks(caps)[0]
        (g,) = torch.autograd.grad(loss_fn(out), [stack[-1].output], retain_graph=True)
        shortcut_of = lambda cap: scs.get(cap.name)  # noqa: E731
        coeffs, branching, still, _ = paths_module._propagate(stack, g, shortcut_of, max_length, [True])
    return [c.detach() for c in coeffs], g.detach(), branching, still


def reference_input_grad(model, x, loss_fn, first_block):
    """dL/d(input of first_block) by a plain backward pass on a copy of the model."""
    net = copy.deepcopy(model)
    seen = {}

    def pre(module, args):
        t = args[0]
        if not t.requires_grad:
            t = t.detach().requires_grad_(True)
        t.retain_grad()
        seen["x"] = t
        return (t, *args[1:])

    dict(net.named_modules())[first_block].register_forward_pre_hook(pre)
    loss_fn(net(x)).backward()
    return seen["x"].grad


def projection(seed=3):
    def loss(out):
        g = torch.Generator().manual_seed(seed)
        return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()

    return loss


def rel(a, b):
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["res_cnn", "plain_cnn", "res_mlp"])
def test_sum_of_coefficients_is_the_autograd_gradient_float64(kind):
    model = make(kind).train()  # BatchNorm in train mode: batch statistics couple the samples
    x = make_input(kind, batch=6)
    loss = projection()
    coeffs, _, branching, still = coefficients(model, x, loss)
    first = select_blocks(model)[0][0]
    ref = reference_input_grad(model, x, loss, first)
    assert rel(torch.stack(coeffs).sum(0), ref) < 1e-10
    assert len(coeffs) == branching + 1
    if kind == "plain_cnn":
        assert still == ["layer2.0"]  # shape-changing, no shortcut: does not branch
    else:
        assert still == []


def test_sum_of_coefficients_float32_batchnorm_train():
    model = make("res_cnn", dtype=torch.float32).train()
    x = make_input("res_cnn", batch=8, dtype=torch.float32)
    loss = projection()
    coeffs, _, _, _ = coefficients(model, x, loss)
    ref = reference_input_grad(model, x, loss, "layer1.0")
    assert rel(torch.stack(coeffs).sum(0), ref) < 1e-4


def test_frame_reports_the_sum_check_and_the_norms():
    model = make("res_cnn").train()
    x = make_input("res_cnn", batch=6)
    frame = gradprobe.paths(model, x, loss_fn=projection())
    coeffs, _, branching, _ = coefficients(model, x, projection())
    assert frame["length"].tolist() == list(range(branching + 1))
    norms = [float(torch.linalg.vector_norm(c)) for c in coeffs]
    np.testing.assert_allclose(frame["path_grad"], norms, rtol=1e-12)
    np.testing.assert_allclose(frame["share"], np.array(norms) / sum(norms), rtol=1e-12)
    np.testing.assert_allclose(frame["cum_share"], np.cumsum(norms) / sum(norms), rtol=1e-12)
    assert frame["n_paths"].tolist() == [float(math.comb(branching, k)) for k in range(branching + 1)]
    np.testing.assert_allclose(frame["per_path"], frame["path_grad"] / frame["n_paths"])
    (info,) = frame.attrs["stacks"]
    assert info["remainder"] / info["grad_norm"] < 1e-10
    assert info["blocks"] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    eff = float((frame["length"] * frame["share"]).sum())
    assert frame.attrs["effective_length"] == pytest.approx(eff)
    assert gradprobe.paths_summary(frame)["effective_length"].iloc[0] == pytest.approx(eff)


@pytest.mark.parametrize("a", [0.3, -0.7])
def test_scaled_identity_chain_is_binomial(a):
    depth = 7
    model = nn.Sequential(*[Scale(a) for _ in range(depth)]).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    frame = gradprobe.paths(model, x, seed=2)
    coeffs, g, _, _ = coefficients(model, x, lambda out: paths_module.projection_loss(out, 2))
    g_norm = float(torch.linalg.vector_norm(g))
    expected = [math.comb(depth, k) * abs(a) ** k * g_norm for k in range(depth + 1)]
    np.testing.assert_allclose(frame["path_grad"], expected, rtol=1e-12)
    for k, c in enumerate(coeffs):
        torch.testing.assert_close(c, math.comb(depth, k) * a**k * g, rtol=1e-12, atol=0)


def test_zero_initialised_branches_carry_nothing():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*[ResMLPBlock(6, zero_init=True) for _ in range(5)]).double()
    x = make_input("res_mlp")
    coeffs, g, _, _ = coefficients(model, x, projection())
    torch.testing.assert_close(coeffs[0], g, rtol=0, atol=0)
    assert all(bool((c == 0).all()) for c in coeffs[1:])
    frame = gradprobe.paths(model, x)
    assert frame["share"].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert frame.attrs["effective_length"] == 0.0


@pytest.mark.parametrize("depth", [1, 4, 10])
def test_linear_blocks_match_brute_force_enumeration(depth):
    rng = np.random.default_rng(depth)
    width, batch = 5, 3
    ws = [rng.standard_normal((width, width)) * 0.4 for _ in range(depth)]
    model = nn.Sequential(*[LinearRes(torch.from_numpy(w)) for w in ws])
    x = torch.from_numpy(rng.standard_normal((batch, width)))
    # blocks named by class: one parameter-only block is no run, so 'auto' selects nothing at depth 1
    coeffs, g, _, _ = coefficients(model, x, projection(), blocks=LinearRes)
    g_np = g.numpy()
    # Independently: every subset of blocks is a path; its gradient is g times the branch
    # matrices of the subset, last block first (y = x + x W^T, so d/dx^T g = g + g W).
    brute = [np.zeros_like(g_np) for _ in range(depth + 1)]
    for mask in itertools.product([False, True], repeat=depth):
        v = g_np
        for i in reversed(range(depth)):
            if mask[i]:
                v = v @ ws[i]
        brute[sum(mask)] += v
    assert len(coeffs) == depth + 1
    for c, b in zip(coeffs, brute, strict=True):
        np.testing.assert_allclose(c.numpy(), b, rtol=1e-10, atol=1e-12 * np.abs(g_np).max())


# ---------------------------------------------------------------------- options and structure
def test_max_length_truncates_and_reports_the_remainder():
    model = make("res_mlp").train()
    x = make_input("res_mlp")
    full = gradprobe.paths(model, x)
    coeffs, _, _, _ = coefficients(model, x, lambda out: paths_module.projection_loss(out, 0))
    cut = gradprobe.paths(model, x, max_length=1)
    assert cut["length"].tolist() == [0, 1]
    np.testing.assert_allclose(cut["path_grad"], full["path_grad"][:2], rtol=1e-12)
    (info,) = cut.attrs["stacks"]
    dropped = float(torch.linalg.vector_norm(torch.stack(coeffs[2:]).sum(0)))
    assert info["remainder"] == pytest.approx(dropped, rel=1e-9)
    assert cut["n_paths"].tolist() == [1.0, 4.0]
    assert gradprobe.paths_summary(cut)["branching"].iloc[0] == 4.0
    with pytest.raises(ValueError, match="max_length"):
        gradprobe.paths(model, x, max_length=-1)


def test_batched_and_one_by_one_vjps_agree(monkeypatch):
    model = make("res_cnn").train()
    x = make_input("res_cnn")
    monkeypatch.setattr(paths_module, "BATCH_VJPS", 3)  # chunks of 3: full and partial calls
    batched = gradprobe.paths(model, x)
    monkeypatch.setattr(paths_module, "BATCH_VJPS", 1)
    single = gradprobe.paths(model, x)
    np.testing.assert_allclose(batched["path_grad"], single["path_grad"], rtol=1e-12)


class TwoStacks(nn.Module):
    """Two independent chains, like an encoder and a decoder: the second starts from its own input."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(*[ResMLPBlock(6) for _ in range(3)])
        self.dec = nn.Sequential(*[ResMLPBlock(6) for _ in range(2)])
        self.mid = nn.Linear(6, 6)

    def forward(self, x):
        h = self.enc(x)
        return self.dec(torch.tanh(self.mid(x))) + h.mean()


def test_independent_chains_are_separate_stacks():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TwoStacks().double()
    frame = gradprobe.paths(model, make_input("res_mlp"))
    assert frame.groupby("stack", sort=False)["length"].max().tolist() == [3, 2]
    assert frame["stack"].unique().tolist() == ["enc", "dec"]  # named as in the probe's frame
    assert [s["blocks"] for s in frame.attrs["stacks"]] == [
        ["enc.0", "enc.1", "enc.2"],
        ["dec.0", "dec.1"],
    ]
    assert all(s["remainder"] / s["grad_norm"] < 1e-10 for s in frame.attrs["stacks"])
    assert frame.attrs["effective_length"] == frame.attrs["stacks"][0]["effective_length"]


class Between(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ResMLPBlock(6) for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x)) * 1.5  # something between the blocks
        return x


def test_ops_between_blocks_are_applied_to_every_path():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Between().double()
    x = make_input("res_mlp")
    loss = projection()
    coeffs, _, _, _ = coefficients(model, x, loss)
    ref = reference_input_grad(model, x, loss, "blocks.0")
    assert rel(torch.stack(coeffs).sum(0), ref) < 1e-10
    assert len(coeffs) == 4


def test_model_is_left_untouched():
    model = make("res_cnn").train()
    x = make_input("res_cnn")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    gradprobe.paths(model, x)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())  # BN buffers too
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    gradprobe.paths(model, x)
    assert not model.training


def test_no_hooks_left(no_leaks):
    model = no_leaks(make("res_cnn"))
    gradprobe.paths(model, make_input("res_cnn"))


def test_bad_loss_is_named():
    model = make("res_mlp")
    with pytest.raises(TypeError, match="scalar"):
        gradprobe.paths(model, make_input("res_mlp"), loss_fn=lambda out: out)


def test_summary_of_several_steps_and_models():
    import pandas as pd

    f = pd.DataFrame(
        {
            "model": ["a"] * 4 + ["b"] * 2,
            "step": [0, 0, 5, 5, 0, 0],
            "stack": 0,
            "length": [0, 1, 0, 1, 0, 1],
            "share": [0.9, 0.1, 0.2, 0.8, 0.5, 0.5],
            "n_paths": [1.0, 1.0] * 3,
        }
    )
    s = gradprobe.paths_summary(f)
    assert s[["model", "step"]].values.tolist() == [["a", 0], ["a", 5], ["b", 0]]
    np.testing.assert_allclose(s["effective_length"], [0.1, 0.8, 0.5])


def test_shortcut_block_splits_into_shortcut_and_the_rest():
    from nets import BasicBlock

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(BasicBlock(3, 6, stride=2)).double().train()
    x = make_input("res_cnn")
    coeffs, g, branching, still = coefficients(model, x, projection(), blocks=["0"])
    assert (branching, still, len(coeffs)) == (1, [], 2)
    # Independently: the skip path is the shortcut module's Jacobian, the branch the rest.
    xr = x.clone().requires_grad_(True)
    (skip,) = torch.autograd.grad(model[0].shortcut(xr), xr, g)
    xr = x.clone().requires_grad_(True)
    (whole,) = torch.autograd.grad(model[0](xr), xr, g)
    torch.testing.assert_close(coeffs[0], skip, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(coeffs[1], whole - skip, rtol=1e-10, atol=1e-14)


def test_paths_stays_callable_after_the_submodule_is_imported():
    assert callable(gradprobe.paths) and callable(gradprobe.paths_summary)
    import subprocess
    import sys

    code = "import gradprobe.path_lengths, gradprobe as g; print(callable(g.paths), g.paths.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True gradprobe.analysis"
    assert not isinstance(gradprobe.paths, type(gradprobe))  # a function, no module swap


def test_path_length_plot_has_a_line_per_step_and_the_binomial_reference():
    import pandas as pd

    from gradprobe.plot import plot_path_lengths

    model = make("res_mlp")
    x = make_input("res_mlp")
    frame = pd.concat([gradprobe.paths(model, x).assign(step=s) for s in (0, 7)])
    ax = plot_path_lengths(frame)
    lines = ax.get_lines()
    assert [line.get_linestyle() for line in lines] == ["--", "-", ":"]  # the reference is dotted
    np.testing.assert_allclose(lines[2].get_ydata(), [math.comb(4, k) / 16 for k in range(5)])
    np.testing.assert_allclose(lines[1].get_ydata(), frame[frame["step"] == 7]["share"])


# ---------------------------------------------------------------------- during training
def train(model, batches, kind="res_cnn", **attach_kwargs):
    """SGD steps on the batches; returns (losses, probe or None, copies of the model before each step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = gradprobe.attach(model, **attach_kwargs) if attach_kwargs else None
    losses, before = [], []
    for x in batches:
        snapshot = make(kind)  # a fresh twin, not a deepcopy, which would copy the probe's hooks too
        snapshot.load_state_dict(model.state_dict())
        before.append(snapshot)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if probe is not None:
        probe.detach()
    return losses, probe, before


def test_attach_paths_records_the_sub_batch_decomposition_every_nth_step(tmp_path):
    batches = [make_input("res_cnn", seed=s, batch=6) for s in range(5)]
    options = {"paths_sub_batch": 4, "seed": 3}
    losses, probe, before = train(make("res_cnn"), batches, paths=2, jacobian_options=options)
    frame = probe.paths_frame()
    assert sorted(frame["step"].unique().tolist()) == [0, 2, 4]
    for step in (0, 2, 4):
        expected = gradprobe.paths(before[step], batches[step][:4], seed=3)
        got = frame[frame["step"] == step].drop(columns="step").reset_index(drop=True)
        np.testing.assert_allclose(got["path_grad"], expected["path_grad"], rtol=1e-10)
        assert got["n_paths"].tolist() == expected["n_paths"].tolist()
    # observational: the same losses and weights as without the probe
    bare_losses, _, _ = train(make("res_cnn"), batches)
    assert losses == bare_losses
    # saved with the run and read back
    run = gradprobe.load(probe.save(tmp_path / "run"))
    assert (tmp_path / "run" / "paths.parquet").exists()
    loaded = run.paths()
    assert list(loaded.columns) == list(frame.columns)
    np.testing.assert_array_equal(loaded.to_numpy(), frame.to_numpy())
    assert run.meta["paths"] == 2


def test_paths_stacks_are_named_as_in_the_probe_frame(tmp_path):
    """Regression (issue 14): the paths table's ``stack`` held 0, 1, ... while the frame held names."""
    batches = [make_input("res_cnn", seed=s, batch=6) for s in range(2)]
    _, probe, _ = train(make("res_cnn"), batches, paths=1, jacobian_options={"paths_sub_batch": 4})
    table, frame = probe.paths_frame(), probe.frame()
    assert len(table) and set(table["stack"]) <= set(frame["stack"])
    assert all(isinstance(name, str) for name in table["stack"])
    one_shot = gradprobe.paths(make("res_cnn"), batches[0])
    assert set(one_shot["stack"]) == set(table["stack"])
    loaded = gradprobe.load(probe.save(tmp_path / "run")).paths()
    assert loaded["stack"].tolist() == table["stack"].tolist()


def test_attach_paths_with_a_sink_and_without_paths(tmp_path):
    batches = [make_input("res_mlp", seed=s, batch=4) for s in range(3)]
    model = make("res_mlp")
    _, probe, _ = train(model, batches, "res_mlp", paths=True, sink=tmp_path / "sink")
    streamed = gradprobe.load(tmp_path / "sink").paths()
    assert sorted(streamed["step"].unique().tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(streamed.to_numpy(), probe.paths_frame().to_numpy())
    _, plain, _ = train(make("res_mlp"), batches, "res_mlp", every=1)
    assert len(plain.paths_frame()) == 0 and list(plain.paths_frame().columns)[:2] == ["step", "stack"]
    assert len(gradprobe.load(plain.save(tmp_path / "plain")).paths()) == 0
    with pytest.raises(ValueError, match="paths="):
        gradprobe.attach(model, paths=0)


def test_attach_paths_leaves_no_hooks(no_leaks):
    model = no_leaks(make("res_mlp"))
    train(model, [make_input("res_mlp")], "res_mlp", paths=1)


def test_paths_while_a_probe_is_attached_records_no_step():
    model = make("res_mlp")
    with gradprobe.attach(model) as probe:
        gradprobe.paths(model, make_input("res_mlp"))
        assert probe.current_step == 0
    assert len(probe.frame()) == 0


# ---------------------------------------------------------------------- compare, report, CLI
@pytest.fixture(scope="module")
def compared():
    from gradprobe.experiment import compare

    return compare(["plain-mlp-5", "resnet-mlp-5"], "synthetic", epochs=2, progress=False, width=16)


def test_compare_records_paths_at_both_ends_and_summarises_them(compared):
    from gradprobe.experiment import summary

    table = compared.paths()
    steps = compared.frame().groupby("model")["step"].agg(["min", "max"])
    for model in compared.models:
        got = sorted(table[table["model"] == model]["step"].unique().tolist())
        assert got == [int(steps.loc[model, "min"]), int(steps.loc[model, "max"])]
    resnet = table[table["model"] == "resnet-mlp-5"]
    first = resnet[resnet["step"] == resnet["step"].min()]
    # zero-initialised residual branches: at initialisation the gradient takes the skips only
    assert first["share"].tolist()[0] == 1.0
    s = summary(compared).set_index("model")
    assert s.loc["resnet-mlp-5", "effective_length_init"] == 0.0
    assert s.loc["resnet-mlp-5", "effective_length_end"] > 0.0
    assert compared.meta["paths"] is True


def test_report_draws_the_path_and_signal_figures_and_keeps_the_table(compared, tmp_path):
    compared.save(tmp_path)
    gradprobe.report(tmp_path, progress=False)
    assert (tmp_path / "paths.png").exists() and (tmp_path / "signal.png").exists()
    back = gradprobe.load(tmp_path).paths()
    np.testing.assert_array_equal(back["share"].to_numpy(), compared.paths()["share"].to_numpy())


def test_cli_no_paths(tmp_path):
    import contextlib
    import io

    from gradprobe.cli import main
    from gradprobe.experiment import summary

    args = ["compare", "--families", "mlp", "--depths", "4", "--epochs", "1", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        code = main([*args, "--no-report", "--no-progress", "--width", "8", "--no-paths"])
    assert code == 0
    run = gradprobe.load(tmp_path)
    assert len(run.paths()) == 0 and not (tmp_path / "paths.parquet").exists()
    assert summary(run)["effective_length_end"].isna().all()
    assert "effective_length_end" in out.getvalue()


def test_hugging_face_encoder_decoder_gives_two_exact_stacks():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8, vocab_size=64
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t5 = transformers.T5ForConditionalGeneration(cfg).train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    frame = gradprobe.paths(t5, (ids, None, ids))  # input_ids, attention_mask, decoder_input_ids
    stacks = frame.attrs["stacks"]
    assert [s["blocks"] for s in stacks] == [
        ["encoder.block.0", "encoder.block.1"],
        ["decoder.block.0", "decoder.block.1"],
    ]
    assert all(s["remainder"] / s["grad_norm"] < 1e-5 for s in stacks)  # float32


class _ItemInBackward(torch.autograd.Function):
    """2x, with a backward that calls .item(): vmap (is_grads_batched) cannot run it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return g * (2.0 + 0.0 * g.sum().item())


class ItemBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x + self.fc(_ItemInBackward.apply(x))


def test_batched_vjps_fall_back_to_one_per_call(monkeypatch):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*[ItemBlock() for _ in range(4)]).double()
    x = make_input("res_mlp")
    single = gradprobe.paths(model, x)
    monkeypatch.setattr(paths_module, "BATCH_VJPS", 8)
    fallen = gradprobe.paths(model, x)
    np.testing.assert_allclose(fallen["path_grad"], single["path_grad"], rtol=1e-12)
    assert fallen.attrs["stacks"][0]["remainder"] / fallen.attrs["stacks"][0]["grad_norm"] < 1e-10


class PostReLU(nn.Module):
    """y = relu(x + F(x)) with a zero-initialised F: the ReLU's mask makes F' = H' - I nonzero."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return torch.relu(x + self.fc(x))


def test_massive_cancellation_is_reported_not_hidden():
    x = torch.relu(make_input("res_mlp", dtype=torch.float32))  # entries exactly 0: masked by the ReLU
    model = nn.Sequential(*[PostReLU() for _ in range(40)])
    with pytest.warns(RuntimeWarning, match="cancel"):
        frame = gradprobe.paths(model, x)
    (info,) = frame.attrs["stacks"]
    assert info["cancellation"] > 1e6 and info["remainder"] > 1e-3 * info["grad_norm"]
    # the binomial shares are still right: c_k = C(40, k) (-1)^k g on the masked entries
    assert frame.attrs["effective_length"] == pytest.approx(20.0, rel=1e-3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = gradprobe.paths(model.double(), x.double())
    assert exact.attrs["stacks"][0]["remainder"] < 1e-3 * exact.attrs["stacks"][0]["grad_norm"]
