"""Imports point one way, without cycles: a core unaware of serving, training stages sharing files, not code."""
import ast
import graphlib
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
CORE_FORBIDDEN = {"ts", "requests", "argparse", "tenacity", "yaml", "ray"}
RUNNERS = {"training.pipeline", "training.tiny_run"}
MODULES = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
           for package in ALLOWED for path in sorted((REPO / package).rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The modules NAME imports anywhere in it (relative imports resolved; `from P import M`: P.M if a module)."""
    path = MODULES[name]
    package = name.split(".")[:None if path.name == "__init__.py" else -1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) + 1 - node.level] if node.level else [])
            module = ".".join(part for part in (base, node.module) if part)
            found |= {f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                      for alias in node.names}
    return found


def top_level(name: str) -> set[str]:
    return {module.split(".")[0] for module in imports(name)}


def project_imports(name: str) -> set[str]:
    return (imports(name) & MODULES.keys()) - {name}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    wrong = {name: sorted(found) for name in MODULES if name.split(".")[0] == package
             if (found := (top_level(name) & (set(ALLOWED) | {"tests"})) - ALLOWED[package])}  # nothing imports tests
    assert not wrong, f"imports against the layout: {wrong}"


def test_no_import_cycles():
    graph, cycles = {name: project_imports(name) for name in MODULES}, []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            break
        except graphlib.CycleError as error:  # error.args[1]: [a, b, ..., a], each imported by the next
            cycles.append(" -> ".join(reversed(error.args[1])))
            graph[error.args[1][1]].discard(error.args[1][0])  # cut it to look for the next one
    assert not cycles, f"import cycles (each module imports the next): {cycles}"


def test_training_stages_import_no_other_stage():
    stages = {name for name in MODULES if name.startswith("training.") and any(isinstance(node, ast.FunctionDef)
              and node.name == "main" for node in ast.parse(MODULES[name].read_text()).body)}
    wrong = {name: sorted(found) for name in MODULES if name.startswith("training.") and name not in RUNNERS
             if (found := project_imports(name) & (stages | RUNNERS))}
    assert not wrong, f"training modules importing a stage (only {sorted(RUNNERS)} may): {wrong}"


def test_the_core_knows_nothing_of_serving_or_command_lines_and_the_local_runner_nothing_of_the_core():
    wrong = {name: sorted(found) for name in MODULES if name.startswith("marketplace_search")
             if (found := top_level(name) & CORE_FORBIDDEN)}
    assert not wrong, f"the core imports serving or CLI libraries: {wrong}"
    # handlers/local.py swaps in the archive's core package; importing the checkout's would defeat that
    assert "marketplace_search" not in top_level("handlers.local")
