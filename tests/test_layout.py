"""The layout's rules.

1. Imports point one way: scripts -> handlers, training -> marketplace_search (the core), never back.
2. No import cycles between the project's modules, counting every import of a module (lazy ones inside
   functions too; relative ones resolved): a cycle that works only because one side imports lazily is
   still two modules that cannot be read, tested or moved apart.
3. Training stages hand each other files, not code. A stage is a training module with a main() of its
   own; it imports no other stage. Only the runners import stages: pipeline.py runs them, refit.py re-runs
   train for the pipeline, tiny_run.py makes a RUN without the pipeline for tests and benchmarks. What
   stages share (the WORK folder's readers, the trunk cache, metrics) lives in the core package or in a
   training module that has no main() and imports no stage.
"""
import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("marketplace_search", "training", "handlers", "scripts")
# What each package may import from this project; anything else from the project is a wrong-way import.
ALLOWED = {
    "marketplace_search": {"marketplace_search"},
    "training": {"marketplace_search", "training"},
    "handlers": {"marketplace_search", "handlers"},
    "scripts": {"marketplace_search", "training", "handlers", "scripts"},
}
# The core knows nothing of serving or command lines.
CORE_FORBIDDEN = {"ts", "requests", "argparse", "tenacity", "yaml", "ray"}
RUNNERS = {"training.pipeline", "training.refit", "training.tiny_run"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def project_imports(path: Path) -> set[str]:
    """Top-level names this module imports (absolute imports, at any depth of the module)."""
    names = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imported_modules(name: str) -> set[str]:
    """The project modules that module NAME imports anywhere in it (`from P import M`: P.M when M is a module)."""
    path = MODULES[name]
    package = name.split(".")[:None if path.name == "__init__.py" else -1]
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) + 1 - node.level] if node.level else [])
            module = ".".join(part for part in (base, node.module) if part)
            found |= {f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                      for alias in node.names}
    return (found & MODULES.keys()) - {name}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    wrong = {}
    for path in sorted((REPO / package).rglob("*.py")):
        found = (project_imports(path) & (set(ALLOWED) | {"tests"})) - ALLOWED[package]  # nothing imports tests
        if found:
            wrong[str(path.relative_to(REPO))] = sorted(found)
    assert not wrong, f"imports against the layout: {wrong}"


def test_no_import_cycles():
    graph, cycles = {name: imported_modules(name) for name in MODULES}, []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            break
        except graphlib.CycleError as error:  # error.args[1]: [a, b, ..., a], each imported by the next
            cycles.append(" -> ".join(reversed(error.args[1])))
            graph[error.args[1][1]].discard(error.args[1][0])  # cut it to look for the next one
    assert not cycles, f"import cycles (each module imports the next): {cycles}"


def test_training_stages_import_no_other_stage():
    stages = {name for name in MODULES if name.startswith("training.") and any(
        isinstance(node, ast.FunctionDef) and node.name == "main" for node in parsed(MODULES[name]).body)} - RUNNERS
    wrong = {name: sorted(imported_modules(name) & (stages | RUNNERS)) for name in sorted(MODULES)
             if name.startswith("training.") and name not in RUNNERS and imported_modules(name) & (stages | RUNNERS)}
    assert not wrong, f"training modules importing a stage (only {sorted(RUNNERS)} may): {wrong}"


def test_the_core_knows_nothing_of_serving_or_command_lines():
    wrong = {str(path.relative_to(REPO)): sorted(project_imports(path) & CORE_FORBIDDEN)
             for path in sorted((REPO / "marketplace_search").glob("*.py")) if project_imports(path) & CORE_FORBIDDEN}
    assert not wrong, f"the core imports serving or CLI libraries: {wrong}"


def test_the_local_runner_imports_no_core_module():
    """handlers/local.py swaps in the archive's core package; importing the checkout's would defeat that."""
    assert "marketplace_search" not in project_imports(REPO / "handlers" / "local.py")
