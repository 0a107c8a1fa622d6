"""Tables and plots for people: what the benchmarks, `hvdtrain plan`, `timeline` and `report` print and draw.

Two kinds of text table: `render_table` (a title, headers, a rule, then the rows; every column as wide as its
widest cell) and `fixed_row` (columns of widths the caller chose, for tables printed line by line). `columns` is
their common core. Ground floor: imports nothing from hvdtrain but files (inside `save_plot`, its write);
matplotlib only inside `save_plot` (Agg backend, no display), so nothing heavy at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: None as '-', floats with `digits` decimals (very large or small ones in %g), the rest as str."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10**-(digits)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def ranks_words(ranks: Sequence[int]) -> str:
    """Ranks in a sentence: "rank 1", "ranks 0, 2" (the launch reports', the hang report's, a test's line)."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def columns(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Rows of text cells as lines: each column as wide as its widest cell, two spaces apart, right-aligned where
    `right` says (numbers) and left-aligned elsewhere; no trailing spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(right))]
    return ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip() for row in rows]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain aligned text table: text columns left-aligned, numbers right-aligned, a rule under the headers."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    out = [title] if title else []
    return "\n".join(out + columns([list(headers), ["-" * w for w in widths], *cells], numeric))


def fixed_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """One line of a table with fixed column widths: the first cell left-aligned in its width, the others
    right-aligned in theirs (a width includes the gap before the next column)."""
    return "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def save_plot(path: Path, draw: Callable[[Any], None], ncols: int = 1, width: float = 7.0, nrows: int = 1) -> Path:
    """Draw a figure with `draw(axes)` (a list of nrows x ncols axes, row by row) and save it with matplotlib's Agg
    at exactly `path` (PNG, or the format its suffix names, e.g. .pdf or .svg), atomically (files.write_atomic: creating the folder;
    a full file system is a DiskFullError, and the previous picture stays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hvdtrain.files import write_atomic

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.8 * nrows), squeeze=False)
    try:
        draw(list(axes.flat))
        fig.tight_layout()
        suffix = Path(path).suffix.lstrip(".").lower()  # .pdf, .svg: as asked; none (or unknown): PNG
        kind = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
        path = write_atomic(path, lambda f: fig.savefig(f, format=kind, dpi=100))
    finally:
        plt.close(fig)
    return path
