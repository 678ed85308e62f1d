"""Tables for people: what the recipe scripts print (aligned columns, chosen formats, no dtypes).

Polars' own ``print(df)`` shows column types, truncates rows and columns and boxes everything; a run's
summary wants every row, the numbers people compare formatted alike, and text that pastes into a
Markdown file as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl

from sieve.errors import printable

__all__ = ["format_table", "interval", "summary_table"]


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


def _iv(r: Mapping[str, Any], est: str, lo: str, hi: str, signed: bool = False) -> str:
    v, a, b = r.get(est), r.get(lo), r.get(hi)
    if v is None or v != v:
        return "-"
    f = "+.3f" if signed else ".3f"
    if a is None or b is None or a != a or b != b:
        return format(v, f)
    return f"{v:{f}} [{a:{f}}, {b:{f}}]"


def summary_table(summary: pl.DataFrame, validity: str = "syntax", *, out: Any = None,
                  ability_name: str | None = "ability", charts: Sequence[Any] | None = None) -> str:
    """The printed summary of a regex study: each method's Pareto-front scales, labelled as such, by
    family, with prompt-clustered 95% intervals where the summary has them (Wilson otherwise), and where
    the full table and the charts are (``out``: the run folder; ``charts``: the chart files this report
    wrote, else those found in ``out``; ``ability_name`` None: the run measured no general ability).

    Example:
        >>> s = pl.DataFrame([{"method": "unsteered", "scale": 0.0, "n": 8, "regex_rate": 0.5, "regex_lo": 0.2,
        ...                    "regex_hi": 0.8, "valid_rate": 1.0, "valid_lo": 0.7, "valid_hi": 1.0, "pareto": True}])
        >>> print(summary_table(s).splitlines()[0][:70])
        Summary: each method's Pareto-front scales only (1 of 1 method × scale
    """
    from sieve.methods import FAMILIES, family

    front = summary.filter(pl.col("pareto")) if "pareto" in summary.columns else summary
    clustered = "regex_clo" in summary.columns and summary["regex_clo"].drop_nulls().len() > 0
    rows = []
    for r in front.to_dicts():
        rlo, rhi = ("regex_clo", "regex_chi") if clustered and r.get("regex_clo") is not None else ("regex_lo", "regex_hi")
        vlo, vhi = ("valid_clo", "valid_chi") if clustered and r.get("valid_clo") is not None else ("valid_lo", "valid_hi")
        row = {
            "family": r.get("family") or family(r["method"]), "method": printable(r["method"]), "scale": r["scale"],
            "regex": _iv(r, "regex_rate", rlo, rhi), "dregex": _iv(r, "regex_diff", "regex_diff_lo", "regex_diff_hi", True),
            "pregex": (f"{r['regex_diff_p']:.3g} ({r['regex_diff_prompts']})" if r.get("regex_diff_p") is not None
                       else "-"),
            "valid": _iv(r, "valid_rate", vlo, vhi), "dvalid": _iv(r, "valid_diff", "valid_diff_lo", "valid_diff_hi", True),
            "ability": _iv(r, "ability", "ability_lo", "ability_hi"),
            "neutral": (f"{r['neutral_changed']:.2f} / {r['neutral_moved']:.2f}"
                        if r.get("neutral_changed") is not None and r.get("neutral_moved") is not None else "-"),
        }
        if r.get("complete_rate") is not None:
            row["split"] = f"{r['complete_rate']:.2f}/{r['prefix_rate']:.2f}/{r.get('empty_rate') or 0.0:.2f}"
        rows.append(row)
    rows.sort(key=lambda x: (FAMILIES.index(x["family"]) if x["family"] in FAMILIES else len(FAMILIES),
                             x["method"], abs(x["scale"])))
    cols = {"family": "family", "method": "method", "scale": "scale", "regex": "regex rate [95%]",
            "dregex": "Δ regex vs unsteered", "pregex": "p (prompts differing)",
            "valid": f"{validity} rate [95%]", "dvalid": f"Δ {validity}"}
    if any("split" in r for r in rows):
        cols["split"] = "complete/prefix/empty"
    if ability_name is not None:
        cols["ability"] = f"{ability_name} [95%]"
    cols["neutral"] = "neutral changed / moved"
    how = ("intervals clustered by prompt (bootstrap over prompts; samples of one prompt are not independent)"
           if clustered else "Wilson intervals")
    lines = [
        f"Summary: each method's Pareto-front scales only ({front.height} of {summary.height} method × scale "
        f"cells; the others are dominated by a scale of the same method on regex rate"
        + (f", {validity} rate and {ability_name})." if ability_name is not None else f" and {validity} rate)."),
        f"Rates on the regex-prone prompts with 95% {how}; Δ: paired difference from unsteered on the same "
        "prompt and seed; neutral: share of neutral completions changed from unsteered / how far they moved.",
        "",
        format_table(rows, cols, formats={"scale": "g"}),
    ]
    if out is not None:
        from pathlib import Path

        o = Path(out)
        if charts is None:
            charts = [p for p in (o / "pareto.html", o / "pareto.png") if p.exists()]
        lines += ["", f"Every cell, with Wilson and prompt-clustered intervals: {o / 'summary.csv'} (and summary.parquet)"]
        lines.append(f"Charts: {', '.join(str(p) for p in charts)}" if charts
                     else "Charts: not written (output.charts = false)")
        lines.append(f"Every completion and its evaluation: {o / 'gen'} (parquet parts); general ability: {o / 'ability'}")
    return "\n".join(lines)
