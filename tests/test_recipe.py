"""Recipe files: every shipped recipe validates; bad files give errors naming file, key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from sieve.errors import RecipeError
from sieve.methods import METHODS
from sieve.recipe import UNSTEERED, load_recipe, recipe_hash, save_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    for m in r.sweep.methods:
        assert m == UNSTEERED or m in METHODS
        assert r.scales_for(m)
    assert r.output.dir


def test_real_model_recipes_match_the_study():
    g2 = load_recipe(ROOT / "recipes/regex_gemma2_2b.toml")
    assert (g2.model.source, g2.sae.source, g2.sae.id, g2.sae.layer, g2.sae.feature) == (
        "google/gemma-2-2b-it", "gemma-scope-2b-pt-res", "layer_8/width_16k/average_l0_71", 8, 931)
    assert g2.sae.threshold is None  # the JumpReLU threshold of the feature
    g9 = load_recipe(ROOT / "recipes/regex_gemma2_9b.toml")
    assert (g9.sae.source, g9.sae.id, g9.sae.layer, g9.sae.feature) == (
        "gemma-scope-9b-it-res", "layer_9/width_16k/average_l0_88", 9, 3585)
    ll = load_recipe(ROOT / "recipes/regex_llama31_8b.toml")
    assert (ll.model.source, ll.sae.source, ll.sae.layer, ll.sae.feature, ll.sae.threshold) == (
        "meta-llama/Llama-3.1-8B-Instruct", "tilde-research/sieve_coding", 12, 9853, 5.0)
    for r in (g2, g9, ll):
        assert r.model.chat and r.eval.execute and r.eval.general == "mmlu" and len(r.sweep.methods) == 13
        assert r.resolve(r.prompts.source).exists()


def test_round_trip_and_hash(tmp_path):
    r = load_recipe(ROOT / "recipes/regex.toml")
    out = save_recipe(r, tmp_path / "copy.toml")
    again = load_recipe(out)
    assert recipe_hash(again) == recipe_hash(r)
    assert again.sweep == r.sweep and again.sae == r.sae
    changed = load_recipe(out, ["sweep.samples=7"])
    assert changed.sweep.samples == 7 and recipe_hash(changed) != recipe_hash(r)
    assert recipe_hash(load_recipe(out, ['output.dir="elsewhere"'])) == recipe_hash(r)


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    src = (ROOT / "recipes/regex_llama31_8b.toml").read_text()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/r.toml").write_text(src)
    r = load_recipe(tmp_path / "shared/r.toml")
    assert r.resolve(r.prompts.source) == (tmp_path / "shared/prompts/regex_task.toml").resolve()


BAD = [
    ("name = 'x'\n[sweep]\nmethods = ['constant_sea']\n[sweep.scales]\nadd=[1.0]\n", "sweep.methods[0]", "constant_sae"),
    ("name = 'x'\n[sweep]\nsamples = 0\n", "sweep.samples", ">= 1"),
    ("name = 'x'\n[sweep]\nsamples = 'many'\n", "sweep.samples", "integer"),
    ("name = 'x'\n[sae]\nlayerr = 3\n", "sae.layerr", "allowed here"),
    ("name = 'x'\n[eval]\njudge = 'gpt'\n", "eval.judge", "allowed"),
    ("name = 'x'\n[sweep]\nmethods = ['clamping']\n[sweep.scales]\nadd = [1.0]\n", "sweep.scales", "clamp"),
    ("name = 'x'\n[sweep]\ntemperature = -1\n", "sweep.temperature", ">= 0"),
    ("[sweep]\nsamples = 2\n", "name", "required"),
    ("name = 'x'\n[sweep\n", "-", "not valid TOML"),
    ("name = 'x'\n[caa]\nthreshold = 'auto'\n", "caa.threshold", "calibrate"),
]


@pytest.mark.parametrize("text,key,hint", BAD)
def test_bad_recipes_name_file_key_and_allowed(tmp_path, text, key, hint):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and f"[{key}]" in msg and hint in msg


def test_loading_a_recipe_runs_no_code(tmp_path):
    p = tmp_path / "r.toml"
    marker = tmp_path / "pwned"
    p.write_text(f"name = \"__import__('pathlib').Path('{marker}').touch()\"\n")
    r = load_recipe(p)
    assert not marker.exists() and r.name.startswith("__import__")


def test_recipe_registry_lists_scripts_and_files(capsys):
    import importlib

    from recipes import RECIPES, recipe_files
    from recipes.__main__ import main

    for module, _ in RECIPES.values():
        assert callable(importlib.import_module(module).main)
    files = {f for f, _, _ in recipe_files()}
    assert files == {p.name for p in SHIPPED}
    main()
    out = capsys.readouterr().out
    assert "regex_gemma2_2b.toml" in out and "detect" in out
