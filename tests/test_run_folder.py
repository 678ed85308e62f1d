"""Runs that never mix or lose data: a folder belongs to one recipe, keeps the resolved recipe, has one
writer per shard, and survives a truncated part file. (The end-to-end resume of a truncated part and
``--out`` moving the detector cache are in test_regex_recipe.py.)"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import polars as pl
import pytest

from recipes import regex
from recipes.cli import RecipeCLI
from sieve.errors import SieveError
from sieve.recipe import load_recipe, recipe_from_dict, recipe_hash
from sieve.results import ResultStore
from sieve.rundir import claim, lock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/regex.toml"


def _writer(rows: int = 3):
    """A recipe script whose body stores a few rows, as the regex study does."""

    def body(run) -> int:
        ResultStore(run.out / "gen").append([{"key": f"k{i}", "recipe_hash": recipe_hash(run.recipe)}
                                             for i in range(rows)])
        return 0

    return RecipeCLI("recipes.test", None), body


def test_a_folder_of_another_recipe_is_refused_naming_what_differs(tmp_path, capsys):
    cli, body = _writer()
    out = ["--out", str(tmp_path)]
    assert cli.main(body, ["sweep.max_new_tokens=48", *out]) == 0
    before = ResultStore(tmp_path / "gen").parts()
    assert cli.main(body, ["sweep.max_new_tokens=32", *out]) == 2
    err = capsys.readouterr().err
    assert "holds results of another recipe" in err and "sweep.max_new_tokens (48 -> 32)" in err
    assert ResultStore(tmp_path / "gen").parts() == before  # nothing added, nothing lost
    assert cli.main(body, ["sweep.max_new_tokens=48", *out]) == 0  # the same recipe resumes
    # output.dir is not part of the recipe's identity: the same study written elsewhere is the same run
    assert cli.main(body, ["sweep.max_new_tokens=48", f'output.dir="{tmp_path}"']) == 0


def test_a_folder_without_results_is_taken_over(tmp_path):
    claim(tmp_path, load_recipe(RECIPE, ["sweep.samples=2"]))
    claim(tmp_path, load_recipe(RECIPE, ["sweep.samples=3"]))  # e.g. a run that failed before any row
    assert tomllib.loads((tmp_path / "recipe.toml").read_text())["sweep"]["samples"] == 3


def test_the_resolved_recipe_is_saved_with_its_overrides(tmp_path):
    ov = ["sweep.samples=2", 'sweep.methods=["unsteered","clamping"]']
    cli, body = _writer()
    assert cli.main(body, [*ov, "--out", str(tmp_path)]) == 0
    saved = tomllib.loads((tmp_path / "recipe.toml").read_text())
    meta = (tmp_path / "recipe.json").read_text()
    r = load_recipe(RECIPE, ov)
    assert saved["sweep"]["samples"] == 2 and saved["sweep"]["methods"] == ["unsteered", "clamping"]
    # read beside the original file, it is the same recipe (same hash)
    assert recipe_hash(recipe_from_dict(saved, RECIPE)) == recipe_hash(r)
    assert recipe_hash(r) in meta and "sweep.samples=2" in meta and str(RECIPE) in meta
    assert (tmp_path / "recipe.toml").read_text().startswith("# The resolved recipe")


def test_a_second_writer_is_refused_and_told_who_holds_the_lock(tmp_path, capsys):
    args = [str(RECIPE), "--out", str(tmp_path), "--no-progress"]
    with lock(tmp_path, "shard-0of1"):
        assert regex.main(args) == 2  # refused before loading anything
        err = capsys.readouterr().err
        assert "is being written by another run" in err and f"pid {os.getpid()}" in err
        with pytest.raises(SieveError, match="being written"), lock(tmp_path, "shard-0of1"):
            pass
        with lock(tmp_path, "shard-1of2"):  # another shard of the same folder may run beside it
            pass
    with lock(tmp_path, "shard-0of1"):  # released when the holder is done
        pass


def test_a_truncated_part_is_named_quarantined_and_its_rows_redone(tmp_path, caplog):
    store = ResultStore(tmp_path / "gen")
    for i in range(3):
        store.append([{"key": f"{i}-{j}", "x": j} for j in range(4)])
    bad = store.parts()[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="sieve.results"):
        done = ResultStore(tmp_path / "gen").done_keys()
    assert done == {f"{i}-{j}" for i in (0, 2) for j in range(4)}  # its rows are to be generated again
    assert str(bad) in caplog.text and "quarantine" in caplog.text
    assert (tmp_path / "gen/quarantine" / bad.name).exists() and not bad.exists()
    again = ResultStore(tmp_path / "gen")
    again.append([{"key": f"1-{j}", "x": j} for j in range(4)])
    table = again.table()
    assert table.height == 12 and table["key"].n_unique() == 12
    assert pl.read_parquet(again.parts()[-1]).height == 4


def test_a_quarantine_link_shipped_in_a_store_is_not_followed(tmp_path, caplog):
    """A shared shard folder ships ``gen/quarantine -> elsewhere`` and a part that is not parquet:
    reading it (``--merge``, ``--report-only``) must not move the part through the link."""
    store = ResultStore(tmp_path / "gen")
    store.append([{"key": "a", "x": 1}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "gen/quarantine").symlink_to(elsewhere)
    bad = tmp_path / "gen" / "part-0of1-999999-evil.parquet"
    bad.write_bytes(b"not parquet: attacker bytes")
    with caplog.at_level(logging.WARNING, logger="sieve.results"):
        assert ResultStore(tmp_path / "gen").done_keys() == {"a"}
    assert list(elsewhere.iterdir()) == [] and bad.exists()
    assert "not a folder of this store" in caplog.text


def test_writes_replace_links_planted_in_the_folder_and_never_write_through_them(tmp_path):
    from sieve.files import write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("summary.csv", ".summary.csv.tmp", "report.html"):
        (out / name).symlink_to(victim)
    (out / "dangling.json").symlink_to(tmp_path / "created-elsewhere.json")
    write_atomic(out / "summary.csv", "a\n")
    write_atomic(out / "report.html", b"<html>")
    write_atomic(out / "dangling.json", lambda p: p.write_text("{}"))
    assert victim.read_text() == "mine" and not (tmp_path / "created-elsewhere.json").exists()
    assert not (out / "summary.csv").is_symlink() and (out / "summary.csv").read_text() == "a\n"
    assert (out / "dangling.json").read_text() == "{}"
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".summary.csv.tmp"]  # no leftovers
    with pytest.raises(ZeroDivisionError):
        write_atomic(out / "x.parquet", lambda p: 1 / 0)
    assert not (out / "x.parquet").exists() and len(list(out.iterdir())) == 4


def test_a_lock_file_planted_as_a_link_is_refused_not_written_through(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("# mine\n")
    out = tmp_path / "shared-run"
    out.mkdir()
    (out / ".lock-mmlu").symlink_to(victim)
    with pytest.raises(SieveError, match=r"\.lock-mmlu is a symbolic link"):
        with lock(out, "mmlu"):
            pass
    assert victim.read_text() == "# mine\n"


def test_a_cache_shipped_in_a_shared_output_folder_is_computed_again(tmp_path, caplog):
    """Its key comes from the recipe and prompts, which anyone can compute; the HMAC under this user's
    key cannot be: a planted CAA vector is not used, the user's own cache is."""
    import torch
    from safetensors.torch import save_file

    from sieve.detectors import cached

    calls = []

    def compute():
        calls.append(1)
        return {"v": torch.ones(4)}

    planted = tmp_path / "cache" / "caa.safetensors"
    planted.parent.mkdir()
    save_file({"v": torch.full((4,), -9.0)}, str(planted), metadata={"key": "k1", "mac": "0" * 64})
    with caplog.at_level(logging.INFO, logger="sieve.detectors"):
        assert cached(planted, "k1", compute)["v"].tolist() == [1.0] * 4
    assert calls == [1] and "not written by this user's sieve" in caplog.text
    assert cached(planted, "k1", compute)["v"].tolist() == [1.0] * 4 and calls == [1]  # its own: reused
    assert cached(planted, "k2", compute) and calls == [1, 1]  # another key: computed


def test_result_parts_this_user_did_not_write_are_named(tmp_path):
    """A folder shipped with a shared recipe can hold result parts (rows a run would resume as its own):
    parts carry an HMAC under this user's key, so a shipped, renamed or edited part is found."""
    import shutil

    store = ResultStore(tmp_path / "gen")
    mine = [store.append([{"key": f"{i}", "x": i}]) for i in range(2)]
    assert store.foreign_parts() == []
    planted = tmp_path / "gen" / "part-0of1-000009-feedbeef.parquet"
    pl.DataFrame([{"key": "9", "x": 9}]).write_parquet(planted)  # shipped: no HMAC
    renamed = tmp_path / "gen" / "part-0of1-000010-deadbeef.parquet"
    shutil.copy(mine[0], renamed)  # a signed part's bytes under another name, its HMAC file beside it
    shutil.copy(mine[0].with_name(f".{mine[0].name}.mac"), renamed.with_name(f".{renamed.name}.mac"))
    edited = mine[1]
    pl.DataFrame([{"key": "1", "x": 100}]).write_parquet(edited)  # a signed part rewritten
    assert sorted(p.name for p in ResultStore(tmp_path / "gen").foreign_parts()) == sorted(
        [planted.name, renamed.name, edited.name])
    merged = tmp_path / "merged"
    from sieve.results import merge_stores

    merge_stores([tmp_path / "gen"], merged)  # a merge the command line asked for writes its own parts
    assert ResultStore(merged).foreign_parts() == []
    merge_stores([tmp_path / "gen"], merged)  # merged again: the old parts go, with their HMAC files
    assert len(list(merged.glob(".part-*.mac"))) == len(ResultStore(merged).parts()) == 1


def test_rows_a_run_did_not_write_are_generated_again_unless_kept(tmp_path, caplog):
    """A shared recipe shipping its own output folder with result parts (rows a run would resume as the
    user's own, under the run's real keys): the parts are set aside and their rows generated here;
    --keep-foreign-parts resumes them, and run.json says which."""
    from sieve.report import load_run

    out = tmp_path / "out"
    args = [str(ROOT / "recipes/regex.toml"), 'sweep.methods=["unsteered"]', "sweep.samples=1",
            "sweep.max_new_tokens=4", "prompts.regex_limit=1", "prompts.neutral_limit=1", 'eval.general="none"',
            f'output.dir="{out}"', "--no-progress"]
    assert regex.main(args) == 0
    assert "did not write" not in caplog.text and "foreign_parts" not in load_run(out)["sessions"][-1]
    gen = ResultStore(out / "gen")
    real = pl.concat([pl.read_parquet(p) for p in gen.parts()])
    # forged: every row the run makes, with a completion of the sender's choosing, and no HMAC
    forged = real.with_columns(pl.lit("FORGED").alias("text"))
    for p in gen.parts():
        p.unlink()
    forged.write_parquet(out / "gen" / "part-0of1-000000-0badc0de.parquet")
    assert [p.name for p in gen.foreign_parts()] == ["part-0of1-000000-0badc0de.parquet"]

    def completions():
        return set(ResultStore(out / "gen").table()["text"].to_list())

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recipes"):
        assert regex.main([*args, "--keep-foreign-parts"]) == 0
    assert "did not write (gen: 1); kept as they are" in caplog.text
    assert load_run(out)["sessions"][-1]["foreign_parts"] == {"gen": 1, "kept": True}
    assert completions() == {"FORGED"}  # kept on request: nothing generated again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recipes"):
        assert regex.main(args) == 0
    assert "did not write (gen: 1" in caplog.text and "set aside in" in caplog.text
    assert load_run(out)["sessions"][-1]["foreign_parts"] == {"gen": 1, "kept": False}
    assert "FORGED" not in completions() and len(ResultStore(out / "gen").table()) == len(real)
    assert (out / "gen" / "foreign" / "part-0of1-000000-0badc0de.parquet").is_file()  # moved, not deleted
    import json

    rh = json.loads((out / "recipe.json").read_text())["hash"]  # parts are signed for the run's recipe
    assert ResultStore(out / "gen", context=rh).foreign_parts() == []  # the rows made again are this user's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recipes"):
        assert regex.main(args) == 0  # a resume of a folder that is now all this user's says nothing
    assert "did not write" not in caplog.text


def test_setting_aside_refuses_a_shipped_link(tmp_path):
    """``gen/foreign`` shipped as a link would move the parts wherever it points: refused, nothing moved."""
    store = ResultStore(tmp_path / "gen")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "gen" / "foreign").symlink_to(elsewhere)
    planted = tmp_path / "gen" / "part-0of1-000000-feedbeef.parquet"
    pl.DataFrame([{"key": "a"}]).write_parquet(planted)
    with pytest.raises(SieveError, match="not a folder of this result store"):
        store.set_aside(store.foreign_parts())
    assert planted.is_file() and list(elsewhere.iterdir()) == []
    (tmp_path / "gen" / "foreign").unlink()
    (tmp_path / "gen" / "foreign").mkdir()
    (tmp_path / "gen" / "foreign" / planted.name).write_text("an earlier one")
    assert store.set_aside([planted]) == tmp_path / "gen" / "foreign"
    assert sorted(p.name for p in (tmp_path / "gen" / "foreign").iterdir()) == [
        "part-0of1-000000-feedbeef.1.parquet", planted.name]  # nothing overwritten
    assert store.done_keys() == set()


def test_launch_passes_keep_foreign_parts_on_to_every_shard(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("sieve.launch.launch", lambda module, argv, out, spec: seen.setdefault("argv", argv))
    assert regex.main([str(ROOT / "recipes/regex.toml"), "--out", str(tmp_path / "o"), "--launch"]) == 0
    assert "--keep-foreign-parts" not in seen.pop("argv")
    assert regex.main([str(ROOT / "recipes/regex.toml"), "--out", str(tmp_path / "o"), "--launch",
                       "--keep-foreign-parts"]) == 0
    assert seen["argv"][-1] == "--keep-foreign-parts"


def _tiny(out, *more):
    return [str(ROOT / "recipes/regex.toml"), 'sweep.methods=["unsteered"]', "sweep.samples=1", "sweep.max_new_tokens=4",
            "prompts.regex_limit=1", "prompts.neutral_limit=1", 'eval.general="none"', "--out", str(out),
            "--no-progress", *more]


def test_files_a_run_reads_back_are_set_aside_unless_this_user_wrote_them(tmp_path):
    """A shipped output folder's detector table, MMLU table and run.json (forged numbers, sessions) went
    into the user's report: unsigned, they are set aside; the ones sieve wrote (signed) are kept."""
    import json
    import re

    from sieve.files import sign, write_atomic

    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    forged = {"detector": ["sae"], "level": ["token"], "threshold": [3.0], "precision": [0.987654],
              "recall": [0.987654], "f1": [0.987654], "auroc": [0.987654], "positives": [1], "n": [2]}
    pl.DataFrame(forged).write_parquet(out / "detect.parquet")
    pl.DataFrame({"method": ["unsteered"], "scale": [0.0], "accuracy": [0.987654], "lo": [0.9], "hi": [1.0],
                  "n": [42]}).write_parquet(out / "mmlu.parquet")
    run = json.loads((out / "run.json").read_text())
    run["sessions"].append({"started": "2026-01-01T00:00:00+00:00", "seconds": 987654.0, "overrides": ["FORGED"]})
    (out / "run.json").write_text(json.dumps(run))  # edited: its HMAC no longer matches
    assert regex.main(_tiny(out)) == 0
    assert sorted(p.name for p in (out / "foreign").iterdir() if not p.name.startswith(".")) == [
        "detect.parquet", "mmlu.parquet", "run.json"]
    page = (out / "report.html").read_text()
    assert "0.987654" not in page and "FORGED" not in page and "987654" not in (out / "run.json").read_text()
    assert json.loads((out / "run.json").read_text())["sessions"][-1]["foreign_parts"] == {"files": 3, "kept": False}
    # the user's own table, signed for this recipe when written (as recipes.detect does), stays and is shown
    rh = json.loads((out / "recipe.json").read_text())["hash"]
    mine = pl.DataFrame(forged | {"precision": [0.5]}).write_parquet
    sign(write_atomic(out / "detect.parquet", mine))  # signed for no study in particular: not this one's
    assert regex.main(_tiny(out)) == 0
    assert not (out / "detect.parquet").exists()
    sign(write_atomic(out / "detect.parquet", mine), context=rh)
    assert regex.main(_tiny(out)) == 0
    assert (out / "detect.parquet").exists()
    meta = json.loads(re.search(r'<script type="application/json" id="meta">(.*?)</script>', (out / "report.html")
                                .read_text(), re.S).group(1))
    assert [r["precision"] for r in meta["detect"]] == [0.5]


def test_a_merge_destination_keeps_only_the_shards_rows(tmp_path):
    """Verdicts and ability rows shipped in a merge's destination (stores the shards do not have) came
    through the merge into the summary; now the destination holds the shards' rows alone."""
    shard, dest = tmp_path / "shard", tmp_path / "dest"
    assert regex.main(_tiny(shard)) == 0
    keys = ResultStore(shard / "gen").table()["key"].to_list()
    for sub, rows in (("judge", [{"key": k, "judge_follows": True, "judge_sensible": True} for k in keys]),
                      ("ability", [{"key": "ability|unsteered|0", "method": "unsteered", "scale": 0.0,
                                    "metric": "mmlu", "value": 0.987654}])):
        (dest / sub).mkdir(parents=True)
        pl.DataFrame(rows).write_parquet(dest / sub / "part-0of1-000000-00000000.parquet")
    assert regex.main(_tiny(dest, "--merge", str(shard))) == 0
    assert ResultStore(dest / "judge").table().height == 0 and ResultStore(dest / "ability").table().height == 0
    assert "0.987654" not in (dest / "summary.csv").read_text()
    assert ResultStore(dest / "gen").table()["key"].to_list() == keys


def test_shards_in_one_folder_keep_their_rows_and_a_part_shipped_under_any_shard_tag_is_set_aside(tmp_path):
    """Shards of one run written into one folder (one key) leave each other's parts alone; a part shipped
    under another shard's tag (a first fix exempted those, and shard 0 then counted the forged rows as
    done and the merge took them) is set aside by whichever shard finds it."""
    out = tmp_path / "out"
    for sh in ("0/2", "1/2"):
        assert regex.main(_tiny(out, "--shard", sh)) == 0
    real = ResultStore(out / "gen").table()
    assert not (out / "gen" / "foreign").exists() and {p.name.split("-")[1] for p in ResultStore(out / "gen").parts()} \
        == {"0of2", "1of2"}
    forged = real.with_columns(pl.lit(True).alias("regex"), pl.lit("FORGED").alias("text"))
    for p in ResultStore(out / "gen").parts():
        p.unlink()
    forged.write_parquet(out / "gen" / "part-1of2-000000-deadbeef.parquet")  # every row, under shard 1's tag
    assert regex.main(_tiny(out, "--shard", "0/2")) == 0
    assert [p.name for p in (out / "gen" / "foreign").glob("part-*")] == ["part-1of2-000000-deadbeef.parquet"]
    assert regex.main(_tiny(out, "--shard", "1/2")) == 0
    merged = tmp_path / "merged"
    assert regex.main(_tiny(merged, "--merge", str(out))) == 0
    table = ResultStore(merged / "gen").table()
    assert table.height == real.height and "FORGED" not in table["text"].to_list()


def test_launch_sets_aside_a_part_shipped_in_a_shard_folder(tmp_path, monkeypatch):
    """The same under --launch: a part shipped in the output folder's shards/0of2/gen under shard 1's tag
    (every row of the run, regex everywhere) reached the merged summary; now shard 0 sets it aside."""
    out = tmp_path / "out"
    assert regex.main(_tiny(tmp_path / "clean")) == 0
    forged = ResultStore(tmp_path / "clean" / "gen").table().with_columns(pl.lit(True).alias("regex"))
    (out / "shards" / "0of2" / "gen").mkdir(parents=True)
    forged.write_parquet(out / "shards" / "0of2" / "gen" / "part-1of2-000000-deadbeef.parquet")
    args = _tiny(out)
    assert regex.main([*args, "--launch", "--executor", "debug", "--shards", "2"]) == 0
    summary = pl.read_csv(out / "summary.csv")
    assert summary["regex_rate"].to_list() == pl.read_csv(tmp_path / "clean" / "summary.csv")["regex_rate"].to_list()
    assert (out / "shards" / "0of2" / "gen" / "foreign" / "part-1of2-000000-deadbeef.parquet").is_file()


def test_the_users_own_parts_of_another_study_do_not_pass_as_this_ones(tmp_path):
    """Parts are signed for the recipe they were made for: the user's own signed parts of study X, shipped
    back in a folder of study Y (with Y's recipe.json), are set aside, not resumed as Y's rows."""
    import json
    import shutil

    x = tmp_path / "x"
    assert regex.main(_tiny(x)) == 0
    y = tmp_path / "y"
    args = _tiny(y)
    y_args = [args[0], "sweep.seed=7", *args[1:]]
    assert regex.main(y_args) == 0
    rh_y = json.loads((y / "recipe.json").read_text())["hash"]
    shutil.rmtree(y / "gen")
    shutil.copytree(x / "gen", y / "gen")  # X's parts and their HMAC files
    shutil.copy(x / "run.json", y / "run.json")
    shutil.copy(x / ".run.json.mac", y / ".run.json.mac")
    assert regex.main(y_args) == 0
    rows = ResultStore(y / "gen").table()
    assert set(rows["recipe_hash"].to_list()) == {rh_y}
    assert len(list((y / "gen" / "foreign").glob("part-*"))) == len(ResultStore(x / "gen").parts())
    assert (y / "foreign" / "run.json").is_file()


def test_without_a_key_a_folder_with_parts_is_refused_naming_why(tmp_path, monkeypatch, capsys):
    """A shared recipe once made the key's path a folder (its output.dir), so that no key could be kept
    and shipped parts were kept: now no key means a refusal that says why, and the key's folder is not a
    place a recipe file may write."""
    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    key = tmp_path / "home" / ".cache" / "sieve" / "secret"
    key.mkdir(parents=True)  # a folder where the key should be
    monkeypatch.setenv("SIEVE_SECRET_FILE", str(key))
    assert regex.main(_tiny(out)) == 2
    err = capsys.readouterr().err
    assert "no key to tell" in err and str(key) in err and "--keep-foreign-parts" in err
    assert regex.main(_tiny(out, "--keep-foreign-parts")) == 0  # kept on request
    monkeypatch.chdir(tmp_path / "home")
    shared = tmp_path / "home" / "shared.toml"
    shared.write_text((ROOT / "recipes/regex.toml").read_text().replace('dir = "runs/regex-world"',
                                                                        'dir = ".cache/sieve/secret/x"'))
    args = [a for a in _tiny(out) if a not in ("--out", str(out))]
    assert regex.main([str(shared), *args[1:]]) == 2
    assert "inside a hidden folder (.cache)" in capsys.readouterr().err
    monkeypatch.setenv("SIEVE_SECRET_FILE", str(tmp_path / "home" / "keys" / "secret"))  # a key in plain sight
    shared.write_text((ROOT / "recipes/regex.toml").read_text().replace('dir = "runs/regex-world"', 'dir = "keys/x"'))
    assert regex.main([str(shared), *args[1:]]) == 2
    assert "beside sieve's key" in capsys.readouterr().err


def test_a_recipe_file_may_not_write_into_a_folder_of_other_files(tmp_path, monkeypatch, capsys):
    """output.dir = "." in a folder of the user's own files would overwrite its recipe.toml, report.html,
    summary.csv...: refused; a folder holding only what runs make (a detector cache) is fine."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text("# the user's own\n")
    shared = tmp_path / "shared" / "recipe.toml"
    shared.parent.mkdir()
    text = (ROOT / "recipes/regex.toml").read_text()
    assert 'dir = "runs/regex-world"' in text
    small = ['sweep.methods=["unsteered"]', "sweep.samples=1", "sweep.max_new_tokens=4", "prompts.regex_limit=1",
             "prompts.neutral_limit=1", 'eval.general="none"', "--no-progress"]
    shared.write_text(text.replace('dir = "runs/regex-world"', f'dir = "{tmp_path}"'))
    assert regex.main([str(shared), *small]) == 2
    assert "holds files a run did not make (recipe.toml, shared)" in capsys.readouterr().err
    assert (tmp_path / "recipe.toml").read_text() == "# the user's own\n"
    (tmp_path / "cached" / "cache").mkdir(parents=True)
    shared.write_text(text.replace('dir = "runs/regex-world"', f'dir = "{tmp_path / "cached"}"'))
    assert regex.main([str(shared), *small]) == 0


def test_parts_that_are_not_files_or_cannot_be_read_stop_nothing(tmp_path, monkeypatch):
    """A FIFO named like a part hung the run; a part name that is not UTF-8, or a file that makes polars
    panic, stopped it with a traceback: now the FIFO is not a part and the others are quarantined."""
    store = ResultStore(tmp_path / "gen")
    store.append([{"key": "a"}])
    os.mkfifo(tmp_path / "gen" / "part-0of1-000001-fifo0000.parquet")
    bad = os.fsencode(str(tmp_path / "gen")) + b"/part-\xff.parquet"
    with open(bad, "wb") as f:
        f.write(b"not parquet")
    panicky = tmp_path / "gen" / "part-0of1-000002-panic000.parquet"
    pl.DataFrame([{"key": "p"}]).write_parquet(panicky)
    real = pl.read_parquet

    def read(path, *a, **k):
        if Path(path) == panicky:
            raise pl.exceptions.PanicException("crafted")
        return real(path, *a, **k)

    monkeypatch.setattr(pl, "read_parquet", read)
    assert store.done_keys() == {"a"}
    assert sorted(os.listdir(os.fsencode(str(tmp_path / "gen" / "quarantine")))) == sorted(
        [b"part-\xff.parquet", panicky.name.encode()])


def test_launch_never_reads_job_files_shipped_in_the_output_folder(tmp_path, monkeypatch):
    """submitit's job and result pickles live in a folder each launch makes anew under a random name, so
    a result pickle shipped as out/launch/<job id>/<job id>_0_result.pkl is never loaded."""
    from sieve import launch as launch_mod

    out = tmp_path / "out"
    (out / "launch" / "4242").mkdir(parents=True)
    (out / "launch" / "4242" / "4242_0_result.pkl").write_bytes(b"planted")
    seen = []

    class Stop(Exception):
        pass

    def executor(spec, folder):
        seen.append(Path(folder))
        raise Stop

    monkeypatch.setattr(launch_mod, "make_executor", executor)
    for _ in range(2):
        with pytest.raises(Stop):
            launch_mod.launch("recipes.regex", ["recipes/regex.toml"], out, launch_mod.LaunchSpec(executor="debug"))
    a, b = (p.parent for p in seen)
    assert a != b and a.parent == b.parent == out / "launch" and seen[0].name == "%j"
    assert len(a.name) > 12 and list(a.iterdir()) == [] and (a.stat().st_mode & 0o777) == 0o700


def test_the_summary_names_only_the_charts_this_report_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pareto.html").write_text("<p>shipped</p>")
    args = _tiny(out)
    assert regex.main([args[0], "output.charts=false", *args[1:]]) == 0
    printed = capsys.readouterr().out
    assert "Charts: not written (output.charts = false)" in printed and "pareto.html" not in printed
    assert regex.main(_tiny(out)) == 0
    assert f"Charts: {out / 'pareto.html'}, {out / 'pareto.png'}" in capsys.readouterr().out


def test_a_lock_file_hard_linked_to_a_file_elsewhere_is_refused_and_left_alone(tmp_path):
    """A shipped .lock-shard-0of1 that is a hard link to the user's ~/.bashrc was emptied by the run."""
    bashrc = tmp_path / "home" / ".bashrc"
    bashrc.parent.mkdir()
    bashrc.write_text("# mine\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(bashrc, out / ".lock-shard-0of1")
    with pytest.raises(SieveError, match="a hard link"):
        with lock(out, "shard-0of1"):
            pass
    assert bashrc.read_text() == "# mine\n"


def test_a_recipe_file_may_not_write_into_hidden_folders_nor_over_your_files(tmp_path, monkeypatch, capsys):
    """output.dir = ".bashrc.d" from the home folder: a shell then sourced the run's recipe.toml (the
    recipe's own strings); a folder of the user's own summary.csv/report.html was overwritten."""
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "shared" / "recipe.toml"
    shared.parent.mkdir()
    text = (ROOT / "recipes/regex.toml").read_text()
    small = ['sweep.methods=["unsteered"]', "sweep.samples=1", "sweep.max_new_tokens=4", "prompts.regex_limit=1",
             "prompts.neutral_limit=1", 'eval.general="none"', "--no-progress"]
    for target in (".bashrc.d", "shared/.hidden/out", ".config/sieve"):
        shared.write_text(text.replace('dir = "runs/regex-world"', f'dir = "{target}"'))
        assert regex.main([str(shared), *small]) == 2
        assert "inside a hidden folder" in capsys.readouterr().err
        assert not (tmp_path / target).exists()
    paper = tmp_path / "paper"
    paper.mkdir()
    for name in ("summary.csv", "report.html"):
        (paper / name).write_text("mine")
    shared.write_text(text.replace('dir = "runs/regex-world"', 'dir = "paper"'))
    assert regex.main([str(shared), *small]) == 2
    assert "holds files a run did not make (report.html, summary.csv)" in capsys.readouterr().err
    assert (paper / "summary.csv").read_text() == "mine"


def test_report_only_of_a_folder_of_rows_this_user_did_not_write_says_so(tmp_path, caplog):
    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    for p in ResultStore(out / "gen").parts():
        (p.parent / f".{p.name}.mac").unlink()  # as a folder from someone else arrives
    with caplog.at_level(logging.WARNING, logger="recipes"):
        assert regex.main(["--report-only", str(out), "--no-progress"]) == 0
    assert "the report shows them as they are" in caplog.text


def test_rows_made_on_other_prompt_texts_are_not_resumed(tmp_path, capsys):
    """A recipe names its prompt files, not their content: after an edit under the same ids, the folder's
    rows were resumed as the new prompts' completions. Now the run refuses, naming the prompt."""
    import json

    prompts = tmp_path / "mine.jsonl"
    first = [{"id": "emails", "prompt": "def find_emails(text):\n    \"\"\"Return the e-mail addresses in text.\"\"\"\n   "}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in first))
    out = tmp_path / "out"
    args = _tiny(out, "--regex-prompts", str(prompts))
    assert regex.main(args) == 0
    prompts.write_text(json.dumps({"id": "emails", "prompt": "def mean(xs):\n    \"\"\"The mean of xs.\"\"\"\n   "}) + "\n")
    before = ResultStore(out / "gen").table()
    assert regex.main(args) == 2
    err = capsys.readouterr().err
    assert "holds rows made on other prompt texts: regex prompt 0 (emails)" in err and "def mean" in err
    assert ResultStore(out / "gen").table().equals(before)  # nothing lost, nothing added
    prompts.write_text("".join(json.dumps(r) + "\n" for r in first))
    assert regex.main(args) == 0


def test_report_only_names_read_back_files_this_user_did_not_write(tmp_path, caplog):
    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    pl.DataFrame({"method": ["unsteered"], "scale": [0.0], "accuracy": [0.987654], "lo": [0.9], "hi": [1.0],
                  "n": [42]}).write_parquet(out / "mmlu.parquet")
    (out / ".prompts.parquet.mac").unlink()  # prompts.parquet edited by someone: its HMAC no longer fits
    with caplog.at_level(logging.WARNING, logger="recipes"):
        assert regex.main(["--report-only", str(out), "--no-progress"]) == 0
    assert "mmlu.parquet, prompts.parquet): the report shows them as they are" in caplog.text


def test_a_folder_whose_prompt_texts_cannot_be_told_is_not_resumed(tmp_path, capsys):
    """The user's own signed rows with their prompts.parquet removed (so no edit can be seen) are refused."""
    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    (out / "prompts.parquet").unlink()
    assert regex.main(_tiny(out)) == 2
    assert "not the prompt texts they were made on" in capsys.readouterr().err


def test_a_merge_moves_parts_it_did_not_make_aside_instead_of_deleting_them(tmp_path):
    from sieve.results import merge_stores

    a, dest = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "dest")
    a.append([{"key": "1", "x": 1}])
    mine = dest.append([{"key": "2", "x": 2}])  # rows the user computed in the destination
    merge_stores([tmp_path / "a"], tmp_path / "dest")
    assert (tmp_path / "dest" / "replaced" / mine.name).is_file()
    assert ResultStore(tmp_path / "dest").table()["key"].to_list() == ["1"]
    merge_stores([tmp_path / "a"], tmp_path / "dest")  # merged again: the earlier merge's part goes
    assert len(ResultStore(tmp_path / "dest").parts()) == 1 and len(list((tmp_path / "dest" / "replaced").iterdir())) == 2


def test_a_part_never_stands_without_its_hmac(tmp_path, monkeypatch):
    """A shard checking the folder while a sibling appends saw the new part before its HMAC and set it
    aside: the HMAC is now written before the part is renamed into place."""
    import sieve.files as files

    store = ResultStore(tmp_path / "gen", context="h")
    seen = []
    real = files.os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith(".parquet") and not Path(dst).name.startswith("."):
            seen.append(files.mac_path(Path(dst)).is_file())  # the HMAC is there before the part
        return real(src, dst, *a, **k)

    monkeypatch.setattr(files.os, "replace", replace)
    store.append([{"key": "a"}])
    assert seen == [True] and store.foreign_parts() == []


def test_a_recipe_in_a_hidden_folder_may_write_beside_itself(tmp_path, monkeypatch):
    """The hidden-folder rule reads below the root the output lies in: a recipe kept in ~/.recipes/ may
    write its own out/ there, run from the home folder."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / ".recipes" / "study" / "recipe.toml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text((ROOT / "recipes/regex.toml").read_text().replace('dir = "runs/regex-world"', 'dir = "out"'))
    from sieve.rundir import output_dir

    assert output_dir(load_recipe(recipe)) == tmp_path / "out"  # relative to the working directory
    recipe.write_text((ROOT / "recipes/regex.toml").read_text().replace(
        'dir = "runs/regex-world"', f'dir = "{recipe.parent / "out"}"'))
    assert output_dir(load_recipe(recipe)) == recipe.parent / "out"  # inside the recipe's own (hidden) folder
    recipe.write_text((ROOT / "recipes/regex.toml").read_text().replace(
        'dir = "runs/regex-world"', f'dir = "{recipe.parent / ".inner"}"'))
    with pytest.raises(SieveError, match="inside a hidden folder"):
        output_dir(load_recipe(recipe))


def test_edited_prompt_texts_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import json

    import sieve.setting

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"id": "emails", "prompt": "def find_emails(text):\n   "}) + "\n")
    out = tmp_path / "out"
    args = _tiny(out, "--regex-prompts", str(prompts))
    assert regex.main(args) == 0
    prompts.write_text(json.dumps({"id": "emails", "prompt": "def mean(xs):\n   "}) + "\n")

    def no_weights(*a, **k):
        raise AssertionError("the model was loaded before the prompt texts were checked")

    monkeypatch.setattr(sieve.setting, "load_model", no_weights, raising=False)
    monkeypatch.setattr("sieve.models.load_model", no_weights)
    assert regex.main(args) == 2
    assert "holds rows made on other prompt texts" in capsys.readouterr().err


def _world_copy(dest: Path) -> Path:
    import shutil

    from sieve.world import world_model_dir

    shutil.copytree(world_model_dir(), dest)  # a plain copy: new times and inodes, same bytes
    return dest


def _retrain_in_place(model: Path) -> None:
    """Move the first weight of a model folder's ``model.safetensors`` a little, saved in its place."""
    from safetensors.torch import load_file, save_file

    w = load_file(model / "model.safetensors")
    name = next(iter(w))
    save_file({**w, name: w[name] + 0.01}, model / "model.safetensors", metadata={"format": "pt"})


def _then(fn, after):
    """``fn``, with ``after()`` run before it returns (a source written while the run reads it)."""
    def call(*a, **kw):
        out = fn(*a, **kw)
        after()
        return out
    return call


def test_rows_made_with_other_weights_under_the_same_name_are_not_resumed(tmp_path, capsys):
    """A recipe names its model folder, not its content: a model retrained in place kept the recipe's
    hash and its rows were resumed as the new model's. Now the run refuses, naming the file."""

    model = _world_copy(tmp_path / "model")
    out = tmp_path / "out"
    args = _tiny(out)
    args.insert(1, f'model.source="{model}"')
    assert regex.main(args) == 0
    record = (out / "sources.json").read_text()
    assert "model.safetensors" in record
    assert regex.main(args) == 0  # unchanged: resumed
    # the same bytes in a new folder at the same path (copied, not moved): still the same weights
    import shutil

    shutil.rmtree(model)
    _world_copy(model)
    assert regex.main(args) == 0
    before = ResultStore(out / "gen").table()
    _retrain_in_place(model)
    assert regex.main(args) == 2
    err = capsys.readouterr().err
    assert "holds rows made with other inputs: the model: model.safetensors changed" in err
    assert ResultStore(out / "gen").table().equals(before)  # nothing lost, nothing added
    assert (out / "sources.json").read_text() == record


def test_a_folder_with_no_record_of_its_weights_is_not_resumed(tmp_path, capsys):
    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    (out / "sources.json").write_text('{"model": {}, "sae": {}}')  # edited: its HMAC no longer fits
    assert regex.main(_tiny(out)) == 2
    assert "no record of the model, SAE and data they were made with" in capsys.readouterr().err


def test_shards_made_with_other_weights_or_prompts_are_not_merged(tmp_path, capsys):
    import json

    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "dest"
    assert regex.main(_tiny(a, "--shard", "0/2")) == 0
    assert regex.main(_tiny(b, "--shard", "1/2")) == 0
    w = json.loads((b / "sources.json").read_text())
    w["model"]["files"]["model.safetensors"] = "0" * 64
    (b / "sources.json").write_text(json.dumps(w))
    assert regex.main(_tiny(dest, "--merge", str(a), str(b))) == 2
    assert "the shards were made with another model, SAE or data" in capsys.readouterr().err
    assert not (dest / "gen").exists() or not ResultStore(dest / "gen").parts()
    (b / "sources.json").write_text((a / "sources.json").read_text())
    df = pl.read_parquet(b / "prompts.parquet").with_columns(pl.lit("def other():").alias("text"))
    df.write_parquet(b / "prompts.parquet")
    assert regex.main(_tiny(dest, "--merge", str(a), str(b))) == 2
    assert "the shards were made on other prompt texts" in capsys.readouterr().err


def test_a_hub_models_record_is_the_commit_its_files_came_from(tmp_path, monkeypatch):
    """A hub id names a repository, not its weights: when its main moves, the record says so."""
    import shutil

    import huggingface_hub.constants as hc

    from sieve.setting import sources_identity
    from sieve.world import world_model_dir
    from tests.test_sae_layouts import _fake_hub_cache

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(cache, "org/model", {p.name: p for p in world_model_dir().iterdir()})
    r = load_recipe(ROOT / "recipes/regex.toml", ['model.source="org/model"'])
    first = sources_identity(r)
    base = cache / "models--org--model"
    old = (base / "refs" / "main").read_text()
    assert first["model"] == {"hub": "org/model", "revision": "main", "commit": old}
    shutil.copytree(base / "snapshots" / old, base / "snapshots" / ("1" * 40), symlinks=True)
    (base / "refs" / "main").write_text("1" * 40)  # a new commit on the hub, fetched
    now = sources_identity(r)
    assert now["model"]["commit"] == "1" * 40
    assert regex.sources_change(first, now) == f"the model: org/model was at commit {old}, now {'1' * 40}"


def test_a_cache_file_that_is_a_fifo_or_garbage_is_computed_again(tmp_path):
    """A shipped ``cache/caa.safetensors`` that is a FIFO hung the run; one of garbage bytes stopped it
    with a traceback. Both are now computed again (and replaced)."""
    import signal

    import torch

    from sieve.detectors import cached

    def stuck(*a):
        raise TimeoutError("reading the cache hung")

    fifo, junk = tmp_path / "fifo.safetensors", tmp_path / "junk.safetensors"
    os.mkfifo(fifo)
    junk.write_bytes(b"\xff" * 64)
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    try:
        for path in (fifo, junk):
            t = cached(path, "k", lambda: {"v": torch.ones(2)})
            assert torch.equal(t["v"], torch.ones(2)) and path.is_file()
            assert torch.equal(cached(path, "k", lambda: {"v": torch.zeros(2)})["v"], torch.ones(2))  # now reused
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _replaced_after_a_run(tmp_path: Path, name: str, bad: str) -> Path:
    """A tiny run's folder whose file ``name`` is then a FIFO (``bad == "fifo"``) or holds ``bad``."""
    out = tmp_path / "out"
    assert regex.main(_tiny(out)) == 0
    (out / name).unlink()
    if bad == "fifo":
        os.mkfifo(out / name)
    else:
        (out / name).write_text(bad)
    return out


@pytest.mark.parametrize("bad", ["fifo", "{not json", '{"recipe": 5}', "[]"])
def test_report_only_of_a_folder_with_an_unreadable_run_json_is_one_message(tmp_path, capsys, bad):
    out = _replaced_after_a_run(tmp_path, "run.json", bad)
    capsys.readouterr()
    assert regex.main(["--report-only", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run.json" in err and "Traceback" not in err, err


@pytest.mark.parametrize("bad", ["fifo", "[]"])
def test_a_recipe_json_that_is_not_a_json_object_is_one_message(tmp_path, capsys, bad):
    out = _replaced_after_a_run(tmp_path, "recipe.json", bad)
    assert regex.main(_tiny(out)) == 2
    assert "recipe.json is not readable JSON" in capsys.readouterr().err


def test_a_merge_of_a_shard_with_a_corrupt_prompts_file_is_one_message(tmp_path, capsys):
    a, dest = tmp_path / "a", tmp_path / "dest"
    assert regex.main(_tiny(a)) == 0
    (a / "prompts.parquet").write_bytes(b"PAR1 not really")
    capsys.readouterr()
    assert regex.main(_tiny(dest, "--merge", str(a))) == 2
    err = capsys.readouterr().err
    assert "prompts.parquet cannot be read" in err and "Traceback" not in err


def test_a_folder_whose_run_failed_before_any_row_takes_a_corrected_recipe(tmp_path):
    """A run writes prompts.parquet before its first row; a mistake found then (after the model loaded)
    must not lock the folder to the mistaken recipe."""
    out = tmp_path / "out"
    claim(out, load_recipe(ROOT / "recipes/regex.toml", ["sweep.samples=2"]))
    pl.DataFrame({"set": ["regex"], "prompt_index": [0]}).write_parquet(out / "prompts.parquet")
    claim(out, load_recipe(ROOT / "recipes/regex.toml", ["sweep.samples=3"]))  # no rows: the folder is free
    ResultStore(out / "gen").append([{"key": "1", "x": 1}])
    with pytest.raises(SieveError, match="holds results of another recipe"):
        claim(out, load_recipe(ROOT / "recipes/regex.toml", ["sweep.samples=4"]))


def test_a_run_that_measures_no_general_ability_does_not_call_it_mmlu(tmp_path, capsys):
    assert regex.main(_tiny(tmp_path / "out")) == 0  # eval.general = "none"
    printed = capsys.readouterr().out
    assert "Summary:" in printed and "MMLU" not in printed and "dominated by a scale of the same method on regex " \
        "rate and syntax rate" in printed


def test_the_digest_of_a_file_rewritten_in_place_with_its_old_time_is_read_again(tmp_path):
    """``tar xf`` of an update (same size, same mtime, same inode) was served the old digest."""
    from sieve.files import folder_digest

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"v1" * 100)
    st = f.stat()
    first = folder_digest(tmp_path)
    with open(f, "r+b") as h:  # in place: the inode stays
        h.write(b"v2" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    assert folder_digest(tmp_path) != first


def test_the_record_names_what_the_loaders_read(tmp_path):
    """Shards an index names in a subfolder, the SAE behind a cfg.json given as the source or behind an
    id naming a folder with no SAE, a study layer's hidden weights file and a hidden MMLU file: each
    was left out of the record, so rows made with other weights or data were resumed."""
    import json

    from sieve.setting import _identity, _sae_files, sources_identity

    model = tmp_path / "model"
    (model / "weights").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "weights/m-1.safetensors"}}))
    (model / "weights" / "m-1.safetensors").write_bytes(b"v1")
    assert "weights/m-1.safetensors" in _identity(model)["files"]

    sae = tmp_path / "sae"
    (sae / "notes").mkdir(parents=True)
    (sae / "cfg.json").write_text("{}")
    (sae / "sae_weights.safetensors").write_bytes(b"w")
    (sae / "notes" / "README.txt").write_text("decoy")
    for source, sae_id in ((sae / "cfg.json", ""), (sae, "notes")):
        r = load_recipe(ROOT / "recipes/regex.toml", [f'sae.source="{source}"', f'sae.id="{sae_id}"', "sae.layer=2",
                                                      "sae.feature=1"])
        folder, keep = _sae_files(r, source)
        assert folder == sae and (keep is None or keep("sae_weights.safetensors")), (source, sae_id)
    study = tmp_path / "study"
    study.mkdir()
    (study / "config.json").write_text("{}")
    (study / ".layer_2.safetensors").write_bytes(b"hidden")
    r = load_recipe(ROOT / "recipes/regex.toml", [f'sae.source="{study}"', "sae.layer=2", "sae.feature=1"])
    folder, keep = _sae_files(r, study)
    assert keep(".layer_2.safetensors") and not keep("layer_3.safetensors")

    data = tmp_path / "mm"
    data.mkdir()
    (data / ".mmlu.json").write_text("[]")
    r = load_recipe(ROOT / "recipes/regex.toml", ['eval.general="mmlu"', f'eval.mmlu_data="{data / ".mmlu.json"}"'])
    assert list(sources_identity(r)["mmlu_data"]["files"]) == [".mmlu.json"]


def test_the_record_holds_keyed_digests_and_no_machine_files(tmp_path):
    """sources.json is shared with the run folder: a link in a model folder to a short secret put its bare
    SHA-256 there (confirmable by guessing); /proc sources stalled the run for minutes."""
    import hashlib
    import shutil

    from sieve.errors import RecipeError
    from sieve.setting import _identity, sources_identity
    from sieve.world import world_model_dir

    model = tmp_path / "model"
    shutil.copytree(world_model_dir(), model)
    secret = tmp_path / "db_password"
    secret.write_text("hunter2\n")
    (model / "notes.txt").symlink_to(secret)
    record = json.dumps(_identity(model))
    assert hashlib.sha256(b"hunter2\n").hexdigest() not in record and "notes.txt" in record
    (model / "README.md").write_text("notes of no weight")  # not read by the loaders: not recorded
    assert "README.md" not in json.dumps(_identity(model))
    (model / "mem.bin").symlink_to("/proc/self/mem")
    with pytest.raises(SieveError, match="not a file a model, SAE or data set is read from"):
        _identity(model)
    for key, value in (("sae.source", "/proc/self/pagemap"), ("model.source", "/proc/self"), ("model.source", "/dev/null")):
        with pytest.raises(RecipeError, match="not a folder a model or SAE is read from"):
            sources_identity(load_recipe(ROOT / "recipes/regex.toml", [f'{key}="{value}"', "sae.layer=2",
                                                                       "sae.feature=1"]))
    with pytest.raises(RecipeError, match=r"\[sae.id\] '/proc/self/cwd': an SAE id names a subfolder"):
        load_recipe(ROOT / "recipes/regex.toml", ['sae.id="/proc/self/cwd"'])


def test_prompts_gone_or_changed_in_special_tokens_are_not_resumed(tmp_path, capsys):
    """New ids under the old positions left the old rows counted under the new prompts; special tokens
    added before a prompt decode to the same text and were resumed."""
    prompts = tmp_path / "mine.jsonl"
    first = {"id": "emails", "prompt": "def find_emails(text):\n   "}
    prompts.write_text(json.dumps(first) + "\n")
    out = tmp_path / "out"
    args = _tiny(out, "--regex-prompts", str(prompts))
    assert regex.main(args) == 0
    prompts.write_text(json.dumps({"id": "other", "prompt": "def mean(xs):\n   "}) + "\n")
    assert regex.main(args) == 2
    assert "which the prompt files no longer hold (now other there)" in capsys.readouterr().err
    prompts.write_text(json.dumps({**first, "prompt": "<|endoftext|>" * 3 + first["prompt"]}) + "\n")
    assert regex.main(args) == 2
    assert "holds rows made on other prompt texts" in capsys.readouterr().err
    prompts.write_text(json.dumps(first) + "\n" + json.dumps({"id": "more", "prompt": "def mean(xs):\n   "}) + "\n")
    assert regex.main(args) == 0  # a prompt added after the others: the old rows stand, the new one is made


def test_a_model_on_a_ram_disk_and_a_task_folder_that_python_wrote_bytecode_into(tmp_path):
    """/dev/shm (a RAM disk) was refused as if it were a device; a harness task folder's record changed
    once Python wrote __pycache__ into it, so the next resume was refused."""
    import shutil

    from sieve.files import folder_digest
    from sieve.setting import _identity
    from sieve.world import world_model_dir

    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        shm = Path("/dev/shm") / f"sieve-test-{os.getpid()}"
        try:
            shutil.copytree(world_model_dir(), shm)
            assert "model.safetensors" in _identity(shm)["files"]
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("x = 1\n")
    before = folder_digest(tasks, recursive=True)
    (tasks / "__pycache__").mkdir()
    (tasks / "__pycache__" / "utils.cpython-311.pyc").write_bytes(b"\x00")
    assert folder_digest(tasks, recursive=True) == before


def test_a_hub_saes_and_hub_datasets_record_is_their_repos_commit(tmp_path, monkeypatch):
    """A sae-lens release or hub SAE, and cais/mmlu, were recorded by name only: a re-upload under the
    same name was resumed. Their record is now the commit of the hub repo the loader reads, from the
    hub where it answers, else from the hub cache (what an offline load reads)."""
    import huggingface_hub
    import huggingface_hub.constants as hc

    from sieve.saes import hub_sae_repo
    from sieve.setting import sources_identity
    from sieve.world import world_sae_dir
    from tests.test_sae_layouts import _fake_hub_cache

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(cache, "org/sae", {f"layer_2/{p.name}": p for p in world_sae_dir().iterdir()})
    r = load_recipe(ROOT / "recipes/regex.toml", ['sae.source="org/sae"', 'sae.id="layer_2"', "sae.layer=2", "sae.feature=1",
                                                 'eval.general="mmlu"'])
    first = sources_identity(r)
    ref = cache / "models--org--sae" / "refs" / "main"
    assert first["sae"] == {"hub": "org/sae", "id": "layer_2", "repo": "org/sae", "commit": ref.read_text()}
    assert first["mmlu_data"] == {"hub": "cais/mmlu", "commit": None}  # not in this cache
    ds = cache / "datasets--cais--mmlu" / "refs"
    ds.mkdir(parents=True)
    (ds / "main").write_text("2" * 40)
    ref.write_text("1" * 40)  # a new upload, fetched into the cache
    now = sources_identity(r)
    assert now["sae"]["commit"] == "1" * 40 and now["mmlu_data"]["commit"] == "2" * 40
    assert regex.sources_change(first, now).startswith(
        f"the SAE: org/sae was at commit {first['sae']['commit']}, now {'1' * 40}; the MMLU data: cais/mmlu was at")
    assert sources_identity(r, known=first) == first  # a known record's hub entries are not looked up again
    assert hub_sae_repo("gemma-scope-2b-pt-res-canonical") == "google/gemma-scope-2b-pt-res"

    class Info:
        sha = "3" * 40

    asked = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the hub answers: its main is what a load downloads
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo, **kw: asked.append(repo) or Info())
    assert sources_identity(r)["sae"]["commit"] == "3" * 40 and asked == ["org/sae", "cais/mmlu"]

    def unreachable(self, repo, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)  # the cache's answer then
    assert sources_identity(r)["sae"]["commit"] == "1" * 40


def test_a_source_written_while_the_run_reads_it_stops_the_run(tmp_path, monkeypatch, capsys):
    """The record is taken before the weights load: a model folder written to while they loaded, or
    MMLU data edited before the run read them, made rows under a record that did not describe them.
    Now the run stops, saying so, and keeps the rows made before."""
    import sieve.setting as setting

    model = _world_copy(tmp_path / "model")
    out = tmp_path / "out"
    args = _tiny(out)
    args.insert(1, f'model.source="{model}"')
    real = setting.load_setting
    monkeypatch.setattr(setting, "load_setting", _then(real, lambda: _retrain_in_place(model)))
    assert regex.main(args) == 2
    err = capsys.readouterr().err
    assert "the model: model.safetensors changed while the weights loaded, after this run recorded it" in err
    assert not (out / "gen").exists() or not ResultStore(out / "gen").parts()  # nothing made under that record
    monkeypatch.setattr(setting, "load_setting", real)
    assert regex.main(args) == 0  # once nothing writes to it, the run goes on (no rows were made before)

    # MMLU data edited after the record, before the run read it: the generated rows stay, no ability row
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(json.dumps([{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"],
                                 "answer": 1, "split": "test"}]))
    out2 = tmp_path / "out2"
    args = [a.replace('eval.general="none"', 'eval.general="mmlu"') for a in _tiny(out2)]
    args.insert(1, f'eval.mmlu_data="{mmlu}"')
    import sieve.evals.mmlu as mmlu_mod

    real_mmlu = mmlu_mod.load_mmlu

    def read_then_edited(recipe):
        qs = real_mmlu(recipe)
        mmlu.write_text(mmlu.read_text().replace("2+2?", "2+3?"))
        return qs

    monkeypatch.setattr(mmlu_mod, "load_mmlu", read_then_edited)
    assert regex.main(args) == 2
    err = capsys.readouterr().err
    assert "the MMLU data: mmlu.json changed while the MMLU questions were read" in err
    assert len(ResultStore(out2 / "gen").table()) == 2 and not (out2 / "ability").exists() or not ResultStore(
        out2 / "ability").parts()


def test_a_judge_model_changed_before_it_loads_is_refused(tmp_path, monkeypatch, capsys):
    """The judge model loads after generation, where the run's record of it was taken before: a judge
    folder written to in between judged rows under a record that did not describe it. The judge now
    loads at its first use and is compared with the record then."""
    import sieve.evals.judge as judge_mod

    judge = _world_copy(tmp_path / "judge")
    loads = []
    real_init = judge_mod.HFJudge.__init__

    def counting(self, *a, **kw):
        real_init(self, *a, **kw)
        loads.append(self._model is None)  # made lazy: nothing loaded yet

    monkeypatch.setattr(judge_mod.HFJudge, "__init__", counting)
    monkeypatch.setattr(regex, "run_generation", _then(regex.run_generation, lambda: _retrain_in_place(judge)))
    out = tmp_path / "out"
    args = _tiny(out)
    args[1:1] = ['eval.judge="hf"', f'eval.judge_model="{judge}"']
    assert regex.main(args) == 2
    assert loads == [True]
    err = capsys.readouterr().err
    assert "the judge model: model.safetensors changed while the judge model loaded, after this run recorded it" in err
    assert len(ResultStore(out / "gen").table()) == 2 and not (out / "judge").exists()  # the generated rows stay


def test_a_record_written_before_hub_commits_were_recorded_still_resumes(tmp_path, caplog):
    """sources.json from before 2026-11-26 holds a hub SAE's name and id only, and no cais/mmlu entry:
    such a folder resumes (with a warning), where the same sources are read; another SAE is refused."""
    from recipes.regex import check_inputs, write_inputs
    from sieve.report import shard_inputs

    table = pl.DataFrame({"set": ["regex"], "prompt_index": [0], "prompt_id": ["a"], "text": ["t"], "prompt": ["t"]})
    now = {"model": {"files": {"model.safetensors": "ab"}},
           "sae": {"hub": "gemma-scope-2b-pt-res", "id": "layer_8/x", "repo": "google/gemma-scope-2b-pt-res",
                   "commit": "c" * 40},
           "mmlu_data": {"hub": "cais/mmlu", "commit": "d" * 40}}
    old = {"model": now["model"], "sae": {"hub": "gemma-scope-2b-pt-res", "id": "layer_8/x"}}
    out = tmp_path / "out"
    out.mkdir()
    write_inputs(out, table, old, "rh")
    with caplog.at_level(logging.WARNING):
        check_inputs(out, table, now, "rh")  # not refused
    assert "written by an earlier sieve" in caplog.text
    with pytest.raises(SieveError, match="the SAE: gemma-scope-2b-pt-res id 'layer_8/x', now 'layer_9/x'"):
        check_inputs(out, table, {**now, "sae": {**now["sae"], "id": "layer_9/x"}}, "rh")
    # --merge of a shard written then and one written now
    a, b = tmp_path / "a", tmp_path / "b"
    for d, rec in ((a, old), (b, now)):
        d.mkdir()
        write_inputs(d, table, rec, "rh")
    assert shard_inputs([a, b])[1] == now


def test_a_hub_judge_loads_the_commit_the_run_recorded(monkeypatch):
    """The judge loads after generation, maybe hours after the run recorded its hub commit: it loads that
    commit, not wherever the hub's main has moved since."""
    import sieve.models
    from sieve.evals.judge import HFJudge
    from sieve.world import world_model_dir

    judge = HFJudge(str(world_model_dir()), lazy=True)
    asked = []

    class Loaded(Exception):
        pass

    def load(source, **kw):
        asked.append(kw.get("revision"))
        raise Loaded

    monkeypatch.setattr(sieve.models, "load_model", load)
    sources = {"judge": {"hub": "org/judge", "revision": "main", "commit": "c" * 40}}
    with pytest.raises(Loaded):
        regex.run_judge(load_recipe(ROOT / "recipes/regex.toml"), None, judge, Path("."), (0, 1), False, sources)
    assert asked == ["c" * 40]
