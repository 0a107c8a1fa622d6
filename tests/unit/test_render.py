"""hvdtrain.render: the text tables every command prints, and its place on the ground floor (it imports nothing
from hvdtrain but hvdtrain.files, its writes; the commands that print tables or draw plots take them from it, not from bench/)."""

import ast
from pathlib import Path

import hvdtrain
from hvdtrain import render

PACKAGE = Path(hvdtrain.__file__).parent


def test_columns_fit_the_widest_cell_and_align_numbers_right():
    lines = render.columns([["run", "steps"], ["a-long-name", "7"], ["b", "1234"]], [False, True])
    assert lines == ["run          steps", "a-long-name      7", "b             1234"]


def test_fixed_row_left_aligns_the_first_cell_only():
    assert render.fixed_row(["layout", "1.00", "22"], [8, 6, 4]) == "layout    1.00  22"
    assert render.fixed_row(["a-longer-name", "1"], [4, 3]) == "a-longer-name  1"  # never cut


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return out | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_render_is_on_the_ground_floor():
    assert {m for m in imports(PACKAGE / "render.py") if m.split(".")[0] == "hvdtrain"} <= {"hvdtrain.files"}
    for user in ("timeline.py", "report.py", *(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob("plan/*.py"))):
        assert not {m for m in imports(PACKAGE / user) if m.startswith("hvdtrain.bench")}, user
