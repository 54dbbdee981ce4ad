"""gradprobe's pytest plugin: the ``gradprobe`` fixture and ``--gradprobe-report DIR``.

Installed with gradprobe through the ``pytest11`` entry point, so it is active in
every test run once gradprobe is installed (disable it with ``-p no:gradprobe``).
Without an installed entry point, load it with ``-p gradprobe.pytest_plugin`` or
``pytest_plugins = ["gradprobe.pytest_plugin"]`` in the root ``conftest.py``; doing
so while the entry point also loads it is harmless.

The ``gradprobe`` fixture
    ``gradprobe.attach(model, blocks="auto", **kwargs)`` (or ``gradprobe(model, ...)``)
    attaches a :class:`gradprobe.Probe` exactly like :func:`gradprobe.attach` and
    detaches it when the test ends. At teardown the fixture also checks every
    module of every model it saw (through ``attach`` or ``gradprobe.watch(model)``):
    a forward/backward/state-dict hook that was added during the test and is still
    registered fails the test ("ERROR at teardown"), naming the module and the kind
    of hook. Any other attribute falls through to :mod:`gradprobe.testing` and then
    to the ``gradprobe`` package, so inside a test that takes the fixture,
    ``gradprobe.analyze(...)`` and ``gradprobe.assert_gradient_flow(...)`` work as
    with the module it shadows::

        def test_highway(gradprobe):
            probe = gradprobe.attach(model)
            train_a_few_steps(model)
            gradprobe.check(probe.frame(), min_cum_gain=1e-3)

``--gradprobe-report DIR``
    For every failing test that used the fixture or a :mod:`gradprobe.testing`
    assertion (or :func:`gradprobe.testing.check`), write a report of each frame it
    looked at into ``DIR/<test id>/NN-<source>/``: the HTML report of
    :func:`gradprobe.report` (``index.html``, figures and tables), or only the
    tables (:func:`gradprobe.records.save_run`) when the report cannot be made.
    ``<test id>`` is the test's node id with every character other than letters,
    digits, ``.``, ``-`` and ``_`` replaced by ``_``; the folder is replaced on every
    run. The path appears in the failure's "gradprobe report" section, with the
    run's summary (:func:`gradprobe.summary.summary`), and in the terminal summary.

There is no marker: the fixture and the option cover what a marker would switch.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator

    from torch import nn

    from .probe import Probe
    from .records import Run

__all__ = ["GradprobeFixture", "gradprobe"]

# The names this module may be registered under: the entry point's name and the module's own.
_NAMES = ("gradprobe", "gradprobe.pytest_plugin")
_THIS = sys.modules[__name__]

# Per-module hook dictionaries of torch.nn.Module whose entries a test must not leave behind.
_HOOK_DICTS: dict[str, str] = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
    "_state_dict_pre_hooks": "state-dict pre-hook",
    "_state_dict_hooks": "state-dict hook",
    "_load_state_dict_pre_hooks": "load-state-dict pre-hook",
    "_load_state_dict_post_hooks": "load-state-dict post-hook",
}
# Hooks registered on parameter tensors (Tensor.register_hook, register_post_accumulate_grad_hook).
_PARAM_HOOK_DICTS: dict[str, str] = {
    "_backward_hooks": "gradient hook",
    "_post_accumulate_grad_hooks": "post-accumulate-grad hook",
}

Snapshot = dict[tuple[str, str, str], set[int]]


def _snapshot(model: nn.Module) -> Snapshot:
    """Keys of every hook dictionary of every submodule and parameter of ``model``."""
    snap: Snapshot = {}
    for name, module in model.named_modules():
        for attr in _HOOK_DICTS:
            snap[("module", name, attr)] = set((getattr(module, attr, None) or {}).keys())
        for pname, param in module.named_parameters(recurse=False):
            qualified = f"{name}.{pname}" if name else pname
            for attr in _PARAM_HOOK_DICTS:
                snap[("param", qualified, attr)] = set((getattr(param, attr, None) or {}).keys())
    return snap


def _leaks(model: nn.Module, before: Snapshot) -> list[str]:
    """One line per module or parameter of ``model`` that has hooks it did not have in ``before``."""
    found: dict[tuple[str, str], list[str]] = {}
    for key, keys in _snapshot(model).items():
        added = len(keys - before.get(key, set()))
        if added:
            kind, name, attr = key
            label = (_HOOK_DICTS if kind == "module" else _PARAM_HOOK_DICTS)[attr]
            found.setdefault((kind, name), []).append(f"{added} {label}{'s' if added > 1 else ''}")
    lines = []
    model_name = type(model).__name__
    for (kind, name), what in found.items():
        if kind == "param":
            where = f"parameter {name!r} of {model_name}"
        else:
            where = f"module {name!r} of {model_name}" if name else f"{model_name} itself"
        lines.append(f"  {where}: {', '.join(what)}")
    return lines


class GradprobeFixture:
    """What the ``gradprobe`` fixture gives a test: tracked probes and a hook-leak check.

    ``attach`` takes the arguments of :func:`gradprobe.attach`; ``watch`` registers
    a model for the leak check only. Other attributes come from
    :mod:`gradprobe.testing`, then from the ``gradprobe`` package.
    """

    def __init__(self) -> None:
        self.probes: list[Probe] = []
        self._watched: list[tuple[nn.Module, Snapshot]] = []

    def watch(self, model: nn.Module) -> nn.Module:
        """Check at teardown that no hook added to ``model`` during the test is left; returns ``model``."""
        from torch import nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"gradprobe.watch() needs a torch.nn.Module, got {type(model).__name__}")
        if not any(m is model for m, _ in self._watched):
            self._watched.append((model, _snapshot(model)))
        return model

    def attach(self, model: nn.Module, blocks: Any = "auto", **kwargs: Any) -> Probe:
        """:func:`gradprobe.attach`, detached automatically when the test ends."""
        from .probe import attach

        self.watch(model)
        probe = attach(model, blocks, **kwargs)
        self.probes.append(probe)
        return probe

    __call__ = attach

    def runs(self) -> list[tuple[str, Run]]:
        """``(label, run)`` of every probe of the test that recorded something."""
        out = []
        for i, probe in enumerate(self.probes, 1):
            run = probe.run()
            if len(run.frame()):
                model_class = str(run.meta.get("model_class", "model")).rsplit(".", 1)[-1]
                out.append((f"probe{i}-{model_class}", run))
        return out

    def close(self) -> list[str]:
        """Detach every probe, then list the hooks left on watched models (empty when clean)."""
        for probe in self.probes:
            probe.detach()
        lines: list[str] = []
        for model, before in self._watched:
            lines += _leaks(model, before)
        return lines

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        from . import testing

        if name in testing.__all__:
            return getattr(testing, name)
        import gradprobe as package

        try:
            return getattr(package, name)
        except AttributeError:
            raise AttributeError(
                f"the gradprobe fixture has no attribute {name!r} (nor do gradprobe.testing and gradprobe)"
            ) from None

    def __repr__(self) -> str:
        return f"<gradprobe fixture: {len(self.probes)} probes, {len(self._watched)} watched models>"


@dataclass
class _State:
    """Per-session state of the plugin (stored in ``config.stash``)."""

    report_dir: Path | None
    current: str | None = None
    frames: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    fixtures: dict[str, GradprobeFixture] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)

    def on_frame(self, source: str, frame: Any) -> None:
        if self.current is not None:
            self.frames.setdefault(self.current, []).append((source, frame))

    def entries(self, nodeid: str) -> list[tuple[str, Any]]:
        from .records import Run

        out: list[tuple[str, Any]] = []
        for source, frame in self.frames.get(nodeid, []):
            out.append((source, Run(frame, _empty_scalars(frame), {"kind": "assertion", "source": source})))
        fixture = self.fixtures.get(nodeid)
        if fixture is not None:
            out += fixture.runs()
        return out

    def write(self, nodeid: str) -> tuple[Path, list[str]] | None:
        assert self.report_dir is not None
        entries = self.entries(nodeid)
        if not entries:
            return None
        folder = self.report_dir / _folder_name(nodeid)
        if folder.exists():
            shutil.rmtree(folder)
        notes = []
        for k, (label, run) in enumerate(entries, 1):
            out = folder / f"{k:02d}-{_safe(label)}"
            run.meta.setdefault("test", nodeid)
            notes.append(_write_one(run, out))
            notes += [f"  {line}" for line in _summary_lines(run)]
        self.written[nodeid] = folder
        return folder, notes


def _empty_scalars(frame: Any) -> Any:
    import pandas as pd

    steps = sorted(frame["step"].unique().tolist()) if "step" in frame.columns else [0]
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64")})


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "test"


def _folder_name(nodeid: str, limit: int = 120) -> str:
    name = _safe(nodeid)
    if len(name) > limit:  # keep paths short; the hash keeps two long ids apart
        digest = hashlib.sha1(nodeid.encode()).hexdigest()[:8]
        name = f"{name[: limit - 9]}-{digest}"
    return name


def _write_one(run: Any, out: Path) -> str:
    """Write the HTML report of ``run`` into ``out``, or its tables when that fails; say which."""
    from .reporting import report

    try:
        return str(report(run, out, progress=False))
    except Exception as exc:  # a broken report must not hide the test's own failure
        error = f"the HTML report failed ({type(exc).__name__}: {exc})"
    run.save(out)
    return f"{out} (tables only: {error})"


#: Columns of the summary the failure's "gradprobe report" section shows for each run.
SUMMARY_COLUMNS = (
    "model",
    "blocks",
    "steps",
    "cum_gain_init",
    "cum_gain_end",
    "cum_gain_min_end",
    "cum_gain_max_end",
    "res_ratio_end",
    "gain_outside",
)


def _summary_lines(run: Any) -> list[str]:
    """The run's summary (the numbers of its HTML report's summary table) as text lines."""
    from ._format import frame_table
    from .summary import summary

    try:
        table = summary(run.frame(), run.scalars(), run.paths())
    except Exception as exc:  # a broken summary must not hide the test's own failure
        return [f"(no summary: {type(exc).__name__}: {exc})"]
    return frame_table(table, SUMMARY_COLUMNS).splitlines()


_KEY = pytest.StashKey[_State]()


# ----------------------------------------------------------------------------- hooks


def pytest_plugin_registered(plugin: Any, manager: Any) -> None:
    # Installed, this module is registered under the entry point's name ("gradprobe"); a conftest's
    # pytest_plugins or -p names it "gradprobe.pytest_plugin". pluggy refuses one module under two
    # names ("Plugin already registered under a different name"), so once registered under one
    # name, block the other: pytest then skips it silently.
    if plugin is not _THIS:
        return
    mine = manager.get_name(plugin)
    for name in _NAMES:
        if name != mine and manager.get_plugin(name) is None and not manager.is_blocked(name):
            manager.set_blocked(name)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradprobe", "gradprobe (gradient flow assertions)")
    group.addoption(
        "--gradprobe-report",
        metavar="DIR",
        dest="gradprobe_report",
        default=None,
        help="for each failing test that used the gradprobe fixture or a gradprobe.testing assertion, "
        "write a report of its frames into DIR/<test id>/",
    )


def pytest_configure(config: pytest.Config) -> None:
    report_dir = config.getoption("gradprobe_report", None)
    state = _State(Path(report_dir).resolve() if report_dir else None)
    config.stash[_KEY] = state


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    state = item.config.stash.get(_KEY, None)
    listening: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if state is not None:
        state.current = item.nodeid
        if state.report_dir is not None:
            from .testing import frame_listener

            # the frames the test's checks look at, from setup to teardown (its context only)
            listening = frame_listener(state.on_frame)
    try:
        with listening:
            yield
    finally:
        if state is not None:
            state.current = None
            state.frames.pop(item.nodeid, None)
            state.fixtures.pop(item.nodeid, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    state = item.config.stash.get(_KEY, None)
    if state is None or state.report_dir is None:
        return
    report = outcome.get_result()
    if not report.failed or item.nodeid in state.written:
        return
    try:
        written = state.write(item.nodeid)
    except Exception as exc:  # never turn a report problem into a crash of the test run
        warnings.warn(f"gradprobe: could not write the report of {item.nodeid}: {exc!r}", stacklevel=1)
        return
    if written is not None:
        folder, notes = written
        report.sections.append(
            ("gradprobe report", f"written to {folder}\n" + "\n".join(f"  {n}" for n in notes))
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    state = terminalreporter.config.stash.get(_KEY, None)
    if state is None or not state.written:
        return
    terminalreporter.write_sep("-", f"gradprobe reports of {len(state.written)} failing tests")
    for nodeid, folder in state.written.items():
        terminalreporter.write_line(f"{nodeid}: {folder}")


# ----------------------------------------------------------------------------- the fixture


@pytest.fixture
def gradprobe(request: pytest.FixtureRequest) -> Iterator[GradprobeFixture]:
    """Attach probes that are detached at teardown (``gradprobe.attach(model)``), and fail the test if
    hooks were left on any model the fixture saw. See :mod:`gradprobe.pytest_plugin`."""
    fixture = GradprobeFixture()
    state = request.config.stash.get(_KEY, None)
    if state is not None:
        state.fixtures[request.node.nodeid] = fixture
    yield fixture
    leaks = fixture.close()
    if leaks:
        pytest.fail(
            "gradprobe fixture: hooks were left on modules after the test; they keep running (and keep "
            "tensors alive) in every later forward and backward pass:\n"
            + "\n".join(leaks)
            + "\nRemove every hook a test adds: attach probes with `with gradprobe.attach(model) as probe:` "
            "or the fixture's gradprobe.attach(model) (detached at teardown), call probe.detach(), or keep "
            "the handle that register_*_hook returns and call handle.remove().",
            pytrace=False,
        )
