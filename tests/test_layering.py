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
