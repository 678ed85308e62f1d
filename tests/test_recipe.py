"""Recipe files: every shipped recipe validates; bad files give errors naming file, key and allowed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sieve.errors import RecipeError
from sieve.methods import METHODS
from sieve.recipe import UNSTEERED, load_recipe, recipe_hash, save_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    for m in r.sweep.methods:
        assert m == UNSTEERED or m in METHODS or m in r.methods
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
    assert ll.sae.threshold_on == "no_bias"  # the study's 5.0 was on h·W_enc[:, 9853], without b_enc
    for r in (g2, g9, ll):
        assert r.model.chat and r.eval.execute and r.eval.general == "mmlu" and len(r.sweep.methods) == 13
        assert r.resolve(r.prompts.source).exists()


def test_a_threshold_on_the_score_without_the_encoder_bias_makes_the_studys_cut(tmp_path):
    """The study scored a feature as h·W_enc[:, f] (no b_enc) and gated Llama's at 5.0; sieve gates on the
    exact pre-activation h·w + b. ``threshold_on = "no_bias"`` moves the threshold by b: the same cut."""
    import torch

    from sieve.errors import RecipeError
    from sieve.setting import load_setting

    r = load_recipe(ROOT / "recipes/regex.toml", ["sae.threshold=1.5", 'sae.threshold_on="no_bias"'])
    s = load_setting(r, progress=False, with_probe=False, cache_dir=tmp_path / "cache")
    w, b = s.feature.linear()
    assert b != 0 and s.threshold == pytest.approx(1.5 + b)
    det, thr = s.parts.detectors["sae"]
    h = torch.randn(64, w.numel())
    assert torch.equal(det.score(h) > thr, (h @ w + b) > 1.5 + b)  # ⇔ h·w > 1.5, up to float rounding
    assert recipe_hash(load_recipe(ROOT / "recipes/regex.toml")) == recipe_hash(
        load_recipe(ROOT / "recipes/regex.toml", ['sae.threshold_on="pre_activation"']))  # the default: old hashes hold
    with pytest.raises(RecipeError, match=r"\[sae.threshold_on\] 'no_bias' needs \[sae\] threshold"):
        load_recipe(ROOT / "recipes/regex.toml", ['sae.source="org/sae"', "sae.layer=2", "sae.feature=1",
                                                  'sae.threshold_on="no_bias"'])


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


# ------------------------------------------------------------------------------- [methods.NAME] tables

MIRRORS = """
name = "declared"
[sae]
layer = 2
feature = 978
[methods.my_conditional_clamping]
gate = "token"
edit = "clamp"
direction = "sae"
detector = "sae"
threshold = "max0"
[methods.my_code_clamping]
gate = "token"
edit = "latent_set"
detector = "sae_code"
threshold = "zero"
[sweep]
methods = ["unsteered", "my_conditional_clamping", "my_code_clamping", "conditional_clamping"]
[sweep.scales]
clamp = [-6.0]
"""


def _world_parts(prompts: list[str] | None = None):
    """The world's parts; with ``prompts``, built on the latent most often active on them (threshold 0),
    so that the methods act whatever feature the world's build chose."""
    from sieve.detectors import token_activations
    from sieve.interventions import Detector, SAECode
    from sieve.methods import Parts
    from sieve.saes import feature
    from sieve.world import load_world

    w = load_world()
    f, threshold = w.feature, w.threshold
    if prompts is not None:
        acts = torch.cat(token_activations(w.model, prompts, w.layer, progress=False))
        f, threshold = feature(w.sae, int((w.sae.encode(acts) > 0).float().mean(0).argmax())), 0.0
    parts = Parts(layer=w.layer)
    wv, b = f.linear()
    parts.add_detector("sae", Detector(wv, b, kind="sae"), threshold)
    parts.add_direction("sae", f.direction)
    parts.add_detector("sae_code", SAECode(w.sae, [f.index]), 0.0)
    parts.add_latents("sae", w.sae, [f.index])
    return w, parts


def test_declared_methods_reproduce_the_registered_ones(tmp_path):
    from sieve.generation import generate
    from sieve.methods import build
    from sieve.prompts import WORLD_PROMPTS_DIR
    from sieve.world.prompts import load_prompts

    path = tmp_path / "r.toml"
    path.write_text(MIRRORS)
    r = load_recipe(path)
    assert r.scales_for("my_code_clamping") == [-6.0] and r.scales_for("sae_code_ablation") == [0.0]
    prompts = [p.prompt for p in load_prompts(WORLD_PROMPTS_DIR / "regex.jsonl")[:6]]
    w, parts = _world_parts(prompts)
    for declared, registered in (("my_conditional_clamping", "conditional_clamping"),
                                 ("my_code_clamping", "sae_code_clamping")):
        a = build(r.method(declared), parts, -6.0)
        b = build(registered, parts, -6.0)
        ga = generate(w.model, prompts, a, max_new_tokens=16, progress=False)
        gb = generate(w.model, prompts, b, max_new_tokens=16, progress=False)
        assert [o.token_ids for o in ga] == [o.token_ids for o in gb]
        assert [o.counts for o in ga] == [o.counts for o in gb]
        assert sum(o.counts["prompt_edited"] + o.counts["gen_edited"] for o in ga) > 0  # they act


@pytest.mark.parametrize("table, key, message", [
    ('gate = "sometimes"', "methods.m.gate", "'sometimes' is not allowed"),
    ('gate = "token"', "methods.m.detector", "needs a detector"),
    ('edit = "latent_set"\ndirection = "caa"', "methods.m.direction", "latent edits act on the recipe's SAE"),
    ('edit = "clamp"\ndetector = "sae_code"', "methods.m.edit", "needs a linear detector"),
    ('layers = [1]', r"methods.m.layers\[0\]", "before sae.layer = 2"),
    ('edit = "latent_ablate"\nlayers = [3]', "methods.m.layers", "latent edits act at the SAE's layer"),
    ('features = [3]', "methods.m.features", "apply to latent_"),
    ('colour = "red"', "methods.m.colour", "unknown key"),
])
def test_declared_method_errors_name_the_key(tmp_path, table, key, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\n[sae]\nlayer = 2\n[methods.m]\n{table}\n')
    with pytest.raises(RecipeError, match=rf"\[{key}\] .*{message}"):
        load_recipe(path)


def test_declared_method_names_and_references_are_checked(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[methods.clamping]\ngate = "always"\n')
    with pytest.raises(RecipeError, match=r"\[methods.clamping\] a registered method has this name"):
        load_recipe(path)
    path.write_text('name = "bad"\n[methods.mine]\ngate = "always"\n[sweep]\nmethods = ["minee"]\n')
    with pytest.raises(RecipeError, match=r"\[sweep.methods\[0\]\] unknown method 'minee'; allowed: .*'mine'"):
        load_recipe(path)


def test_recipe_listing_shows_declared_methods(capsys):
    from recipes.__main__ import main

    main()
    assert "sae_code_input_clamping" in capsys.readouterr().out


def test_world_sae_fields_come_from_world_json(tmp_path):
    from sieve.world import world_info

    info = world_info()
    r = load_recipe(ROOT / "recipes/regex.toml")
    assert (r.sae.layer, r.sae.feature, r.sae.threshold) == (info["layer"], info["feature"], info["threshold"])
    assert "feature" not in (ROOT / "recipes/regex.toml").read_text().partition("[sae]")[2].partition("[")[0]
    # A recipe may still override them, and the override is what the hash sees.
    other = load_recipe(ROOT / "recipes/regex.toml", ["sae.feature=7"])
    assert other.sae.feature == 7 and recipe_hash(other) != recipe_hash(r)


def test_non_world_sae_needs_layer_and_feature(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("name = 'x'\n[sae]\nsource = 'some/folder'\nfeature = 3\n")
    with pytest.raises(RecipeError, match=r"sae\.layer.*required when sae\.source is not \"world\""):
        load_recipe(f)


PROMPTS = '[prompts]\nsource = "world"'


def test_a_recipe_file_reads_prompts_and_data_from_its_own_folder_only(tmp_path):
    """A shared recipe cannot copy files from elsewhere into its outputs (prompts.parquet, the report):
    absolute, ``~``, ``..`` and links out of the folder are refused; the command line may name any."""
    secret = tmp_path / "secret.py"
    secret.write_text("API_KEY = 'x'\n")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "link.py").symlink_to(secret)
    (folder / "mine.py").write_text("def f(s):\n    # find dates\n")
    base = Path("recipes/regex.toml").read_text()
    for key, value in (("regex_file", str(secret)), ("neutral_file", "../secret.py"), ("regex_file", "link.py"),
                       ("neutral_file", "~/secret.py")):
        (folder / "r.toml").write_text(base.replace(PROMPTS, f'{PROMPTS}\n{key} = "{value}"'))
        with pytest.raises(RecipeError, match=rf"\[prompts.{key}\] .* outside the recipe's folder"):
            load_recipe(folder / "r.toml")
    (folder / "r.toml").write_text(base.replace(PROMPTS, f'{PROMPTS}\nregex_file = "mine.py"'))
    assert load_recipe(folder / "r.toml").prompts.regex_file == "mine.py"
    assert load_recipe(folder / "r.toml", [f'prompts.regex_file="{secret}"']).prompts.regex_file == str(secret)


def test_method_names_are_plain(tmp_path):
    base = Path("recipes/regex.toml").read_text()
    for name in ("</script><script>x=1</script>", "m\u001b]0;title\u0007", "a b", "x" * 65):
        (tmp_path / "r.toml").write_text(base + f'\n[methods.{json.dumps(name)}]\nedit = "add"\n')
        with pytest.raises(RecipeError, match="a method's name is letters, digits"):
            load_recipe(tmp_path / "r.toml")
