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
from sieve.evals.task_files import check_task_folder, data_tasks, sandboxed_templates, task_code
from sieve.recipe import load_recipe
from sieve.world import load_world

BUILTIN = Path(lm_eval.tasks.__file__).resolve().parent
ROOT = Path(__file__).resolve().parents[1]


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
    "tagged key": ("? !function utils.go\n: 1\n", "YAML tag !function", "!function"),
    "task class": ("class: utils.go\n", "a Python task class is not read", "class:"),
    "custom dataset": ("custom_dataset: utils.go\n", "'custom_dataset' is not a key", "custom_dataset"),
    "process results": ("process_results: utils.go\n", "'process_results' is not a key", "process_results"),
    "unsafe code": ("unsafe_code: true\n", "'unsafe_code' must be false", "unsafe_code"),
    "remote code": ("", "'dataset_kwargs.trust_remote_code' is not a key", "dataset_kwargs"),  # below
    "cache elsewhere": ("", "'dataset_kwargs.cache_dir' is not a key", "dataset_kwargs"),  # below
    "cache behind a merge key": ("", "'dataset_kwargs.cache_dir' is not a key", "dataset_kwargs"),  # below
    "hf evaluate": ("metric_list:\n  - metric: exact_match\n    hf_evaluate: true\n", "sets ['hf_evaluate']",
                    "metric_list"),
    "unregistered metric": ("metric_list:\n  - metric: ./evil_metric\n", "is not one the harness registers",
                            "metric_list"),
    "custom filter": ("filter_list:\n  - name: f\n    filter:\n      - function: custom\n", "not one the harness",
                      "filter_list"),
    "prompt file": ("use_prompt: prompts.yaml:one\n", "'use_prompt' is not a key", "use_prompt"),
    "template internals": ("", "reads no '_'-named attribute", "doc_to_text"),
    "sql builder": ("", "one of the file readers", "dataset_path"),  # dataset_path replaced, below
    "custom generate": ("generation_kwargs:\n  custom_generate: gen\n  trust_remote_code: 'no'\n",
                        "'generation_kwargs.custom_generate' is not a key", "generation_kwargs"),
    "include behind a merge key": ("<<: {include: evil.txt}\n", "YAML tag !function", "!function"),
    "include out of the folder": ("include: ../../elsewhere.yaml\n", "outside the task folder", "include"),
    "data outside the recipe": ("", "outside the recipe's folder", "dataset_kwargs"),  # below
    "data through a pattern": ("", "no pattern", "dataset_kwargs"),  # below
    "data folder": ("", "'dataset_kwargs.data_dir' is not a key", "dataset_kwargs"),  # below
    "local dataset folder": ("", "one of the file readers", "dataset_path"),  # below
}


@pytest.mark.parametrize("case", sorted(CODE))
def test_every_way_a_task_file_runs_code_is_named_with_its_line(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra, what, on_line = CODE[case]
    text = "{{ cycler.__init__.__globals__ }}{{text}}" if case == "template internals" else "{{text}}"
    folder, marker = _folder(tmp_path, extra=extra, text=text)
    (folder / "tasks" / "evil.txt").write_text("process_docs: !function utils.go\n")
    (tmp_path / "elsewhere.yaml").write_text("output_type: multiple_choice\n")
    f = folder / "tasks" / "mine.yaml"
    body = f.read_text()
    kwargs = {"remote code": "  trust_remote_code: true\n", "cache elsewhere": "  cache_dir: /tmp/elsewhere\n",
              "cache behind a merge key": "  <<: {cache_dir: /tmp/elsewhere}\n"}
    if case in kwargs:
        body = body.replace("dataset_kwargs:\n", "dataset_kwargs:\n" + kwargs[case])
    if case == "sql builder":
        body = body.replace("dataset_path: json", "dataset_path: sql")
    if case == "data outside the recipe":
        (tmp_path / "secret.json").write_text("[]")
        body = body.replace(str(folder / "docs.json"), "../../secret.json")
    if case == "data through a pattern":  # a link in the folder, reached by a pattern resolve() cannot follow
        (tmp_path / "secret.json").write_text("[]")
        (folder / "data").mkdir()
        (folder / "data" / "x.json").symlink_to(tmp_path / "secret.json")
        body = body.replace(str(folder / "docs.json"), "../data/x.jso[n]")
    if case == "data folder":
        body = body.replace("dataset_kwargs:\n", "dataset_kwargs:\n  data_dir: ../data\n")
    if case == "local dataset folder":  # datasets opens ./shared/evil (from the working directory) first
        (tmp_path / "shared" / "evil").mkdir()
        body = body.replace("dataset_path: json", "dataset_path: shared/evil")
    f.write_text(body)
    found = task_code(folder / "tasks", folder)
    assert found, case
    assert what in found[0].what, found
    line = found[0].line
    assert on_line in found[0].file.read_text().splitlines()[line - 1], (line, found)
    with pytest.raises(SieveError, match=r"(mine\.yaml|evil\.txt):\d+: .*--trust-task-code"):
        check_task_folder(folder / "tasks", folder)
    assert not marker.exists()


BUILTIN_OVERRIDES = {
    # a group overriding the harness's own tasks: builtin code fed the folder's data or metadata
    "group overrides a builtin's metadata": "group: g\ntask:\n  - task: niah_single_1\n    metadata: {tokenizer: tok}\n",
    "group lifts a builtin's unsafe gate": "group: g\ntask:\n  - task: cruxeval_output\n    unsafe_code: false\n",
    "task list": "task_list:\n  - task: a\n    dataset_path: json\n",
}


@pytest.mark.parametrize("case", sorted(BUILTIN_OVERRIDES))
def test_groups_that_could_override_the_harness_tasks_are_refused(tmp_path, case):
    folder, marker = _folder(tmp_path, files={"tasks/group.yaml": BUILTIN_OVERRIDES[case]})
    found = task_code(folder / "tasks", folder)
    assert [c.file.name for c in found] == ["group.yaml"] and "not read from a shared folder" in found[0].what
    assert not marker.exists()


def test_a_plain_data_task_folder_passes(tmp_path):
    from tests.test_lmeval import write_tasks

    assert task_code(write_tasks(tmp_path / "tasks")) == []
    folder, _ = _folder(tmp_path)
    assert task_code(folder / "tasks", folder) == []


def test_code_in_sub_folders_and_inline_group_tasks_is_found_and_includes_stay_in_the_folder(tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("process_results: !function utils.go\n")
    with_fn = next(p for p in sorted(BUILTIN.rglob("*.yaml")) if "!function" in p.read_text())
    folder, marker = _folder(tmp_path, files={
        "tasks/deep/more/t2.yml": "task: t2\ninclude: ../../../../elsewhere.yaml\n",
        "tasks/group.yaml": "group: g\ntask:\n  - task: inline\n    doc_to_text: !function utils.go\n",
        "tasks/inc.yaml": f"task: inc\ninclude: {with_fn}\n",  # even the harness's own: its code, our data
    })
    found = {(c.file.name, c.line) for c in task_code(folder / "tasks", folder)}
    assert found == {("t2.yml", 2), ("group.yaml", 4), ("inc.yaml", 2)}
    assert not marker.exists()


def test_yaml_aliases_are_refused_before_they_are_walked(tmp_path):
    """Aliases of aliases (461 bytes, nine levels of ten) held sieve's reader for a minute before the
    model loaded: a node reached twice is refused at once."""
    bomb = "a0: &a0 [" + ", ".join(["x"] * 10) + "]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)) + "task: bomb\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    found = task_code(tmp_path)
    assert [c.file.name for c in found] == ["bomb.yaml"] and "YAML alias" in found[0].what
    (tmp_path / "bomb.yaml").write_text("a: &x [1]\nb: *x\ntask: t\n")  # one alias is refused too
    assert "YAML alias" in task_code(tmp_path)[0].what


def test_includes_fanning_out_read_each_file_once(tmp_path, monkeypatch):
    """24 files each including the next twice would be 2**24 reads; each file is read once (includes
    stay in the folder, so reads are bounded by its files)."""
    from sieve.evals import task_files

    for i in range(24):
        inc = f"include: [f{i + 1}.yaml, f{i + 1}.yaml]\n" if i < 23 else ""
        (tmp_path / f"f{i}.yaml").write_text(f"{inc}doc_to_text: '{{{{q}}}}'\n" + ("task: top\n" if i == 0 else ""))
    reads = []
    real = task_files._Reader._load
    monkeypatch.setattr(task_files._Reader, "_load", lambda self, path, seen: reads.append(path) or real(self, path,
                                                                                                          seen))
    assert task_code(tmp_path) == []
    assert sorted(p.name for p in reads) == sorted(f"f{i}.yaml" for i in range(24))


def test_tasks_including_one_file_share_none_of_its_values(tmp_path):
    """Each file is read once; the tasks that include it get their own copy of its nested values (the
    harness sets some in place, e.g. generation_kwargs)."""
    from sieve.evals import task_files

    (tmp_path / "base.yaml").write_text("metadata:\n  version: 1\ngeneration_kwargs:\n  until: ['x']\n")
    reader = task_files._Reader(tmp_path, tmp_path)
    a, _ = reader.load(tmp_path / "base.yaml")
    b, _ = reader.load(tmp_path / "base.yaml")
    a["metadata"]["version"] = 2
    a["generation_kwargs"]["until"].append("y")
    assert b == {"metadata": {"version": 1}, "generation_kwargs": {"until": ["x"]}}


def test_a_task_file_too_large_or_a_template_too_deep_is_refused_in_one_line(tmp_path):
    """A 21 MB task file took 40 s and 2.7 GB before the model loaded; a template of 200 nested
    parentheses stopped the run with Jinja's RecursionError."""
    (tmp_path / "big.yaml").write_text("task: big\nfewshot_config:\n  samples:\n" + "  - {}\n" * 200_000)
    found = task_code(tmp_path)
    assert [c.file.name for c in found] == ["big.yaml"] and "larger than 1,048,576 bytes" in found[0].what
    (tmp_path / "big.yaml").unlink()
    (tmp_path / "deep.yaml").write_text("task: deep\ndoc_to_text: '{{ " + "(" * 200 + "q" + ")" * 200 + " }}'\n")
    found = task_code(tmp_path)
    assert [c.file.name for c in found] == ["deep.yaml"] and "nested at most 32 deep" in found[0].what
    (tmp_path / "deep.yaml").write_text("task: deep\ndoc_to_text: '{{ " + "(" * 40 + "q" + ")" * 40 + " }}'\n")
    assert "nested at most 32 deep" in task_code(tmp_path)[0].what  # parses here, but not from a deeper stack


def test_a_folder_task_reaches_the_harness_as_a_plain_config(tmp_path):
    folder, _ = _folder(tmp_path, files={"tasks/base.yaml": "output_type: multiple_choice\ndoc_to_target: 1\n",
                                         "tasks/sub/t3.yaml": "task: t3\ninclude: ../base.yaml\n<<: {num_fewshot: 0}\n"
                                                              "dataset_path: json\ndataset_kwargs:\n"
                                                              "  data_files: ../../docs.json\n"})
    tasks = data_tasks(folder / "tasks", folder)
    assert sorted(tasks) == ["mine", "t3"]
    assert tasks["t3"] == {"task": "t3", "output_type": "multiple_choice", "doc_to_target": 1, "num_fewshot": 0,
                           "dataset_path": "json", "dataset_kwargs": {"data_files": str((folder / "docs.json").resolve())}}


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
    assert task_code(folder / "tasks", folder) == []
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
    """Read as data, a task's relative data file is relative to its task file, and a missing one is
    named before anything loads; handed to the harness (trusted), relative to the working directory,
    as the harness has it, and named when the harness reads it."""
    folder, _ = _folder(tmp_path)
    f = folder / "tasks" / "mine.yaml"
    f.write_text(f.read_text().replace(str(folder / "docs.json"), "docs.json"))
    with pytest.raises(SieveError, match=r"mine\.yaml:\d+: 'dataset_kwargs.data_files.test' 'docs.json': no such file"):
        harness_tasks(["mine"], folder / "tasks", allow_code=False)
    w = load_world()
    lm = SteeredLM(model=w.model, intervention=None, layer=w.layer, batch_size=4)
    with pytest.raises(SieveError, match=r"lm-eval tasks \['mine'\]: FileNotFoundError: .*working directory"):
        run_harness(lm, ["mine"], include_path=folder / "tasks", allow_code=True)
    (folder / "tasks" / "docs.json").write_text((folder / "docs.json").read_text())
    assert len(run_harness(lm, ["mine"], include_path=folder / "tasks", allow_code=False)["tasks"]["mine"]["values"]) == 2


def test_tasks_read_as_data_score_as_the_harness_reading_the_folder(tmp_path):
    """The recipe's way (the folder read as data, each task given as a plain config) and the harness's
    own (``--include_path``) give the same per-document values and responses: multiple choice, greedy
    generation with stops, rolling log-likelihoods."""
    from tests.test_lmeval import write_tasks

    folder = write_tasks(tmp_path / "tasks")
    w = load_world()
    names = ["world_mc", "world_gen", "world_ppl"]
    metric = {"world_mc": "acc", "world_gen": "exact_match", "world_ppl": "word_perplexity"}
    outs = [run_harness(SteeredLM(model=w.model, intervention=None, layer=w.layer, batch_size=4), names,
                        include_path=folder, include_defaults=False, metric=metric, allow_code=allow)
            for allow in (True, False)]
    for name in names:
        assert outs[0]["tasks"][name]["values"] == outs[1]["tasks"][name]["values"], name
        assert outs[0]["tasks"][name]["responses"] == outs[1]["tasks"][name]["responses"], name


def test_a_folder_in_the_working_directory_cannot_stand_in_for_a_hub_dataset(tmp_path, monkeypatch):
    """Run from a shared folder that ships ``./allenai/ai2_arc`` or ``./cais/mmlu`` (a README whose data
    files point anywhere), the harness's own tasks and sieve's MMLU would read it instead of the hub's:
    refused before the model loads, and at load time."""
    import datasets

    from sieve.evals.mmlu import load_mmlu

    for name in ("allenai/ai2_arc", "cais/mmlu"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: ../../x.jsonl\n---\n")
    monkeypatch.chdir(tmp_path)
    folder, _ = _folder(tmp_path)
    with pytest.raises(SieveError, match=r"'allenai/ai2_arc': a folder .* would be read instead of the hub's"):
        harness_tasks(["mine", "arc_easy"], folder / "tasks", allow_code=False)
    with sandboxed_templates(), pytest.raises(SieveError, match="would be read instead"):
        from sieve.evals.task_files import hub_datasets_checked

        with hub_datasets_checked():
            datasets.load_dataset("allenai/ai2_arc")
    with pytest.raises(SieveError, match=r"MMLU .*'cais/mmlu': a folder"):
        load_mmlu(load_recipe(ROOT / "recipes/regex_gemma2_2b.toml", ["eval.general=\"mmlu\""]))
    # a recipe says so before the model loads, with or without a task folder of its own
    for ov in (['eval.general="mmlu"', 'eval.mmlu_data=""'], ['eval.general="lmeval"', 'eval.lmeval_tasks=["arc_easy"]']):
        with pytest.raises(SieveError, match="would be read instead of the hub's"):
            regex.check_harness(load_recipe(ROOT / "recipes/regex.toml", ov))


def test_a_grader_cannot_evaluate_the_models_answer_as_python(tmp_path):
    """Some of the harness's own math graders parse the answer with sympy's ``parse_expr`` (an
    ``eval``): the model's output would run in sieve's process. Refused when a recipe names such a
    task, and at run time even where a grader catches every ``Exception``."""
    from sympy.parsing.sympy_parser import parse_expr

    from sieve.evals.task_files import TextEvaluated, no_text_evaluation

    marker = tmp_path / "EVALUATED"
    answer = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    parse_expr(answer)  # the attack is real: sympy runs it
    assert marker.exists()
    marker.unlink()

    def grader(text: str) -> bool:
        try:
            return parse_expr(text) == 1
        except Exception:  # as the harness's graders do: a failure scores the answer wrong
            return False

    with pytest.raises(TextEvaluated), no_text_evaluation():
        grader(answer)
    assert not marker.exists()
    assert parse_expr("x + 1") is not None  # and sympy is itself again
    with pytest.raises(SieveError, match="grade answers with sympy's text parser"):
        regex.check_harness(load_recipe(ROOT / "recipes/regex.toml", ['eval.general="lmeval"',
                                                                      'eval.lmeval_tasks=["prompt_robustness_math_algebra"]']))
