"""The ``gradprobe`` command: compare --quick, report, inspect and blocks, and their errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gradprobe
from gradprobe.cli import load_factory, main
from gradprobe.experiment import summary


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


FACTORY_FILE = textwrap.dedent(
    '''
    """Models that are not part of gradprobe, for the inspect/blocks commands."""
    import torch
    from torch import nn


    class Residual(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.lin = nn.Linear(width, width)

        def forward(self, x):
            return x + torch.tanh(self.lin(x))


    class Net(nn.Module):
        def __init__(self, depth=4, width=8):
            super().__init__()
            torch.manual_seed(0)  # a user factory may use the global RNG; gradprobe does not care
            self.inp = nn.Linear(5, width)
            self.body = nn.Sequential(*[Residual(width) for _ in range(depth)])
            self.out = nn.Linear(width, 3)

        def forward(self, x):
            return self.out(self.body(self.inp(x)))


    def make(depth=4, width=8):
        return Net(depth, width)


    def broken():
        raise RuntimeError("no weights here")


    def not_a_model():
        return 42


    def gpt2():
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        return GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    '''
)


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "user_models.py"
    path.write_text(FACTORY_FILE)
    return path


# ----------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", [[], ["compare"], ["report"], ["inspect"], ["blocks"]])
def test_every_command_has_help(command, capsys):
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: gradprobe")
    if command == ["compare"]:
        for option in (
            "--depths",
            "--families",
            "--epochs",
            "--lr",
            "--seed",
            "--data",
            "--out",
            "--jacobian",
        ):
            assert option in text
        assert "--quick" in text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "compare" in capsys.readouterr().out


def test_unknown_option_is_a_usage_error(capsys):
    assert main(["compare", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_typo_in_a_subcommands_option_prints_that_subcommands_usage(capsys):
    """Regression: `gradprobe compare --quik` printed the top-level usage."""
    assert main(["compare", "--quik"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("usage: gradprobe compare [options]")
    assert lines[1] == "gradprobe compare: error: unrecognized arguments: --quik (did you mean --quick?)"
    assert main(["report", "some/run", "--froce"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines[0].startswith("usage: gradprobe report PATH [options]") and "did you mean --force?" in lines[1]
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["compare", "--depths", "20,abc"],
            "gradprobe compare: error: --depths must be an integer, got 'abc'",
        ),
        (["compare", "--lr", "fast"], "gradprobe compare: error: --lr must be a number, got 'fast'"),
        (["inspect", "gradprobe.models:mlp", "--batch", "0"], "gradprobe inspect: error: --batch must be"),
        (
            ["inspect", "gradprobe.models:mlp", "--input-dtype", "int"],
            "gradprobe inspect: error: argument --input-dtype: invalid choice",
        ),
        (["compar"], "gradprobe: error: argument COMMAND: invalid choice: 'compar'"),
    ],
)
def test_a_bad_value_is_one_line_without_the_usage(args, line, capsys):
    """Regression: `--depths 20,abc` printed eight lines of usage before the error."""
    assert main(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines


def test_report_of_a_file_names_the_file_it_was_given(tmp_path):
    """Regression: `gradprobe report README.md` said "--out README.md is a file" without any --out."""
    readme = tmp_path / "README.md"
    readme.write_text("# not a run")
    code, _, err = run_cli("report", str(readme))
    assert code == 2 and err.count("\n") == 1
    assert f"{readme} is a file, not a saved run" in err and "--out" not in err
    code, _, err = run_cli("report", str(tmp_path), "--out", str(readme))
    assert code == 2 and f"--out {readme} is a file" in err  # given: then it is named


def test_cifar10_without_its_folder_hints_at_the_command_line_flag():
    """Regression: the hint named the Python API (load('cifar10', root=DIR)), not --data-root."""
    code, stdout, err = run_cli("compare", "--data", "cifar10", "--out", "unused", "--no-progress")
    assert code == 2 and stdout == "" and err.count("\n") == 1, err  # refused before the run's header
    assert "--data-root DIR" in err and "root=" not in err and "load(" not in err


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "gradprobe"]
    if not scripts:
        pytest.skip("gradprobe is not installed (pip install -e .); the entry point is declared in pyproject")
    assert scripts[0].value == "gradprobe.cli:main"


# ----------------------------------------------------------------------------- compare --quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "compare"
    code, stdout, stderr = run_cli("compare", "--quick", "--out", str(out), "--no-progress")
    return code, stdout, stderr, out


def test_quick_compare_writes_the_run_and_the_report(quick_run):
    code, stdout, stderr, out = quick_run
    assert code == 0, stderr
    run = gradprobe.load(out)
    assert run.models == ["plain-8", "plain-14", "resnet-8", "resnet-14"]
    assert run.meta["command"].startswith("gradprobe compare --quick")
    assert run.meta["epochs"] == 2 and run.meta["data"] == "digits"
    assert (out / "index.html").is_file()
    assert f"report {out / 'index.html'}" in stdout
    assert f"run tables in {out}/" in stdout


def test_quick_compare_prints_the_summary_of_the_saved_run(quick_run):
    _, stdout, _, out = quick_run
    table = summary(gradprobe.load(out))
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == [
        "model", "train_loss", "test_acc", "cum_gain_init", "cum_gain_end", "res_ratio_init", "res_ratio_end",
        "effective_length_init", "effective_length_end",
    ]  # fmt: skip
    for offset, row in enumerate(table.itertuples()):
        cells = lines[header + 1 + offset].split()
        assert cells[0] == row.model
        assert float(cells[1]) == pytest.approx(row.train_loss, rel=5e-3)
        assert float(cells[3]) == pytest.approx(row.cum_gain_init, rel=5e-3)
    assert "gradient highway" in stdout  # the legend says what the numbers mean


def test_quick_compare_shows_identity_init_and_the_highway(quick_run):
    _, _, _, out = quick_run
    run = gradprobe.load(out)
    frame = run.frame()
    for model in ("resnet-8", "resnet-14"):
        identity = frame[(frame["model"] == model) & frame["skip_grad"].notna()]
        assert len(identity[identity["step"] == 0]) == (1 if model == "resnet-8" else 4)
        assert (identity[identity["step"] == 0]["res_ratio"] == 0).all()
        assert (identity[identity["step"] == identity["step"].max()]["res_ratio"] > 0).all()
    table = summary(run).set_index("model")
    gain = table["cum_gain_init"].map(lambda g: abs(math.log10(g)))
    assert gain["plain-14"] > gain["plain-8"] > gain["resnet-14"]  # the plain gain grows with depth


def test_report_command_regenerates_a_report(quick_run, tmp_path):
    _, _, _, out = quick_run
    code, stdout, stderr = run_cli("report", str(out), "--out", str(tmp_path / "rep"), "--no-progress")
    assert code == 0, stderr
    assert (tmp_path / "rep" / "index.html").is_file()
    assert stdout.strip() == f"wrote {tmp_path / 'rep' / 'index.html'}"


def test_report_of_a_missing_run_is_a_one_line_error(tmp_path):
    code, _, err = run_cli("report", str(tmp_path / "nothing"))
    assert code == 2
    assert err.count("\n") == 1 and "no saved run" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--models", "vgg-16"], "unknown model spec"),
        (["--depths", "21"], "6n+2"),
        (["--families", "rnn"], "--families takes cnn and/or mlp"),
        (["--data", "mnist"], "unknown dataset"),
        (["--data", "cifar10:/no/such/folder"], "does not exist"),
    ],
)
def test_compare_usage_errors_are_one_line(args, match, tmp_path):
    common = ["--out", str(tmp_path / "x"), "--no-progress", "--epochs", "1"]
    code, _, err = run_cli("compare", *common, *args)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("gradprobe compare: error:") and match in last
    assert "Traceback" not in err


def test_compare_mlp_family(tmp_path):
    code, stdout, stderr = run_cli(
        "compare", "--families", "mlp", "--depths", "4", "--epochs", "1", "--out", str(tmp_path),
        "--no-report", "--no-progress", "--width", "16",
    )  # fmt: skip
    assert code == 0, stderr
    assert gradprobe.load(tmp_path).models == ["plain-mlp-4", "resnet-mlp-4"]
    assert "plain-mlp-4" in stdout


# ----------------------------------------------------------------------------- inspect and blocks


def test_blocks_on_a_user_model(factory_file):
    code, stdout, stderr = run_cli("blocks", f"{factory_file}:make", "--arg", "depth=3")
    assert code == 0, stderr
    assert "Net: 3 blocks selected by blocks='auto'" in stdout
    rows = [line.split() for line in stdout.splitlines()[2:]]
    assert [r[1] for r in rows] == ["body.0", "body.1", "body.2"]
    assert all(r[2] == "Residual" and r[3] == "72" for r in rows)
    assert stdout.splitlines()[1].split()[-1] == "run"
    assert all(r[4] == "body[0..2]" for r in rows)  # the run each block came from


def test_blocks_with_patterns_and_module_targets(capsys):
    code, stdout, _ = run_cli(
        "blocks", "gradprobe.models:resnet_cifar", "--arg", "20", "--blocks", "layer2.*", "layer3.0"
    )  # fmt: skip
    assert code == 0
    names = [line.split()[1] for line in stdout.splitlines()[2:]]
    assert names == ["layer2.0", "layer2.1", "layer2.2", "layer3.0"]
    assert all(line.split()[-1] == "-" for line in stdout.splitlines()[2:])  # no run: named by hand


def test_inspect_prints_the_per_block_table_of_a_user_model(factory_file, tmp_path):
    csv = tmp_path / "table.csv"
    code, stdout, stderr = run_cli("inspect", f"{factory_file}:make", "--seed", "1", "--csv", str(csv))
    assert code == 0, stderr
    assert "Net on a random input of shape (8, 5)" in stdout
    header = next(line for line in stdout.splitlines() if line.lstrip().startswith("index"))
    assert header.split() == [
        "index", "block", "gain", "cum_gain", "skip_grad", "branch_grad", "res_ratio", "out_rms",
        "jac_fro", "jac_spec", "jac_id",
    ]  # fmt: skip
    import pandas as pd

    table = pd.read_csv(csv)
    assert table["block"].tolist() == [f"body.{i}" for i in range(4)]
    assert (table["step"] == 0).all() and table["jac_fro"].notna().all()
    # the printed numbers are the table's
    first = next(line for line in stdout.splitlines() if " body.0 " in f" {line} ").split()
    assert float(first[2]) == pytest.approx(table["gain"].iloc[0], rel=5e-3)


def test_inspect_with_an_explicit_input_shape_and_no_jacobian():
    code, stdout, stderr = run_cli(
        "inspect", "gradprobe.models:resnet_cifar", "--arg", "8", "--arg", "in_channels=1",
        "--input-shape", "4,1,8,8", "--no-jacobian",
    )  # fmt: skip
    assert code == 0, stderr
    assert "ResNetCIFAR on a random input of shape (4, 1, 8, 8)" in stdout
    assert "jac_fro" not in stdout and "layer3.0" in stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_inspect_and_blocks_on_a_hugging_face_gpt2(factory_file):
    code, stdout, stderr = run_cli("blocks", f"{factory_file}:gpt2")
    assert code == 0, stderr
    assert [line.split()[1] for line in stdout.splitlines()[2:]] == ["h.0", "h.1"]
    code, stdout, stderr = run_cli("inspect", f"{factory_file}:gpt2", "--no-jacobian")
    assert code == 0, stderr
    assert "GPT2Model on a random input of shape (8, 16)" in stdout  # token ids, guessed from the embedding
    assert " h.1 " in stdout


@pytest.mark.parametrize(
    ("target", "extra", "match"),
    [
        ("no_such_module_xyz:make", [], "cannot import module 'no_such_module_xyz'"),
        ("gradprobe.models:nope", [], "has no attribute 'nope'"),
        ("gradprobe.models", [], "must look like MODULE:FACTORY"),
        ("/no/such/file.py:make", [], "no such file"),
        ("{file}:broken", [], "calling {file}:broken(...) failed: RuntimeError: no weights here"),
        ("{file}:not_a_model", [], "returned a int, not a torch.nn.Module"),
        ("{file}:make", ["--blocks", "nothing*"], "nothing*"),
        ("gradprobe.models:resnet_cifar", [], "missing 1 required positional argument"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "blocks"])
def test_bad_targets_give_one_line_and_exit_2(command, target, extra, match, factory_file):
    target = target.format(file=factory_file)
    code, stdout, err = run_cli(command, target, *extra)
    assert code == 2
    assert err.startswith(f"gradprobe {command}: error:")
    assert match.format(file=factory_file) in err
    assert "Traceback" not in err and not stdout


def test_inspect_that_cannot_guess_the_input_says_so(factory_file):
    code, _, err = run_cli("inspect", "torch.nn:Identity")
    assert code == 2 and "--input-shape" in err


def test_inspect_wrong_input_shape_is_a_usage_error(factory_file):
    code, _, err = run_cli("inspect", f"{factory_file}:make", "--input-shape", "2,7")
    assert code == 2 and "failed" in err and "--input-shape" in err


def test_load_factory_resolves_dotted_attributes():
    assert load_factory("gradprobe.models:ResNetCIFAR.forward").__name__ == "forward"


def test_compare_arguments_map_onto_one_train_config():
    from gradprobe.cli import _train_config, build_parser
    from gradprobe.experiment import TrainConfig

    argv = ["compare", "--lr", "0.1", "--warmup", "5", "--batch-size", "32", "--seed", "3", "--width", "8"]
    argv += [
        "--every",
        "2",
        "--jacobian",
        "--no-zero-init",
        "--no-paths",
        "--no-progress",
        "--tensorboard",
        "tb",
    ]
    config = _train_config(build_parser().parse_args(argv), 7)
    assert config == TrainConfig(
        epochs=7,
        lr=0.1,
        warmup=5,
        batch_size=32,
        seed=3,
        width=8,
        every=2,
        jacobian=True,
        zero_init_residual=False,
        paths=False,
        progress=False,
        tensorboard="tb",
    )
    # without options the command trains exactly as compare() does by default
    assert _train_config(build_parser().parse_args(["compare"]), 20) == TrainConfig()


# ----------------------------------------------------------------------------- output folder and progress

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--models", "plain-mlp-4", "--data", "synthetic", "--epochs", "1", "--width", "8"]


def test_compare_replaces_the_reference_report_but_not_a_folder_with_the_users_files(tmp_path):
    """Regression: on a fresh clone `gradprobe compare` refused reports/compare, the committed
    reference report (no run_id in its meta.json), and its message mixed overwrite=True, --force
    and "(a run)"."""
    out = tmp_path / "compare"
    shutil.copytree(ROOT / "reports" / "compare", out)
    code, _, err = run_cli("compare", *SMALL, "--out", str(out), "--no-progress")
    assert code == 0, err
    assert gradprobe.load(out).models == ["plain-mlp-4"]
    assert {"frame.parquet", "scalars.parquet", "paths.parquet", "meta.json", "index.html"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p.name for p in out.iterdir() if p.suffix == ".csv" or p.name.startswith(".")]
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("compare", *SMALL, "--out", str(out), "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"gradprobe compare: error: --out {out} holds files gradprobe did not write (notes.txt)"
    )
    assert "pass --force" in err and "overwrite" not in err and "(a run)" not in err
    code, _, err = run_cli("compare", *SMALL, "--out", str(out), "--no-progress", "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the run, never the user's files


def test_compare_refuses_another_kind_of_run_in_the_cli_s_words(tmp_path):
    other = tmp_path / "probe"
    gradprobe.records.Run(
        gradprobe.records.empty_frame(), gradprobe.records.empty_frame()[["step"]], {"kind": "probe"}
    ).save(other)
    code, _, err = run_cli("compare", *SMALL, "--out", str(other), "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert f"--out {other} holds another gradprobe run: a probe run (run " in err
    assert "pass --force to replace it" in err and "overwrite" not in err


def test_piped_compare_prints_plain_progress_lines_and_no_shortcut_warning(tmp_path):
    """Regression: piped into a file the bars were 115 KB of carriage-return-joined redraws, and
    the plain nets warned that they have no shortcut."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--models", "plain-8,resnet-8", "--data", "synthetic", "--epochs", "2", "--width", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "gradprobe", "compare", *args, "--out", str(tmp_path / "run")],
        capture_output=True,  # pipes: not a terminal
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "Warning" not in result.stderr and "change the shape" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if " epoch " in line]
    assert [re.sub(r" loss .*", "", line).strip() for line in progress] == [
        f"{model} epoch {epoch}/2" for model in ("plain-8", "resnet-8") for epoch in (1, 2)
    ]
    assert (tmp_path / "run" / "index.html").is_file()


def test_compare_arch_preact_trains_the_pre_activation_pair_and_no_lesion_skips_lesions(tmp_path):
    import gradprobe
    from gradprobe.cli import main
    from gradprobe.experiment import lesions

    out = tmp_path / "run"
    args = ["compare", "--quick", "--depths", "8", "--epochs", "1", "--no-report", "--no-progress"]
    assert main([*args, "--arch", "preact", "--out", str(out)]) == 0
    run = gradprobe.load(out)
    assert run.models == ["plain-preact-8", "resnet-preact-8"]
    assert run.meta["model_info"]["resnet-preact-8"]["model_class"] == "gradprobe.models.PreActResNetCIFAR"
    assert lesions(run) is not None
    assert "lesion_worst_drop" in summary(run).columns
    assert main([*args, "--no-lesion", "--out", str(tmp_path / "bare")]) == 0
    bare = gradprobe.load(tmp_path / "bare")
    assert bare.models == ["plain-8", "resnet-8"] and lesions(bare) is None
    assert "lesion_worst_drop" not in summary(bare).columns
