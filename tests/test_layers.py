"""The package's layers: no module imports from a layer above its own, and sibling layers do not import each other.

The order is the data flow of docs/architecture.md; a change that needs an upward import belongs in a higher layer.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (layer rank, module prefix); the longest matching prefix decides a module's layer.
LAYERS = [
    (0, "dynamize.errors"), (0, "dynamize.version"),
    (1, "dynamize.models"), (1, "dynamize.ranges"),
    (2, "dynamize.graph"),
    (3, "dynamize.io"),
    (4, "dynamize.runtime"),
    (5, "dynamize.training"),
    (6, "dynamize.reporting"),
    (7, "dynamize"),
    (8, "dynamize_cli"),
]


def _layer(module: str):
    matches = [(len(prefix), rank, prefix) for rank, prefix in LAYERS
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1:] if matches else None


def _modules():
    for package in ("dynamize", "dynamize_cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(module: str, path: Path):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_only_from_lower_layers(module, path):
    own_rank, own_prefix = _layer(module)
    for imported in _imports(module, path):
        layer = _layer(imported)
        if layer is None:
            continue  # not ours
        rank, prefix = layer
        assert rank < own_rank or prefix == own_prefix, f"{module} (layer {own_rank}) imports {imported} (layer {rank})"


def test_every_module_has_a_layer():
    assert all(_layer(module) is not None for module, _ in _modules())
