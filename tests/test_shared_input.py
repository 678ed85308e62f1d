"""Shared files that are not what they claim: a FIFO under a file's name, nesting or numbers past what a
parser takes, a run folder's records in another shape. Each stops with one clear error (or is left out
where it only names something), before any read that would block, and never with a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import polars as pl
import pytest

from sieve.errors import RecipeError, SieveError
from sieve.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "regex.toml"


def _returns(fn, seconds: float = 20.0):
    """``fn()``'s result or exception, failing the test (not hanging it) if it blocks."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_a_fifo_shipped_as_a_run_folders_recipe_toml_does_not_block(tmp_path):
    from sieve import rundir

    (tmp_path / "recipe.json").write_text(json.dumps({"hash": "0" * 16}))
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "part-0.parquet").write_bytes(b"x")
    os.mkfifo(tmp_path / "recipe.toml")
    with pytest.raises(SieveError, match="holds results of another recipe"):
        _returns(lambda: rundir.check(tmp_path, load_recipe(RECIPE)))
    (tmp_path / "recipe.toml").unlink()
    (tmp_path / "recipe.toml").write_text("[" * 5000)  # nested too deep: only names the keys, so left out
    with pytest.raises(SieveError, match="holds results of another recipe"):
        rundir.check(tmp_path, load_recipe(RECIPE))


def _world_sae_copy(tmp_path: Path) -> Path:
    from sieve.world import DATA_DIR

    sae = tmp_path / "sae"
    shutil.copytree(DATA_DIR / "sae", sae)
    return sae


def test_a_fifo_or_bad_json_as_the_saes_cfg_is_one_error_before_the_weights(tmp_path):
    from sieve.setting import preflight

    sae = _world_sae_copy(tmp_path)
    (sae / "cfg.json").unlink()
    os.mkfifo(sae / "cfg.json")
    recipe = load_recipe(RECIPE, [f'sae.source="{sae}"', "sae.layer=2", "sae.feature=471", "sae.threshold=2.8"])
    with pytest.raises(RecipeError, match=r"sae.source.*cfg.json is not readable JSON.*not a regular file"):
        _returns(lambda: preflight(recipe))
    (sae / "cfg.json").unlink()
    (sae / "cfg.json").write_text('{"d_in": 64, ')
    with pytest.raises(RecipeError, match=r"sae.source.*cfg.json is not readable JSON"):
        preflight(recipe)


def test_a_recipe_linked_to_a_file_that_reads_on_forever_is_one_error(tmp_path):
    """/proc/self/pagemap says it is a regular file of size 0 and reads on for hundreds of GiB: a recipe
    linked to it filled 2.2 GB before a MemoryError; the read stops at a size cap."""
    (tmp_path / "recipe.toml").symlink_to("/proc/self/pagemap")
    with pytest.raises(RecipeError, match="cannot be read.*larger than"):
        _returns(lambda: load_recipe(tmp_path / "recipe.toml"))


def test_a_fifo_named_like_a_weight_index_in_a_model_folder_does_not_block(tmp_path):
    from sieve.setting import _model_files

    os.mkfifo(tmp_path / "extra.index.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
    assert _returns(lambda: _model_files(tmp_path)) == ("m-1.safetensors",)


@pytest.mark.parametrize("text,what", [("x = " + "[" * 5000, "nested too deep"), ("x = " + "9" * 5000, "digits")])
def test_a_recipe_past_the_toml_parsers_limits_is_one_error(tmp_path, text, what):
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(RecipeError, match=f"is not valid TOML.*{what}"):
        load_recipe(tmp_path / "r.toml")


def test_a_prompt_line_past_the_json_parsers_limits_is_one_error(tmp_path):
    from sieve.prompts import PromptFileError, load_prompt_file

    (tmp_path / "p.jsonl").write_text('{"prompt": "def f():\\n", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(PromptFileError, match=r"p.jsonl:1: is not JSON sieve reads \(ValueError"):
        load_prompt_file(tmp_path / "p.jsonl", "regex")
    (tmp_path / "p.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(PromptFileError, match=r"p.jsonl:1: "):
        load_prompt_file(tmp_path / "p.jsonl", "regex")


def test_a_layer_file_that_is_a_pickle_of_no_dict_is_one_error(tmp_path):
    from sieve.saes import _read_state_dict

    (tmp_path / "layer_2.pt").write_bytes(pickle.dumps(5))
    with pytest.raises(SieveError, match="not a state dict of tensors"):
        _read_state_dict(tmp_path / "layer_2.pt")


def test_a_run_json_with_sessions_in_another_shape_is_reported_without_them():
    from sieve.report import _session_info

    assert _session_info({"sessions": [{"finished": "x"}, 3]}) == {"sessions": []}
    ok = {"started": "2026-01-01", "finished": "2026-01-02", "seconds": 2.0}
    assert _session_info({"sessions": [ok, {"seconds": "a"}]})["seconds"] == 2.0
    assert _session_info({"sessions": "many"}) == {"sessions": []}


def test_report_on_parts_without_a_runs_columns_is_one_error(tmp_path):
    from recipes.regex import report

    (tmp_path / "gen").mkdir()
    pl.DataFrame({"key": ["a"], "set": ["regex"]}).write_parquet(tmp_path / "gen" / "part-0.parquet")
    with pytest.raises(SieveError, match=r"lack what a run writes.*method"):
        report(load_recipe(RECIPE), tmp_path, charts=False, quiet=True)


def test_warnings_naming_a_shared_folder_reach_the_terminal_escaped(tmp_path):
    """A folder name with a terminal escape (here: set the window title) is printed escaped in warnings
    too, as in errors and log lines."""
    import subprocess
    import sys

    folder = tmp_path / "shared\x1b]0;TITLE\x07"
    folder.mkdir()
    (folder / "recipe.toml").write_text('kind = "regex"\n' + RECIPE.read_text())
    p = subprocess.run([sys.executable, "-m", "recipes.regex", str(folder / "recipe.toml"), "sweep.samples=0",
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "[kind] is no longer read" in p.stderr and "[sweep.samples]" in p.stderr, p.stderr
    assert "\x1b" not in p.stderr and "\x07" not in p.stderr and "\\x1b]0;TITLE\\x07" in p.stderr


def test_the_cli_puts_warnings_back_as_it_found_them(tmp_path):
    """The CLI logs warnings as escaped lines while it runs, and leaves the process's warning display as
    it was (a notebook calling it keeps its warnings' file and line); a warning written to a given file
    goes there."""
    import io
    import warnings

    from recipes import cli
    from recipes.regex import main

    before = warnings.showwarning
    assert main([str(RECIPE), "sweep.samples=0", "--out", str(tmp_path / "out")]) == 2
    assert warnings.showwarning is before
    buf = io.StringIO()
    cli._show_warning(UserWarning("w"), UserWarning, "f.py", 3, file=buf)
    assert "f.py:3: UserWarning: w" in buf.getvalue()
