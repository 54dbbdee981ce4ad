"""The Lightning and Hugging Face callbacks and the accelerate recipe, on the real frameworks (no mocks).

Each training run is checked against a reference taken with plain torch hooks in the same
run: the squared norm of every block's output gradient at every backward pass, pooled over
the micro-batches of each optimizer step as the probe defines pooling (the norm of all of
them together).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradprobe
from gradprobe.data import digits
from gradprobe.models import mlp

pl = pytest.importorskip("pytorch_lightning")
transformers = pytest.importorskip("transformers")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "integrations.md").read_text()  # the user guide's integrations page
ACCUMULATE = 2


# transformers, Lightning and tensorboard: see conftest.frozen_heap
pytestmark = pytest.mark.usefixtures("frozen_heap")


class GradOuts:
    """|g_y|^2 of each block at each backward pass, with plain torch hooks (no gradprobe code)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.sq: dict[str, list[float]] = {n: [] for n in names}
        self.handles = [model.get_submodule(n).register_forward_hook(partial(self._fwd, n)) for n in names]

    def _fwd(self, name: str, module: nn.Module, args: object, out: object) -> None:
        y = out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]
        if torch.is_grad_enabled() and y.requires_grad:
            y.register_hook(lambda g: self.sq[name].append(float(g.double().pow(2).sum())))

    def pooled(self, name: str, step: int) -> float:
        parts = self.sq[name][step * ACCUMULATE : (step + 1) * ACCUMULATE]
        assert len(parts) == ACCUMULATE
        return math.sqrt(sum(parts))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def scalars_of(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under ``folder``: tag -> [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def check_pooled_against_reference(frame, ref: GradOuts, steps: int) -> None:
    assert sorted(frame["step"].unique()) == list(range(steps))
    assert (frame["calls"] == ACCUMULATE).all()
    for row in frame.itertuples():
        assert row.grad_out == pytest.approx(ref.pooled(row.block, row.step), rel=1e-5)
    # the symptom of one probe step per backward pass: update_ratio 0 on every other step
    later = frame[frame["step"] > 0]
    assert (later["update_ratio"] > 0).all()


# ----------------------------------------------------------------------------- Lightning


def digits_loader(n: int, batch: int, *, test: bool = False) -> torch.utils.data.DataLoader:
    data = digits(flat=True)
    x, y = (data.x_test, data.y_test) if test else (data.x_train, data.y_train)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=batch)


class DigitsNet(pl.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = mlp(
            5, in_features=64, num_classes=10, width=32, generator=torch.Generator().manual_seed(0)
        )
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def lightning_trainer(tmp_path: Path, callback, **kwargs) -> pl.Trainer:
    from pytorch_lightning.loggers import TensorBoardLogger

    options = {
        "max_steps": 6,
        "accumulate_grad_batches": ACCUMULATE,
        "callbacks": [callback],
        "logger": TensorBoardLogger(str(tmp_path / "logs")),
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        **kwargs,
    }
    return pl.Trainer(**options)


def test_lightning_steps_are_optimizer_steps_pooled_logged_and_reported(tmp_path, no_leaks):
    from gradprobe.integrations.lightning import GradprobeCallback

    module = DigitsNet()
    no_leaks(module.net)
    ref = GradOuts(module.net, ["blocks.0", "blocks.1", "blocks.2"])
    callback = GradprobeCallback(module="net")
    # validation every 4 training batches (mid-accumulation too), after a sanity check
    trainer = lightning_trainer(tmp_path, callback, val_check_interval=4, limit_val_batches=2)
    trainer.fit(module, digits_loader(256, 16), digits_loader(64, 32, test=True))
    ref.remove()

    assert trainer.global_step == 6 and callback.probe is None
    report = Path(trainer.log_dir) / "gradprobe" / "index.html"
    assert callback.report == report and report.exists()
    run = gradprobe.load(report.parent)
    frame = run.frame()
    assert list(frame["block"].unique()) == ["blocks.0", "blocks.1", "blocks.2"]
    check_pooled_against_reference(frame, ref, steps=6)
    assert run.meta["framework"] == "lightning"

    logged = scalars_of(Path(trainer.log_dir))
    assert "val_loss" in logged  # the validation loop did run, and added no rows above
    for column in ("cum_gain", "gain", "res_ratio"):
        for block, rows in frame.groupby("block"):
            points = logged[f"gradprobe/{column}/{block}"]
            assert [s for s, _ in points] == list(range(6))
            assert [v for _, v in points] == pytest.approx(rows[column].tolist(), rel=1e-6)
    first = frame[frame["block"] == "blocks.0"]["cum_gain"].tolist()
    assert [v for _, v in logged["gradprobe/summary/first_cum_gain"]] == pytest.approx(first, rel=1e-6)
    max_gain = frame.groupby("step")["gain"].max().tolist()
    assert [v for _, v in logged["gradprobe/summary/max_gain"]] == pytest.approx(max_gain, rel=1e-6)
    assert {"gradprobe/summary/min_gain", "gradprobe/summary/max_res_ratio"} <= set(logged)


def test_lightning_every_and_log_every_and_the_default_report_dir(tmp_path):
    from gradprobe.integrations.lightning import GradprobeCallback

    callback = GradprobeCallback(every=2, log_every=4, report_dir=tmp_path / "mine")
    trainer = lightning_trainer(tmp_path, callback, log_every_n_steps=50)
    trainer.fit(DigitsNet(), digits_loader(256, 16))
    frame = gradprobe.load(tmp_path / "mine").frame()
    assert sorted(frame["step"].unique()) == [0, 2, 4]
    assert set(frame["block"]) == {"net.blocks.0", "net.blocks.1", "net.blocks.2"}  # found by "auto"
    logged = scalars_of(Path(trainer.log_dir))
    assert [s for s, _ in logged["gradprobe/gain/net.blocks.1"]] == [0, 4]


def test_lightning_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    from gradprobe.integrations.lightning import GradprobeCallback

    weights = []
    for callbacks in ([], [GradprobeCallback(module="net", report_dir=tmp_path / "report")]):
        module = DigitsNet()
        trainer = lightning_trainer(tmp_path, None, callbacks=callbacks, logger=False)
        trainer.fit(module, digits_loader(256, 16))
        weights.append({k: v.clone() for k, v in module.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key  # BatchNorm buffers included


def test_lightning_resumed_run_numbers_steps_as_the_trainer(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from gradprobe.integrations.lightning import GradprobeCallback

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = lightning_trainer(tmp_path, None, callbacks=[saver], max_steps=2, enable_checkpointing=True)
    first.fit(DigitsNet(), digits_loader(256, 16))
    callback = GradprobeCallback(module="net", report_dir=tmp_path / "resumed")
    second = lightning_trainer(tmp_path, callback, max_steps=5)
    second.fit(DigitsNet(), digits_loader(256, 16), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    run = gradprobe.load(tmp_path / "resumed")
    assert sorted(run.frame()["step"].unique()) == [2, 3, 4] and run.meta["step_offset"] == 2
    logged = scalars_of(Path(second.log_dir))
    assert [s for s, _ in logged["gradprobe/gain/blocks.0"]] == [2, 3, 4]


def test_lightning_jacobian_columns_come_from_the_module_the_step_calls(tmp_path):
    from gradprobe.integrations.lightning import GradprobeCallback

    loader = digits_loader(64, 16)
    callback = GradprobeCallback(module="net", jacobian=True, report_dir=tmp_path / "net")
    lightning_trainer(tmp_path, callback, max_steps=2, logger=False).fit(DigitsNet(), loader)
    frame = gradprobe.load(tmp_path / "net").frame()
    assert frame["jac_fro"].notna().all() and (frame["jac_fro"] > 0).all()
    # training_step calls self.net, never the LightningModule as a whole: no columns, and a warning
    callback = GradprobeCallback(jacobian=True, report_dir=tmp_path / "root")
    with pytest.warns(RuntimeWarning, match="module='net'"):
        lightning_trainer(tmp_path, callback, max_steps=2, logger=False).fit(DigitsNet(), loader)


def test_lightning_exception_detaches_and_keeps_the_closed_steps(tmp_path, no_leaks):
    from gradprobe.integrations.lightning import GradprobeCallback

    module = DigitsNet(fail_at=5)  # the second micro-batch of optimizer step 2
    no_leaks(module.net)  # (Lightning itself sets attributes on the LightningModule)
    callback = GradprobeCallback(module="net")
    trainer = lightning_trainer(tmp_path, callback)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, digits_loader(256, 16))
    assert callback.probe is None
    frame = gradprobe.load(Path(trainer.log_dir) / "gradprobe").frame()
    assert sorted(frame["step"].unique()) == [0, 1] and (frame["calls"] == 2).all()


def test_lightning_bad_options_say_what_to_do(tmp_path):
    from gradprobe.integrations.lightning import GradprobeCallback

    with pytest.raises(ValueError, match="auto_step"):
        GradprobeCallback(auto_step=True)
    with pytest.raises(ValueError, match="log_columns"):
        GradprobeCallback(log_columns=("gian",))
    trainer = lightning_trainer(tmp_path, GradprobeCallback(module="nett"))
    module = DigitsNet()
    with pytest.raises(ValueError, match=r"module='nett'.*children are \['net'\]"):
        trainer.fit(module, digits_loader(64, 16))


@pytest.mark.slow
def test_lightning_ddp_rank_zero_writes_every_ranks_rows(tmp_path):
    from pytorch_lightning.loggers import CSVLogger
    from torch.multiprocessing import ProcessExitedException

    from gradprobe.integrations.lightning import GradprobeCallback

    def fit(out):
        callback = GradprobeCallback(module="net", log_every=1)
        trainer = lightning_trainer(
            out, callback, max_steps=4, devices=2, strategy="ddp_spawn", logger=CSVLogger(str(out))
        )
        trainer.fit(DigitsNet(), digits_loader(256, 16))

    try:
        fit(tmp_path / "run")
    except ProcessExitedException as exc:
        # A spawned gloo rank can abort in its C++ teardown after `fit` has returned ("terminate
        # called without an active exception", once in about ten CI runs, never in isolation);
        # that is the process group's exit, not the probe's work: the whole run again, once, in a
        # fresh folder, with every assertion below.
        if exc.signal_name != "SIGABRT":
            raise
        fit(tmp_path / "again")
        tmp_path = tmp_path / "again"
    (folder,) = tmp_path.rglob("gradprobe")
    frame = gradprobe.load(folder).frame()
    assert (folder / "index.html").exists()
    for rank in (0, 1):
        mine = frame[frame["rank"] == rank]
        assert sorted(mine["step"].unique()) == [0, 1, 2, 3] and (mine["calls"] == 2).all()
        assert list(mine["block"].unique()) == ["blocks.0", "blocks.1", "blocks.2"]
    (metrics,) = tmp_path.rglob("metrics.csv")
    logged = pd.read_csv(metrics)
    rank0 = frame[(frame["rank"] == 0) & (frame["block"] == "blocks.1")]["gain"].to_numpy()
    got = logged.dropna(subset=["gradprobe/gain/blocks.1"])
    assert got["step"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(got["gradprobe/gain/blocks.1"], rank0, rtol=1e-6)


def test_lightning_callback_derives_from_each_installed_lightning_package(monkeypatch):
    import types

    from gradprobe.integrations import lightning

    # The `lightning` package is not installed here: stand in for its lightning.pytorch module.
    class OtherCallback:
        pass

    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = OtherCallback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    assert lightning._callback_bases() == (OtherCallback, pl.Callback)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    assert lightning._callback_bases() == (OtherCallback,)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ImportError, match=r"gradprobe\[lightning\]"):
        lightning._callback_bases()
    assert issubclass(lightning.GradprobeCallback, pl.Callback)


# ----------------------------------------------------------------------------- Hugging Face


def digit_tokens(n: int) -> torch.Tensor:
    """The digits images as sequences of 32 pixel intensities (0..16): real data as tokens."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:n, :32], dtype=torch.long)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=17,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def hf_trainer(tmp_path: Path, model: nn.Module, callbacks: list) -> transformers.Trainer:
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": row, "labels": row} for row in digit_tokens(64)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model, args, train_dataset=data, eval_dataset=data[:16], callbacks=callbacks)


def test_hf_trainer_steps_pooled_reported_and_in_tensorboard(tmp_path, no_leaks):
    from gradprobe.integrations.transformers import GradprobeCallback

    model = tiny_llama()
    no_leaks(model.model)  # (the Trainer itself sets attributes on the top-level model)
    blocks = ["model.layers.0", "model.layers.1"]
    ref = GradOuts(model, blocks)
    callback = GradprobeCallback()
    trainer = hf_trainer(tmp_path, model, [callback])
    trainer.train()
    ref.remove()

    assert trainer.state.global_step == 4 and callback.probe is None
    report = tmp_path / "hf" / "gradprobe" / "index.html"
    assert callback.report == report and report.exists()
    run = gradprobe.load(report.parent)
    frame = run.frame()
    assert list(frame["block"].unique()) == blocks
    check_pooled_against_reference(frame, ref, steps=4)  # evaluation ran twice and added nothing

    logged = scalars_of(tmp_path / "hf")
    assert "eval/loss" in logged and "train/loss" in logged
    for column in ("cum_gain", "gain", "res_ratio"):
        for block, rows in frame.groupby("block"):
            points = logged[f"train/gradprobe/{column}/{block}"]
            # stamped like the Trainer's own training logs: global_step after the update
            assert [s for s, _ in points] == [1, 2, 3, 4]
            assert [v for _, v in points] == pytest.approx(rows[column].tolist(), rel=1e-6)
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4]
    assert "train/gradprobe/summary/first_cum_gain" in logged


def test_hf_training_is_bit_identical_with_and_without_the_callback(tmp_path, fresh_accelerate):
    from gradprobe.integrations.transformers import GradprobeCallback

    weights = []
    for callbacks in ([], [GradprobeCallback(report_dir=tmp_path / "report")]):
        model = tiny_llama()
        hf_trainer(tmp_path, model, callbacks).train()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


# ------------------------------------------------------------------- the guide's examples, accelerate


def guide_block(heading: str) -> str:
    """The first Python block under ``heading`` in docs/integrations.md."""
    section = GUIDE.split(f"\n{heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def run_block(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run a guide block in this process (imports are paid once), in ``cwd``; return its namespace."""
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "guide_example"}
    exec(compile(code, "docs/integrations.md", "exec"), namespace)
    return namespace


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons (the Trainer makes an Accelerator too): reset them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_guide_lightning_trainer_example_runs(tmp_path, monkeypatch, capsys):
    ns = run_block(guide_block("## PyTorch Lightning"), tmp_path, monkeypatch)
    report = tmp_path / "runs/lightning/lightning_logs/version_0/gradprobe/index.html"
    assert str(report.relative_to(tmp_path)) in capsys.readouterr().out and report.exists()
    assert ns["trainer"].global_step == 20
    frame = gradprobe.load(report.parent).frame()
    assert sorted(frame["step"].unique()) == list(range(20))
    # 23 batches an epoch: Lightning's step 11 ends the epoch after one micro-batch
    calls = frame.groupby("step")["calls"].first()
    assert calls[11] == 1 and (calls.drop(11) == 2).all()
    logged = scalars_of(report.parents[1])
    # the first step, then Lightning's own cadence for log_every=5: after steps 4, 9, 14, 19
    assert [s for s, _ in logged["gradprobe/cum_gain/blocks.0"]] == [0, 4, 9, 14, 19]


def test_guide_accelerate_recipe_steps_with_sync_gradients(tmp_path, monkeypatch, fresh_accelerate):
    ns = run_block(guide_block("## accelerate"), tmp_path, monkeypatch)
    frame = ns["probe"].frame()
    assert len(ns["loader"]) == 23  # 1,437 training images in batches of 64
    # 11 steps of 2 micro-batches, and the last batch is an optimizer step of its own: accelerate
    # syncs at the end of the loader
    steps = list(range(12))
    calls = frame.groupby("step")["calls"].first()
    assert list(calls.index) == steps and calls[11] == 1 and (calls.drop(11) == 2).all()
    assert (frame[frame["step"] > 0]["update_ratio"] > 0).all()
    assert not ns["probe"].attached
    logged = scalars_of(tmp_path / "runs" / "accelerate")
    assert [s for s, _ in logged["gradprobe/gain/blocks.0"]] == steps
    assert len(logged["gradprobe/loss"]) == 12


def test_guide_hugging_face_example_runs(tmp_path, monkeypatch, capsys, fresh_accelerate):
    run_block(guide_block("## Hugging Face `Trainer`"), tmp_path, monkeypatch)
    assert "runs/hf/gradprobe/index.html" in capsys.readouterr().out
    frame = gradprobe.load(tmp_path / "runs/hf/gradprobe").frame()
    assert sorted(frame["step"].unique()) == list(range(10)) and (frame["calls"] == 2).all()
    logged = scalars_of(tmp_path / "runs" / "hf")
    # with the Trainer's loss: logging_steps=5 logs at global_step 5 and 10 (and the first step)
    assert [s for s, _ in logged["train/gradprobe/gain/model.layers.3"]] == [1, 5, 10]
    assert [s for s, _ in logged["train/loss"]] == [5, 10]


# ----------------------------------------------------------------------------- packaging


def test_importing_gradprobe_imports_no_framework_and_a_missing_one_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        import gradprobe, gradprobe.export, gradprobe.integrations, gradprobe.cli
        gradprobe.attach, gradprobe.report, gradprobe.load
        frameworks = ("pytorch_lightning", "lightning", "transformers", "tensorboard", "accelerate")
        print("LOADED", [m for m in frameworks if m in sys.modules])
        for name in frameworks:
            sys.modules[name] = None  # what an absent package looks like to import
        for module, call in (
            ("gradprobe.integrations.lightning", None),
            ("gradprobe.integrations.transformers", None),
            ("gradprobe.export", lambda m: m.summary_writer("unused")),
        ):
            try:
                call(__import__(module, fromlist=["x"]))
            except ImportError as exc:
                print("ERROR", exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout
    for extra in ("lightning", "transformers", "tensorboard"):
        assert f"pip install 'gradprobe[{extra}]'" in out.stdout, out.stdout


def test_the_test_extra_includes_the_integrations():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any("pytorch-lightning" in r for r in extras["lightning"])
    assert any(r.startswith("transformers") for r in extras["transformers"])
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert "gradprobe[lightning,transformers,tensorboard]" in extras["test"]
    assert not any(r.startswith("torch") for extra in extras.values() for r in extra)  # the pin stays
