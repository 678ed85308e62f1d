"""The regex study end to end on the embedded world: a tiny sweep, kill-and-resume, shards and merge."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from recipes import regex
from sieve.errors import RecipeError
from sieve.recipe import load_recipe, recipe_hash
from sieve.results import ResultStore

ROOT = Path(__file__).resolve().parents[1]
METHODS = '["unsteered","constant_sae","conditional_per_input","conditional_clamping","probe_sae","sae_steering_vector"]'


def _overrides(out: Path, **extra) -> list[str]:
    ov = {
        "sweep.methods": METHODS, "sweep.samples": "1", "sweep.max_new_tokens": "8", "sweep.batch_size": "8",
        "sweep.scales.add": "[-8.0]", "sweep.scales.clamp": "[-4.0]",
        "prompts.regex_limit": "6", "prompts.neutral_limit": "3", "prompts.code_limit": "4",
        "output.dir": f'"{out}"',
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="session")
def detector_cache(tmp_path_factory) -> Path:
    """CAA vector and probe built once for the session (they are cached by a hash of their inputs)."""
    from sieve.setting import load_setting

    out = tmp_path_factory.mktemp("cache_run")
    load_setting(load_recipe(ROOT / "recipes/regex.toml", _overrides(out)), progress=False, cache_dir=out / "cache")
    return out / "cache"


def _prepare(out: Path, cache: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cache, out / "cache", dirs_exist_ok=True)


def test_tiny_sweep_end_to_end(tmp_path, detector_cache, capsys):
    out = tmp_path / "run"
    _prepare(out, detector_cache)
    # --out wins over the recipe's output.dir: results and the detector cache go there, nothing elsewhere
    elsewhere = tmp_path / "recipe_dir"
    args = [str(ROOT / "recipes/regex.toml"), *_overrides(elsewhere), "--out", str(out), "--no-progress"]
    assert regex.main(args) == 0
    assert not elsewhere.exists() and (out / "cache/caa.safetensors").exists() and (out / "recipe.toml").exists()
    gen = ResultStore(out / "gen").table()
    r = load_recipe(ROOT / "recipes/regex.toml", _overrides(out))
    # 6 methods, one scale each, (6 regex + 3 neutral) prompts, 1 sample
    assert gen.height == 6 * 9 and gen["key"].n_unique() == gen.height
    assert set(gen["recipe_hash"]) == {recipe_hash(r)}
    assert {"regex", "syntax", "validity", "empty", "prompt_fired", "gen_edited", "text", "code"} <= set(gen.columns)
    assert not gen.filter(pl.col("empty") & pl.col("syntax")).height  # an empty completion is never valid
    ability = ResultStore(out / "ability").table()
    assert ability.height == 6 and (ability["metric"] == "loss").all()
    summary = pl.read_parquet(out / "summary.parquet")
    assert summary.height == 6 and {"regex_lo", "regex_hi", "ability_lo", "pareto"} <= set(summary.columns)
    assert {"regex_clo", "regex_chi", "regex_diff", "valid_diff", "empty_n", "complete_rate", "prefix_rate",
            "neutral_changed_clo"} <= set(summary.columns)
    assert set(pl.read_csv(out / "summary.csv").columns) >= {"regex_clo", "regex_diff_lo", "empty_n"}
    assert (out / "pareto.html").exists() and (out / "pareto.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    # the summary says what it shows, by family, and where the rest is
    assert "each method's Pareto-front scales only" in printed and "| family " in printed
    assert "regex rate [95%]" in printed and "clustered by prompt" in printed
    assert str(out / "summary.csv") in printed and str(out / "pareto.html") in printed
    shown = [ln for ln in printed.splitlines() if ln.startswith("| ") and "method" not in ln]
    assert len(shown) == summary["pareto"].sum() and "dtype" not in printed
    # unsteered rows are never edited; constant steering edits every generated token
    un = gen.filter(pl.col("method") == "unsteered")
    assert (un["gen_edited"] == 0).all() and (un["prompt_edited"] == 0).all()
    const = gen.filter(pl.col("method") == "constant_sae")
    # A row that ran out of budget (8 new tokens, 9 when healing re-spelled the prompt's last token)
    # had n_tokens - 1 decode forwards after the prefill; a row that picked EOS at step j (n_tokens = j,
    # the EOS cut) had its j kept tokens read by a forward, and nothing after its EOS is counted.
    expected = pl.when(pl.col("finished")).then(pl.col("n_tokens")).otherwise(pl.col("n_tokens") - 1)
    assert set(const.filter(~pl.col("finished"))["n_tokens"]) <= {8, 9}
    assert const.select((pl.col("gen_edited") == expected).all()).item()
    # (rows ending at EOS are checked in tests/test_healing.py: healed prompts rarely end within 8 tokens)
    assert (~const["finished"]).any()
    # a truncated part file: named, quarantined, its rows generated again, the same as before
    part = ResultStore(out / "gen").parts()[0]
    lost = pl.read_parquet(part)["key"].to_list()
    part.write_bytes(part.read_bytes()[:100])
    assert regex.main(args) == 0
    assert (out / "gen/quarantine" / part.name).exists()
    again = ResultStore(out / "gen").table()
    assert again.height == gen.height and set(lost) <= set(again["key"])
    assert again.sort("key")["text"].to_list() == gen.sort("key")["text"].to_list()


def test_killed_run_resumes_without_duplicates(tmp_path, detector_cache):
    out = tmp_path / "run"
    _prepare(out, detector_cache)
    extra = {"sweep.batch_size": "2", "sweep.samples": "3"}  # 162 rows in 21 parts: room to kill mid-way
    args = [str(ROOT / "recipes/regex.toml"), *_overrides(out, **extra), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recipes.regex", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    gen_dir = out / "gen"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(gen_dir.glob("part-*.parquet"))) < 2:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: make the sweep longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = ResultStore(gen_dir).table()
    assert 0 < partial.height < 162
    assert regex.main(args) == 0
    full = ResultStore(gen_dir).table()
    assert full.height == 162 and full["key"].n_unique() == 162
    # the rows written before the kill are kept as they were (resume skips them)
    kept = full.filter(pl.col("key").is_in(partial["key"].to_list())).sort("key")
    assert kept["text"].to_list() == partial.sort("key")["text"].to_list()
    # and the whole table equals an uninterrupted run's (rows are seeded per prompt and sample)
    clean = tmp_path / "clean"
    _prepare(clean, detector_cache)
    assert regex.main([str(ROOT / "recipes/regex.toml"), *_overrides(clean, **{"sweep.samples": "3"}),
                       "--no-progress"]) == 0
    ref = ResultStore(clean / "gen").table().sort("key")
    assert full.sort("key")["text"].to_list() == ref["text"].to_list()


def test_shards_then_merge(tmp_path, detector_cache):
    outs = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        _prepare(out, detector_cache)
        assert regex.main([str(ROOT / "recipes/regex.toml"), *_overrides(out), "--shard", f"{i}/2", "--no-progress"]) == 0
        outs.append(out)
    sizes = [ResultStore(o / "gen").table().height for o in outs]
    assert sum(sizes) == 54 and min(sizes) > 0
    merged = tmp_path / "merged"
    assert regex.main([str(ROOT / "recipes/regex.toml"), *_overrides(merged), "--merge", *map(str, outs)]) == 0
    table = ResultStore(merged / "gen").table()
    assert table.height == 54 and table["key"].n_unique() == 54
    assert ResultStore(merged / "ability").table().height == 6
    assert (merged / "summary.parquet").exists()


def test_bad_override_names_key(tmp_path, capsys):
    args = [str(ROOT / "recipes/regex.toml"), 'sweep.methods=["bogus"]', f'output.dir="{tmp_path}"']
    assert regex.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"sweep.methods\[0\].*unknown method 'bogus'", err) and "Traceback" not in err
    with pytest.raises(RecipeError, match="unknown method 'bogus'"):
        regex.main([*args, "--debug"])


def test_user_prompt_files_run_end_to_end(tmp_path, detector_cache):
    """Your own regex-prone (.py) and neutral (.jsonl) prompts, ending in a bare newline after the
    docstring (healed), with the lexical baseline beside unsteered."""
    out = tmp_path / "run"
    _prepare(out, detector_cache)
    rx = tmp_path / "mine.py"
    rx.write_text('def find_emails(text):\n    """Return every email address in text."""\n'
                  '# --- dates\ndef is_valid_date(s):\n    """Check that s matches YYYY-MM-DD."""\n')
    nt = tmp_path / "neutral.jsonl"
    nt.write_text('{"prompt": "def mean(xs):\\n    \\"\\"\\"The mean of xs.\\"\\"\\"\\n", "id": "mean"}\n')
    ov = _overrides(out, **{"sweep.methods": '["unsteered","lexical_steering_vector"]', "sweep.samples": "2"})
    assert regex.main([str(ROOT / "recipes/regex.toml"), *ov, "--regex-prompts", str(rx),
                       "--neutral-prompts", str(nt), "--no-progress"]) == 0
    gen = ResultStore(out / "gen").table()
    assert gen.height == 2 * (2 + 1) * 2
    assert set(gen.filter(pl.col("set") == "regex")["prompt_id"]) == {"mine.py:1", "dates"}
    assert set(gen.filter(pl.col("set") == "neutral")["prompt_id"]) == {"mean"}
    lex = gen.filter(pl.col("method") == "lexical_steering_vector")
    # Only "dates" has a regex-ish word ("matches"): its rows are steered, the others are not.
    opened = {(r["prompt_id"], r["prompt_gate_opened"]) for r in lex.iter_rows(named=True)}
    assert opened == {("mine.py:1", 0), ("dates", 1), ("mean", 0)}
    assert (gen["n_tokens"] > 0).all()  # healed: no completion is cut to nothing by a bare newline
    summary = pl.read_parquet(out / "summary.parquet")
    assert summary.filter(pl.col("method") == "lexical_steering_vector")["gate_open_rate"].to_list() == [0.5]


def test_sweep_progress_moves_per_batch(tmp_path, detector_cache, monkeypatch):
    updates: list[int] = []

    class Bar:  # records what the sweep's bar is told
        def __init__(self, *a, total=None, desc="", **kw):
            self.desc = desc

        def update(self, n=1):
            if self.desc.startswith("sweep"):
                updates.append(n)

        def close(self):
            pass

        def __iter__(self):
            return iter(())

    out = tmp_path / "run"
    _prepare(out, detector_cache)
    monkeypatch.setattr(regex, "tqdm", lambda *a, **kw: Bar(*a, **kw) if "total" in kw else iter(a[0]))
    assert regex.main([str(ROOT / "recipes/regex.toml"), *_overrides(out, **{"sweep.batch_size": "4"}),
                       "eval.general=\"none\""]) == 0
    # 6 methods x (6 + 3) prompts = 54 rows, stored in chunks of >= 4 whole (prompt, sample) groups (forked
    # generation), but the bar moves every batch: a batch of 4 unsteered trajectories settles at most their
    # 4 x 6 rows, a batch of forked or full rows <= 4
    assert sum(updates) == 54 and max(updates) <= 4 * 6 and len(updates) > 54 // 16


def test_judge_runs_after_generation_and_retries_failures_on_resume(tmp_path, detector_cache, monkeypatch, capsys):
    from tests.test_judge import _Server

    server = _Server(rate_limited=3)  # the first three requests are refused (429) and not retried here
    try:
        monkeypatch.setenv("SIEVE_JUDGE_BASE_URL", server.url)
        monkeypatch.setenv("SIEVE_JUDGE_API_KEY", "k")
        monkeypatch.setenv("SIEVE_JUDGE_MAX_RETRIES", "0")
        monkeypatch.setenv("SIEVE_JUDGE_CONCURRENCY", "2")
        out = tmp_path / "run"
        _prepare(out, detector_cache)
        args = [str(ROOT / "recipes/regex.toml"), *_overrides(out), "eval.judge=\"openai\"", "eval.general=\"none\"",
                "--no-progress"]
        assert regex.main(args) == 0
        gen = ResultStore(out / "gen").table()
        want = set(gen.filter((pl.col("set") == "regex") & (pl.col("code") != ""))["key"])
        first = ResultStore(out / "judge").done_keys()
        assert len(want) > 3 and first < want and len(want - first) == 3  # the three refused are not stored
        asked = len(server.seen)
        assert regex.main(args) == 0  # the same command again: only those three are asked
        assert len(server.seen) - asked == 3 and ResultStore(out / "judge").done_keys() == want
        summary = pl.read_parquet(out / "summary.parquet")
        assert (summary["judged"].fill_null(0) > 0).any() and "judge_follows_rate" in summary.columns
    finally:
        server.close()


def test_forked_sweep_equals_full_sweep_also_in_shards(tmp_path, detector_cache):
    import json

    cols = ["key", "text", "n_tokens", "finished", "regex", "syntax", "prompt_fired", "gen_fired", "prompt_edited",
            "gen_edited", "prompt_fired_at", "gen_fired_at", "gen_edited_at"]
    extra = {"sweep.samples": "2"}
    tables, ability = {}, {}
    # "false": the sweep as it was before any saving (every row in full, no prefill shared, HF's cache)
    engine = {"true": {}, "false": {"sweep.share_prefill": "false", "sweep.kv_cache": '"hf"', "sweep.drop_ended": "false"}}
    for fork in ("true", "false"):
        out = tmp_path / fork
        _prepare(out, detector_cache)
        assert regex.main([str(ROOT / "recipes/regex.toml"),
                           *_overrides(out, **extra, **{"sweep.fork": fork}, **engine[fork]), "--no-progress"]) == 0
        tables[fork] = ResultStore(out / "gen").table().sort("key").select(cols)
        ability[fork] = ResultStore(out / "ability").table().sort("key")
    assert tables["true"].height == 6 * 9 * 2 and tables["true"].equals(tables["false"])
    # held-out loss: texts a cell's gate never edits reuse the unsteered forward; the rest are float noise apart
    assert ability["true"]["key"].to_list() == ability["false"]["key"].to_list()
    for a, b in zip(ability["true"]["values"].to_list(), ability["false"]["values"].to_list()):
        assert len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b))
    work = json.loads((tmp_path / "true/run.json").read_text())["sessions"][-1]["work"]
    assert work["rows"] == 108 and work["unsteered"] == 18 and 0 < work["tokens"] < work["tokens_full"]
    assert work["texts"] == 5 * 4 and 0 <= work["texts_reused"] <= work["texts"]  # 5 steered cells x 4 texts
    assert "work" not in json.loads((tmp_path / "false/run.json").read_text())["sessions"][-1]
    # the same recipe either way (a run may resume with the other setting)
    on, off = (load_recipe(ROOT / "recipes/regex.toml", _overrides(tmp_path, **{"sweep.fork": f}, **engine[f]))
               for f in ("true", "false"))
    assert off.sweep.kv_cache == "hf" and not off.sweep.share_prefill and on.sweep.kv_cache == "grow"
    assert on.sweep.drop_ended and not off.sweep.drop_ended
    assert recipe_hash(on) == recipe_hash(off)
    # shards of one folder: a shard's gated rows whose unsteered row is in the other shard are forked from
    # a trajectory made in memory; the rows are the same
    out = tmp_path / "shards"
    _prepare(out, detector_cache)
    for i in range(2):
        assert regex.main([str(ROOT / "recipes/regex.toml"), *_overrides(out, **extra), 'eval.general="none"',
                           "--shard", f"{i}/2", "--no-progress"]) == 0
    assert ResultStore(out / "gen").table().sort("key").select(cols).equals(tables["true"])
