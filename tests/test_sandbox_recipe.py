"""End to end: a shared prompts file whose code under test tries to escape, run by an ordinary
``python -m recipes.regex`` on the embedded model, and through the recipe's own evaluation path. The
code under test runs only inside the sandbox; nothing it attempts happens outside."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from recipes import regex
from sieve.evals.sandbox import bwrap_available
from sieve.generation import Completion
from sieve.prompts import load_prompt_sets
from sieve.recipe import load_recipe

pytestmark = pytest.mark.skipif(not bwrap_available() and os.environ.get("SIEVE_SANDBOX_TESTS") != "require",
                                reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")

ROOT = Path(__file__).resolve().parents[1]


def _payload(folder: Path, home_marker: Path) -> str:
    """Code under test that, wherever it runs, tries to run `id` into files next to the recipe, write
    there and in the home directory, and copy the project's files out; RAN records that it ran. (Short:
    the embedded model's context is 256 tokens.)"""
    return textwrap.dedent(f'''
        import os, re, shutil, subprocess as s
        D = "{folder}/"
        for f in (lambda: os.system("id>" + D + "a"), lambda: s.run(["id"], stdout=open(D + "b", "w")),
                  lambda: open(D + "c", "w").write("x"), lambda: open("{home_marker}", "w"),
                  lambda: shutil.copy("{ROOT}/pyproject.toml", D)):
            try:
                f()
            except Exception:
                pass
        RAN = 1
        def shout(t):
            return re.sub(" +", " ", t).upper()
    ''')


@pytest.fixture()
def shared_recipe(tmp_path: Path):
    folder = tmp_path / "shared"
    folder.mkdir()
    markers = [folder / name for name in ("a", "b", "c", "pyproject.toml")]
    home_marker = Path.home() / f".sieve-escape-{os.getpid()}"
    prompts = {
        "prefill": "```python\n",
        "instruction": "{code}",
        "function": [{"name": "shout", "code": _payload(folder, home_marker)}] + [
            {"name": f"f{i}", "code": f"import re\n\ndef f{i}(s):\n    return re.findall('[0-9]{{{i}}}', s) or s.split()\n"}
            for i in range(1, 6)],
        "neutral": [{"id": "n1", "task": "Write a function that adds two numbers."}],
        "contrastive": {"base": "Test the code below.", "positive_suffix": " Use regular expressions.",
                        "negative_suffix": ""},
    }
    import tomli_w

    (folder / "prompts.toml").write_text(tomli_w.dumps(prompts))
    (folder / "recipe.toml").write_text(textwrap.dedent(f'''
        name = "shared-recipe"
        [model]
        source = "world"
        [sae]
        source = "world"
        layer = 2
        feature = 978
        [prompts]
        source = "prompts.toml"
        regex_limit = 1
        [sweep]
        methods = ["unsteered"]
        samples = 2
        max_new_tokens = 8
        temperature = 1.0
        [eval]
        execute = true
        general = "none"
        [output]
        dir = "{tmp_path / 'out'}"
        charts = false
    '''))
    yield folder, markers, home_marker
    home_marker.unlink(missing_ok=True)


def _nothing_escaped(folder: Path, markers: list[Path], home_marker: Path) -> None:
    assert not [m for m in markers if m.exists()]
    assert not home_marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["prompts.toml", "recipe.toml"]


def test_escaping_prompts_file_through_the_evaluation_path(shared_recipe):
    """The recipe's evaluation of a row runs the prompts file's code in the sandbox: it ran (the test
    that checks RAN passes) and none of its attempts had an effect outside."""
    folder, markers, home_marker = shared_recipe
    recipe = load_recipe(folder / "recipe.toml")
    prompt = load_prompt_sets(recipe, None).regex[0]
    assert "os.system" in prompt.setup
    completion = Completion(prompt.text, "def test_shout():\n    assert RAN and shout('a') == 'A'\n```\n", [1], True)
    row = regex.evaluate_row(recipe, prompt, completion)
    assert row["exec_status"] == "ok" and row["executed"] is True
    _nothing_escaped(folder, markers, home_marker)
    failing = Completion(prompt.text, "def test_shout():\n    assert shout('a') == 'a'\n```\n", [1], True)
    assert regex.evaluate_row(recipe, prompt, failing)["exec_status"] == "error"
    _nothing_escaped(folder, markers, home_marker)


def test_escaping_prompts_file_in_an_ordinary_run(shared_recipe):
    folder, markers, home_marker = shared_recipe
    # the output folder is the user's choice (--out): a shared recipe may not write outside its folder
    assert regex.main([str(folder / "recipe.toml"), "--out", str(folder.parent / "out"), "--no-progress"]) == 0
    _nothing_escaped(folder, markers, home_marker)
    from sieve.results import ResultStore

    gen = ResultStore(folder.parent / "out" / "gen").table()
    assert gen.height == 2 * (1 + 1) and set(gen.filter(gen["set"] == "regex")["prompt_id"]) == {"shout"}


def test_run_refuses_before_loading_anything_without_bwrap(shared_recipe, monkeypatch, capsys):
    from sieve.evals import sandbox

    folder, _, _ = shared_recipe
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    loaded = []
    monkeypatch.setattr("sieve.setting.load_setting", lambda *a, **k: loaded.append(1))
    args = [str(folder / "recipe.toml"), "--out", str(folder.parent / "out"), "--no-progress"]
    assert regex.main(args) == 2  # a user error: one message, exit status 2
    assert "apt-get install -y bubblewrap" in capsys.readouterr().err
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install -y bubblewrap"):
        regex.main([*args, "--debug"])
    assert not loaded


def test_a_link_shipped_in_the_output_folder_is_refused_before_anything_is_written(tmp_path):
    """A shared recipe folder whose output folder holds ``gen -> somewhere else``: the run (output folder
    from the recipe file) exits 2 before loading anything, and nothing appears where the link points."""
    import subprocess
    import sys

    folder, outside = tmp_path / "shared", tmp_path / "outside"
    (folder / "out").mkdir(parents=True)
    outside.mkdir()
    (folder / "out" / "gen").symlink_to(outside)
    (folder / "recipe.toml").write_text(textwrap.dedent('''
        name = "shared-recipe"
        [prompts]
        regex_limit = 2
        neutral_limit = 1
        [sweep]
        methods = ["unsteered"]
        samples = 1
        [output]
        dir = "out"
    '''))
    r = subprocess.run([sys.executable, "-m", "recipes.regex", "recipe.toml"], cwd=folder, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["gen"]
