"""The layout's one rule: scripts -> handlers, training -> marketplace_search, never back (README, "Layout")."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What each package may import from this project; anything else from the project is a wrong-way import.
ALLOWED = {
    "marketplace_search": {"marketplace_search"},
    "training": {"marketplace_search", "training"},
    "handlers": {"marketplace_search", "handlers"},
    "scripts": {"marketplace_search", "training", "handlers", "scripts"},
}
# The core knows nothing of serving or command lines.
CORE_FORBIDDEN = {"ts", "requests", "argparse", "tenacity", "yaml", "ray"}


def project_imports(path: Path) -> set[str]:
    """Top-level names this module imports (absolute imports, at any depth of the module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    wrong = {}
    for path in sorted((REPO / package).rglob("*.py")):
        found = (project_imports(path) & (set(ALLOWED) | {"tests"})) - ALLOWED[package]  # nothing imports tests
        if found:
            wrong[str(path.relative_to(REPO))] = sorted(found)
    assert not wrong, f"imports against the layout: {wrong}"


def test_the_core_knows_nothing_of_serving_or_command_lines():
    wrong = {str(path.relative_to(REPO)): sorted(project_imports(path) & CORE_FORBIDDEN)
             for path in sorted((REPO / "marketplace_search").glob("*.py")) if project_imports(path) & CORE_FORBIDDEN}
    assert not wrong, f"the core imports serving or CLI libraries: {wrong}"


def test_the_local_runner_imports_no_core_module():
    """handlers/local.py swaps in the archive's core package; importing the checkout's would defeat that."""
    assert "marketplace_search" not in project_imports(REPO / "handlers" / "local.py")
