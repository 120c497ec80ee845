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


# The one configuration base is the only part of moerge/ (the top of the tree) the other packages use,
# and it stands on nothing of the project itself.
SHARED_FROM_MOERGE = {"moerge.config_base"}


def test_only_the_configuration_base_is_shared_from_moerge() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for package in ("merge", "router", "serving")
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in _imported_modules(path)
        if (module == "moerge" or module.startswith("moerge.")) and module not in SHARED_FROM_MOERGE
    ]
    assert not offenders, offenders
    base = _imported_modules(ROOT / "moerge" / "config_base.py")
    assert not [m for m in base if m.split(".")[0] in PACKAGES], base


def test_only_the_vllm_boundary_imports_vllm() -> None:
    """serving/vllm_boundary.py is the one module at the boundary to vLLM (issue 18 item 4)."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "serving" / "vllm_boundary.py"
        for module in _imported_modules(path)
        if module == "vllm" or module.startswith("vllm.")
    ]
    assert not offenders, offenders
