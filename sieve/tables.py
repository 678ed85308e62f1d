"""Tables for people: what the recipe scripts print (aligned columns, chosen formats, no dtypes).

Polars' own ``print(df)`` shows column types, truncates rows and columns and boxes everything; a run's
summary wants every row, the numbers people compare formatted alike, and text that pastes into a
Markdown file as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl

__all__ = ["format_table", "interval"]


def interval(value: float | None, lo: float | None, hi: float | None, fmt: str = ".3f") -> str:
    """``value [lo, hi]``, or ``-`` when there is no value.

    Example:
        >>> interval(0.25, 0.1, 0.4)
        '0.250 [0.100, 0.400]'
        >>> interval(None, None, None)
        '-'
    """
    if value is None or value != value:  # None or NaN
        return "-"
    if lo is None or hi is None:
        return format(value, fmt)
    return f"{value:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _cell(v: Any, fmt: str | Callable[[Any], str] | None) -> str:
    if callable(fmt):
        return fmt(v)
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if fmt is not None:
        return format(v, fmt)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_table(
    table: pl.DataFrame | Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str] | None = None,
    formats: Mapping[str, str | Callable[[Any], str]] | None = None,
) -> str:
    """A Markdown table with aligned columns: every row, numbers right-aligned.

    ``columns``: which columns, in order (a mapping renames them: ``{"f1": "F1"}``); ``formats``: a
    format spec (``".2f"``) or a function per column. Floats default to 3 decimals, booleans to yes/no,
    missing values to ``-``.

    Example:
        >>> print(format_table([{"method": "clamping", "scale": -3.0, "rate": 0.125}],
        ...                    formats={"scale": "g"}))
        | method   | scale |  rate |
        |----------|------:|------:|
        | clamping |    -3 | 0.125 |
    """
    rows = table.to_dicts() if isinstance(table, pl.DataFrame) else [dict(r) for r in table]
    if columns is None:
        names: dict[str, str] = {k: k for k in (rows[0] if rows else {})}
    elif isinstance(columns, Mapping):
        names = dict(columns)
    else:
        names = {c: c for c in columns}
    formats = formats or {}
    body = [[_cell(r.get(c), formats.get(c)) for c in names] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) and bool(rows)
               for c in names]
    head = list(names.values())
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(head), rule, *(line(b) for b in body)])
