"""Charts (altair): Pareto frontiers of the regex study, precision–recall curves. HTML and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import altair as alt
import polars as pl

from sieve.files import write_atomic
from sieve.methods import FAMILIES, UNSTEERED, family

__all__ = ["pareto_chart", "pr_chart", "save_chart", "method_colors"]


# Shades per family, dark to light: methods of one family share a hue, families differ.
_SHADES = {
    "baseline": ["#000000"],
    "constant": ["#b2182b", "#e34a33", "#fc8d59", "#f4a582", "#d6604d"],
    "SAE-gated": ["#08306b", "#08519c", "#2171b5", "#4292c6", "#6baed6", "#9ecae1", "#3f6fa8", "#17456e"],
    "probe-gated": ["#00441b", "#006d2c", "#238b45", "#41ab5d", "#74c476", "#a1d99b"],
    "CAA-gated": ["#7f2704", "#a63603", "#d94801", "#f16913", "#fd8d3c"],
    "lexical": ["#525252", "#737373", "#969696"],
    "other": ["#3f007d", "#54278f", "#6a51a3", "#807dba", "#9e9ac8", "#756bb1"],
}
_SHAPES = {"baseline": "cross", "constant": "square", "SAE-gated": "circle", "probe-gated": "triangle-up",
           "CAA-gated": "diamond", "lexical": "triangle-right", "other": "triangle-down"}


def method_colors(methods: list[str], families: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(domain, range) of a colour scale: methods ordered by family (:data:`sieve.methods.FAMILIES`), each
    family in shades of its own hue.

    Example:
        >>> method_colors(["probe_sae", "unsteered", "constant_sae", "clamping"])[0]
        ['unsteered', 'constant_sae', 'clamping', 'probe_sae']
    """
    fam_of = {m: (families or {}).get(m) or family(m) for m in methods}
    ordered = sorted(dict.fromkeys(methods), key=lambda m: (FAMILIES.index(fam_of[m]), m))
    seen: dict[str, int] = {}
    colors = []
    for m in ordered:
        fam = fam_of[m]
        k = seen.get(fam, 0)
        seen[fam] = k + 1
        shades = _SHADES[fam]
        colors.append(shades[k % len(shades)])
    return ordered, colors


def _panel(df: pl.DataFrame, y: str, lo: str, hi: str, ytitle: str, title: str, domain: list[str],
           colors: list[str]) -> alt.LayerChart:
    """One Pareto panel: regex avoided (x) against ``y``, a line per method through its scales, 95%
    intervals on both axes, each point labelled with its scale; filled points are on the method's front."""
    x_axis = alt.X("regex_avoided:Q", title="regex avoided (share of completions; 95% interval)",
                   scale=alt.Scale(zero=False))
    y_axis = alt.Y(f"{y}:Q", title=ytitle, scale=alt.Scale(zero=False))
    cscale = alt.Scale(domain=domain, range=colors)
    color = alt.Color("series:N", title="family · method", scale=cscale,
                      legend=alt.Legend(symbolLimit=0, labelLimit=260))
    fams = [f for f in FAMILIES if f in set(df["family"])]
    shape = alt.Shape("family:N", legend=None,
                      scale=alt.Scale(domain=fams, range=[_SHAPES[f] for f in fams]))
    tooltip = ["method", "family", "scale", alt.Tooltip("regex_avoided:Q", format=".3f"),
               alt.Tooltip(f"{y}:Q", format=".3f"), alt.Tooltip(f"{lo}:Q", format=".3f"),
               alt.Tooltip(f"{hi}:Q", format=".3f")]
    base = alt.Chart(df).encode(x=x_axis, y=y_axis, color=color)
    line = base.mark_line(opacity=0.55, strokeWidth=1.5).encode(detail="method:N", order="scale_order:Q")
    x_err = alt.Chart(df).mark_rule(opacity=0.45).encode(
        x="avoided_lo:Q", x2="avoided_hi:Q", y=f"{y}:Q", color=alt.Color("series:N", scale=cscale))
    y_err = alt.Chart(df).mark_rule(opacity=0.45).encode(
        x="regex_avoided:Q", y=f"{lo}:Q", y2=f"{hi}:Q", color=alt.Color("series:N", scale=cscale))
    front = base.transform_filter("datum.pareto").mark_point(size=70, filled=True, opacity=0.95).encode(
        shape=shape, tooltip=tooltip)
    dominated = base.transform_filter("!datum.pareto").mark_point(size=70, strokeWidth=1.5, fill="white").encode(
        shape=shape, tooltip=tooltip)
    labels = base.mark_text(dx=7, dy=-7, fontSize=9, align="left").encode(text="scale_label:N")
    return alt.layer(x_err, y_err, line, dominated, front, labels).properties(
        title=alt.TitleParams(title, subtitle="filled: on the method's Pareto front; labels: scale"),
        width=400, height=320)


def pareto_chart(summary: pl.DataFrame, *, ability_title: str = "general ability") -> alt.HConcatChart:
    """Two panels, one line per method across its scales: regex avoided vs valid code, and regex
    avoided vs general ability. Methods are coloured by family (shades of one hue per family, shapes per
    family), every point carries its 95% intervals on both axes and is labelled with its scale; filled
    points are on their method's Pareto front, hollow ones are dominated.

    Example:
        >>> chart = pareto_chart(summary)  # doctest: +SKIP
        >>> save_chart(chart, "runs/regex-world/pareto")  # doctest: +SKIP
    """
    df = summary.with_columns(
        (1 - pl.col("regex_rate")).alias("regex_avoided"),
        (1 - pl.col("regex_hi")).alias("avoided_lo"),
        (1 - pl.col("regex_lo")).alias("avoided_hi"),
        (pl.col("family") if "family" in summary.columns  # a recipe's own methods: set by its report
         else pl.col("method").map_elements(family, return_dtype=pl.String)).alias("family"),
        pl.when(pl.col("method") == UNSTEERED).then(pl.lit(""))
        .otherwise(pl.col("scale").map_elements(lambda v: f"{v:g}", return_dtype=pl.String)).alias("scale_label"),
        pl.col("scale").abs().alias("scale_order"),
    )
    df = df.with_columns((pl.col("family") + " · " + pl.col("method")).alias("series"))
    if "pareto" not in df.columns:
        df = df.with_columns(pl.lit(True).alias("pareto"))
    df = df.sort(["method", "scale_order"])
    fams = dict(zip(df["method"].to_list(), df["family"].to_list()))
    domain, colors = method_colors(df["method"].to_list(), fams)
    domain = [f"{fams[m]} · {m}" for m in domain]
    panels = [_panel(df, "valid_rate", "valid_lo", "valid_hi", "valid code (share; 95% interval)",
                     "Constraint vs task", domain, colors)]
    if "ability" in df.columns and df["ability"].drop_nulls().len():
        panels.append(_panel(df.drop_nulls("ability"), "ability", "ability_lo", "ability_hi", f"{ability_title} (95% interval)",
                             "Constraint vs general ability", domain, colors))
    return alt.hconcat(*panels).resolve_scale(color="shared", shape="shared")


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


class _ScriptSafeJSON(json.JSONEncoder):
    """JSON with ``<``, ``>`` and ``&`` written as ``\\u`` escapes: the same data, but a string in the
    chart's data (a method name from a shared recipe or run folder, ``</script><script>...``) can
    neither close the page's ``<script>`` element nor open a comment in it."""

    def encode(self, o: object) -> str:
        return super().encode(o).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def save_chart(chart: alt.TopLevelMixin, stem: str | Path) -> list[Path]:
    """Save ``stem.html`` (self-contained; its data cannot end the page's script) and ``stem.png``, each
    written atomically (:func:`sieve.files.write_atomic`); returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html, png = stem.with_suffix(".html"), stem.with_suffix(".png")
    write_atomic(html, lambda p: chart.save(str(p), inline=True, json_kwds={"cls": _ScriptSafeJSON}))
    write_atomic(png, lambda p: chart.save(str(p), scale_factor=1.5))
    return [html, png]
