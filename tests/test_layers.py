"""The layer rules import-linter cannot see: which names cross a layer.

import-linter (``lint-imports``, run by ``make test``) checks which layer may import
which. These tests check *what* crosses: another layer is imported through its package
(``from .._core import X``), never through one of its modules, and never a ``_private``
name; and no class outside the core subclasses a core context type.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import ctxmiddleware

PACKAGE = Path(ctxmiddleware.__file__).parent
LAYERS = {"_core", "_request", "_asgi", "_wsgi", "_integrations"}


def _layer_of(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in LAYERS else None


def _cross_layer_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, target module, names) for imports of another layer from ``path``."""
    own = _layer_of(path)
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            module = node.module or ""
            if not module.startswith("ctxmiddleware."):
                continue
            parts = module.split(".")[1:]
        else:
            if node.level != 2 or own is None:
                continue  # within the layer (or the package's own __init__)
            parts = (node.module or "").split(".")
        if not parts or parts[0] not in LAYERS or parts[0] == own:
            continue
        found.append((node.lineno, ".".join(parts), [a.name for a in node.names]))
    return found


LAYER_FILES = sorted(p for p in PACKAGE.rglob("*.py") if _layer_of(p) is not None)


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_other_layers_are_imported_through_their_package_and_public_names(path: Path) -> None:
    for line, target, names in _cross_layer_imports(path):
        assert target in LAYERS, (
            f"{path.name}:{line} imports the module {target}: import from its package"
        )
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name}:{line} imports private names {private} of {target}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The AST check above would catch both kinds of violation."""
    bad = PACKAGE / "_asgi" / "_probe_for_test.py"
    bad.write_text(
        "from .._core._context import _CancelCtx\nfrom .._request import _headers\n"
    )
    try:
        found = _cross_layer_imports(bad)
    finally:
        bad.unlink()
    assert found == [(1, "_core._context", ["_CancelCtx"]), (2, "_request", ["_headers"])]


def test_no_class_outside_the_core_subclasses_a_core_context_type() -> None:
    from ctxmiddleware._core import _context

    node_types = (_context._CancelCtx, _context._ValueCtx, _context._EmptyCtx)
    for info in pkgutil.walk_packages([str(PACKAGE)], "ctxmiddleware."):
        if info.name.startswith("ctxmiddleware._core") or info.name in (
            "ctxmiddleware.flask",
            "ctxmiddleware.django",
        ):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue  # an optional driver is missing
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                assert not issubclass(cls, node_types), f"{info.name}.{cls.__name__}"
