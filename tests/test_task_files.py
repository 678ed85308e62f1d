"""A shared recipe's lm-evaluation-harness task folder is data: every way its files could make the
harness run Python is refused before the model loads, the harness renders templates in Jinja's
sandbox, and only ``--trust-task-code`` on the command line runs a folder's code. Every escape checks
that its effect (a marker file) did not happen."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval.tasks
from lm_eval import utils as lm_utils

from recipes import regex
from sieve.errors import SieveError
from sieve.evals.lmeval import SteeredLM, harness_tasks, run_harness
from sieve.evals.task_files import check_task_folder, sandboxed_templates, task_code
from sieve.recipe import load_recipe
from sieve.world import load_world

BUILTIN = Path(lm_eval.tasks.__file__).resolve().parent


def _task(name: str, data: Path, extra: str = "", text: str = "{{text}}") -> str:
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: {json.dumps(text)}
        doc_to_choice: ["a", "b"]
        doc_to_target: 0
        metric_list:
          - metric: acc
        """) + textwrap.dedent(extra)


def _folder(tmp_path: Path, name: str = "mine", extra: str = "", text: str = "{{text}}",
            files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A recipe folder with a task folder ``tasks/`` holding one task and any ``files``; the Python
    file ``tasks/utils.py`` writes the marker when imported and its ``go`` when called."""
    folder = tmp_path / "shared"
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "RAN"
    data = folder / "docs.json"
    data.write_text(json.dumps([{"text": "x y"}, {"text": "z"}]))
    (tasks / "utils.py").write_text(f"open({str(marker)!r}, 'a').write('imported')\n"
                                    f"def go(*a, **k):\n    open({str(marker)!r}, 'a').write('called')\n"
                                    "    return a[0] if a else None\n")
    (tasks / f"{name}.yaml").write_text(_task(name, data, extra, text))
    for rel, body in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(body.replace("DATA", str(data)).replace("MARKER", str(marker)))
    return folder, marker


# Each construct, written as a recipe author would: what the finding says, and what its line holds.
CODE = {
    "function tag": ("process_docs: !function utils.go\n", "YAML tag !function", "!function"),
    "importable function": ("process_docs: !function os.system\n", "YAML tag !function", "os.system"),
    "python tag": ("description: !!python/name:os.system\n", "python/name", "!!python"),
    "custom tag elsewhere": ("metadata:\n  version: !env HOME\n", "YAML tag !env", "!env"),
    "task class": ("class: utils.go\n", "'class' names a Python task class", "class:"),
    "custom dataset": ("custom_dataset: utils.go\n", "'custom_dataset'", "custom_dataset"),
    "unsafe code": ("unsafe_code: true\n", "executes the model's output", "unsafe_code"),
    "remote code": ("", "trust_remote_code", "trust_remote_code"),  # in dataset_kwargs, below
    "hf evaluate": ("metric_list:\n  - metric: exact_match\n    hf_evaluate: true\n", "hf_evaluate", "hf_evaluate"),
    "unregistered metric": ("metric_list:\n  - metric: ./evil_metric\n", "not one the harness registers", "./evil"),
    "prompt file": ("use_prompt: prompts.yaml:one\n", "use_prompt", "use_prompt"),
    "template internals": ("", "starting with '_'", "__init__"),
    "tagged key": ("? !function utils.go\n: 1\n", "YAML tag !function", "!function"),
    "sql builder": ("", "'dataset_path: sql'", "sql"),  # dataset_path replaced, below
    "cache elsewhere": ("", "dataset_kwargs.cache_dir", "cache_dir"),  # in dataset_kwargs, below
}


@pytest.mark.parametrize("case", sorted(CODE))
def test_every_way_a_task_file_runs_code_is_named_with_its_line(tmp_path, case):
    extra, what, on_line = CODE[case]
    text = "{{ cycler.__init__.__globals__ }}{{text}}" if case == "template internals" else "{{text}}"
    folder, marker = _folder(tmp_path, extra=extra, text=text)
    f = folder / "tasks" / "mine.yaml"
    if case in ("remote code", "cache elsewhere"):
        line = "trust_remote_code: true" if case == "remote code" else "cache_dir: /tmp/elsewhere"
        f.write_text(f.read_text().replace("dataset_kwargs:\n", f"dataset_kwargs:\n  {line}\n"))
    if case == "sql builder":
        f.write_text(f.read_text().replace("dataset_path: json", "dataset_path: sql"))
    found = task_code(folder / "tasks")
    assert found, case
    assert what in found[0].what, found
    line = found[0].line
    assert on_line in f.read_text().splitlines()[line - 1], (line, found)
    with pytest.raises(SieveError, match=r"mine\.yaml:\d+: .*--trust-task-code"):
        check_task_folder(folder / "tasks")
    assert not marker.exists()


def test_a_plain_data_task_folder_passes(tmp_path):
    from tests.test_lmeval import write_tasks

    assert task_code(write_tasks(tmp_path / "tasks")) == []
    folder, _ = _folder(tmp_path)
    assert task_code(folder / "tasks") == []


def test_code_in_included_files_sub_folders_and_inline_group_tasks_is_found(tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("process_results: !function utils.go\n")
    folder, marker = _folder(tmp_path, files={
        "tasks/deep/more/t2.yml": "task: t2\ninclude: ../../../../elsewhere.yaml\n",
        "tasks/group.yaml": "group: g\ntask:\n  - task: inline\n    doc_to_text: !function utils.go\n",
    })
    found = {(c.file.name, c.line) for c in task_code(folder / "tasks")}
    assert found == {("elsewhere.yaml", 1), ("group.yaml", 4)}
    assert not marker.exists()


def test_the_harness_installed_tasks_are_trusted_when_included(tmp_path):
    with_fn = next(p for p in sorted(BUILTIN.rglob("*.yaml")) if "!function" in p.read_text())
    folder, _ = _folder(tmp_path, files={"tasks/inc.yaml": f"task: inc\ninclude: {with_fn}\n"})
    assert task_code(folder / "tasks") == []


def _recipe(folder: Path, tasks: list[str], tmp_path: Path):
    (folder / "recipe.toml").write_text(textwrap.dedent(f"""\
        name = "shared"
        [model]
        source = "world"
        [sae]
        source = "world"
        layer = 2
        feature = 978
        [sweep]
        methods = ["unsteered"]
        samples = 1
        max_new_tokens = 4
        [eval]
        general = "lmeval"
        lmeval_tasks = {json.dumps(tasks)}
        lmeval_include = "tasks"
        """))
    return folder / "recipe.toml"


def test_a_recipe_naming_task_code_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    folder, marker = _folder(tmp_path, extra="process_docs: !function utils.go\n")
    recipe = _recipe(folder, ["mine"], tmp_path)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sieve.setting.load_setting", no_model)
    assert regex.main([str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mine.yaml:13: YAML tag !function utils.go" in err[0] and "--trust-task-code" in err[0]
    assert not marker.exists()
    assert not (tmp_path / "out" / "ability").exists()
    # --launch checks before any job is submitted
    monkeypatch.setattr("sieve.launch.launch", no_model)
    assert regex.main([str(recipe), "--out", str(tmp_path / "out2"), "--launch", "--no-progress"]) == 2
    assert not marker.exists()


def test_task_names_must_be_indexed_names_not_paths(tmp_path, capsys, monkeypatch):
    folder, marker = _folder(tmp_path)
    evil = tmp_path / "evil.yaml"
    evil.write_text(_task("evil", folder / "docs.json", "process_docs: !function shared.tasks.utils.go\n"))
    monkeypatch.setattr("sieve.setting.load_setting", lambda *a, **k: pytest.fail("the model was loaded"))
    for name in (str(evil), "mien"):
        recipe = load_recipe(_recipe(folder, ["mine", name], tmp_path))
        with pytest.raises(SieveError, match="is not a task the harness knows") as e:
            regex.check_harness(recipe)
        if name == "mien":
            assert "did you mean ['mine']" in str(e.value)
    assert not marker.exists()
    regex.check_harness(load_recipe(_recipe(folder, ["mine"], tmp_path)))  # a known name passes


def test_trust_task_code_is_the_command_lines_consent(tmp_path, monkeypatch):
    folder, marker = _folder(tmp_path, extra="process_docs: !function utils.go\n")
    recipe = load_recipe(_recipe(folder, ["mine"], tmp_path))
    with pytest.raises(SieveError):
        regex.check_harness(recipe)
    regex.check_harness(recipe, trust_task_code=True)
    assert not marker.exists()  # indexing never imports
    w = load_world()
    lm = SteeredLM(model=w.model, intervention=None, layer=w.layer, batch_size=4)
    with pytest.raises(SieveError, match="--trust-task-code"):
        run_harness(lm, ["mine"], include_path=folder / "tasks", allow_code=False)
    assert not marker.exists()
    out = run_harness(lm, ["mine"], include_path=folder / "tasks", allow_code=True)
    assert len(out["tasks"]["mine"]["values"]) == 2
    assert "called" in marker.read_text()  # with consent, the folder's code runs
    # the launcher passes the consent on to every shard
    seen = {}
    monkeypatch.setattr("sieve.launch.launch", lambda module, argv, out, spec: seen.setdefault("argv", argv))
    regex.main([str(folder / "recipe.toml"), "--out", str(tmp_path / "o"), "--launch", "--trust-task-code"])
    assert seen["argv"][-1] == "--trust-task-code"


def test_templates_render_in_jinja_sandbox_even_past_the_static_check(tmp_path):
    marker = tmp_path / "TEMPLATE_RAN"
    # a dynamic attribute name: the static check cannot see it, the sandbox refuses it at render time
    payload = ("{{ (cycler|attr('_' ~ '_init__')|attr('_' ~ '_globals__'))['os'].system('touch " + str(marker)
               + "') }}{{text}}")
    lm_utils.apply_template(payload, {"text": "x"})  # the harness's own environment runs it: the attack is real
    assert marker.exists()
    marker.unlink()
    folder, code_marker = _folder(tmp_path, text=payload)
    assert task_code(folder / "tasks") == []
    w = load_world()
    lm = SteeredLM(model=w.model, intervention=None, layer=w.layer, batch_size=4)
    for allow in (False, True):
        with pytest.raises(SieveError, match="template (was refused by|failed in) Jinja's sandbox"):
            run_harness(lm, ["mine"], include_path=folder / "tasks", allow_code=allow)
        assert not marker.exists()
    assert lm_utils.env.__class__.__name__ == "Environment"  # the harness's environment is restored
    with sandboxed_templates():
        assert lm_utils.apply_template("{{ text|upper }} {{ choices|join(',') }}", {"text": "q", "choices": [1, 2]}) \
            == "Q 1,2"


def test_a_missing_data_file_is_one_clear_error(tmp_path):
    folder, _ = _folder(tmp_path)
    f = folder / "tasks" / "mine.yaml"
    f.write_text(f.read_text().replace(str(folder / "docs.json"), "docs.json"))
    harness_tasks(["mine"], folder / "tasks", allow_code=False)
    w = load_world()
    lm = SteeredLM(model=w.model, intervention=None, layer=w.layer, batch_size=4)
    with pytest.raises(SieveError, match=r"lm-eval tasks \['mine'\]: FileNotFoundError: .*working directory"):
        run_harness(lm, ["mine"], include_path=folder / "tasks", allow_code=False)
