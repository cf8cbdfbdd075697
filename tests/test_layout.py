"""The layout is the data flow: layers import only downward, nothing imports in a cycle, and the
README's module map names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("pipeline", "workers")

# Lowest first; a module may import its own layer and the ones below it, never above.
LAYERS = [
    ("pipeline.errors", "pipeline.config", "pipeline.card"),  # shared vocabulary: errors and the config models
    ("pipeline.core",),  # pure: geometry, georef, volume, statistics, regions maths, planning
    ("pipeline.store",),  # the zarr mask store
    ("pipeline.sources",),  # readers of the inputs
    ("workers",),  # what runs on Ray workers: read -> predict -> write, ingest and label tasks, models
    ("pipeline.jobs", "pipeline.query"),  # the driver: plan, run, resume, batch, submit; reading stores
    ("pipeline.viewer",),  # raymask serve: the web app over stores
    ("pipeline.cli",),
]
# The pure core must not import I/O or cluster libraries, even lazily.
CORE_FORBIDDEN = {"ray", "zarr", "rasterio", "pydicom", "torch", "tqdm", "dask", "xarray", "PIL"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only; nothing is imported)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports when it runs, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {
        name: {m for m in imports(path, name) if m in mods and m != "pipeline"} - {name} for name, path in mods.items()
    }


def layer(name: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_belongs_to_a_layer() -> None:
    assert [name for name in modules() if name not in PACKAGES and layer(name) is None] == []


def test_layers_import_only_downward() -> None:
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)  # type: ignore[operator]
    ]
    assert upward == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``edges`` (module -> modules it imports), each as a closed path."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_lazy_and_long_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"x": {"y"}, "y": {"y"}}) == [["y", "y"]]


def test_no_module_imports_in_a_cycle() -> None:
    assert cycles(graph()) == []


def test_the_core_imports_no_io() -> None:
    mods = modules()
    bad = [
        f"{name} imports {m}"
        for name, path in mods.items()
        if name.startswith("pipeline.core")
        for m in imports(path, name)
        if m.split(".")[0] in CORE_FORBIDDEN
    ]
    assert bad == []


def test_the_readme_module_map_names_every_module() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- modules:start -->", 1)[1].split("<!-- modules:end -->", 1)[0]
    listed = set(re.findall(r"`((?:pipeline|workers)(?:\.\w+)+)`", block))
    actual = {name for name in modules() if name not in PACKAGES}
    assert sorted(actual - listed) == [], "modules missing from the README's module map"
    assert sorted(listed - actual) == [], "the README's module map names modules that do not exist"


def test_the_public_api_resolves_every_name_it_lists() -> None:
    import pipeline

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018
