"""Rules of the source tree itself: what the installed packages contain and may import."""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "router", "serving", "moerge")


def _imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


def test_installed_packages_never_import_the_test_helpers() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in _imported_modules(path)
        if module == "tests" or module.startswith("tests.")
    ]
    assert not offenders, offenders


def test_the_wheel_ships_the_four_packages_and_not_tests() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in PACKAGES:
        assert any(fnmatch.fnmatch(package, pattern) for pattern in include), package
    for name in ("tests", "tests.helpers", "bench"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in include), name


# Long functions still waiting to be split into named steps (issue 18 item 5); the list only shrinks.
LONG_FUNCTIONS_LEFT: set[str] = set()


def test_no_function_is_over_80_lines() -> None:
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    name = f"{path.relative_to(ROOT)}:{node.name}"
                    if length > 80 and name not in LONG_FUNCTIONS_LEFT:
                        long.append(f"{name} (line {node.lineno}, {length} lines)")
    assert not long, long
