"""Signal propagation columns (Brock et al. 2021): chan_mean_sq, chan_var, branch_var."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nets import ResMLPBlock, make, make_input
from torch import nn

import gradprobe
from gradprobe import metrics


def numpy_signal(y: np.ndarray, r: np.ndarray | None, axis: int) -> dict[str, float]:
    """The three columns computed directly: channels on ``axis``, population variance."""
    yc = np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)
    out = {"chan_mean_sq": float((yc.mean(1) ** 2).mean()), "chan_var": float(yc.var(1, ddof=0).mean())}
    if r is None:
        out["branch_var"] = math.nan
    else:
        d = np.moveaxis(y - r, axis, 0).reshape(y.shape[axis], -1)
        out["branch_var"] = float(d.var(1, ddof=0).mean())
    return out


def record_outputs(model, x, names, shortcuts=()):
    """(input, output, shortcut output) of each named block from a plain forward pass."""
    seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    modules = dict(model.named_modules())
    handles = []
    for n in names:
        handles.append(modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].update(x=a[0], y=o)))
    for n in shortcuts:
        handles.append(modules[n].shortcut.register_forward_hook(lambda m, a, o, n=n: seen[n].update(s=o)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def check_against_numpy(frame, seen, axis):
    for name, got in seen.items():
        y = got["y"].numpy()
        ref = got.get("s", got["x"])
        r = ref.numpy() if ref.shape == got["y"].shape else None
        expected = numpy_signal(y, r, axis)
        row = frame.set_index("block").loc[name]
        for column, value in expected.items():
            if math.isnan(value):
                assert math.isnan(row[column]), (name, column)
            else:
                assert row[column] == pytest.approx(value, rel=1e-10, abs=1e-14), (name, column)


def test_conv_outputs_use_dim_one_and_the_shortcut():
    model = make("res_cnn").train()
    x = make_input("res_cnn", batch=6)
    frame = gradprobe.analyze(model, x, jacobian=False)
    names = ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    check_against_numpy(frame, record_outputs(model, x, names, shortcuts=["layer2.0"]), axis=1)


def test_plain_shape_change_has_no_branch_var():
    model = make("plain_cnn").train()
    frame = gradprobe.analyze(model, make_input("plain_cnn"), jacobian=False).set_index("block")
    assert math.isnan(frame.loc["layer2.0", "branch_var"])
    assert frame.loc["layer2.0", "chan_var"] > 0


class Tokens(nn.Module):
    """(N, T, C) activations: channels on the last dim."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[ResMLPBlock(6) for _ in range(3)])

    def forward(self, x):
        return self.blocks(x)


def test_token_outputs_use_the_last_dim():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Tokens().double()
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.3
    frame = gradprobe.analyze(model, x, jacobian=False)
    names = ["blocks.0", "blocks.1", "blocks.2"]
    check_against_numpy(frame, record_outputs(model, x, names), axis=2)


def test_channel_dim_overrides_the_rule():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Tokens().double()
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    frame = gradprobe.analyze(model, x, jacobian=False, channel_dim=1)
    names = ["blocks.0", "blocks.1", "blocks.2"]
    check_against_numpy(frame, record_outputs(model, x, names), axis=1)
    with pytest.raises(ValueError, match="channel_dim"):
        gradprobe.attach(model, channel_dim="last")


def test_mlp_outputs_and_large_means_do_not_cancel():
    model = make("res_mlp").train()
    x = make_input("res_mlp") * 1e-3 + 1e4  # tiny variance around a huge mean
    frame = gradprobe.analyze(model, x, jacobian=False)
    names = [f"{i}" for i in range(4)]
    check_against_numpy(frame, record_outputs(model, x, names), axis=1)


class Shared(nn.Module):
    """One block called twice: its row pools both calls."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ResMLPBlock(6)])

    def forward(self, x):
        return self.blocks[0](self.blocks[0](x) * 3 + 1)


def test_two_calls_pool_to_the_moments_of_the_concatenation():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Shared().double()
    x = make_input("res_mlp", batch=7)
    frame = gradprobe.analyze(model, x, jacobian=False)
    with torch.no_grad():
        y1 = model.blocks[0](x)
        x2 = y1 * 3 + 1
        y2 = model.blocks[0](x2)
    ys = torch.cat([y1, y2]).numpy()
    rs = torch.cat([x, x2]).numpy()
    (row,) = frame.to_dict("records")
    assert row["calls"] == 2
    for column, value in numpy_signal(ys, rs, axis=1).items():
        assert row[column] == pytest.approx(value, rel=1e-10)


def test_pool_moments_is_chan_parallel_formula():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 3)) + 7, rng.standard_normal((9, 3)) - 2
    parts = [metrics.signal_stats(torch.from_numpy(t), None).reshape(-1).tolist() for t in (a, b)]
    pooled = metrics.pool_moments(parts)
    whole = np.concatenate([a, b])
    np.testing.assert_allclose(pooled[0, 1], whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pooled[0, 2] / pooled[0, 0], whole.var(0), rtol=1e-12)
    assert metrics.pool_moments([parts[0], parts[0][:6]]) is None


# ---------------------------------------------------------------------- fidelity
class PreActBlock(nn.Module):
    """x + F(x), F = BatchNorm, ReLU, Linear, BatchNorm, ReLU, Linear (De and Smith 2020)."""

    def __init__(self, width: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.f = nn.Sequential(
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
        )

    def forward(self, x):
        return x + self.f(x) if self.residual else self.f(x)


def stage(residual: bool, seed: int, depth: int = 32, width: int = 256) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(*[PreActBlock(width, residual) for _ in range(depth)])
        for m in net.modules():
            if isinstance(m, nn.Linear):  # He (Kaiming) fan-in initialisation, zero bias
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return net


def slopes(frame):
    depth = frame["index"].to_numpy()
    total = frame["chan_var"] + frame["chan_mean_sq"]
    fit = {k: np.polyfit(depth, v, 1)[0] for k, v in (("sum", total), ("var", frame["chan_var"]))}
    fit["mean_sq"] = np.polyfit(depth, frame["chan_mean_sq"], 1)[0]
    return fit


@pytest.mark.parametrize("seed", [0])
def test_fidelity_preactivation_stage_grows_linearly(seed):
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(seed + 100))
    frame = gradprobe.analyze(stage(True, seed).train(), x, jacobian=False).sort_values("index")
    fit = slopes(frame)
    assert fit["sum"] == pytest.approx(1.0, rel=0.10)
    assert fit["var"] == pytest.approx(1 - 1 / math.pi, rel=0.10)
    assert fit["mean_sq"] == pytest.approx(1 / math.pi, rel=0.30)
    plain = gradprobe.analyze(stage(False, seed).train(), x, jacobian=False).sort_values("index")
    assert all(abs(v) < 0.05 for v in slopes(plain).values())


# ---------------------------------------------------------------------- plot
def test_signal_propagation_plot_draws_three_panels_per_model():
    import pandas as pd

    from gradprobe.plot import plot_signal_propagation

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    frames = [
        gradprobe.analyze(stage(res, 0, depth=6, width=32), x, jacobian=False).assign(model=name)
        for name, res in (("plain", False), ("residual", True))
    ]
    ax = plot_signal_propagation(pd.concat(frames))
    axes = ax.figure.axes
    assert [a.get_title() for a in axes[:3]] == ["average squared channel mean", "average channel variance",
                                                 "residual branch variance"]  # fmt: skip
    assert all(len(a.get_lines()) == 2 for a in axes[:3])
    ydata = axes[1].get_lines()[1].get_ydata()
    np.testing.assert_allclose(ydata, frames[1].sort_values("index")["chan_var"])
    with pytest.raises(ValueError, match="chan_var"):
        plot_signal_propagation(frames[0].drop(columns="chan_var"))
    with pytest.raises(ValueError, match="hue"):
        plot_signal_propagation(frames[0], hue="nope")
