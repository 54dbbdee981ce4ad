"""Tests of gradprobe's pytest plugin, run through pytest's own ``pytester``.

Each test writes a small user test suite into a temporary folder and runs pytest
on it with the plugin loaded explicitly (``-p gradprobe.pytest_plugin``), the way
it runs before the ``pytest11`` entry point is installed: in a subprocess when the
suite runs gradprobe code, in-process otherwise. The double-registration tests
add a fake installed distribution whose entry point loads the plugin too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pytest

import gradprobe
from gradprobe import records
from gradprobe.pytest_plugin import _folder_name

pytest_plugins = ["pytester"]


def _import_table_readers() -> None:
    # pytester drops the modules a test imports when the test ends; pyarrow's pandas extension
    # types cannot be registered twice, so import what reading a saved run needs once, up front.
    with tempfile.TemporaryDirectory() as folder:
        records.Run(records.empty_frame(), pd.DataFrame({"step": [0]}), {}).save(folder)
        records.load(folder)


_import_table_readers()

PLUGIN = ("-p", "gradprobe.pytest_plugin")

MODELS = """
import torch
from torch import nn


def plain(depth, width=16, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])


def data(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(models=MODELS)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # In a subprocess: an in-process run would drop the modules it imported (torch._dynamo, which the
    # probe pulls in, among them) at its end, and the next run could not import them again.
    return pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", *args)


PASSING = """
from gradprobe.testing import assert_gradient_flow
from models import plain, data

def test_shallow_net_passes():
    frame = assert_gradient_flow(plain(4), data(8, 16))
    assert len(frame) == 4

def test_fixture(gradprobe):
    net = plain(3)
    probe = gradprobe.attach(net)
    net(data(4, 16)).sum().backward()
    assert probe.frame()["block"].tolist() == ["0", "1", "2"]
    # the fixture stands in for the package it shadows
    assert gradprobe.analyze(net, data(4, 16), jacobian=False)["step"].tolist() == [0, 0, 0]
    assert gradprobe.check(probe.frame(), min_cum_gain=1e-6) == []
"""

FAILING = """
from gradprobe.testing import assert_gradient_flow
from models import plain, data

def test_deep_plain_net():
    assert_gradient_flow(plain(40), data(8, 16))
"""

TRAINING = """
import pytest
import torch
from models import plain, data

@pytest.mark.parametrize("lr", [0.1])
def test_training(gradprobe, lr):
    net = plain(3)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    probe = gradprobe.attach(net)
    for step in range(4):
        loss = net(data(8, 16, seed=step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe.log(loss=loss)
    gradprobe.check(probe.frame(), max_cum_gain=1e3)
    assert False, "the loss did not go down"
"""

HOOKS = """
import gradprobe as gp
from models import plain, data

KEEP = {}

def test_probe_left_attached_by_the_user_is_detached(gradprobe):
    KEEP["net"] = net = plain(3)
    KEEP["probe"] = gradprobe.attach(net)  # never detached by the test

def test_it_was_detached():
    assert not KEEP["probe"].attached
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in KEEP["net"].modules())

def test_raw_hook_left_behind(gradprobe):
    net = plain(3)
    gradprobe.attach(net)
    net[1].register_forward_hook(lambda *args: None)

def test_probe_attached_outside_the_fixture(gradprobe):
    net = gradprobe.watch(plain(2))
    gp.attach(net)  # the package's attach: nobody detaches it

def test_parameter_hook(gradprobe):
    net = gradprobe.watch(plain(2))
    net[0][0].weight.register_hook(lambda grad: grad)

def test_hooks_from_before_the_test_are_fine(gradprobe):
    net = plain(2)
    handle = net.register_forward_hook(lambda *args: None)
    gradprobe.watch(net)
    handle.remove()
"""


@pytest.mark.slow  # three HTML reports in a subprocess: about 15 s, more on a busy machine
def test_passing_and_failing_suites_with_reports(suite: pytest.Pytester):
    suite.makepyfile(test_ok=PASSING, test_deep=FAILING, test_train=TRAINING)
    stale = suite.path / "reports" / "test_deep.py_test_deep_plain_net" / "07-stale"
    stale.mkdir(parents=True)  # left by an earlier run: the folder is replaced
    result = run(suite, "--gradprobe-report", "reports")
    result.assert_outcomes(passed=2, failed=2)
    # the failure text, as the user sees it
    result.stdout.fnmatch_lines(
        [
            "*assert_gradient_flow(plain(40), data(8, 16))*",
            "E*GradientAssertionError: assert_gradient_flow failed for Sequential: * of 40 blocks are*",
            "E*rule: 0.001 <= cum_gain <= 1000 at every block",
            "E*index  block  cum_gain  violates",
            "E*0  0 * min_cum_gain = 0.001",
            "E*... and * more: *",
            "E*advice: the gradient vanishes on its way to the input: plain nets of this depth (40 blocks)*",
            "*- gradprobe report -*",
            "written to *test_deep.py_test_deep_plain_net",
            "  *01-assert_gradient_flow*index.html",
            "    model  blocks  steps  cum_gain_init  cum_gain_end  cum_gain_min_end  cum_gain_max_end  *",
            "    run        40      1  *",  # the summary of the frame the assertion checked
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*the loss did not go down*",
            "*- gradprobe report -*",
            "written to *test_train.py_test_training_0.1",
            "*- gradprobe reports of 2 failing tests -*",
            "test_deep.py::test_deep_plain_net: *test_deep.py_test_deep_plain_net",
            "test_train.py::test_training?0.1?: *test_train.py_test_training_0.1",
        ]
    )
    out = result.stdout.str()
    assert "_assert_bands" not in out  # gradprobe's internals are hidden from the traceback
    # the report folder: one per failing test, nothing for passing ones
    reports = suite.path / "reports"
    assert sorted(p.name for p in reports.iterdir()) == [
        "test_deep.py_test_deep_plain_net",
        "test_train.py_test_training_0.1",
    ]
    assert not stale.exists()
    folder = reports / "test_deep.py_test_deep_plain_net" / "01-assert_gradient_flow"
    assert (folder / "index.html").exists()
    saved = gradprobe.load(folder)
    assert saved.frame()["block"].tolist() == [str(i) for i in range(40)]
    assert saved.meta["test"] == "test_deep.py::test_deep_plain_net"
    assert saved.meta["source"] == "assert_gradient_flow"
    # a test that used the fixture: the probe's run (with its scalars) and the frame check() looked at
    test_dir = reports / "test_train.py_test_training_0.1"
    assert sorted(p.name for p in test_dir.iterdir()) == ["01-check", "02-probe1-Sequential"]
    probe_run = gradprobe.load(test_dir / "02-probe1-Sequential")
    assert probe_run.scalars()["step"].tolist() == [0, 1, 2, 3]
    assert probe_run.scalars()["loss"].notna().all()
    assert sorted(probe_run.frame()["step"].unique().tolist()) == [0, 1, 2, 3]
    assert (test_dir / "02-probe1-Sequential" / "index.html").exists()


def test_leaked_hooks_fail_the_test_and_nothing_is_written_without_the_option(suite: pytest.Pytester):
    suite.makepyfile(test_deep=FAILING, test_hooks=HOOKS)
    result = run(suite)
    result.assert_outcomes(passed=6, failed=1, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_raw_hook_left_behind*",
            "gradprobe fixture: hooks were left on modules after the test; they keep running*",
            "  module '1' of Sequential: 1 forward hook",
            "Remove every hook a test adds: *handle.remove().",
            "*ERROR at teardown of test_probe_attached_outside_the_fixture*",
            # the probe's pre- and post-hook, and until its first recorded step the one-off checks
            # of blocks="auto" (which submodules run, whether the block adds its input)
            "  module '0' of Sequential: 1 forward pre-hook, 2 forward hooks",
            "  module '0.0' of Sequential: 1 forward pre-hook",
            "  module '0.1' of Sequential: 1 forward pre-hook",
            "  module '1' of Sequential: 1 forward pre-hook, 2 forward hooks",
            "*ERROR at teardown of test_parameter_hook*",
            "  parameter '0.0.weight' of Sequential: 1 gradient hook",
        ]
    )
    assert "gradprobe report" not in result.stdout.str()
    assert not list(suite.path.rglob("meta.json")) and not list(suite.path.rglob("index.html"))


def test_tables_are_written_when_the_html_report_fails(suite: pytest.Pytester):
    suite.makeconftest(
        """
        import gradprobe.reporting

        def broken(*args, **kwargs):
            raise RuntimeError("no figures today")

        gradprobe.reporting.report = broken
        """
    )
    suite.makepyfile(test_deep=FAILING)
    result = run(suite, "--gradprobe-report", "reports")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*(tables only: the HTML report failed (RuntimeError: no figures today))"])
    folder = suite.path / "reports" / "test_deep.py_test_deep_plain_net" / "01-assert_gradient_flow"
    assert not (folder / "index.html").exists()
    assert len(gradprobe.load(folder).frame()) == 40


def test_fixture_attributes():
    from gradprobe.pytest_plugin import GradprobeFixture

    fixture = GradprobeFixture()
    assert fixture.assert_near_identity is gradprobe.testing.assert_near_identity
    assert fixture.load is gradprobe.load
    with pytest.raises(AttributeError, match="the gradprobe fixture has no attribute 'nope'"):
        _ = fixture.nope
    with pytest.raises(TypeError, match=r"gradprobe.watch\(\) needs a torch.nn.Module"):
        fixture.watch("model")
    assert fixture.close() == []


def test_report_folder_names():
    assert _folder_name("tests/test_a.py::TestX::test_b[1-a/b c]") == "tests_test_a.py_TestX_test_b_1-a_b_c"
    long_a, long_b = "t.py::test_" + "x" * 300 + "[1]", "t.py::test_" + "x" * 300 + "[2]"
    assert len(_folder_name(long_a)) == 120
    assert _folder_name(long_a) != _folder_name(long_b)


# ----------------------------------------------------------------------------- the entry point


def fake_installed_entry_point(pytester: pytest.Pytester, name: str = "gradprobe") -> None:
    """A distribution on sys.path whose ``pytest11`` entry point loads the plugin, as an install does."""
    site = pytester.mkdir("site")
    dist = site / "gradprobe_fake_ep-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gradprobe-fake-ep\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{name} = gradprobe.pytest_plugin\n")
    pytester.syspathinsert(site)


USES_FIXTURE = """
def test_fixture(gradprobe):
    assert gradprobe.probes == []
"""


@pytest.mark.parametrize("how", ["entry point only", "conftest pytest_plugins", "-p option"])
def test_entry_point_and_explicit_loading_do_not_clash(pytester: pytest.Pytester, how: str):
    fake_installed_entry_point(pytester)
    pytester.makepyfile(test_fx=USES_FIXTURE)
    args: list[str] = []
    if how == "conftest pytest_plugins":
        pytester.makeconftest("pytest_plugins = ['gradprobe.pytest_plugin']")
    elif how == "-p option":
        args = list(PLUGIN)
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    assert "already registered" not in result.stdout.str() + result.stderr.str()


def test_entry_point_can_be_disabled(pytester: pytest.Pytester):
    fake_installed_entry_point(pytester)
    pytester.makepyfile(test_fx=USES_FIXTURE)
    result = pytester.runpytest("-p", "no:gradprobe")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'gradprobe' not found*"])


def test_help_lists_the_option(pytester: pytest.Pytester):
    result = pytester.runpytest(*PLUGIN, "--help")
    result.stdout.fnmatch_lines(["*gradprobe*", "*--gradprobe-report=DIR*"])


def test_plugin_source_is_importable_without_side_effects():
    # importing the plugin module registers nothing by itself; only pytest's registration does
    import gradprobe.testing as testing

    before = testing.bands._LISTENERS.get()
    import gradprobe.pytest_plugin as plugin

    assert before == testing.bands._LISTENERS.get()
    assert Path(plugin.__file__).name == "pytest_plugin.py"
