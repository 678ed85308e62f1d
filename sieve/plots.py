"""Charts (altair): Pareto frontiers of the regex study, precision–recall curves. HTML and PNG."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl

__all__ = ["pareto_chart", "pr_chart", "save_chart"]


def _line(df: pl.DataFrame, x: str, y: str, xtitle: str, ytitle: str, title: str) -> alt.Chart:
    base = alt.Chart(df).encode(
        x=alt.X(f"{x}:Q", title=xtitle, scale=alt.Scale(zero=False)),
        y=alt.Y(f"{y}:Q", title=ytitle, scale=alt.Scale(zero=False)),
        color=alt.Color("method:N", title="method", scale=alt.Scale(scheme="tableau20")),
        tooltip=["method", "scale", alt.Tooltip(f"{x}:Q", format=".3f"), alt.Tooltip(f"{y}:Q", format=".3f")],
    )
    return (base.mark_line(opacity=0.6) + base.mark_point(filled=True, size=60)).properties(
        title=title, width=360, height=300
    )


def pareto_chart(summary: pl.DataFrame, *, ability_title: str = "general ability") -> alt.HConcatChart:
    """Two panels, one line per method across its scales: regex avoided vs valid code, and regex
    avoided vs general ability.

    Example:
        >>> chart = pareto_chart(summary)  # doctest: +SKIP
    """
    df = summary.with_columns((1 - pl.col("regex_rate")).alias("regex_avoided")).sort(["method", "scale"])
    left = _line(df, "regex_avoided", "valid_rate", "regex avoided (share of completions)",
                 "valid code (share)", "Constraint vs task")
    panels = [left]
    if "ability" in df.columns:
        panels.append(_line(df.drop_nulls("ability"), "regex_avoided", "ability", "regex avoided (share of completions)",
                            ability_title, "Constraint vs general ability"))
    return alt.hconcat(*panels)


def pr_chart(curves: pl.DataFrame, marks: pl.DataFrame | None = None) -> alt.Chart:
    """Precision–recall curves, one per detector (``detector``, ``recall``, ``precision`` columns), with
    the operating points each method uses marked (``marks``: detector, recall, precision)."""
    chart = alt.Chart(curves).mark_line().encode(
        x=alt.X("recall:Q", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("precision:Q", scale=alt.Scale(domain=[0, 1])),
        color="detector:N",
    ).properties(width=380, height=320, title="Detectors: precision vs recall")
    if marks is not None and marks.height:
        pts = alt.Chart(marks).mark_point(size=120, shape="diamond", filled=True).encode(
            x="recall:Q", y="precision:Q", color="detector:N", tooltip=["detector", "threshold", "precision", "recall"]
        )
        chart = chart + pts
    return chart


def save_chart(chart: alt.TopLevelMixin, stem: str | Path) -> list[Path]:
    """Save ``stem.html`` (self-contained) and ``stem.png``; returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html, png = stem.with_suffix(".html"), stem.with_suffix(".png")
    chart.save(str(html), inline=True)
    chart.save(str(png), scale_factor=1.5)
    return [html, png]
