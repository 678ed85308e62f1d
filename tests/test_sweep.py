"""The sweep module: cells, planned rows (keys and seeds stable across versions, so old runs resume),
typed result rows and their schema."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import polars as pl
import pytest

from sieve.methods import UNSTEERED
from sieve.prompts import Prompt, PromptSets
from sieve.recipe import load_recipe, recipe_hash
from sieve.results import ResultStore
from sieve.sweep import AbilityRow, Cell, GenRow, PlannedRow, cells, columns, needs_detector, plan, row_seed, schema, shard

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/regex_lexical.toml"  # its scales: add [-5, -10, -20, -40], clamp [-3, -10]


def _sets(n_regex: int = 2, n_neutral: int = 1) -> PromptSets:
    rx = [Prompt(f"r{i}", f"def r{i}(", "regex") for i in range(n_regex)]
    nt = [Prompt(f"n{i}", f"def n{i}(", "neutral") for i in range(n_neutral)]
    return PromptSets(rx, nt, [], ([], []), [])


def test_cells_follow_the_recipe_and_the_baseline_comes_first_once():
    r = load_recipe(RECIPE, ['sweep.methods=["clamping","unsteered","probe_sae"]', "sweep.scales.add=[-5.0]"])
    assert [c.key for c in cells(r)] == ["clamping|-3", "clamping|-10", "unsteered|0", "probe_sae|-5"]
    assert [c.key for c in cells(r, baseline=True)] == ["unsteered|0", "clamping|-3", "clamping|-10", "probe_sae|-5"]
    assert needs_detector(r, "probe") and not needs_detector(load_recipe(RECIPE, ['sweep.methods=["clamping"]']), "probe")
    assert Cell(UNSTEERED).intervention(None) is None and not Cell(UNSTEERED).steered


def test_plan_keys_and_seeds_are_those_of_earlier_versions():
    r = load_recipe(RECIPE, ['sweep.methods=["unsteered","clamping"]', "sweep.samples=2"])
    rows = plan(r, _sets())
    # (2 regex + 1 neutral prompts) x (1 + 2 cells) x 2 samples, set by set, cell by cell
    assert len(rows) == 3 * 3 * 2 and len({x.key for x in rows}) == len(rows)
    assert rows[0].key == "regex|unsteered|0|0:r0|0" and rows[-1].key == "neutral|clamping|-10|0:n0|1"
    # the seed depends on prompt and sample, not on the method: methods share random numbers
    by_prompt = {(x.set, x.prompt_index, x.sample): set() for x in rows}
    for x in rows:
        by_prompt[(x.set, x.prompt_index, x.sample)].add(x.seed)
    assert all(len(s) == 1 for s in by_prompt.values())
    assert row_seed(0, "regex", 0, "r0", 0) == 2040856293  # pinned: earlier runs must resume
    assert [x.key for x in shard(rows, (1, 4))] == [x.key for x in rows[1::4]]


def _gen(**changes) -> GenRow:
    planned = PlannedRow("regex", "clamping", -3.0, 0, "r0", 0, 7)
    evaluation = dict(text="x", code="x", has_code=True, regex=False, regex_parsed="ast", syntax=True,
                      validity="complete", empty=False, complete=True, executed=None, exec_status="",
                      n_tokens=3, finished=True, prompt_fired=1, gen_fired=0, prompt_edited=1, gen_edited=0)
    evaluation.update(changes)
    return GenRow.of(planned, "h", **evaluation)


def test_typed_rows_store_with_one_schema(tmp_path):
    store = ResultStore(tmp_path)
    store.append([_gen()])
    store.append([_gen(executed=True, judge_follows=True)])  # columns that were null before keep their type
    ab = AbilityRow.of(Cell("clamping", -3.0), "loss", [3.0, 4.0], "h")
    store.append([ab])
    t = pl.concat([pl.read_parquet(p) for p in store.parts()], how="diagonal")
    assert t.schema["executed"] == pl.Boolean and t.schema["judge_follows"] == pl.Boolean
    assert t.schema["values"] == pl.List(pl.Float64) and t.schema["detail"] == pl.String
    assert ab.key == "ability|clamping|-3" and ab.value == 3.5
    assert set(columns([_gen()])) == set(schema(GenRow)) and list(schema(GenRow))[0] == "key"
    with pytest.raises(TypeError):
        GenRow.of(PlannedRow("regex", "m", 0.0, 0, "p", 0, 1), "h", text="x")  # a missing field is an error
    assert {f.name for f in dataclasses.fields(PlannedRow)} < {f.name for f in dataclasses.fields(GenRow)}


def test_a_recipe_with_the_old_kind_line_loads_with_a_warning(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text('kind = "regex"\n' + RECIPE.read_text())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = load_recipe(p)
    assert any("[kind] is no longer read" in str(x.message) for x in w)
    assert recipe_hash(r) == recipe_hash(load_recipe(RECIPE))
