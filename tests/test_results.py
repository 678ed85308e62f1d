"""Result store (append, resume, shards, merge), summary statistics and Pareto fronts."""

from __future__ import annotations

import polars as pl
import pytest

from sieve.results import ResultStore, merge_stores, pareto_front, parse_shard, summarize


def _rows(method, scale, n, regex_every, valid_every=1, set_name="regex"):
    return [{"key": f"{set_name}|{method}|{scale}|p{i}|0", "set": set_name, "method": method, "scale": scale,
             "prompt_id": f"p{i}", "prompt_index": i, "sample": 0,
             "regex": i % regex_every == 0, "syntax": i % valid_every == 0,
             "executed": None, "text": f"{method}{scale}{i}" if method != "unsteered" else f"t{i}",
             "prompt_fired": 1, "gen_fired": 2} for i in range(n)]


def test_store_appends_resumes_and_dedupes(tmp_path):
    s = ResultStore(tmp_path / "gen")
    s.append(_rows("a", 1.0, 5, 2))
    s.append(_rows("a", 1.0, 5, 2))  # a crashed run that re-wrote the same rows
    assert s.table().height == 5
    assert s.done_keys() == {f"regex|a|1.0|p{i}|0" for i in range(5)}
    # A half-written part (a crash mid-write) is a temp file, never read.
    (tmp_path / "gen" / ".part-x.parquet.tmp").write_bytes(b"garbage")
    assert ResultStore(tmp_path / "gen").table().height == 5


def test_shards_merge_without_duplicates(tmp_path):
    a, b = ResultStore(tmp_path / "s0" / "gen", "0of2"), ResultStore(tmp_path / "s1" / "gen", "1of2")
    a.append(_rows("m", 1.0, 6, 3)[:4])
    b.append(_rows("m", 1.0, 6, 3)[3:])  # overlapping row p3
    merged = merge_stores([tmp_path / "s0" / "gen", tmp_path / "s1" / "gen"], tmp_path / "all" / "gen")
    assert merged.height == 6 and merged["key"].n_unique() == 6
    assert ResultStore(tmp_path / "all" / "gen").table().height == 6


def test_moved_measures_the_lost_suffix():
    from sieve.results import _moved

    assert _moved("abcd", "abcd") == 0.0 and _moved("abcd", "abXY") == 0.5 and _moved("abcd", "zzzz") == 1.0


def test_parse_shard():
    assert parse_shard(None) == (0, 1) and parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_summary_rates_intervals_and_side_effects():
    rows = _rows("unsteered", 0.0, 20, 2) + _rows("c", -4.0, 20, 10, valid_every=2)
    rows += _rows("unsteered", 0.0, 4, 99, set_name="neutral") + _rows("c", -4.0, 4, 99, set_name="neutral")
    gen = pl.DataFrame(rows)
    ability = pl.DataFrame([{"key": "ability|unsteered|0", "method": "unsteered", "scale": 0.0, "metric": "loss",
                             "value": 2.0, "values": [1.9, 2.0, 2.1]},
                            {"key": "ability|c|-4", "method": "c", "scale": -4.0, "metric": "loss",
                             "value": 2.2, "values": [2.1, 2.2, 2.3]}])
    s = summarize(gen, ability)
    un = s.filter(pl.col("method") == "unsteered").row(0, named=True)
    c = s.filter(pl.col("method") == "c").row(0, named=True)
    assert un["regex_rate"] == 0.5 and c["regex_rate"] == 0.1 and c["valid_rate"] == 0.5
    assert un["regex_lo"] < 0.5 < un["regex_hi"]
    assert c["ability"] == pytest.approx(2.2) and c["ability_lo"] < 2.2 < c["ability_hi"]
    assert un["neutral_changed"] == 0.0 and c["neutral_changed"] == 1.0
    assert un["neutral_moved"] == 0.0 and c["neutral_moved"] == 1.0  # "t0" vs "c-4.00": differs at once
    assert c["neutral_fired_per_row"] == 3.0
    p = pareto_front(s, lower_ability_is_better=True)
    # neither dominates: c has less regex, unsteered has more validity and lower loss
    assert p["pareto_all"].to_list() == [True, True]


def test_summary_counts_empties_splits_validity_and_pairs_with_unsteered():
    """2 prompts x 2 samples. Unsteered: regex on 3 of 4; the method: regex on 1 (prompt 0 sample 0),
    one empty completion (prompt 1 sample 1, never valid) and one valid prefix at the budget."""
    def row(method, p, s, regex, kind):
        return {"key": f"regex|{method}|0|{p}|{s}", "set": "regex", "method": method, "scale": 0.0,
                "prompt_index": p, "sample": s, "regex": regex, "syntax": kind in ("complete", "prefix"),
                "validity": kind, "empty": kind == "empty", "text": "" if kind == "empty" else "x",
                "prompt_fired": 0, "gen_fired": 0}

    rows = [row("unsteered", 0, 0, True, "complete"), row("unsteered", 0, 1, True, "complete"),
            row("unsteered", 1, 0, True, "complete"), row("unsteered", 1, 1, False, "complete"),
            row("m", 0, 0, True, "complete"), row("m", 0, 1, False, "prefix"),
            row("m", 1, 0, False, "complete"), row("m", 1, 1, False, "empty")]
    s = summarize(pl.DataFrame(rows), None, n_boot=500)
    un = s.filter(pl.col("method") == "unsteered").row(0, named=True)
    m = s.filter(pl.col("method") == "m").row(0, named=True)
    assert m["empty_n"] == 1 and m["empty_rate"] == 0.25 and un["empty_n"] == 0
    assert m["valid_rate"] == 0.75 and m["complete_rate"] == 0.5 and m["prefix_rate"] == 0.25
    assert m["regex_rate"] == 0.25 and m["regex_diff"] == pytest.approx(0.25 - 0.75)
    assert m["valid_diff"] == pytest.approx(-0.25)
    assert un["regex_diff"] is None and m["n_prompts"] == 2
    for r in (un, m):
        assert r["regex_clo"] <= r["regex_rate"] <= r["regex_chi"]
        assert r["valid_clo"] <= r["valid_rate"] <= r["valid_chi"]
    assert m["regex_diff_lo"] <= m["regex_diff"] <= m["regex_diff_hi"] <= 0
