"""gradprobe.lesion: block deletions against closed forms, the frame, the model left untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradprobe
from gradprobe.lesions import LESION_COLUMNS, lesion
from gradprobe.models import mlp, preact_resnet_cifar
from gradprobe.summary import lesion_records, lesion_table


class LinearResidual(nn.Module):
    """``y = x + W x``: a residual block whose lesion has a closed form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


def _data(n: int = 32, d: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, d, (n,), generator=g)


def test_two_block_linear_residual_net_matches_its_closed_form_in_float64():
    g = torch.Generator().manual_seed(1)
    w1, w2 = (0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    net = nn.Sequential(LinearResidual(w1), LinearResidual(w2)).double()
    x, y = _data(dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)

    def ce(matrix: torch.Tensor) -> float:
        return float(F.cross_entropy(x @ matrix.T, y))

    frame = lesion(net, (x, y), k=2, samples=4)
    by = frame.set_index(["kind", "k", "block"], drop=False)
    full = (eye + w2) @ (eye + w1)
    assert frame.loc[frame["kind"] == "none", "loss"].item() == pytest.approx(ce(full), rel=1e-12)
    single = frame[frame["kind"] == "single"].set_index("block")["loss"]
    assert single["0"] == pytest.approx(ce(eye + w2), rel=1e-12)  # block 1 deleted: (I + W2) x
    assert single["1"] == pytest.approx(ce(eye + w1), rel=1e-12)
    # k=1: both subsets enumerated (2 <= samples); k=2: the one subset, both deleted: y = x
    random = frame[frame["kind"] == "random"].set_index("k")
    assert random.loc[1, "loss"] == pytest.approx((ce(eye + w2) + ce(eye + w1)) / 2, rel=1e-12)
    assert random.loc[1, "loss_std"] == pytest.approx(abs(ce(eye + w2) - ce(eye + w1)) / 2, rel=1e-9)
    assert random.loc[2, "loss"] == pytest.approx(ce(eye), rel=1e-12)
    assert random.loc[[1, 2], "samples"].tolist() == [2, 1]
    assert len(by) == 5


def test_identity_blocks_change_nothing_whatever_is_deleted():
    net = mlp(7, in_features=4, num_classes=4, width=8, zero_init_residual=True)
    x, y = _data()
    frame = lesion(net, (x, y), k=5, samples=3)
    base = frame.loc[frame["kind"] == "none", "loss"].item()
    assert np.isfinite(base)
    single = frame["kind"] == "single"
    assert (frame.loc[single, "loss"] == base).all()  # bit-equal: each block is exactly the identity
    assert (frame["acc"] == frame["acc"].iloc[0]).all()
    # a mean of equal numbers may differ in the last bit
    np.testing.assert_allclose(frame.loc[~single, "loss"], base, rtol=1e-14)
    assert (frame.loc[frame["kind"] == "random", "loss_std"] < 1e-14).all()
    assert frame["removable"].all()


def test_frame_shape_columns_and_attrs():
    net = preact_resnet_cifar(14, in_channels=1, num_classes=3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(10, 1, 8, 8)
    y = torch.randint(0, 3, (10,))
    frame = lesion(net, (x, y), k=3, samples=2, batch_size=4)
    assert list(frame.columns) == [*LESION_COLUMNS, "loss", "loss_std", "acc", "acc_std"]
    assert frame["kind"].tolist() == ["none"] + ["single"] * 6 + ["random"] * 3
    assert frame["k"].tolist() == [0] + [1] * 6 + [1, 2, 3]
    single = frame[frame["kind"] == "single"]
    assert single["downsampling"].tolist() == [False, False, True, False, True, False]
    assert single["block"].tolist() == [
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
        "layer3.0",
        "layer3.1",
    ]
    assert single["position"].tolist() == list(range(6))
    assert frame.loc[frame["kind"] == "random", "samples"].tolist() == [2, 2, 2]
    assert frame.attrs["blocks"] == single["block"].tolist()
    assert frame.attrs["not_removable"] == [] and frame.attrs["n"] == 10
    assert frame.attrs["baseline"]["loss"] == frame["loss"].iloc[0]
    # batching does not change the numbers
    whole = lesion(net, (x, y), k=3, samples=2)
    np.testing.assert_allclose(whole["loss"], frame["loss"], rtol=1e-5)
    # same seed, same subsets; the stored form reads back equal
    import pandas.testing as pdt

    pdt.assert_frame_equal(lesion_table(lesion_records(frame)), frame)


def test_plain_nets_shape_changing_block_is_not_removable():
    net = preact_resnet_cifar(8, residual=False, in_channels=1, num_classes=3)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    frame = gradprobe.lesion(net, (x, y), k=3, samples=2)
    single = frame[frame["kind"] == "single"].set_index("block")
    assert single["removable"].to_dict() == {"layer1.0": True, "layer2.0": False, "layer3.0": False}
    assert single.loc[["layer2.0", "layer3.0"], ["loss", "acc"]].isna().all().all()
    assert frame.attrs["not_removable"] == ["layer2.0", "layer3.0"]
    # random deletions choose among the one removable block only
    assert frame.loc[frame["kind"] == "random", "k"].tolist() == [1]


def test_model_is_left_untouched():
    net = preact_resnet_cifar(8, in_channels=1, num_classes=3)
    net.train()
    net.layer2.eval()  # a mix of modes must come back as it was
    calls = []
    handle = net.layer1.register_forward_hook(lambda m, a, o: calls.append(1))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {n: m.training for n, m in net.named_modules()}
    hooks = {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for n, m in net.named_modules()
    }
    rng = torch.random.get_rng_state()
    np_rng = np.random.get_state()[1].copy()
    lesion(net, (x, y), k=2, samples=3)
    assert calls  # the user's hook ran and is still there
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for n, m in net.named_modules()
    } == hooks
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert np.array_equal(np.random.get_state()[1], np_rng)
    assert all(p.grad is None for p in net.parameters())
    handle.remove()


def test_evaluates_in_eval_mode_with_running_statistics():
    net = preact_resnet_cifar(8, in_channels=1, num_classes=3).train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    frame = lesion(net, (x, y), k=0)
    with torch.no_grad():
        expected = float(F.cross_entropy(net.eval()(x).double(), y))
    assert frame["loss"].iloc[0] == pytest.approx(expected, rel=1e-6)
    assert len(frame) == 4  # k=0: the intact model and the single deletions


def test_random_subsets_follow_the_seed():
    net = mlp(12, in_features=4, num_classes=4, width=8)
    x, y = _data()
    a, b = lesion(net, (x, y), k=4, samples=3, seed=5), lesion(net, (x, y), k=4, samples=3, seed=5)
    c = lesion(net, (x, y), k=4, samples=3, seed=6)
    assert a.equals(b)
    rows = a["kind"] == "random"
    assert not np.allclose(a.loc[rows, "loss"].iloc[1:], c.loc[rows, "loss"].iloc[1:])


def test_accepts_a_dataset_and_a_custom_metric():
    data = gradprobe.data.synthetic(shape=(4,), num_classes=4)
    net = mlp(4, in_features=4, num_classes=4, width=8)
    frame = lesion(net, data, metric=lambda out, y: {"err": float((out.argmax(1) != y).double().mean())})
    assert list(frame.columns)[-2:] == ["err", "err_std"]
    assert frame.attrs["n"] == data.n_test
    assert math.isfinite(frame["err"].iloc[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data": torch.randn(3, 4)}, TypeError, "inputs, targets"),
        ({"data": (torch.randn(3, 4), torch.zeros(2, dtype=torch.long))}, ValueError, "as many targets"),
        ({"k": -1}, ValueError, "k must be"),
        ({"samples": 0}, ValueError, "samples must be"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, error, match):
    net = mlp(4, in_features=4, num_classes=4, width=8)
    args = {"data": _data(), **kwargs}
    with pytest.raises(error, match=match):
        lesion(net, **args)


def test_compare_keeps_the_lesions_and_the_report_shows_them(tmp_path):
    from gradprobe.experiment import compare, lesions, summary

    run = compare(
        ["plain-mlp-4", "resnet-mlp-4"], "synthetic", epochs=1, progress=False, out=tmp_path / "run"
    )
    table = lesions(gradprobe.load(tmp_path / "run"))
    assert table is not None and sorted(table["model"].unique()) == ["plain-mlp-4", "resnet-mlp-4"]
    assert table.loc[table["kind"] == "random", "k"].max() <= 5
    assert {"lesion_worst_drop", "lesion_worst_block"} <= set(summary(run).columns)
    gradprobe.report(run, tmp_path / "report", progress=False)
    html = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "Deleting blocks" in html and (tmp_path / "report" / "lesion.png").exists()
    assert "Deleting one block of resnet-mlp-4" in html

    bare = compare(["resnet-mlp-4"], "synthetic", epochs=1, progress=False, lesion=False)
    assert lesions(bare) is None and "lesions" not in bare.meta
    assert "lesion_worst_drop" not in summary(bare).columns
    gradprobe.report(bare, tmp_path / "bare", progress=False)
    assert "Deleting blocks" not in (tmp_path / "bare" / "index.html").read_text(encoding="utf-8")
    assert not (tmp_path / "bare" / "lesion.png").exists()
