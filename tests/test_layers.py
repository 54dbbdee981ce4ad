"""The package's import graph: no circle, and data flowing one way (model -> ... -> frame -> reports).

The graph is read from the source with ``ast``, not by importing: an edge is every
``import``/``from ... import`` of a gradprobe module, at module level or inside a function
(a lazy import is still a dependency, and still closes a circle when the function runs).
Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they cannot form a
circle at run time, and annotations may name a type from any layer. Importing
``gradprobe.a.b`` also runs ``gradprobe/a/__init__.py``, so it is an edge to ``gradprobe.a``
too (except from inside ``gradprobe.a``, which is already being imported).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import gradprobe

PACKAGE_ROOT = Path(gradprobe.__file__).parent

Graph = dict[str, set[str]]


# ---------------------------------------------------------------------- reading the graph
def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root`` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST, *, in_functions: bool = True) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``tree``, skipping ``if TYPE_CHECKING:`` bodies (their ``else``
    runs) and, with ``in_functions=False``, everything inside a function."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _type_checking(child.test):
            for stmt in child.orelse:
                yield from imports(ast.Module(body=[stmt], type_ignores=[]), in_functions=in_functions)
            continue
        if not in_functions and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from imports(child, in_functions=in_functions)


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names an import statement in ``module`` may refer to (modules or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        here = (module if is_package else module.rpartition(".")[0]).split(".")
        base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path, package: str, *, in_functions: bool = True) -> Graph:
    """``{module: modules of the package it imports}`` for the package in folder ``root``."""
    files = module_files(root, package)
    graph: Graph = {}
    for module, path in files.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in imports(tree, in_functions=in_functions):
            for name in imported_names(node, module, path.name == "__init__.py"):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    # a package the importer sits in is being imported already: no edge
                    if target in files and target != module and not module.startswith(target + "."):
                        targets.add(target)
        graph[module] = targets
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None when there is none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def reachable(graph: Mapping[str, set[str]], start: str) -> dict[str, str]:
    """``{module: the module that imports it}`` for every module ``start`` imports, transitively."""
    parent: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in parent and nxt != start:
                parent[nxt] = node
                todo.append(nxt)
    return parent


def chain(parent: Mapping[str, str], start: str, end: str) -> str:
    links = [end]
    while links[-1] != start:
        links.append(parent[links[-1]])
    return " -> ".join(reversed(links))


# ---------------------------------------------------------------------- the intended layers
#: Layer of each module, by pattern (``*`` matches one or more dotted segments); the first
#: matching pattern counts. A module may import only modules of its own or a lower layer.
#: Data flows upward through the model side (0-7), the frame side (9) reads only tables,
#: and the entry points (10) put the two together. A new module must be given a layer here.
LAYERS: tuple[tuple[str, int], ...] = (
    # 0: no gradprobe import: the version, the tensor mute, table formatting, the column schema
    ("gradprobe._version", 0),
    ("gradprobe._tensors", 0),
    ("gradprobe._format", 0),
    ("gradprobe.alerts", 0),
    ("gradprobe.records.schema", 0),
    # 1: tensors to numbers, models and data, tables on disk
    ("gradprobe.metrics", 1),
    ("gradprobe.fused", 1),
    ("gradprobe.sharding", 1),
    ("gradprobe.hooks", 1),
    ("gradprobe.models", 1),
    ("gradprobe.data", 1),
    ("gradprobe.records", 1),
    ("gradprobe.records.*", 1),
    # 2-4: which modules are blocks, their stacks, their captured inputs and outputs
    ("gradprobe.blocks", 2),
    ("gradprobe.stacking", 3),
    ("gradprobe.capture", 3),
    ("gradprobe.coverage", 3),
    ("gradprobe.config", 4),
    ("gradprobe.passes", 4),
    ("gradprobe.rows", 4),
    ("gradprobe.batching", 4),
    ("gradprobe.jacobian.estimate", 4),
    ("gradprobe.jacobian.rerun", 4),
    ("gradprobe.jacobian.spectrum", 4),
    ("gradprobe.jacobian", 4),
    # 5-7: what the probe records during training, and the probe
    ("gradprobe.path_lengths", 5),
    ("gradprobe.jacobian.schedule", 5),
    ("gradprobe.taps", 6),
    ("gradprobe.probe", 7),
    # 8: the one-shot functions, above the probe
    ("gradprobe.analysis", 8),
    ("gradprobe.lesions", 8),
    # 9: downstream of the DataFrame: read tables, never run a model
    ("gradprobe.plot", 9),
    ("gradprobe.plot.*", 9),
    ("gradprobe.summary", 9),
    ("gradprobe.verdict", 9),
    ("gradprobe.reporting", 9),
    ("gradprobe.export", 9),
    ("gradprobe.pooling", 9),
    ("gradprobe.testing.bands", 9),
    # 10: entry points that run models and report on them
    ("gradprobe.testing", 10),
    ("gradprobe.testing.*", 10),
    ("gradprobe.experiment", 10),
    ("gradprobe.integrations", 10),
    ("gradprobe.integrations.*", 10),
    ("gradprobe.pytest_plugin", 10),
    ("gradprobe.cli", 10),
    ("gradprobe.__main__", 10),
    ("gradprobe", 10),
)

#: The probe itself: what hooks into a model while it trains.
PROBE = ("gradprobe.probe", "gradprobe.taps", "gradprobe.hooks", "gradprobe.batching", "gradprobe.fused")

#: Downstream of the DataFrame: may not reach the probe through any chain of imports.
DOWNSTREAM = (
    "gradprobe.plot",
    "gradprobe.plot.*",
    "gradprobe.reporting",
    "gradprobe.summary",
    "gradprobe.verdict",
    "gradprobe.testing.bands",
    "gradprobe.export",
    "gradprobe.pooling",
    "gradprobe._format",
)

#: Upstream of the DataFrame: no plotting or frame library at module level (imported inside
#: the functions that build frames, so that a training step never pays for them).
UPSTREAM = (
    "gradprobe.probe",
    "gradprobe.taps",
    "gradprobe.hooks",
    "gradprobe.batching",
    "gradprobe.fused",
    "gradprobe.capture",
    "gradprobe.stacking",
    "gradprobe.blocks",
    "gradprobe.metrics",
    "gradprobe.rows",
    "gradprobe.passes",
    "gradprobe.path_lengths",
    "gradprobe.config",
    "gradprobe.jacobian",
    "gradprobe.jacobian.*",
    "gradprobe.records",
    "gradprobe.records.*",
)
FRAME_LIBRARIES = ("pandas", "seaborn", "matplotlib")


def matches(module: str, pattern: str) -> bool:
    regex = re.escape(pattern).replace(r"\*", r"[^.]+(\.[^.]+)*")
    return re.fullmatch(regex, module) is not None


def layer_of(module: str) -> int | None:
    return next((layer for pattern, layer in LAYERS if matches(module, pattern)), None)


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """``a (layer m) imports b (layer n)`` for every edge up the layers."""
    out = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                out.append(f"{module} (layer {here}) imports {target} (layer {there})")
    return out


def downstream_reaching_the_probe(graph: Mapping[str, set[str]]) -> list[str]:
    out = []
    for module in sorted(graph):
        if any(matches(module, p) for p in DOWNSTREAM):
            parent = reachable(graph, module)
            out += [chain(parent, module, probe) for probe in PROBE if probe in parent]
    return out


def frame_libraries_at_module_level(root: Path, package: str) -> list[str]:
    out = []
    for module, path in module_files(root, package).items():
        if not any(matches(module, p) for p in UPSTREAM):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in imports(tree, in_functions=False):
            for name in imported_names(node, module, path.name == "__init__.py"):
                if name.split(".")[0] in FRAME_LIBRARIES:
                    out.append(f"{module} line {node.lineno}: {name}")
    return out


# ---------------------------------------------------------------------- gradprobe
@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(PACKAGE_ROOT, "gradprobe")


def test_gradprobe_has_no_import_circle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer(graph):
    missing = [m for m in graph if layer_of(m) is None]
    assert not missing, f"give these modules a layer in LAYERS of tests/test_layers.py: {missing}"


def test_no_module_imports_a_higher_layer(graph):
    assert layer_violations(graph) == []


def test_nothing_downstream_of_the_frame_reaches_the_probe(graph):
    assert downstream_reaching_the_probe(graph) == []


def test_nothing_upstream_of_the_frame_imports_pandas_or_plotting_at_module_level():
    assert frame_libraries_at_module_level(PACKAGE_ROOT, "gradprobe") == []


def test_the_graph_sees_known_edges(graph):
    # the reader itself: a lazy import, a relative import of a sibling package's module,
    # and the package __init__ that importing a submodule runs
    assert "gradprobe.probe" in graph["gradprobe.analysis"]
    assert "gradprobe.capture" in graph["gradprobe.jacobian.rerun"]
    assert {"gradprobe.jacobian", "gradprobe.jacobian.schedule"} <= graph["gradprobe.taps"]
    assert "gradprobe.records" in graph["gradprobe.reporting"]


# ---------------------------------------------------------------------- the checkers fail when they should
def write_package(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_circle_through_a_lazy_import_is_found(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "from .b import f\n",
            "b.py": "def f():\n    from .sub import c\n    return c\n",
            "sub/__init__.py": "",
            "sub/c.py": "from .. import a\n",
        },
    )
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_a_circle_through_a_package_init_is_found(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "import pkg.sub.x\n",
            "sub/__init__.py": "from .. import a\n",
            "sub/x.py": "",
        },
    )
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg.a", "pkg.sub", "pkg.a"]


def test_type_checking_imports_make_no_circle(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "from . import b\n",
            "b.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .a import X\nelse:\n    import os\n",
        },
    )
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycle(graph) is None


def test_an_import_up_the_layers_and_a_path_to_the_probe_are_found():
    graph = {
        "gradprobe.metrics": {"gradprobe.plot.lines"},
        "gradprobe.plot.lines": {"gradprobe.summary"},
        "gradprobe.summary": {"gradprobe.analysis"},
        "gradprobe.analysis": {"gradprobe.probe"},
        "gradprobe.probe": set(),
    }
    assert layer_violations(graph) == ["gradprobe.metrics (layer 1) imports gradprobe.plot.lines (layer 9)"]
    assert downstream_reaching_the_probe(graph) == [
        "gradprobe.plot.lines -> gradprobe.summary -> gradprobe.analysis -> gradprobe.probe",
        "gradprobe.summary -> gradprobe.analysis -> gradprobe.probe",
    ]
    assert layer_of("gradprobe.newmodule") is None


def test_pandas_at_module_level_upstream_is_found(tmp_path):
    pkg = write_package(
        tmp_path / "gradprobe",
        {
            "__init__.py": "",
            "rows.py": "import numpy\nimport pandas as pd\n",
            "probe.py": "def frame():\n    import pandas\n",
            "taps.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from matplotlib.axes import Axes\n",
            "plot.py": "import seaborn\n",
        },
    )
    assert frame_libraries_at_module_level(pkg, "gradprobe") == ["gradprobe.rows line 2: pandas"]
