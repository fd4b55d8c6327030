"""Import layering inside maskray/: subpackages import only lower ones (no folder-level cycle, ``engine`` may use
``eval`` but not the reverse), and the core never imports the plugin objectives."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskray"
LAYERS = ("masking", "models", "data", "tracking", "eval", "engine")  # lowest first


def _imports(path: Path) -> set[str]:
    """Every module an (also function-local) import statement of ``path`` names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_subpackages_import_only_lower_layers() -> None:
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)
    violations = []
    for layer in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(layer) + 1])
        for path in (PACKAGE / layer).rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "maskray" and len(parts) > 1 and parts[1] in LAYERS and parts[1] not in allowed:
                    violations.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not violations, violations


def test_core_never_imports_plugin_objectives() -> None:
    offenders = [
        str(path) for path in PACKAGE.rglob("*.py") if any(n.split(".")[0] == "objectives" for n in _imports(path))
    ]
    assert not offenders


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """``{module: the maskray modules it imports}`` over every module of the package, function-local imports
    included. ``from maskray.a import b`` names ``maskray.a.b`` when that is a module, else ``maskray.a``; the
    implicit import of a module's parent packages is not an edge (Python runs them first, never in a circle)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                targets |= submodules or {node.module}
                if len(submodules) < len(node.names):
                    targets.add(node.module)
        graph[name] = targets - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as the path of modules around it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_among_modules() -> None:
    """No module of maskray imports itself through others, top-level modules and lazy imports included."""
    graph = _import_graph()
    assert "maskray.config" in graph and "maskray.objective" in graph["maskray.run_spec"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_circle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
