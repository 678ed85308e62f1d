"""Charts: methods grouped by family, 95% intervals drawn, scales labelled, saved offline."""

from __future__ import annotations

import polars as pl

from sieve.methods import FAMILIES, family
from sieve.plots import method_colors, pareto_chart, save_chart

METHODS = ["unsteered", "constant_sae", "constant_steering_vector", "conditional_per_token", "clamping",
           "probe_sae", "conditional_steering_vector", "someone_elses_method"]


def _summary() -> pl.DataFrame:
    rows = []
    for i, m in enumerate(METHODS):
        for j, s in enumerate([0.0] if m == "unsteered" else [-4.0, -8.0]):
            r = 0.4 - 0.03 * i - 0.05 * j
            rows.append({"method": m, "scale": s, "regex_rate": r, "regex_lo": r - 0.04, "regex_hi": r + 0.05,
                         "valid_rate": 0.5 - 0.01 * i, "valid_lo": 0.45 - 0.01 * i, "valid_hi": 0.55 - 0.01 * i,
                         "ability": 3.2 + 0.02 * i, "ability_lo": 3.0 + 0.02 * i, "ability_hi": 3.4 + 0.02 * i,
                         "pareto": j == 0})
    return pl.DataFrame(rows)


def test_families_cover_every_registered_method():
    from sieve.methods import METHODS as REGISTRY

    assert {family(m) for m in REGISTRY} <= set(FAMILIES) - {"baseline"}
    assert family("conditional_per_input") == "SAE-gated" and family("probe_steering_vector_clamping") == "probe-gated"
    assert family("constant_steering_vector") == "constant" and family("unsteered") == "baseline"


def test_colours_group_methods_by_family():
    domain, colors = method_colors(METHODS)
    fams = [family(m) for m in domain]
    assert fams == sorted(fams, key=FAMILIES.index)  # the legend reads family by family
    assert len(set(colors)) == len(colors)  # every method distinguishable
    by_family = {f: {c for m, c in zip(domain, colors) if family(m) == f} for f in set(fams)}
    assert not set.intersection(*[by_family["SAE-gated"], by_family["constant"]])


def test_pareto_chart_draws_intervals_and_scale_labels(tmp_path):
    spec = pareto_chart(_summary(), ability_title="held-out loss").to_dict()
    assert len(spec["hconcat"]) == 2
    for panel in spec["hconcat"]:
        marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in panel["layer"]]
        assert marks.count("rule") == 2 and "text" in marks and "point" in marks and "line" in marks
        enc = [layer["encoding"] for layer in panel["layer"]]
        assert any("x2" in e for e in enc) and any("y2" in e for e in enc)  # both intervals
        assert any(e.get("text", {}).get("field") == "scale_label" for e in enc)
    data = next(iter(spec["datasets"].values()))
    labels = {(d["method"], d["scale_label"]) for d in data}
    assert ("clamping", "-8") in labels and ("unsteered", "") in labels
    # intervals of "regex avoided" are the regex-rate interval turned round
    row = next(d for d in data if d["method"] == "clamping" and d["scale"] == -8.0)
    assert abs(row["avoided_lo"] - (1 - row["regex_hi"])) < 1e-12
    assert row["avoided_lo"] < row["regex_avoided"] < row["avoided_hi"]
    paths = save_chart(pareto_chart(_summary()), tmp_path / "pareto")
    assert [p.suffix for p in paths] == [".html", ".png"] and all(p.stat().st_size > 1000 for p in paths)
    assert "cdn" not in (tmp_path / "pareto.html").read_text().lower()  # self-contained, works offline


def test_a_hostile_method_name_cannot_end_the_charts_script(tmp_path):
    """A method name from someone else's run folder (``--merge``, ``--report-only``) is chart data: in
    the page it is written as JSON escapes, so it neither closes the ``<script>`` element nor opens one."""
    hostile = "</script><script>window.PWNED=1</script><!--"
    s = _summary().with_columns(pl.when(pl.col("method") == "someone_elses_method").then(pl.lit(hostile))
                                .otherwise(pl.col("method")).alias("method"))
    html = save_chart(pareto_chart(s), tmp_path / "hostile")[0].read_text()
    plain = save_chart(pareto_chart(_summary()), tmp_path / "plain")[0].read_text()
    assert "window.PWNED" in html  # the name is there, as data
    assert "<script>window" not in html and "<!--" not in html.split("<body>")[-1]
    assert html.lower().count("</script") == plain.lower().count("</script")
    assert html.count("<script") == plain.count("<script")
