"""The runner: specs, schedule, tables of a compare run, determinism, and the facts on a real default run."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradprobe
from gradprobe import data, experiment
from gradprobe.analysis import analyze
from gradprobe.experiment import (
    DEFAULT_MODELS,
    ModelSpec,
    TrainConfig,
    build_model,
    compare,
    parse_spec,
    summary,
)
from gradprobe.records import FRAME_COLUMNS, MODEL_COLUMNS

TINY = data.synthetic(n_train=40, n_test=12, shape=(1, 6, 6), num_classes=3, seed=1)


# ----------------------------------------------------------------------------- specs and models


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("plain-56", ModelSpec("cnn", 56, False)),
        ("resnet-20", ModelSpec("cnn", 20, True)),
        ("ResNet-cnn-8", ModelSpec("cnn", 8, True)),
        ("plain-mlp-30", ModelSpec("mlp", 30, False)),
        ("resnet-mlp-3", ModelSpec("mlp", 3, True)),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected
    assert parse_spec(expected.name) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("plain-57", "6n\\+2"),
        ("resnet-mlp-2", ">= 3"),
        ("vgg-16", "unknown model spec"),
        ("resnet", "unknown"),
    ],
)
def test_parse_spec_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


def test_build_model_fits_the_dataset():
    cnn = build_model("resnet-8", TINY, width=4)
    assert cnn(TINY.x_train[:2]).shape == (2, 3) and cnn.conv1.in_channels == 1
    net = build_model("plain-mlp-5", TINY.flat(), norm="layer")
    assert net(TINY.flat().x_train[:2]).shape == (2, 3) and net.stem.in_features == 36
    with pytest.raises(ValueError, match=r"needs image inputs.*plain-mlp-DEPTH"):
        build_model("plain-20", TINY.flat())
    a, b = build_model("resnet-8", TINY, seed=3), build_model("resnet-8", TINY, seed=3)
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_lr_schedule_warms_up_linearly_then_decays_with_a_cosine():
    lrs = [experiment._lr_at(s, lr=0.1, warmup=4, total=12, schedule="cosine") for s in range(12)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.05)  # half-way through the decay
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] > 0
    assert experiment._lr_at(9, lr=0.1, warmup=4, total=12, schedule="constant") == 0.1
    assert experiment._lr_at(0, lr=0.1, warmup=0, total=12, schedule="cosine") == pytest.approx(0.1)


def test_batches_never_leave_a_batch_of_one():
    perm = torch.arange(9)
    assert [len(b) for b in experiment._batches(9, 4, perm)] == [4, 5]
    assert [len(b) for b in experiment._batches(10, 4, perm.new_tensor(range(10)))] == [4, 4, 2]
    assert torch.equal(torch.cat(experiment._batches(9, 4, perm)), perm)


# ----------------------------------------------------------------------------- compare


# One configuration for the shared tiny run and for the determinism test that repeats it.
TINY_RUN_ARGS = (["plain-mlp-5", "resnet-mlp-5", "resnet-8"], TINY)
TINY_RUN_OPTIONS = {"epochs": 3, "batch_size": 16, "lr": 0.05, "warmup": 2, "width": 8, "progress": False}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = compare(
        *TINY_RUN_ARGS,
        **TINY_RUN_OPTIONS,
        out=out,
        command="test",
    )
    return run, out


def test_compare_frame_has_the_schema_and_model_columns(tiny_run):
    run, _ = tiny_run
    frame = run.frame()
    assert list(frame.columns) == list(MODEL_COLUMNS) + list(FRAME_COLUMNS)
    assert run.models == ["plain-mlp-5", "resnet-mlp-5", "resnet-8"]
    by_model = frame.groupby("model", sort=False)
    # 40 samples in batches of 16 -> 16 + 16 + 8: 3 steps per epoch
    assert by_model["step"].nunique().tolist() == [9, 9, 9]
    assert by_model["block"].nunique().tolist() == [3, 3, 3]
    assert frame[frame["model"] == "resnet-8"]["depth"].unique().tolist() == [8]
    assert frame.groupby("model", sort=False)["residual"].first().tolist() == [False, True, True]
    assert frame["depth"].dtype == np.int64 and frame["residual"].dtype == bool


def test_compare_scalars_have_one_row_per_step(tiny_run):
    run, _ = tiny_run
    scalars = run.scalars()
    assert list(scalars.columns) == [
        "model", "depth", "residual", "step", "epoch", "train_loss", "train_acc", "test_acc", "lr"
    ]  # fmt: skip
    one = scalars[scalars["model"] == "resnet-8"]
    assert one["step"].tolist() == list(range(9)) and one["epoch"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # test accuracy is measured after the last step of each epoch and nowhere else
    assert one["test_acc"].notna().tolist() == [False, False, True] * 3
    assert set(one["test_acc"].dropna() * 12) <= set(range(13))  # fractions of the 12 test samples
    expected_lr = [experiment._lr_at(s, lr=0.05, warmup=2, total=9, schedule="cosine") for s in range(9)]
    assert one["lr"].tolist() == pytest.approx(expected_lr)
    assert ((one["train_acc"] >= 0) & (one["train_acc"] <= 1)).all()


def test_compare_losses_equal_a_bare_training_loop(tiny_run):
    """The runner trains exactly like a hand-written loop (same seeds, same order, same schedule)."""
    run, _ = tiny_run
    ds = TINY.flat()
    model = build_model("resnet-mlp-5", ds, seed=0, zero_init_residual=True, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    order = torch.Generator().manual_seed(0)
    losses, step = [], 0
    for _ in range(3):
        perm = torch.randperm(ds.n_train, generator=order)
        for idx in perm.split(16):
            for g in opt.param_groups:
                g["lr"] = experiment._lr_at(step, lr=0.05, warmup=2, total=9, schedule="cosine")
            loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    got = run.scalars().query("model == 'resnet-mlp-5'")["train_loss"].tolist()
    assert got == losses  # bit for bit: the probe does not change training


def test_compare_is_deterministic_and_leaves_the_global_rng_alone(tiny_run):
    run, _ = tiny_run
    state = torch.random.get_rng_state()
    again = compare(
        *TINY_RUN_ARGS,
        **TINY_RUN_OPTIONS,
    )
    assert torch.equal(state, torch.random.get_rng_state())
    pd.testing.assert_frame_equal(run.frame(), again.frame())
    pd.testing.assert_frame_equal(run.scalars(), again.scalars())


def test_compare_saves_a_run_that_loads_back(tiny_run):
    run, out = tiny_run
    back = gradprobe.load(out)
    pd.testing.assert_frame_equal(back.frame(), run.frame())
    pd.testing.assert_frame_equal(back.scalars(), run.scalars())
    meta = back.meta
    assert meta["models"] == run.models and meta["seed"] == 0 and meta["command"] == "test"
    assert meta["epochs"] == 3 and meta["lr"] == 0.05 and meta["data"] == "synthetic"
    assert meta["gradprobe_version"] == gradprobe.__version__ and meta["torch_version"] == torch.__version__
    assert meta["model_info"]["resnet-8"]["blocks"][0] == "layer1.0"


def test_compare_zero_init_blocks_start_as_identity_and_move_away(tiny_run):
    run, _ = tiny_run
    frame = run.frame()
    res = frame[(frame["model"] == "resnet-mlp-5")]
    assert (res[res["step"] == 0]["res_ratio"] == 0).all()
    assert (res[res["step"] == res["step"].max()]["res_ratio"] > 0).all()
    plain = frame[(frame["model"] == "plain-mlp-5") & (frame["step"] == 0)]
    assert (plain["res_ratio"] > 0.1).all()


def test_summary_reads_the_tables(tiny_run):
    run, _ = tiny_run
    table = summary(run)
    assert table["model"].tolist() == run.models
    scalars, frame = run.scalars(), run.frame()
    last = scalars[(scalars["model"] == "resnet-8") & (scalars["epoch"] == 2)]
    row = table.set_index("model").loc["resnet-8"]
    assert row["train_loss"] == pytest.approx(last["train_loss"].mean())
    assert row["test_acc"] == last["test_acc"].dropna().iloc[-1]
    first = frame[(frame["model"] == "resnet-8") & (frame["index"] == 0)]
    assert row["cum_gain_init"] == first[first["step"] == 0]["cum_gain"].iloc[0]
    assert row["cum_gain_end"] == first[first["step"] == 8]["cum_gain"].iloc[0]
    assert row["res_ratio_init"] == 0 and row["res_ratio_end"] > 0
    assert bool(row["residual"]) and row["depth"] == 8


def test_compare_accepts_user_modules_and_every(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.layers = nn.Sequential(*[nn.Linear(36, 36) for _ in range(3)])
            self.head = nn.Linear(36, 3)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layers(x.flatten(1)))

    net = Net()
    before = net.head.weight.detach().clone()
    run = compare({"plain-linear": net}, TINY, epochs=2, batch_size=20, lr=0.01, every=3, progress=False)
    frame = run.frame()
    assert sorted(frame["step"].unique()) == [0, 3]  # 4 steps, every 3rd recorded
    assert frame["depth"].unique().tolist() == [3] and not frame["residual"].any()
    assert len(run.scalars()) == 4
    assert not torch.equal(before, net.head.weight)  # trained in place


def test_compare_jacobian_true_records_the_first_and_last_step():
    run = compare(["resnet-mlp-4"], TINY, epochs=2, batch_size=16, width=8, jacobian=True, progress=False)
    frame = run.frame()
    with_jac = sorted(frame[frame["jac_fro"].notna()]["step"].unique())
    assert with_jac == [0, 5]  # 2 epochs of 3 steps: initialisation and end of training
    ends = frame[frame["step"].isin([0, 5])]
    assert ends[["prod_fro", "jac_spec", "prod_spec"]].notna().all().all()  # spectral at both ends
    every_2nd = compare(["resnet-mlp-4"], TINY, epochs=2, batch_size=16, width=8, jacobian=2, progress=False)
    assert sorted(every_2nd.frame().dropna(subset=["jac_fro"])["step"].unique()) == [0, 2, 4]


@pytest.mark.parametrize(
    ("models", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "at least one model"),
        (["plain-8", "plain-8"], {}, ValueError, "unique"),
        (["plain-8"], {"epochs": 0}, ValueError, "epochs"),
        (["plain-8"], {"every": 1.5}, ValueError, "every"),
        (["plain-8"], {"lr": 0.0}, ValueError, "lr"),
        (["plain-8"], {"schedule": "step"}, ValueError, "schedule"),
        (["plain-8"], {"jacobian": 0}, ValueError, "jacobian"),
        ({"x": "not a module"}, {}, TypeError, "not a torch.nn.Module"),
        (["alexnet"], {}, ValueError, "unknown model spec"),
    ],
)
def test_compare_rejects_bad_arguments(models, kwargs, error, match):
    with pytest.raises(error, match=match):
        compare(models, TINY, progress=False, **kwargs)


# ----------------------------------------------------------------------------- TrainConfig and train_one


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
        ({"epochs": True}, "epochs must be an int"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
        ({"every": 0}, "every must be an int >= 1"),
        ({"warmup": -1}, "warmup must be a number of steps >= 0"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"momentum": -0.5}, "momentum and weight_decay must be >= 0"),
        ({"weight_decay": "1e-4"}, "weight_decay must be a finite number"),
        ({"schedule": "step"}, "schedule must be 'cosine' or 'constant', got 'step'"),
        ({"jacobian": 0}, "jacobian must be True, False or a positive int"),
        ({"jacobian": None}, "jacobian must be True, False or a positive int"),
        ({"paths": -2}, "paths must be True, False or a positive int"),
        ({"width": 0}, "width must be a positive int"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"jacobian_options": ["probes"]}, "jacobian_options must be a mapping"),
        ({"device": "no-such-device"}, "device 'no-such-device' is not a torch device"),
    ],
)
def test_train_config_rejects_bad_values_with_a_message(options, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        TrainConfig(**options)


def test_train_config_is_frozen_and_of_replaces_fields():
    config = TrainConfig(epochs=3, lr=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4  # type: ignore[misc]
    changed = TrainConfig.of(config, lr=0.2)
    assert (changed.epochs, changed.lr, config.lr) == (3, 0.2, 0.1)
    assert TrainConfig.of() == TrainConfig()
    assert TrainConfig().epochs == experiment.DEFAULTS["epochs"]
    with pytest.raises(ValueError, match="lr must be positive"):
        TrainConfig.of(config, lr=-1.0)  # replaced values are checked too


def test_unknown_training_options_are_a_type_error_naming_them():
    with pytest.raises(TypeError, match=r"unknown training options \['epoch'\].*epochs"):
        TrainConfig.of(epoch=3)
    with pytest.raises(TypeError, match="unknown training options"):
        compare(["plain-mlp-4"], TINY, epoch=3)


def test_train_config_gives_attach_its_schedule_for_the_first_and_last_step():
    assert TrainConfig(jacobian=True).probe_options(10) == {
        "every": 1,
        "jacobian": 9,  # steps 0 and 9
        "probes": 4,
        "jacobian_options": {"spec": True},
        "paths": 9,
    }
    options = TrainConfig(jacobian=3, paths=False, every=2, jacobian_options={"probes": 8}).probe_options(10)
    assert options == {"every": 2, "jacobian": 3, "probes": 8, "jacobian_options": None, "paths": False}


def test_compare_with_a_config_equals_compare_with_keywords():
    config = TrainConfig(epochs=1, batch_size=16, width=8, progress=False)
    by_config = compare(["resnet-mlp-4"], TINY, config=config, command="x")
    by_keywords = compare(
        ["resnet-mlp-4"], TINY, epochs=1, batch_size=16, width=8, progress=False, command="x"
    )
    pd.testing.assert_frame_equal(by_config.frame(), by_keywords.frame())
    pd.testing.assert_frame_equal(by_config.scalars(), by_keywords.scalars())
    # keywords replace the config's values
    one_more = compare(["resnet-mlp-4"], TINY, config=config, epochs=2)
    assert one_more.meta["epochs"] == 2 and one_more.scalars()["epoch"].max() == 1


def test_train_one_trains_in_place_and_returns_the_tables_of_one_model():
    ds = TINY.flat()
    model = build_model("resnet-mlp-4", ds, seed=0, width=8)
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.random.get_rng_state()
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, warmup=2, progress=False)
    frame, scalars, info = experiment.train_one(model, ds, config, name="m")
    assert torch.equal(state, torch.random.get_rng_state())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert list(frame.columns) == list(FRAME_COLUMNS) and sorted(frame["step"].unique()) == list(range(6))
    assert list(scalars.columns) == ["step", "epoch", "train_loss", "train_acc", "test_acc", "lr"]
    assert scalars["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert scalars["test_acc"].notna().tolist() == [False, False, True, False, False, True]
    assert scalars["lr"].tolist()[:2] == [0.025, 0.05]  # warm-up over 2 steps
    assert info["blocks"] == ["blocks.0", "blocks.1"] and info["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    assert info["model_class"] == "gradprobe.models.MLP" and info["seconds"] >= 0
    assert sorted(info["paths"]["step"].unique()) == [0, 5]  # paths=True: first and last step


def test_train_one_losses_equal_the_same_model_trained_by_compare():
    ds = TINY.flat()
    config = TrainConfig(epochs=1, batch_size=16, width=8, progress=False, paths=False)
    _, scalars, _ = experiment.train_one(
        build_model("plain-mlp-4", ds, zero_init_residual=True, width=8), ds, config
    )
    run = compare(["plain-mlp-4"], TINY, config=config)
    assert scalars["train_loss"].tolist() == run.scalars()["train_loss"].tolist()
    assert len(run.paths()) == 0


# ----------------------------------------------------------------------------- the facts


def _first_block_cum_gain(depth: int, residual: bool) -> float:
    """cum_gain of the first block at He init (no zero init) on a digits batch, cross-entropy loss."""
    ds = data.digits()
    model = build_model(f"{'resnet' if residual else 'plain'}-{depth}", ds, seed=0)
    x, y = ds.x_train[:128], ds.y_train[:128]
    frame = analyze(model, x, loss_fn=lambda out: F.cross_entropy(out, y), jacobian=False)
    return float(frame.sort_values("index")["cum_gain"].iloc[0])


def test_gradient_highway_at_standard_init():
    """Fact 3 without zero init: He et al.'s own init already keeps resnet-56 within a decade or two of
    plain-56's explosion; the plain net amplifies the gradient by over two decades."""
    plain, res = _first_block_cum_gain(56, False), _first_block_cum_gain(56, True)
    assert abs(math.log10(plain)) > 2.5
    assert abs(math.log10(plain)) - abs(math.log10(res)) >= 1.0


@pytest.mark.slow
def test_default_run_shows_the_four_facts(tmp_path):
    """The facts of issue 4, asserted on a real run of ``gradprobe compare`` with its defaults."""
    from gradprobe.cli import main

    out = tmp_path / "compare"
    assert main(["compare", "--out", str(out), "--no-report", "--no-progress", "--threads", "1"]) == 0
    run = gradprobe.load(out)
    assert run.models == list(DEFAULT_MODELS)
    table = summary(run).set_index("model")
    loss = table["train_loss"]
    # 1. degradation: the deeper plain net ends with a clearly higher training loss
    assert loss["plain-56"] > 5 * loss["plain-20"] and loss["plain-56"] > loss["plain-20"] + 0.2
    # 2. the residual net of the same depth trains clearly better
    assert loss["resnet-56"] < loss["plain-56"] / 5 and loss["resnet-56"] < loss["plain-56"] - 0.2
    # 3. gradient highway at initialisation: at least a decade between the first blocks' |log10 cum_gain|
    gain = table["cum_gain_init"]
    assert abs(math.log10(gain["plain-56"])) - abs(math.log10(gain["resnet-56"])) >= 1.0
    # 4. identity initialisation: every identity block is exactly the identity at step 0 and moves away
    frame = run.frame()
    for model in ("resnet-20", "resnet-56"):
        identity = frame[(frame["model"] == model) & frame["skip_grad"].notna()]
        first = identity[identity["step"] == 0]
        last = identity[identity["step"] == identity["step"].max()]
        assert len(first) == (7 if model == "resnet-20" else 25)
        assert (first["res_ratio"] == 0).all()
        assert (last["res_ratio"] > 0).all()
        assert last["res_ratio"].median() > 0.01


# ----------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


FLAT = TINY.flat()


def _progress_of(monkeypatch, stream: io.StringIO, progress: bool = True) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    model = build_model("plain-mlp-4", FLAT, width=8)
    experiment.train_one(
        model, FLAT, TrainConfig(epochs=2, batch_size=16, progress=progress), name="plain-mlp-4"
    )
    return stream.getvalue()


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    text = _progress_of(monkeypatch, _Terminal())
    assert "\r" in text and "epoch 2/2" in text and "step/s" in text


def test_progress_into_a_file_or_pipe_is_one_plain_line_per_model_and_epoch(monkeypatch):
    """Regression: piped into a log, the bars were one line of carriage-return-joined redraws."""
    text = _progress_of(monkeypatch, io.StringIO())
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2, lines
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(
            rf" *plain-mlp-4 epoch {epoch}/2 loss \d+\.\d{{4}} test acc \d\.\d{{3}} \(\d+ s\)", line
        )


def test_no_progress_prints_nothing(monkeypatch):
    assert _progress_of(monkeypatch, _Terminal(), progress=False) == ""
    assert _progress_of(monkeypatch, io.StringIO(), progress=False) == ""


# ----------------------------------------------------------------------------- output folder


def test_compare_replaces_an_earlier_compare_run_and_keeps_other_files_only_with_overwrite(tmp_path):
    out = tmp_path / "compare"
    options = {"epochs": 1, "batch_size": 16, "width": 8, "progress": False, "command": "test"}
    compare(["plain-mlp-4"], TINY, out=out, **options)
    meta = json.loads((out / "meta.json").read_text())
    del meta["run_id"]  # as the committed reference report, saved before runs had ids
    (out / "meta.json").write_text(json.dumps(meta))
    compare(["resnet-mlp-4"], TINY, out=out, **options)  # the same kind of run: replaced
    assert gradprobe.load(out).models == ["resnet-mlp-4"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as caught:
        compare(["plain-mlp-4"], TINY, out=out, **options)
    message = str(caught.value)
    assert message.startswith(f"out={str(out)!r} holds files gradprobe did not write (notes.txt)")
    assert "overwrite=True" in message and "--force" not in message
    compare(["plain-mlp-4"], TINY, out=out, overwrite=True, **options)
    assert gradprobe.load(out).models == ["plain-mlp-4"] and (out / "notes.txt").read_text() == "mine"
    probe_run = tmp_path / "probe"
    gradprobe.records.Run(
        gradprobe.records.empty_frame(), pd.DataFrame({"step": [0]}), {"kind": "probe"}
    ).save(probe_run)
    with pytest.raises(FileExistsError, match=r"another gradprobe run: a probe run \(run [0-9a-f]{12}"):
        compare(["plain-mlp-4"], TINY, out=probe_run, **options)


def test_parse_spec_reads_the_pre_activation_resnet():
    from gradprobe import data as _data
    from gradprobe.experiment import build_model, parse_spec
    from gradprobe.models import PreActResNetCIFAR

    spec = parse_spec("resnet-preact-20")
    assert (spec.family, spec.depth, spec.residual, spec.name) == ("preact", 20, True, "resnet-preact-20")
    assert parse_spec("plain-preact-8").name == "plain-preact-8"
    with pytest.raises(ValueError, match="6n\\+2"):
        parse_spec("resnet-preact-21")
    model = build_model("plain-preact-8", _data.synthetic(shape=(1, 8, 8), num_classes=3))
    assert isinstance(model, PreActResNetCIFAR) and not model.residual
