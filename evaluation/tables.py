"""Writing an evaluation table as Markdown (rounded, for reading) and CSV (full precision, for code), and its figure
as a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

Cell = str | int | float


def markdown(table: list[dict[str, str]]) -> str:
    """A Markdown table of rows that share their columns (the first row's keys, in order)."""
    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def format_cell(value: Cell, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict[str, Cell]], out: Path, name: str = "table", digits: int = 4) -> str:
    """``OUT/NAME.md`` and ``OUT/NAME.csv`` of rows that share their columns; returns the Markdown text."""
    if not rows:
        raise ValueError(f"{out / name}: no rows to write")
    out.mkdir(parents=True, exist_ok=True)
    text = markdown([{key: format_cell(value, digits) for key, value in row.items()} for row in rows])
    (out / f"{name}.md").write_text(text + "\n")
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return text


def save_figure(figure, path: Path, dpi: int = 100) -> Path:
    """A matplotlib figure laid out tightly, written to ``path`` (folders made) and closed; returns ``path``."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
