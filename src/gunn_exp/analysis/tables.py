"""Tables of measurements, as Markdown (reports, docs) or as rich tables (a terminal).

Every table in this package goes through here, so numbers read the same everywhere: `cell` prints
a float with three significant digits below 100 and as a whole number with thousands separators
from 100 on (6,315 img/s or a 151 ms step need no decimals), anything else as `str` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table


def cell(value: Any) -> str:
    """A table cell: floats to three significant digits, or whole from 100 on; others `str`."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], text_columns: int | None = None
) -> str:
    """A Markdown table of `rows` under `header`, each cell through `cell`.

    `text_columns`: the first that many columns are left-aligned and the rest (numbers)
    right-aligned; None leaves the alignment to the viewer.
    """
    n = len(header) if text_columns is None else text_columns
    rule = "|" + "|".join("---" if i < n else "---:" for i in range(len(header))) + "|"
    return "\n".join([_line(header), rule, *(_line(map(cell, row)) for row in rows)])


def rich_table(
    title: str, header: Sequence[str], rows: Iterable[Sequence[Any]], text_columns: int = 1
) -> Table:
    """The same table for a terminal (`rich.console.Console().print` it)."""
    from rich.table import Table  # imported here: the GPU check runs where only torch is

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < text_columns else "right")
    for row in rows:
        table.add_row(*map(cell, row))
    return table
