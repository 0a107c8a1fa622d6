"""The experiment scripts the docs cite (scripts/experiments): every one compiles, and every one a doc names exists."""

import py_compile
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "scripts" / "experiments").glob("*.py"))
DOCS = sorted((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_experiment_compiles(script, tmp_path):
    py_compile.compile(str(script), cfile=str(tmp_path / "out.pyc"), doraise=True)
    assert script.read_text().startswith(('"""', 'r"""')), f"{script.name}: its docstring says what it measures"


def test_every_experiment_the_docs_name_exists():
    named = {(doc.name, path) for doc in DOCS for path in re.findall(r"scripts/experiments/[\w.-]*\w", doc.read_text())}
    assert SCRIPTS and named, "no experiment scripts, or no doc names one"
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (REPO / path).is_file())
    assert not missing, missing
    # And every script is cited by some doc: none is left without the figures it produced.
    cited = {path.rsplit("/", 1)[1] for _, path in named}
    assert not [s.name for s in SCRIPTS if s.name not in cited]
