"""The shape of the code: layers that import downward only, no import cycle in ``drpo/``, topics
named only by the bus and the agent client, replies never checked by hand.

Imports are read from the source (``ast``), function-level ones included, because a lazy import
that closes a cycle still ties two modules together; only ``if TYPE_CHECKING:`` blocks are left
out, since they never run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "drpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def _targets(module: str, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The drpo modules an import statement loads (``from pkg import mod`` loads pkg.mod)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative import
            base = module.split(".")[: -node.level] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name.startswith("drpo"):
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(name, node, known)
        # A package's own __init__ runs before its modules; that edge is Python's, not ours.
        graph[name] = {target for target in edges if target != name and target != "drpo"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_drpo() -> None:
    graph = import_graph()
    assert "drpo.agents.search" in graph and "drpo.agents.client" in graph["drpo.agents.search"]
    assert cycles(graph) == []


#: The layers of drpo, lowest first: a module may import only from its own layer or a lower one.
#: ``drpo/errors.py`` (the base of every user error) imports nothing, so that every layer can
#: derive its errors from it; the domain (the search's values, messages and reward rule) imports
#: nothing of ours but that; the bus
#: carries the domain's values without importing them; backends know requests and completions;
#: runs keep what the bus and backends produce; agents use all of those; the views, the traces,
#: the jobs, and the two front doors (the Python API and the command) sit on top.
LAYERS: tuple[str, ...] = (
    "errors",
    "domain",
    "data",
    "bus",
    "backends",
    "runs",
    "agents",
    "inspect",
    "tracing",
    "jobs",
    "api",
    "cli",
    "",  # drpo/__init__.py: the public names, loaded lazily from every layer
)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, or between layers not in :data:`LAYERS`."""
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source_layer, target_layer = _layer(module), _layer(target)
            if source_layer == target_layer:
                continue
            if source_layer not in rank or target_layer not in rank:
                found.append(f"{module} -> {target} (a layer missing from LAYERS)")
            elif rank[target_layer] > rank[source_layer]:
                found.append(f"{module} -> {target}")
    return found


def layer_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between subpackages (each subpackage one node), function-level imports included."""
    layered: dict[str, set[str]] = {}
    for module, targets in graph.items():
        layered.setdefault(_layer(module), set()).update(
            _layer(target) for target in targets if _layer(target) != _layer(module)
        )
    return cycles(layered)


def test_the_layer_checks_find_what_they_look_for() -> None:
    graph = {"drpo.bus.bus": {"drpo.domain.values"}, "drpo.domain.values": {"drpo.bus.bus"}}
    assert upward_imports(graph) == ["drpo.domain.values -> drpo.bus.bus"]
    assert layer_cycles(graph) == [["bus", "domain"]]
    assert upward_imports({"drpo.novel.x": {"drpo.domain.values"}}) == [
        "drpo.novel.x -> drpo.domain.values (a layer missing from LAYERS)"
    ]


def test_every_subpackage_has_a_layer() -> None:
    assert {_layer(module) for module in import_graph()} <= set(LAYERS)


def test_layers_import_downward_only() -> None:
    assert upward_imports(import_graph()) == []


def test_no_cycle_between_subpackages() -> None:
    assert layer_cycles(import_graph()) == []


def _sources() -> Iterator[tuple[Path, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("pattern", "allowed"),
    [
        # a topic string: only the bus itself and the agent client name them
        (r"[\"']agent\.[a-z]", {"drpo/agents/client.py"}),
        (r"[\"']search\.events[\"']", {"drpo/agents/client.py"}),
        # replies are typed by the client, never checked by hand
        (r"assert isinstance\((reply|verdict|answer|selected|rewritten)", set()),
    ],
)
def test_concepts_live_in_one_place(pattern: str, allowed: set[str]) -> None:
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path, text in _sources()
        if re.search(pattern, text) and str(path.relative_to(PACKAGE.parent)) not in allowed
    ]
    assert offenders == []


def test_agent_handlers_need_no_type_ignore() -> None:
    runtime = (PACKAGE / "agents" / "runtime.py").read_text(encoding="utf-8")
    assert "type: ignore" not in runtime
