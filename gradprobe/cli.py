"""The ``gradprobe`` command: ``compare``, ``report``, ``inspect`` and ``blocks``.

``gradprobe compare`` with no arguments is the main job: it trains plain and
residual CNNs of depths 20 and 56 on the bundled digits data with a probe
attached, writes the run (and the HTML report) into ``reports/compare/`` and
prints a summary table. ``gradprobe inspect`` and ``gradprobe blocks`` work on
any importable model factory, e.g. ``torchvision.models:resnet18``.

Exit codes: 0 success, 1 the job itself failed, 2 bad usage (unknown option,
bad target, missing file). Errors are one line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._format import frame_table

if TYPE_CHECKING:
    from torch import nn

    from .experiment import TrainConfig

__all__ = ["build_parser", "load_factory", "main"]


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors a user can read at a glance (exit code 2 either way).

    A bad value (``--depths 20,abc``) is one line naming the option. Any other mistake (an
    unknown option, a missing argument) is this (sub)command's one-line usage and one error
    line; ``--help`` still shows everything. Subcommand parsers are of this class too.
    """

    def short_usage(self) -> str:
        """``usage: gradprobe compare [options]``, with the positional arguments."""
        words = [self.prog]
        for action in self._actions:
            if not action.option_strings:
                words.append(str(action.metavar or action.dest.upper()))
        if any(action.option_strings for action in self._actions):
            words.append("[options]")
        return f"usage: {' '.join(words)}   ({self.prog} --help lists them)"

    def error(self, message: str) -> Any:  # argparse's signature: NoReturn
        # argparse words a bad value "argument --depths: --depths must be ...": the option once
        value = re.match(r"argument (\S+): (.*)", message, re.DOTALL)
        if value:
            option, detail = value.groups()
            line = detail if option in detail else message
            choice = re.match(r"invalid choice: '([^']*)' \(choose from (.*)\)", detail)
            if choice:  # a typo of a command: name the nearest one
                match = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1)
                line += f"; did you mean {match[0]!r}?" if match else ""
            self.exit(2, f"{self.prog}: error: {' '.join(line.split())}\n")
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {' '.join(message.split())}\n")


def _unrecognized(parser: argparse.ArgumentParser, extra: Sequence[str]) -> Any:
    """Exit on arguments ``parser``'s (sub)command does not take, naming the option nearest a typo."""
    known = [o for action in parser._actions for o in action.option_strings]
    close = {
        word: match[0]
        for word in extra
        if word.startswith("-") and (match := difflib.get_close_matches(word.split("=")[0], known, n=1))
    }
    if len(extra) == 1 and close:
        hint = f" (did you mean {close[extra[0]]}?)"
    else:
        hint = f" ({'; '.join(f'{w}: did you mean {m}?' for w, m in close.items())})" if close else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


# ----------------------------------------------------------------------------- helpers


def _csv(kind: type, name: str) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} is empty")
        return values

    return parse


def _number(kind: type, name: str, low: float, high: float | None = None) -> Any:
    """An argparse type: a ``kind`` number in [low, high], else a one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not (value >= low and (high is None or value <= high)) or (
            kind is float and not math.isfinite(value)
        ):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text}")
        return value

    return parse


def _positive(name: str, high: int | None = None) -> Any:
    return _number(int, name, 1, high)


#: A seed: what ``torch.Generator.manual_seed`` takes.
_SEED = _number(int, "--seed", 0, 2**63 - 1)


def _output_folder(path: Path, run_id: str | None, force: bool, label: str, kind: str | None = None) -> None:
    """Check an output folder at start-up, before any work: one line and exit 2 if it cannot be used.

    ``label`` names the folder as the user gave it (``--out DIR``); ``kind``: see
    :func:`gradprobe.records.check_destination`.
    """
    from .records import check_destination

    if not str(path):
        raise UsageError(f"{label.strip()} is empty; pass a folder name ('.' for the current folder)")
    try:
        check_destination(path, run_id, overwrite=force, kind=kind, name=label, force="--force")
    except OSError as exc:
        raise UsageError(str(exc)) from None


def _check_data(data: str, data_root: str | None) -> None:
    """``--data`` in the command line's words: a known name, and CIFAR-10 with its folder.

    (:func:`gradprobe.data.load` checks the same in the Python API's words.)
    """
    from .data import DATASETS

    key, _, folder = data.partition(":")
    key = key.strip().lower()
    if key not in (*DATASETS, "cifar-10"):
        raise UsageError(
            f"--data {data}: unknown dataset; choose digits, synthetic or cifar10 "
            "(with --data-root DIR, or as --data cifar10:DIR)"
        )
    if key.startswith("cifar") and not (folder or data_root):
        raise UsageError(
            f"--data {data} needs the folder that holds CIFAR-10: pass --data-root DIR "
            "(or --data cifar10:DIR); gradprobe never downloads it"
        )


def _output_file(path: Path, what: str) -> None:
    """Check at start-up that the file ``path`` can be written (its folder exists and is writable)."""
    from .records import not_regular, try_write

    if not str(path):
        raise UsageError(f"{what} is empty; pass a file name")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; pass a file name")
    kind = not_regular(path)
    if kind is not None:  # written over, a device node or a FIFO would be replaced by a plain file
        raise UsageError(f"{what} {path} is {kind}, not a regular file; pass a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{what} {path}: the folder {folder} does not exist; create it first")
    try:
        try_write(folder)
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be written ({exc.strerror or exc})") from None


def _log_folder(path: str, what: str) -> None:
    """Check at start-up that ``path`` is a folder or can be made one (its nearest existing parent
    a writable folder)."""
    from .records import try_write

    if not path:
        raise UsageError(f"{what} is empty; pass a folder name")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {path} exists and is not a folder; TensorBoard logs go into a folder")
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {parent} is not a folder")
    try:
        try_write(parent)
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be written ({exc.strerror or exc})") from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 8,3,32,32, got {text!r}") from None
    if not shape or any(not 1 <= s < 2**31 for s in shape):
        raise argparse.ArgumentTypeError(
            f"input shape must be positive sizes below 2**31 like 8,3,32,32, got {text!r}"
        )
    return shape


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --arg shortcut=A


def _factory_args(items: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key.isidentifier():
            kwargs[key] = _literal(value)
        else:
            args.append(_literal(item))
    return args, kwargs


def load_factory(target: str) -> Any:
    """Resolve ``MODULE:ATTR`` (``torchvision.models:resnet18``) or ``path/to/file.py:ATTR``.

    Raises :class:`UsageError` with a one-line explanation when it cannot.

    >>> load_factory("gradprobe.models:resnet_cifar").__name__
    'resnet_cifar'
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"target {target!r} must look like MODULE:FACTORY, e.g. torchvision.models:resnet18")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"target {target!r}: no such file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"target {target!r}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise UsageError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UsageError(f"cannot import module {module_name!r} of target {target!r}: {exc}") from exc
        except Exception as exc:
            raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} (target {target!r})")
        obj = getattr(obj, part)
    return obj


def _build_target(target: str, arg_items: Sequence[str]) -> nn.Module:
    from torch import nn

    factory = load_factory(target)
    args, kwargs = _factory_args(arg_items)
    if isinstance(factory, nn.Module):
        if args or kwargs:
            raise UsageError(f"{target} is a module instance, not a factory; it takes no --arg")
        return factory
    if not callable(factory):
        raise UsageError(
            f"{target} is a {type(factory).__name__}, neither a model factory nor a torch.nn.Module"
        )
    try:
        model = factory(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:  # the user's code ending the program: say so
        raise UsageError(
            f"calling {target}(...) raised {type(exc).__name__}"
            + (f"({exc.args[0]!r})" if exc.args else "")
            + "; a model factory must return a model"
        ) from None
    except BaseException as exc:
        hint = " (pass the factory's arguments with --arg, e.g. --arg 20 --arg residual=False)"
        raise UsageError(f"calling {target}(...) failed: {type(exc).__name__}: {exc}{hint}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{target}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _default_input(model: nn.Module, batch: int, gen: Any) -> Any:
    """A random input for ``model``, guessed from its first layer with parameters."""
    import torch
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (batch, 16), generator=gen)
        if isinstance(module, nn.Conv2d):
            return torch.randn(batch, module.in_channels, 32, 32, generator=gen)
        if isinstance(module, nn.Conv1d):
            return torch.randn(batch, module.in_channels, 64, generator=gen)
        if isinstance(module, nn.Conv3d):
            return torch.randn(batch, module.in_channels, 8, 16, 16, generator=gen)
        if isinstance(module, nn.Linear):
            return torch.randn(batch, module.in_features, generator=gen)
    raise UsageError(
        "cannot guess the input of this model; pass --input-shape (e.g. --input-shape 8,3,32,32)"
    )


# ----------------------------------------------------------------------------- subcommands


def _train_config(ns: argparse.Namespace, epochs: int) -> TrainConfig:
    """The :class:`gradprobe.experiment.TrainConfig` of ``gradprobe compare``'s arguments.

    The compare parser names its training options after the config's fields, so this is the
    one place that maps them: every field the namespace holds, plus the two the CLI derives.
    """
    from dataclasses import fields

    from .experiment import TrainConfig

    given = {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)}
    return TrainConfig(**{**given, "epochs": epochs, "progress": not ns.no_progress})


def _cmd_compare(ns: argparse.Namespace) -> int:
    import torch

    from . import experiment
    from .experiment import progress_bars

    if ns.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {ns.threads}")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    quick = ns.quick
    depths = ns.depths or ([8, 14] if quick else [20, 56])
    families = ns.families or ["cnn"]
    for fam in families:
        if fam not in ("cnn", "mlp"):
            raise UsageError(f"--families takes cnn and/or mlp, got {fam!r}")
    cnn = "" if ns.arch == "post" else "preact-"
    models = list(ns.models or [])
    if not models:
        for fam in families:
            for kind in ("plain", "resnet"):
                for depth in depths:
                    models.append(f"{kind}-{cnn}{depth}" if fam == "cnn" else f"{kind}-mlp-{depth}")
    specs = []
    for m in models:
        try:
            specs.append(experiment.parse_spec(m).name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    epochs = ns.epochs if ns.epochs is not None else (2 if quick else experiment.DEFAULTS["epochs"])
    if ns.out is not None and not ns.out.strip():
        raise UsageError("--out is empty; pass a folder name ('.' for the current folder)")
    out = Path(ns.out if ns.out is not None else ("reports/compare-quick" if quick else "reports/compare"))
    _check_data(ns.data, ns.data_root)
    label = f"--out {out}" if ns.out is not None else f"{out} (the default --out)"
    # Before training: a bad folder must not cost the results. An earlier compare run there is replaced.
    _output_folder(out, None, ns.force, label, kind="compare")
    if ns.tensorboard is not None:
        _log_folder(ns.tensorboard, "--tensorboard")
    command = "gradprobe " + " ".join(ns.argv)
    print(
        f"gradprobe compare: {', '.join(specs)} on {ns.data}, {epochs} epochs, lr {ns.lr}, seed {ns.seed}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    try:
        run = experiment.compare(
            specs,
            ns.data,
            config=_train_config(ns, epochs),
            out=out,
            overwrite=ns.force,
            data_root=ns.data_root,
            command=command,
        )
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - started
    wrote = [f"run tables in {out}/ (read with gradprobe.load)"]
    if not ns.no_report:
        from .reporting import report

        index = report(run, out, progress=not ns.no_progress and progress_bars(), overwrite=ns.force)
        wrote.insert(0, f"report {index}")
    elif (out / "index.html").exists():
        stale = f"{out / 'index.html'} is the report of an earlier run; `gradprobe report {out}` renews it"
        print(f"gradprobe compare: note: {stale}", file=sys.stderr)
    table = experiment.summary(run)
    print(f"\nTrained {len(specs)} models in {seconds:.0f} s ({torch.get_num_threads()} threads). Wrote:")
    for line in wrote:
        print(f"  {line}")
    print()
    print(frame_table(table, SUMMARY_COLUMNS))
    print(SUMMARY_LEGEND)
    return 0


#: Columns of the summary ``gradprobe compare`` prints (see :func:`gradprobe.summary.summary`).
SUMMARY_COLUMNS = (
    "model",
    "train_loss",
    "test_acc",
    "cum_gain_init",
    "cum_gain_end",
    "res_ratio_init",
    "res_ratio_end",
    "effective_length_init",
    "effective_length_end",
)

SUMMARY_LEGEND = """
train_loss      mean training loss over the last epoch (degradation: deeper plain nets end higher)
test_acc        accuracy on the held-out test split after the last epoch
cum_gain_init   |dL/dx| at the first block / |dL/dy| at the last block of its stack, at step 0: how
                much the gradient grew or shrank on its way back. ~1: the gradient highway; >>1
                explodes, <<1 vanishes
cum_gain_end    the same after the last step
res_ratio_*     largest |y - x| / |x| over the shape-preserving blocks (0: every block is the identity)
effective_length_*  share-weighted mean number of residual branches on the gradient's paths (Veit et al.
                2016), at the first and last step; 0: the gradient takes the skips only (--no-paths: off)"""


def _cmd_report(ns: argparse.Namespace) -> int:
    path = Path(ns.path)
    if not path.exists():
        raise UsageError(
            f"no saved run at {path}; pass the folder written by gradprobe compare or Probe.save"
        )
    if not path.is_dir():
        raise UsageError(
            f"{path} is a file, not a saved run; pass the folder written by gradprobe compare or Probe.save"
        )
    from .experiment import progress_bars
    from .records import load
    from .reporting import report

    if ns.out is not None and not ns.out.strip():
        raise UsageError("--out is empty; pass a folder name ('.' for the current folder)")
    out = Path(ns.out) if ns.out is not None else path
    label = f"--out {out}" if ns.out is not None else str(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{label} is a file; the report is written into a folder")
    try:
        run = load(path)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    same = out.exists() and out.resolve() == path.resolve()
    _output_folder(out, None if same else run.meta.get("run_id"), ns.force or same, label)
    progress = not ns.no_progress and progress_bars()
    try:
        index = report(path if same else run, out, progress=progress, overwrite=ns.force)
    except (OSError, ValueError) as exc:
        raise UsageError(f"writing the report into {out} failed: {exc}") from None
    print(f"wrote {index}")
    return 0


def _blocks_arg(ns: argparse.Namespace) -> Any:
    if not ns.blocks:
        return "auto"
    return ns.blocks if len(ns.blocks) > 1 or ns.blocks[0] != "auto" else "auto"


def _cmd_blocks(ns: argparse.Namespace) -> int:
    from .blocks import auto_blocks, select_blocks

    model = _build_target(ns.target, ns.arg)
    try:
        selected = select_blocks(model, _blocks_arg(ns))
        # The run each block came from (see gradprobe.blocks); '-' for blocks named by hand.
        runs = {b.name: b.run for b in auto_blocks(model)} if _blocks_arg(ns) == "auto" else {}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    import pandas as pd

    frame = pd.DataFrame(
        {
            "index": range(len(selected)),
            "block": [name for name, _ in selected],
            "class": [type(m).__name__ for _, m in selected],
            "params": [sum(p.numel() for p in m.parameters()) for _, m in selected],
            "run": [runs.get(name, "-") for name, _ in selected],
        }
    )
    print(f"{type(model).__name__}: {len(selected)} blocks selected by blocks={_blocks_arg(ns)!r}")
    print(frame_table(frame, ["index", "block", "class", "params", "run"]))
    return 0


def _cmd_inspect(ns: argparse.Namespace) -> int:
    import torch

    if ns.csv is not None:  # before building and running anything
        _output_file(Path(ns.csv), "--csv")
    model = _build_target(ns.target, ns.arg)
    gen = torch.Generator().manual_seed(ns.seed)
    try:
        if ns.input_shape:
            if ns.input_dtype == "long":
                if not ns.vocab_size:
                    raise UsageError(
                        "--input-dtype long needs --vocab-size (random token ids are drawn below it)"
                    )
                inputs = torch.randint(0, ns.vocab_size, ns.input_shape, generator=gen)
            else:
                inputs = torch.randn(ns.input_shape, generator=gen)
        else:
            inputs = _default_input(model, ns.batch, gen)
    except (RuntimeError, MemoryError, ValueError, TypeError) as exc:  # an input too large to allocate
        raise UsageError(f"cannot make the random input: {type(exc).__name__}: {exc}") from None
    param = next(iter(model.parameters()), None)
    if param is not None and inputs.is_floating_point():
        inputs = inputs.to(param.dtype)
    from .analysis import analyze
    from .blocks import select_blocks

    blocks = _blocks_arg(ns)
    try:
        select_blocks(model, blocks)  # a clear error before running anything
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        frame = analyze(
            model, inputs, blocks=blocks, jacobian=not ns.no_jacobian, probes=ns.probes, seed=ns.seed
        )
    except Exception as exc:
        raise UsageError(
            f"running {ns.target} on an input of shape {tuple(inputs.shape)} failed: "
            f"{type(exc).__name__}: {exc}. "
            "Pass --input-shape (and --input-dtype long --vocab-size N for token ids)."
        ) from None
    print(
        f"{type(model).__name__} on a random input of shape {tuple(inputs.shape)}, one forward/backward "
        f"({'train' if model.training else 'eval'} mode, loss = <output, random direction>, seed {ns.seed}):"
    )
    columns = ["index", "block", "gain", "cum_gain", "skip_grad", "branch_grad", "res_ratio", "out_rms"]
    if not ns.no_jacobian:
        columns += ["jac_fro", "jac_spec", "jac_id"]
    print(frame_table(frame, columns))
    if ns.csv:
        from .records import atomic_write

        atomic_write(ns.csv, lambda tmp: frame.to_csv(tmp, index=False))
        print(f"wrote {ns.csv}")
    return 0


def _cmd_export_tensorboard(ns: argparse.Namespace) -> int:
    from . import export

    try:
        out = export.tensorboard(ns.path, ns.logdir, columns=ns.columns)
    except (FileNotFoundError, NotADirectoryError, ImportError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote TensorBoard events of {ns.path} into {out} (view with: tensorboard --logdir {out})")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradprobe`` command."""
    from ._version import __version__
    from .experiment import DEFAULTS

    parser = _Parser(
        prog="gradprobe",
        description="Measure gradient propagation and identity behaviour of the blocks of deep PyTorch nets.",
    )
    parser.add_argument("--version", action="version", version=f"gradprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "compare",
        help="train plain and residual nets side by side with probes (the main job)",
        description="Train plain and residual nets on the same data with a probe attached, save the run and "
        "its report, and print a summary. Without options: plain and residual CNNs of depths 20 and 56 on "
        "scikit-learn's digits, into reports/compare/.",
    )
    p.add_argument("--models", type=_csv(str, "--models"), help="explicit specs, e.g. plain-56,resnet-mlp-30")
    p.add_argument(
        "--depths",
        type=_csv(_positive("--depths"), "--depths"),
        help="depths to build (default 20,56; 8,14 with --quick)",
    )
    p.add_argument("--families", type=_csv(str, "--families"), help="cnn and/or mlp (default cnn)")
    p.add_argument(
        "--arch",
        choices=("post", "preact"),
        default="post",
        help="the CNN: post (He et al. 2016, ReLU after the addition; default) or preact "
        "(pre-activation, identity skips)",
    )
    p.add_argument(
        "--epochs",
        type=_positive("--epochs", 10**6),
        help=f"training epochs (default {DEFAULTS['epochs']}; 2 with --quick)",
    )
    p.add_argument(
        "--lr",
        type=_number(float, "--lr", 1e-12, 1e6),
        default=DEFAULTS["lr"],
        help="peak learning rate (default %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=_number(int, "--warmup", 0, 10**9),
        default=DEFAULTS["warmup"],
        help="warm-up steps (default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive("--batch-size", 2**31 - 1),
        default=DEFAULTS["batch_size"],
        help="default %(default)s",
    )
    p.add_argument("--seed", type=_SEED, default=0, help="seed of weights and data order (default 0)")
    p.add_argument("--data", default="digits", help="digits (default), synthetic, cifar10 or cifar10:FOLDER")
    p.add_argument("--data-root", help="folder that holds CIFAR-10 (never downloaded)")
    p.add_argument(
        "--width",
        type=_positive("--width", 1 << 16),
        help="channels of the first stage (CNN, default 16) or units (MLP, 128)",
    )
    p.add_argument(
        "--every", type=_positive("--every", 2**31 - 1), default=1, help="record every N-th step (default 1)"
    )
    p.add_argument(
        "--jacobian",
        action="store_true",
        help="also record the Jacobian columns at the first and last step (slower)",
    )
    p.add_argument(
        "--no-zero-init",
        dest="zero_init_residual",
        action="store_false",
        default=DEFAULTS["zero_init_residual"],
        help="plain He init for residual nets (default: zero-init the last BN of every residual branch)",
    )
    p.add_argument(
        "--out", help="output folder (default reports/compare, reports/compare-quick with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny run (depths 8,14, 2 epochs) for smoke tests")
    p.add_argument("--no-report", action="store_true", help="write the tables only, not the HTML report")
    p.add_argument("--force", action="store_true", help="replace another run already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="stream each model's per-block scalars into this TensorBoard log folder while it trains",
    )
    p.add_argument(
        "--no-lesion",
        dest="lesion",
        action="store_false",
        help="skip the block lesions after training (default: delete each block, then k random blocks)",
    )
    p.add_argument(
        "--no-paths",
        dest="paths",
        action="store_false",
        help="skip the path-length decomposition (default: at the first and the last step of each model)",
    )
    p.add_argument(
        "--threads",
        type=_number(int, "--threads", 0, 4096),
        default=1,
        help="torch CPU threads (default 1; 0: torch's choice). The reference nets are too small to gain "
        "from more, and with other work on the machine extra threads made the default run 6x slower",
    )
    p.set_defaults(func=_cmd_compare, parser=p)

    p = sub.add_parser(
        "report",
        help="write the HTML report of a saved run",
        description="Regenerate the HTML report (figures, summary, tables) of a saved run folder.",
    )
    p.add_argument("path", help="folder of a saved run (gradprobe compare --out, Probe.save)")
    p.add_argument("--out", help="report folder (default: the run folder)")
    p.add_argument("--force", action="store_true", help="replace another run already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_report, parser=p)

    p = sub.add_parser(
        "export",
        help="export a saved run to another tool (tensorboard)",
        description="Export a saved run. `gradprobe export tensorboard RUN LOGDIR` writes every "
        "(column, block) as the scalar gradprobe/<column>/<block> at each recorded step, one subfolder "
        "per model of a multi-model run.",
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = formats.add_parser("tensorboard", help="TensorBoard event files (needs the tensorboard package)")
    q.add_argument("path", help="folder of a saved run (gradprobe compare --out, Probe.save)")
    q.add_argument("logdir", help="TensorBoard log folder to write into (created if needed)")
    q.add_argument(
        "--columns", type=_csv(str, "--columns"), help="columns to export (default: every metric with values)"
    )
    q.set_defaults(func=_cmd_export_tensorboard, parser=q)

    target_help = "MODULE:FACTORY (e.g. torchvision.models:resnet18) or path/to/file.py:FACTORY"
    arg_help = "argument of the factory, positional (20) or KEY=VALUE (residual=False); repeatable"
    blocks_help = "blocks= of gradprobe.attach: auto (default), or names/glob patterns"

    p = sub.add_parser(
        "inspect",
        help="one-shot per-block analysis of any model factory",
        description="Build a model from an importable factory, run one forward/backward pass on a random "
        "input with a probe attached, and print the per-block table.",
    )
    p.add_argument("target", help=target_help)
    p.add_argument("--arg", action="append", default=[], help=arg_help)
    p.add_argument(
        "--input-shape", type=_shape, help="input shape with batch, e.g. 8,3,32,32 (default: guessed)"
    )
    p.add_argument("--input-dtype", choices=("float", "long"), default="float", help="long for token ids")
    p.add_argument(
        "--vocab-size",
        type=_positive("--vocab-size", 2**62),
        help="token ids are drawn below this (with --input-dtype long)",
    )
    p.add_argument(
        "--batch",
        type=_positive("--batch", 1 << 14),
        default=8,
        help="batch of the guessed input (default 8)",
    )
    p.add_argument("--blocks", nargs="+", help=blocks_help)
    p.add_argument("--no-jacobian", action="store_true", help="skip the Jacobian columns (faster)")
    p.add_argument(
        "--probes",
        type=_positive("--probes", 1 << 12),
        default=8,
        help="random vectors per Jacobian estimate (default 8)",
    )
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the input and the probes (default 0)")
    p.add_argument("--csv", help="also write the full table to this CSV file")
    p.set_defaults(func=_cmd_inspect, parser=p)

    p = sub.add_parser(
        "blocks",
        help="show which blocks blocks='auto' selects in a model",
        description="Build a model from an importable factory and list the blocks a probe would attach to, "
        "with the run (container and member range) that blocks='auto' took each one from.",
    )
    p.add_argument("target", help=target_help)
    p.add_argument("--arg", action="append", default=[], help=arg_help)
    p.add_argument("--blocks", nargs="+", help=blocks_help)
    p.set_defaults(func=_cmd_blocks, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradprobe`` console script; returns the exit code.

    >>> main(["blocks", "gradprobe.models:mlp", "--arg", "4", "--arg", "in_features=3",
    ...       "--arg", "num_classes=2"])
    MLP: 2 blocks selected by blocks='auto'
    index  block     class     params  run
        0  blocks.0  MLPBlock   16768  blocks[0..1]
        1  blocks.1  MLPBlock   16768  blocks[0..1]
    0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns, extra = parser.parse_known_args(args)
        if extra:  # reported by the subcommand that did not take them, with its usage
            owner = getattr(ns, "parser", None)
            _unrecognized(owner if isinstance(owner, argparse.ArgumentParser) else parser, extra)
    except SystemExit as exc:  # argparse exits 2 on bad usage and 0 on --help
        return int(exc.code or 0)
    if ns.command is None:
        parser.print_help()
        return 2
    ns.argv = args
    try:
        return int(ns.func(ns))
    except UsageError as exc:
        message = " ".join(str(exc).split())  # one line, however the underlying error was laid out
        print(f"gradprobe {ns.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradprobe {ns.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # user code (a factory, a model's forward) calling sys.exit()
        print(f"gradprobe {ns.command}: error: user code raised SystemExit({exc.code!r})", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) and exc.code not in (0, None) else 1
    except OSError as exc:  # a folder or a file that changed under the command, a full disk
        message = " ".join(str(exc).split())
        print(f"gradprobe {ns.command}: error: {message}", file=sys.stderr)
        return 1
    except BaseException as exc:
        from .records import RunFormatError

        if isinstance(exc, Exception) and not isinstance(exc, RunFormatError):
            raise  # a bug of gradprobe (user code's exceptions are caught where it is called)
        message = " ".join(str(exc).split())  # a run folder that changed under the command, or a
        # BaseException of the user's code (its own class, GeneratorExit, ...): one line
        print(f"gradprobe {ns.command}: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m gradprobe.cli
    sys.exit(main())
