"""The package's layering, as docs/architecture.md ("Layers") states it, read from the imports themselves (ast):
the ground floor imports nothing above it, the launching side imports no torch and nothing of the training
side, the CLI imports nothing heavy when it is imported, and no two modules import each other, however
indirectly. Imports under `if TYPE_CHECKING:` (annotations only) are not counted; imports inside functions are.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hvdtrain"

# The ground floor: what every other part may use, and which uses nothing above it.
GROUND = {
    "errors",
    "files",
    "env",
    "srunmpi",
    "rundir",
    "procs",
    "startup",
    "npz",
    "preempt",
    "render",
    "doctor",
    "mpi",
    "progress",
}
# Libraries too heavy for the CLI's import and the launching side (seconds to import, or GPU runtimes).
HEAVY = ("torch", "horovod.torch", "horovod.common", "mpi4py", "numpy", "matplotlib", "tensorboard")


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "launching.spec"
    target: str  # what it imports, absolute: "hvdtrain.launching.hosts", "torch", ...
    line: int
    top: bool  # at module level (run when the module is imported), not inside a function


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, root: Path = PACKAGE) -> list[Import]:
    """Every import in the file: `from hvdtrain.x import y` counts as hvdtrain.x.y when y is a module of the
    package, else as hvdtrain.x."""
    module = module_name(path, root)
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                base = child.module
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    is_module = base.startswith("hvdtrain") and _exists(candidate)
                    found.append(Import(module, candidate if is_module else base, child.lineno, top))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _exists(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def package_imports() -> list[Import]:
    return [i for path in sorted(PACKAGE.rglob("*.py")) for i in imports_of(path)]


def internal(target: str) -> str | None:
    """The package module an import names (without 'hvdtrain.'), or None for an outside library."""
    if target == "hvdtrain":
        return "__init__"
    return target.removeprefix("hvdtrain.") if target.startswith("hvdtrain.") else None


def part(module: str) -> str:
    """A module's part of the house: its sub-package, or the module itself at the top."""
    return module.split(".")[0]


def violations(rule, imports=None) -> list[str]:
    return [
        f"hvdtrain/{i.module.replace('.', '/')}.py:{i.line} imports {i.target}"
        for i in imports or package_imports()
        if rule(i)
    ]


def ground_imports_above(i: Import) -> bool:
    inner = internal(i.target)
    return part(i.module) in GROUND and inner is not None and part(inner) not in GROUND


def launching_reaches_training(i: Import) -> bool:
    if part(i.module) != "launching":
        return False
    inner = internal(i.target)
    if inner is None:
        return i.target.startswith(HEAVY)
    return part(inner) not in GROUND | {"launching"}


def lower_floor_reaches_up(i: Import) -> bool:
    """parallel/ (collectives, no loop) imports nothing of train/; neither imports the launching side, the
    commands or the tools built on them."""
    inner = internal(i.target)
    if inner is None:
        return False
    above = {"launching", "jobs", "cli", "bench", "plan", "timeline", "report", "slurm", "worker"}
    if part(i.module) == "parallel":
        return part(inner) in above | {"train"}
    if part(i.module) == "train":
        return part(inner) in above
    return False


def cli_imports_heavy_at_import(i: Import) -> bool:
    """cli.py and its option machinery (clickopts.py) at module level: click, the standard library and the ground
    floor only; everything else is imported inside the command that needs it."""
    if i.module not in ("cli", "clickopts") or not i.top:
        return False
    inner = internal(i.target)
    return part(inner) not in GROUND | {"__init__", "clickopts"} if inner is not None else i.target.startswith(HEAVY)


RULES = {
    "the ground floor imports nothing above it": ground_imports_above,
    "the launching side imports no torch and nothing of training": launching_reaches_training,
    "parallel/ and train/ import nothing above them": lower_floor_reaches_up,
    "the CLI imports nothing heavy at import time": cli_imports_heavy_at_import,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_layering_rule(rule):
    assert violations(RULES[rule]) == [], rule


def cycles(imports: list[Import]) -> list[list[str]]:
    """The package's import cycles between modules (Tarjan's strongly connected components of more than one
    module, or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        inner = internal(i.target)
        if inner is not None and inner != "__init__" and not i.module.startswith(inner + "."):
            graph.setdefault(i.module, set()).add(inner)
            graph.setdefault(inner, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    assert cycles(package_imports()) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """Each rule fails on a module that breaks it (the same ast reading as above, on planted files)."""
    planted = [
        Import("launching.spec", "hvdtrain.train.checkpoint", 1, False),
        Import("launching.argv", "torch", 1, False),
        Import("rundir", "hvdtrain.config", 1, True),
        Import("parallel.zero", "hvdtrain.train.update", 1, False),
        Import("cli", "torch", 1, True),
    ]
    assert len(violations(launching_reaches_training, planted)) == 2
    assert len(violations(ground_imports_above, planted)) == 1
    assert len(violations(lower_floor_reaches_up, planted)) == 1
    assert len(violations(cli_imports_heavy_at_import, planted)) == 1
    loop = [
        Import("a", "hvdtrain.b", 1, True),
        Import("b", "hvdtrain.c", 1, False),
        Import("c", "hvdtrain.a", 1, False),
    ]
    assert cycles(loop) == [["a", "b", "c"]]
    # A function-level import closes a cycle too; TYPE_CHECKING imports do not.
    code = tmp_path / "m.py"
    code.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert [(i.target, i.top) for i in imports_of(code, tmp_path)] == [("typing", True), ("y", False)]
