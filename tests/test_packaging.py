"""Packaging: version, public names, licence, dependencies and the import contracts.

``import ctxmiddleware`` must stay free of third-party packages (the core
dependencies are empty); every third-party package the library imports must
come with one of its extras; ``make run`` installs what example_app imports and
no test tool; and the layering in ``[tool.importlinter]`` must hold.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import ctxmiddleware

ROOT = Path(__file__).resolve().parent.parent

# Packages `import ctxmiddleware` must not load: web frameworks, servers, HTTP
# clients, anyio, drivers. They belong to the integrations and their extras.
NOT_AT_IMPORT = [
    "starlette",
    "fastapi",
    "httpx",
    "httpcore",
    "uvicorn",
    "hypercorn",
    "anyio",
    "asyncpg",
    "psycopg",
    "sqlalchemy",
    "aiosqlite",
    "structlog",
]

# Import name -> distribution name, where they differ.
DISTRIBUTION = {
    "yaml": "pyyaml",
    "prometheus_client": "prometheus-client",
    "opentelemetry": "opentelemetry-api",
}


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def _extra_names(requirement: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", requirement)
    return [e.strip() for e in match.group(1).split(",")] if match else []


def _distributions(extras: list[str]) -> set[str]:
    """The distributions the given extras of this project bring (self-references expanded)."""
    project = _pyproject()["project"]
    optional: dict[str, list[str]] = project["optional-dependencies"]
    seen: set[str] = set()
    found = {_requirement_name(r) for r in project["dependencies"]}
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            if _requirement_name(requirement) == project["name"]:
                todo.extend(_extra_names(requirement))
            else:
                found.add(_requirement_name(requirement))
    return found


def _third_party_imports(paths: list[Path]) -> set[str]:
    """Top-level names of the non-stdlib, absolute imports in these files."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {
        n
        for n in names
        if n not in sys.stdlib_module_names and n not in {"ctxmiddleware", "example_app"}
    }


def test_version_is_pyprojects() -> None:
    assert ctxmiddleware.__version__ == _pyproject()["project"]["version"]
    assert "__version__" in dir(ctxmiddleware)


def test_dir_lists_every_public_name_lazy_ones_included() -> None:
    names = dir(ctxmiddleware)
    assert names == sorted(names)
    missing = set(ctxmiddleware.__all__) - set(names)
    assert not missing, f"dir(ctxmiddleware) lacks {sorted(missing)}"
    # Every name in __all__ really resolves (lazily or not).
    for name in ctxmiddleware.__all__:
        assert hasattr(ctxmiddleware, name), name


def test_import_loads_no_framework_client_or_driver() -> None:
    code = (
        "import sys, json, ctxmiddleware\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = set(ast.literal_eval(out.strip().splitlines()[-1]))
    unwanted = sorted(loaded & set(NOT_AT_IMPORT))
    assert not unwanted, f"import ctxmiddleware loaded {unwanted}"


def test_core_dependencies_are_empty_and_extras_exist() -> None:
    project = _pyproject()["project"]
    assert project["dependencies"] == []
    assert project["requires-python"] == ">=3.11"
    extras = set(project["optional-dependencies"])
    for extra in (
        "starlette",
        "fastapi",
        "asyncpg",
        "psycopg",
        "sqlalchemy",
        "aiosqlite",
        "httpx",
        "structlog",
        "all",
        "test",
    ):
        assert extra in extras, extra
    # `all` is every runtime extra; `test` brings all of them.
    runtime = extras - {"all", "test"}
    assert _distributions(["all"]) == _distributions(sorted(runtime))
    assert _distributions(["all"]) <= _distributions(["test"])


def test_every_third_party_import_comes_with_an_extra() -> None:
    imported = _third_party_imports(sorted((ROOT / "ctxmiddleware").rglob("*.py")))
    declared = _distributions(["all"])
    undeclared = {n for n in imported if DISTRIBUTION.get(n, n) not in declared}
    assert not undeclared, f"imported by ctxmiddleware but in no extra: {sorted(undeclared)}"


def test_make_run_installs_what_example_app_imports_and_no_test_tool() -> None:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^RUN_DEPS\s*:=\s*(.+)$", makefile, re.MULTILINE)
    assert match, "Makefile has no RUN_DEPS"
    words = [w.strip("'\"") for w in match.group(1).split()]
    extras = [e for w in words if w.startswith(".[") for e in _extra_names(w)]
    assert "test" not in extras and "all" not in extras
    installed = _distributions(extras) | {
        _requirement_name(w) for w in words if not w.startswith(".")
    }
    needed = _third_party_imports(sorted((ROOT / "example_app").glob("*.py")))
    missing = {n for n in needed if DISTRIBUTION.get(n, n) not in installed}
    assert not missing, f"example_app imports {sorted(missing)}; make run does not install them"
    assert not installed & {"pytest", "mypy", "ruff", "import-linter", "hypercorn"}
    # The image is built from the same run venv, not the test one.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN make .venv-run/.installed" in dockerfile
    assert "[test]" not in dockerfile


def test_license_is_mit() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text
    assert _pyproject()["project"]["license"] == "MIT"


def _lint_imports() -> str | None:
    beside = Path(sys.executable).parent / "lint-imports"
    return str(beside) if beside.exists() else shutil.which("lint-imports")


def test_import_contracts_hold() -> None:
    exe = _lint_imports()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("lint-imports is not installed (pip install -e '.[test]')")
        pytest.skip("lint-imports is not installed (pip install -e '.[test]')")
    result = subprocess.run(
        [exe, "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
