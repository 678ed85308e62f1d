"""Bad input: every case is one clear message and exit status 2 (no traceback; --debug shows it),
given before any weights load (the model and SAE loaders are replaced by ones that fail the test).
The README's bad-input table lists these cases and messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recipes import regex
from sieve.errors import SieveError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/regex.toml"

PROMPTS = '''
instruction = "Test this function:\\n{code}"
prefill = "```python\\n"

[[function]]
name = "short_one"
code = "def f(x):\\n    return x\\n"
{extra}
[[neutral]]
id = "add"
task = "Write add(a, b)."

[contrastive]
base = "Test this function."
positive_suffix = " Use regular expressions."
'''


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Every case must be refused before a model or SAE is loaded."""
    import sieve.models
    import sieve.saes

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(sieve.models, "load_model", refuse)
    monkeypatch.setattr(sieve.saes, "load_sae", refuse)


def _prompts(tmp_path: Path, text: str, name: str) -> Path:
    p = tmp_path / "shared" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _recipe_in(tmp_path: Path, extra: str = "", name: str = "r.toml", prompts: str | None = None) -> Path:
    """A copy of the shipped recipe in a shared folder, with extra TOML appended (after its last table)
    and tables the shipped one has set by replacing their lines (``[eval]`` gets ``extra``'s
    ``sandbox``; ``prompts``: the prompts source)."""
    p = tmp_path / "shared" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    text = RECIPE.read_text()
    if extra.startswith("\n[eval]\n"):
        text, extra = text.replace("[eval]\n", extra.lstrip("\n"), 1), ""
    if prompts is not None:
        head, tail = text.split("[prompts]\n", 1)
        text = head + "[prompts]\n" + tail.replace('source = "world"', f"source = {json.dumps(prompts)}", 1)
    p.write_text(text + extra)
    return p


def _case(tmp_path: Path, name: str) -> tuple[list[str], str]:
    """The arguments of one bad-input case and a part of the message it must give (run from
    ``tmp_path``)."""
    (tmp_path / "shared" / "openai-community" / "gpt2").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tilde-research" / "sieve_coding").mkdir(parents=True, exist_ok=True)
    out = f'output.dir="{tmp_path / "out"}"'
    long_fn = "def long_one(x):\n" + "".join(f"    y{i} = x + {i}\n" for i in range(400))
    latin1 = _write(tmp_path / "latin1.toml", b'name = "caf\xe9"\n')
    bad_prompts = _write(tmp_path / "p.toml", b"x = 1  # \xff")
    long_prompts = _prompts(tmp_path, PROMPTS.replace("{extra}", _fn("long_one", long_fn)), "long.toml")
    empty_prompts = _prompts(tmp_path, _no_functions(), "empty.toml")
    cases: dict[str, tuple[list[str], str]] = {
        "recipe not UTF-8": ([str(latin1), out],
                             "latin1.toml: [-] is not UTF-8 text: byte 0xe9 at offset 11"),
        "prompt file not UTF-8": ([str(RECIPE), f'prompts.source="{bad_prompts}"', out],
                                  "p.toml: [-] is not UTF-8 text: byte 0xff"),
        "missing local model folder": ([str(RECIPE), 'model.source="./models/mine"', out],
                                       "[model.source] './models/mine': local folder"),
        "missing local SAE folder": ([str(RECIPE), 'sae.source="../saes/mine"', "sae.layer=2", "sae.feature=5", out],
                                     "[sae.source] '../saes/mine': local folder"),
        "function longer than the context": (
            [str(RECIPE), f'prompts.source="{long_prompts}"', out], "[regex prompt 'long_one'] needs"),
        "empty prompt set": ([str(RECIPE), f'prompts.source="{empty_prompts}"', out],
                             "[function] is empty"),
        "no methods": ([str(RECIPE), "sweep.methods=[]", out], "[sweep.methods] is empty"),
        "temperature 0 with samples > 1": ([str(RECIPE), "sweep.temperature=0", "sweep.samples=4", out],
                                           "[sweep.samples] is 4 but sweep.temperature = 0"),
        "empty scale list": ([str(RECIPE), "sweep.scales.add=[]", out], "[sweep.scales.add] is empty"),
        "timeout_s <= 0": ([str(RECIPE), "eval.timeout_s=0", out], "[eval.timeout_s] must be > 0 and at most 86400, got 0.0"),
        "memory_mb <= 0": ([str(RECIPE), "eval.memory_mb=-5", out], "[eval.memory_mb] must be > 0 and at most 1048576, got -5"),
        "timeout_s the sandbox cannot keep": ([str(RECIPE), "eval.timeout_s=1e7", out],
                                              "[eval.timeout_s] must be > 0 and at most 86400, got 10000000.0"),
        "samples beyond any machine": ([str(RECIPE), "sweep.samples=1000000000000", out],
                                       "[sweep.samples] must be at most 100000, got 1000000000000"),
        "a recipe file setting the sandbox's time limit": (
            [str(_recipe_in(tmp_path, '\n[eval]\ntimeout_s = 999999\n', "slow.toml")), out],
            "[eval.timeout_s] a recipe file may ask for at most 60 s per evaluation, got 999999"),
        "a recipe file setting the sandbox's memory limit": (
            [str(_recipe_in(tmp_path, '\n[eval]\nmemory_mb = 100000\n', "big.toml")), out],
            "[eval.memory_mb] a recipe file may ask for at most 4096 MB per evaluation, got 100000"),
        "a hub judge model id that a folder in the working directory shadows": (
            [str(RECIPE), 'eval.judge="hf"', 'eval.judge_model="tilde-research/sieve_coding"', out],
            "[eval.judge_model] 'tilde-research/sieve_coding': a folder"),
        "a prompts file that is a FIFO": ([str(RECIPE), f'prompts.source="{_fifo(tmp_path / "fifo.toml")}"', out],
                                          "fifo.toml is not a file"),
        "an MMLU file whose answer is not a choice": (
            [str(RECIPE), 'eval.general="mmlu"', f'eval.mmlu_data="{_mmlu_e(tmp_path)}"', out],
            "row 0 needs 4 choices and an answer in 0..3 or A..D, got 'E'"),
        "layer out of range": ([str(RECIPE), "sae.layer=9", out], "[sae.layer] 9 is out of range: the model has 4"),
        "a method's layer out of range": (
            [str(RECIPE), 'methods.two.gate="always"', 'methods.two.layers=[2,7]', 'sweep.methods=["unsteered","two"]',
             out], "[methods.two.layers[1]] 7 is out of range: the model has 4 layers (0..3)"),
        "a device torch does not know": ([str(RECIPE), 'model.device="cdua"', out],
                                         "[model.device] device 'cdua' is not one sieve knows"),
        "a dtype torch does not know": ([str(RECIPE), 'model.dtype="float31"', out],
                                        "[model.dtype] dtype 'float31' is not a torch dtype"),
        "a negative probe penalty": ([str(RECIPE), "probe.l2=-1", out], "[probe.l2] must be >= 0"),
        "probe generations longer than the context": ([str(RECIPE), 'probe.data="generations"', out],
                                                      "tokens + probe.max_new_tokens 64 = "),
        "feature out of range": ([str(RECIPE), "sae.feature=100000", out], "[sae.feature] 100000 is out of range"),
        "SAE width differs from the model's": ([str(RECIPE), f'sae.source="{_wide_sae(tmp_path)}"', "sae.layer=2",
                                                "sae.feature=5", out],
                                               "the SAE reads vectors of width 64 but the model's hidden size is"),
        "bad --shard": ([str(RECIPE), out, "--shard", "3/2"], "--shard 3/2: need 0 <= i < n"),
        "--out where nothing can be written": ([str(RECIPE), "--out", "/proc/sieve-out"],
                                               "output folder /proc/sieve-out: cannot write there"),
        "--merge of a folder that is not a run": ([str(RECIPE), out, "--merge", str(tmp_path)], "not a run folder"),
        "harness task that is code": ([*_tasks_recipe(tmp_path, "process_docs: !function utils.go\n"), out],
                                      "tasks/mine.yaml:13: YAML tag !function utils.go"),
        "unknown harness task": ([*_tasks_recipe(tmp_path, "", "plain_tasks"), 'eval.lmeval_tasks=["mien"]', out],
                                 "eval.lmeval_tasks: 'mien' is not a task the harness knows"),
        "a recipe file choosing the process sandbox": (
            [str(_recipe_in(tmp_path, '\n[eval]\nsandbox = "process"\n', "process.toml")), out],
            "[eval.sandbox] a recipe file cannot choose 'process'"),
        "a recipe file turning on the API judge": (
            [str(_recipe_in(tmp_path, '\n[eval]\njudge = "openai"\n', "judge.toml")), out],
            "[eval.judge] a recipe file cannot turn on the API judge"),
        "a prompts file outside the recipe's folder": (
            [str(_recipe_in(tmp_path, "", "outside.toml", prompts="~/.ssh/config.toml")), out],
            "[prompts.source] '~/.ssh/config.toml' resolves to"),
        "a model folder whose chat template the sandbox refuses": (
            [str(RECIPE), f'model.source="{_hostile_model(tmp_path)}"', "model.chat=true",
             f'prompts.source="{_prompts(tmp_path, PROMPTS.replace("{extra}", ""), "chat.toml")}"', out],
            f"[model.source] {tmp_path / 'hostile_model'}: its config, tokenizer or chat template cannot be used "
            "(SecurityError"),
        "a hub model id that is also a folder beside the recipe": (
            [str(_recipe_in(tmp_path, "", "shadow.toml")), 'model.source="openai-community/gpt2"', out],
            "[model.source] 'openai-community/gpt2' is both a hub id and the folder"),
        "a hub SAE id that a folder in the working directory shadows": (
            [str(RECIPE), 'sae.source="tilde-research/sieve_coding"', "sae.layer=2", "sae.feature=5", out],
            "[sae.source] 'tilde-research/sieve_coding': a folder"),
        "a task key with terminal escapes": ([*_tasks_recipe(tmp_path, "\"\\e]0;TITLE\\a\\e[2J\": 1\n", "esc_tasks"), out],
                                             "'\\x1b]0;TITLE\\x07\\x1b[2J' is not a key a shared task may set"),
        "sbatch option a recipe file may not set": (
            [str(_recipe_in(tmp_path, '\n[launch]\nslurm = { export = "ALL,LD_PRELOAD=x.so" }\n', "sbatch.toml")), out],
            "[launch.slurm.export] changes what the job runs"),
    }
    return cases[name]


def _tasks_recipe(tmp_path: Path, extra: str, folder: str = "tasks") -> list[str]:
    """The shipped recipe in a shared folder, with a harness task of its own as the general ability."""
    tasks = tmp_path / "shared" / folder
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "docs.json").write_text('[{"text": "x"}]')
    (tasks / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.json\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_choice: ['a', 'b']\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n" + extra)
    return [str(_recipe_in(tmp_path, name="tasks.toml")), 'eval.general="lmeval"', 'eval.lmeval_tasks=["mine"]',
            f'eval.lmeval_include="{folder}"']


def _fifo(path: Path) -> Path:
    import os

    if not path.exists():
        os.mkfifo(path)
    return path


def _mmlu_e(tmp_path: Path) -> Path:
    p = tmp_path / "mmlu_e.json"
    p.write_text(json.dumps([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E", "subject": "s"}]))
    return p


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _fn(name: str, code: str) -> str:
    return f"\n[[function]]\nname = {json.dumps(name)}\ncode = {json.dumps(code)}\n"


def _no_functions() -> str:
    return PROMPTS.replace('[[function]]\nname = "short_one"\ncode = "def f(x):\\n    return x\\n"\n{extra}',
                           "function = []\n")


def _hostile_model(tmp_path: Path) -> Path:
    """The world model's folder with a chat template that reaches Python's internals."""
    from sieve.world import world_model_dir

    d = tmp_path / "hostile_model"
    if not d.exists():
        shutil.copytree(world_model_dir(), d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "') }}"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _wide_sae(tmp_path: Path) -> Path:
    from sieve.world import world_sae_dir

    d = tmp_path / "wide_sae"
    shutil.copytree(world_sae_dir(), d)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["d_in"] = 64
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d


CASES = ["recipe not UTF-8", "prompt file not UTF-8", "missing local model folder", "missing local SAE folder",
         "function longer than the context", "empty prompt set", "no methods", "temperature 0 with samples > 1",
         "empty scale list", "timeout_s <= 0", "memory_mb <= 0", "timeout_s the sandbox cannot keep",
         "samples beyond any machine", "a recipe file setting the sandbox's time limit",
         "a recipe file setting the sandbox's memory limit",
         "a hub judge model id that a folder in the working directory shadows", "a prompts file that is a FIFO",
         "an MMLU file whose answer is not a choice", "layer out of range", "a method's layer out of range",
         "a device torch does not know", "a dtype torch does not know", "a negative probe penalty",
         "probe generations longer than the context",
         "feature out of range",
         "SAE width differs from the model's", "bad --shard",
         "--out where nothing can be written", "--merge of a folder that is not a run", "harness task that is code",
         "unknown harness task", "a recipe file choosing the process sandbox", "a recipe file turning on the API judge",
         "a prompts file outside the recipe's folder",
         "a model folder whose chat template the sandbox refuses", "a hub model id that is also a folder beside the recipe",
         "a hub SAE id that a folder in the working directory shadows", "a task key with terminal escapes",
         "sbatch option a recipe file may not set"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_message_and_exit_2(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    args, expected = _case(tmp_path, name)
    assert regex.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(c.isprintable() for c in err.rstrip("\n")), err  # a shared name cannot drive the terminal
    with pytest.raises(SieveError):
        regex.main([*args, "--no-progress", "--debug"])
    assert not (tmp_path / "pwned").exists()


def test_output_dir_from_a_shared_recipe_stays_in_its_folder(tmp_path, monkeypatch, capsys):
    """``output.dir`` in a recipe file cannot leave the recipe's folder or the working directory; the
    same value on the command line (an override, or --out) is the user's own choice."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for bad in ('"../../x"', f'"{tmp_path / "elsewhere"}"', '"~/sieve-out"'):
        recipe = _recipe_in(tmp_path, "")
        recipe.write_text(recipe.read_text().replace('dir = "runs/regex-world"', f"dir = {bad}"))
        assert regex.main([str(recipe), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "[output.dir]" in err and "outside the working directory" in err and "--out" in err
        assert not (tmp_path / "x").exists() and not (tmp_path / "elsewhere").exists()
    from sieve.recipe import load_recipe
    from sieve.rundir import output_dir

    r = load_recipe(recipe)
    assert output_dir(r, tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()  # --out goes anywhere
    assert output_dir(r, trusted=True) == Path("~/sieve-out").expanduser().resolve()  # set on the command line
    inside = load_recipe(recipe, ['output.dir="runs/a"'])
    assert output_dir(inside) == work.resolve() / "runs/a"  # relative to the working directory
