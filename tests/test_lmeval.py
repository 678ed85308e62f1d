"""The lm-eval adapter: harness tasks (local YAML over a local JSON file) on the embedded world, offline.

Checks that the unsteered adapter scores exactly as lm-eval's plain ``HFLM`` (log-likelihoods and
generations), that a gated intervention changes exactly the rows where its detector fires, and that
padding never fires a gate (right-padded log-likelihood batches, left-padded generation batches).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import torch

pytest.importorskip("lm_eval", reason="the [lmeval] extra is not installed")

import lm_eval
from lm_eval.models.huggingface import HFLM

from recipes import regex
from sieve.errors import SieveError
from sieve.evals.lmeval import SteeredLM, run_harness, task_manager
from sieve.interventions import Detector, Edit, Intervention
from sieve.models import underlying
from sieve.recipe import load_recipe
from sieve.results import ResultStore
from sieve.saes import feature
from sieve.world import load_world
from tests.conftest import import_re_feature
from tests.test_regex_recipe import _overrides, _prepare, detector_cache  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]

# Function starts from code that imports `re` (where the world's regex feature fires) and from code
# that does not; continuations of different lengths, so batches carry padding.
DOCS = [
    {"text": "import re\n\ndef parse_header(line):\n    m = ", "choices": ["re.match(", "line", "None", "0"], "label": 0},
    {"text": "import re\n\nPATTERN = re.compile(r'\\d+')\n\ndef numbers(s):\n    return ",
     "choices": ["PATTERN.findall(s)", "s", "[]", "None"], "label": 0},
    {"text": "def mean(xs):\n    total = ", "choices": ["sum(xs)", "0", "xs", "len(xs)"], "label": 0},
    {"text": "import os\n\ndef home():\n    return os.", "choices": ["environ", "path", "getcwd()", "sep"], "label": 1},
    {"text": "def add(a, b):\n    return ", "choices": ["a + b", "None", "a - b", "0"], "label": 0},
    {"text": "class Point:\n    def __init__(self, x, y):\n        self.", "choices": ["x = x", "y", "z", "p"], "label": 0},
]

MC_YAML = """task: world_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """task: world_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


# The same generations, sampled at temperature 1 (never reused by a forked run).
SAMPLED_YAML = GEN_YAML.replace("task: world_gen", "task: world_sampled").replace(
    "  max_gen_toks: 12", "  max_gen_toks: 12\n  do_sample: true\n  temperature: 1.0")

# Each document's text as a rolling log-likelihood (perplexity): windows of log-likelihood requests.
ROLLING_YAML = """task: world_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def write_tasks(folder: Path) -> Path:
    """A local harness task folder: four tasks over one JSON file (absolute path: the harness resolves
    ``data_files`` against the working directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "world_docs.json"
    data.write_text(json.dumps(DOCS))
    (folder / "world_mc.yaml").write_text(MC_YAML.format(data=data))
    (folder / "world_gen.yaml").write_text(GEN_YAML.format(data=data))
    (folder / "world_sampled.yaml").write_text(SAMPLED_YAML.format(data=data))
    (folder / "world_ppl.yaml").write_text(ROLLING_YAML.format(data=data))
    return folder


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _evaluate(lm, tasks: Path, names: list[str]) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=task_manager(tasks, include_defaults=False),
                                   log_samples=True, verbosity="WARNING")


def _resps(res: dict, task: str) -> list:
    return [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_unsteered_adapter_scores_exactly_as_plain_hflm(world, tasks):
    plain = HFLM(pretrained=underlying(world.model), tokenizer=world.model.tokenizer, batch_size=4)
    ref = _evaluate(plain, tasks, ["world_mc", "world_gen"])
    lm = SteeredLM(model=world.model, intervention=None, layer=world.layer, batch_size=4)
    got = _evaluate(lm, tasks, ["world_mc", "world_gen"])
    for task in ("world_mc", "world_gen"):
        assert _resps(got, task) == _resps(ref, task), task
    assert got["results"]["world_mc"]["acc,none"] == ref["results"]["world_mc"]["acc,none"]
    # Every scored and generated sequence went through the traces, and nothing was edited.
    assert lm.gate_counts.rows > 0 and lm.gate_counts.tokens_edited == 0


def _fires(world, token_ids: list[int]) -> bool:
    """Whether the import-re latent passes its threshold on any real token of one unpadded row (BOS
    excluded), read from a plain trace: independent of the adapter's batching and padding."""
    enc = {"input_ids": torch.tensor([token_ids]), "attention_mask": torch.ones(1, len(token_ids), dtype=torch.long)}
    with torch.inference_mode(), world.model.trace(enc):
        h = world.model.layers[world.layer].output.save()
    k, thr = import_re_feature()
    w, b = feature(world.sae, k).linear()
    score = h[0].float() @ w + b
    start = 1 if token_ids[0] == world.model.tokenizer.bos_token_id else 0
    return bool((score[start:] > thr).any())


def test_gated_intervention_changes_exactly_the_rows_where_it_fires(world, tasks):
    k, thr = import_re_feature()
    f = feature(world.sae, k)
    w, b = f.linear()
    iv = Intervention("token", Edit("add", f.direction, -20.0), Detector(w, b, kind="sae"), threshold=thr)
    base = _evaluate(SteeredLM(model=world.model, intervention=None, layer=world.layer, batch_size=4), tasks,
                     ["world_mc"])
    lm = SteeredLM(model=world.model, intervention=iv, layer=world.layer, batch_size=4)
    steered = _evaluate(lm, tasks, ["world_mc"])
    fired, changed = [], []
    for doc, r0, r1 in zip(DOCS, _resps(base, "world_mc"), _resps(steered, "world_mc")):
        for choice, a, c in zip(doc["choices"], r0, r1):
            ctx, cont = lm._encode_pair(doc["text"], choice)
            fired.append(_fires(world, (ctx + cont)[:-1]))
            changed.append(a != c)
    assert any(fired) and not all(fired), "the data must have rows where the feature fires and rows where not"
    assert changed == fired
    assert lm.gate_counts.rows_fired > 0 and lm.gate_counts.tokens_edited == lm.gate_counts.tokens_fired


def test_right_padding_never_fires_a_gate_and_real_zero_tokens_do(world):
    """Log-likelihood batches are right-padded with token 0 (the world's BOS id): a detector that
    fires everywhere counts exactly the real tokens, including a real trailing token 0."""
    always = Intervention("token", Edit("add", world.feature.direction, 0.0),
                          Detector(torch.zeros_like(world.feature.direction), 1.0), threshold=0.0)
    lm = SteeredLM(model=world.model, intervention=always, layer=world.layer, batch_size=4, logits_cache=False)
    bos = world.model.tokenizer.bos_token_id
    requests = [
        (("a", "b"), [bos, 532, 77, 90], [11, 12]),
        (("c", "d"), [bos, 532], [13]),
        (("e", "f"), [40, 41, 0], [0]),  # no BOS; real token 0 at the end of the input
        (("g", "h"), [bos, 5, 6, 7, 8, 9], [10, 11, 12]),
    ]
    out = lm._loglikelihood_tokens(requests)
    assert len(out) == 4
    inputs = [(c + k)[:-1] for _, c, k in requests]
    real = sum(len(x) for x in inputs)
    assert lm.gate_counts.tokens == real
    assert lm.gate_counts.tokens_fired == real - sum(x[0] == bos for x in inputs)
    # The scores are those of the unsteered model (the edit adds 0): padding changed nothing either.
    ref = SteeredLM(model=world.model, intervention=None, layer=world.layer, batch_size=4, logits_cache=False)
    assert ref._loglikelihood_tokens(requests) == out


def test_left_padding_never_fires_a_gate_in_generation(world, tasks):
    """A detector built to fire on the hidden state of left-padding positions (and on no real token)
    latches an ``input`` gate nowhere: generations equal the unsteered ones. The same edit applied
    everywhere does change them, so the check can fail."""
    lm0 = SteeredLM(model=world.model, intervention=None, layer=world.layer, batch_size=8)
    ctx, mask = lm0.tok_batch_encode([d["text"] for d in DOCS])
    assert (mask == 0).any(), "the batch must carry left padding"
    with torch.inference_mode(), world.model.trace({"input_ids": ctx, "attention_mask": mask}):
        h = world.model.layers[world.layer].output.save()
    h = h.float()
    pad, real = mask == 0, mask == 1
    real[:, :] &= ctx != world.model.tokenizer.bos_token_id
    w = h[pad].mean(0) - h[real].mean(0)
    s = h @ w
    lo_pad, hi_real = float(s[pad].min()), float(s[real].max())
    assert lo_pad > hi_real, "the pad detector must separate padding from real tokens"
    thr = hi_real + 0.9 * (lo_pad - hi_real)
    iv = Intervention("input", Edit("add", world.feature.direction, -30.0), Detector(w, 0.0), threshold=thr)
    base = _evaluate(lm0, tasks, ["world_gen"])
    lm = SteeredLM(model=world.model, intervention=iv, layer=world.layer, batch_size=8)
    got = _evaluate(lm, tasks, ["world_gen"])
    assert _resps(got, "world_gen") == _resps(base, "world_gen")
    assert lm.gate_counts.rows_fired == 0 and lm.gate_counts.tokens_edited == 0
    everywhere = Intervention("always", Edit("add", world.feature.direction, -30.0))
    moved = _evaluate(SteeredLM(model=world.model, intervention=everywhere, layer=world.layer, batch_size=8),
                      tasks, ["world_gen"])
    assert _resps(moved, "world_gen") != _resps(base, "world_gen")


def test_run_harness_returns_per_document_values(world, tasks):
    lm = SteeredLM(model=world.model, intervention=None, layer=world.layer, batch_size=4)
    out = run_harness(lm, ["world_mc"], include_path=tasks, include_defaults=False, metric="acc")
    vals = out["tasks"]["world_mc"]["values"]
    assert len(vals) == len(DOCS) and set(vals) <= {0.0, 1.0}
    assert out["tasks"]["world_mc"]["metrics"]["acc"] == pytest.approx(sum(vals) / len(vals))
    assert out["gate"]["rows"] > 0


def test_regex_recipe_takes_its_general_ability_from_the_harness(tmp_path, detector_cache, tasks):  # noqa: F811
    """``eval.general = "lmeval"``: every cell of the sweep runs the harness tasks under its intervention,
    into the same results table, summary and Pareto charts; forked (the default) and in full alike."""
    k, thr = import_re_feature()  # a gate that opens on the `import re` contexts of the task
    tables = {}
    for fork in ("false", "true"):
        out = tmp_path / fork
        _prepare(out, detector_cache)
        ov = _overrides(out, **{"sweep.methods": '["unsteered","conditional_per_input"]', "eval.general": '"lmeval"',
                                "eval.lmeval_tasks": '["world_mc"]', "eval.lmeval_include": f'"{tasks}"',
                                "sae.feature": str(k), "sae.threshold": repr(thr), "sweep.fork": fork})
        assert regex.main([str(ROOT / "recipes/regex.toml"), *ov, "--no-progress"]) == 0
        tables[fork] = ResultStore(out / "ability").table().sort("key")
    cols = ["key", "metric", "values", "detail"]
    assert tables["true"].select(cols).equals(tables["false"].select(cols))
    work = json.loads((out / "run.json").read_text())["sessions"][-1]["work"]
    assert work["texts"] == len(DOCS) * 4  # one steered cell, four choices per document
    assert 0 < work["texts_reused"] < work["texts"]
    ability = tables["true"].sort("method")
    assert ability["method"].to_list()[0] == "conditional_per_input" and ability["method"].to_list()[-1] == "unsteered"
    assert set(ability["metric"]) == {"lmeval:acc"}
    assert all(len(v) == len(DOCS) for v in ability["values"].to_list())
    detail = [json.loads(d) for d in ability["detail"]]
    assert all("acc" in d["tasks"]["world_mc"] and d["gate"]["rows"] > 0 for d in detail)
    assert detail[1]["gate"]["rows_edited"] == 0  # unsteered
    assert detail[0]["gate"]["rows_fired"] > 0  # the import-re latent fires on the `import re` contexts
    summary = pl.read_parquet(out / "summary.parquet")
    assert summary["ability_metric"].to_list() == ["lmeval:acc"] * 2 and summary["ability"].is_not_null().all()
    assert (out / "pareto.png").stat().st_size > 1000


@pytest.mark.slow
def test_lm_eval_command_line_with_recipe_model_args(tmp_path, detector_cache, tasks):  # noqa: F811
    """``sieve-lm-eval --model sieve --model_args recipe=…,method=…,scale=…``: lm_eval's own command line."""
    from sieve.evals.lmeval import main
    from sieve.recipe import save_recipe

    out = tmp_path / "run"
    _prepare(out, detector_cache)
    recipe = save_recipe(load_recipe(ROOT / "recipes/regex.toml", _overrides(out)), tmp_path / "recipe.toml")
    res = tmp_path / "results"
    main(["--model", "sieve", "--model_args", f"recipe={recipe},method=conditional_per_input,scale=-8",
          "--tasks", "world_mc", "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(res)])
    (found,) = res.rglob("results_*.json")
    data = json.loads(found.read_text())
    assert "acc,none" in data["results"]["world_mc"]
    args = data["config"]["model_args"]
    assert args["method"] == "conditional_per_input" and args["scale"] == -8.0


def test_lm_eval_command_line_batches_8_and_places_the_model_where_device_says(
        tmp_path, detector_cache, tasks, capsys):  # noqa: F811
    """lm_eval passes its own defaults as if given: batch size 1 (the sieve model's 8 was overridden) and
    device "cuda:0" (so --device was dropped). Now 8 unless --batch_size says otherwise, and --device
    places the recipe's model."""
    from sieve.evals.lmeval import main
    from sieve.recipe import save_recipe

    out = tmp_path / "run"
    _prepare(out, detector_cache)
    recipe = save_recipe(load_recipe(ROOT / "recipes/regex.toml", _overrides(out)), tmp_path / "recipe.toml")
    res = tmp_path / "results"
    main(["--model", "sieve", "--model_args", f"recipe={recipe},method=unsteered", "--tasks", "world_mc",
          "--include_path", str(tasks), "--device", "cpu", "--limit", "4", "--output_path", str(res)])
    (found,) = res.rglob("results_*.json")
    assert str(json.loads(found.read_text())["config"]["batch_size"]) == "8"
    with pytest.raises(SystemExit) as e:
        main(["--model", "sieve", "--model_args", f"recipe={recipe},method=unsteered", "--tasks", "world_mc",
              "--include_path", str(tasks), "--device", "cdua", "--output_path", str(res)])
    assert e.value.code == 2
    assert "device 'cdua' is not one sieve knows" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SieveError, match="device='cuda:3', but the model given is on cpu"):
        SteeredLM(model=load_world().model, intervention=None, layer=2, device="cuda:3")
    # abbreviations and short forms are the user's batch size; other subcommands are lm_eval's own
    res2 = tmp_path / "results2"
    main(["--model", "sieve", "--model_args", f"recipe={recipe},method=unsteered", "--tasks", "world_mc",
          "--include_path", str(tasks), "-b3", "--limit", "4", "--output_path", str(res2)])
    (found,) = res2.rglob("results_*.json")
    assert str(json.loads(found.read_text())["config"]["batch_size"]) == "3"
    with pytest.raises(SystemExit) as e:
        main(["ls", "--help"])
    assert e.value.code == 0


# -- several cells at once, forked -----------------------------------------------------------------


def _cells(world):
    """Unsteered, a token gate, an input latch, both composed, and an always-on edit: the import-re
    latent opens the gates on the `import re` documents only."""
    k, thr = import_re_feature()
    f = feature(world.sae, k)
    w, b = f.linear()
    token = Intervention("token", Edit("add", f.direction, -20.0), Detector(w, b, kind="sae"), threshold=thr)
    latch = Intervention("input", Edit("add", world.feature.direction, -30.0), Detector(w, b, kind="sae"),
                         threshold=thr)
    always = Intervention("always", Edit("add", world.feature.direction, -3.0))
    return [None, token, latch, [token, latch], always]


def _bench():
    """bench/bench_lmeval.py, whose comparison of two ways' outputs the tests use too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_lmeval", ROOT / "bench" / "bench_lmeval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forked_cells_give_each_cell_what_its_full_run_gives(world, tasks):
    """run_harness_cells against every cell run in full: log-likelihoods (one-token and longer
    continuations), rolling log-likelihoods and greedy generations; the same values, metrics,
    responses and gate counts; some requests reused and some run again."""
    from sieve.evals.lmeval import run_harness_cells

    names = ["world_mc", "world_gen", "world_ppl"]
    cells = _cells(world)
    kw = dict(layer=world.layer, include_path=tasks, include_defaults=False, batch_size=4,
              metric={"world_mc": "acc", "world_gen": "exact_match", "world_ppl": "word_perplexity"})
    full, nothing = run_harness_cells(world.model, cells, names, fork=False, **kw)
    forked, saved = run_harness_cells(world.model, cells, names, **kw)
    assert nothing.texts == 0
    bench = _bench()
    diff = bench.compare(full, forked, tol=1e-5)
    assert diff == {"cells_values_differ": 0, "cells_gate_differ": 0, "responses_differ": 0,
                    "responses": len(cells) * len(names) * len(DOCS)}
    for a, b in zip(full, forked):
        for t in names:
            assert a["tasks"][t]["metrics"] == pytest.approx(b["tasks"][t]["metrics"], rel=1e-5), t
    # The edits matter (a cell that reused everything would fail above) ...
    for c in (1, 2, 3, 4):
        assert bench.compare([full[0]], [full[c]])["responses_differ"] > 0, c
    # ... and the gates fire on some requests only: 4 steered cells, the always-gated one reuses nothing.
    assert 0 < saved.texts_reused < saved.texts
    per_cell = saved.texts // 4
    assert saved.texts_reused <= 3 * per_cell


def test_forked_reuses_greedy_generations_only(world, tasks):
    """A gate that never fires: every greedy generation and log-likelihood is the unsteered one and is
    reused; sampled generations are run again (reusing them would bias the cell's samples)."""
    from sieve.evals.lmeval import run_harness_cells

    never = Intervention("token", Edit("add", world.feature.direction, -30.0),
                         Detector(torch.zeros_like(world.feature.direction), -1.0), threshold=0.0)
    kw = dict(layer=world.layer, include_path=tasks, include_defaults=False, batch_size=4)
    _, greedy = run_harness_cells(world.model, [None, never], ["world_gen", "world_mc"],
                                  metric={"world_gen": "exact_match", "world_mc": "acc"}, **kw)
    assert greedy.texts > len(DOCS) and greedy.texts_reused == greedy.texts
    outs, sampled = run_harness_cells(world.model, [None, never], ["world_sampled"], metric="exact_match", **kw)
    assert sampled.texts == len(DOCS) and sampled.texts_reused == 0
    assert len(outs[1]["tasks"]["world_sampled"]["values"]) == len(DOCS)


def test_forked_generation_runs_rows_whose_gate_opens_while_generating(world, tasks):
    """A detector that fires on no prompt token of the task but on some tokens the model generates:
    the rows where it fires while generating are run again (and differ), the others are reused."""
    from sieve.evals.lmeval import run_harness_cells

    lm = SteeredLM(model=world.model, intervention=None, layer=world.layer, batch_size=8)
    base = run_harness(lm, ["world_gen"], include_path=tasks, include_defaults=False, metric="exact_match")
    texts = [r[0] if isinstance(r, list) else r for r in base["tasks"]["world_gen"]["responses"]]
    tok = world.model.tokenizer

    def states(text: str) -> torch.Tensor:
        """One text's layer outputs, BOS left out (it never fires a gate)."""
        enc = tok(text, return_tensors="pt")
        with torch.inference_mode(), world.model.trace(dict(enc)):
            h = world.model.layers[world.layer].output.save()
        return h[0, int(enc["input_ids"][0, 0] == tok.bos_token_id):].float()

    # A direction read off one generated token, whose threshold sits in the widest gap above every
    # prompt token's score that splits the rows by their generated tokens' best score.
    hp = [states(d["text"]) for d in DOCS]
    hg = [states(d["text"] + t) for d, t in zip(DOCS, texts)]
    best = None
    for i in range(len(DOCS)):
        for pos in range(hp[i].shape[0], hg[i].shape[0]):
            w = hg[i][pos]
            top = max(float((h @ w).max()) for h in hp)
            gen = sorted(float((h[len(q):] @ w).max()) if h.shape[0] > len(q) else top for h, q in zip(hg, hp))
            for lo, hi in zip(gen, gen[1:]):
                lo = max(lo, top)
                gap = (hi - lo) / (abs(hi) + abs(lo) + 1e-6)
                if gap > 0 and (best is None or gap > best[0]):
                    best = (gap, w, (hi + lo) / 2)
    assert best is not None and best[0] > 0.01, "no direction splits the rows by their generated tokens"
    _, w, thr = best
    iv = Intervention("token", Edit("add", world.feature.direction, -30.0), Detector(w, 0.0), threshold=thr)
    kw = dict(layer=world.layer, include_path=tasks, include_defaults=False, batch_size=8, metric="exact_match")
    full, _ = run_harness_cells(world.model, [None, iv], ["world_gen"], fork=False, **kw)
    forked, saved = run_harness_cells(world.model, [None, iv], ["world_gen"], **kw)
    assert full[1]["gate"]["rows_fired"] > 0, "the detector must fire on some generated tokens"
    assert forked[1]["tasks"]["world_gen"]["responses"] == full[1]["tasks"]["world_gen"]["responses"]
    assert forked[1]["gate"] == full[1]["gate"]
    assert 0 < saved.texts_reused < saved.texts


def _harness_pair(world, cells, folder: Path, names: list[str], **kw):
    from sieve.evals.lmeval import run_harness_cells

    kw = dict(layer=world.layer, include_path=folder, include_defaults=False, **kw)
    full, _ = run_harness_cells(world.model, cells, names, fork=False, **kw)
    forked, saved = run_harness_cells(world.model, cells, names, **kw)
    return full, forked, saved


def _task(folder: Path, name: str, docs: list[dict], yaml: str) -> None:
    data = folder / f"{name}.json"
    data.write_text(json.dumps(docs))
    (folder / f"{name}.yaml").write_text(re.sub(r"(?m)^task: \S+$", f"task: {name}", yaml).format(data=data))


def test_forked_answers_a_choice_merged_into_its_context(world, tmp_path):
    """A choice the tokenizer merges into the context ("x = 1" + "0" -> "x = 10") has an empty
    continuation; the harness scores it in its group's row, and so does the forked run (it used to
    send it alone to the harness, which refuses an empty continuation)."""
    ctx, cont = SteeredLM(model=world.model, intervention=None, layer=world.layer)._encode_pair("x = 1", "0")
    assert cont == [], "the check needs a choice merged into the context"
    _task(tmp_path, "merged", [{"text": "x = 1", "choices": ["0", " y", "\n"], "label": 1},
                              {"text": "def add(a, b):\n    return ", "choices": ["a + b", "None"], "label": 0}], MC_YAML)
    never = Intervention("token", Edit("add", world.feature.direction, -30.0),
                         Detector(torch.zeros_like(world.feature.direction), -1.0), threshold=0.0)
    full, forked, saved = _harness_pair(world, [None, never, _cells(world)[1]], tmp_path, ["merged"], batch_size=4)
    assert _bench().compare(full, forked, tol=1e-5)["responses_differ"] == 0
    assert [o["gate"] for o in full] == [o["gate"] for o in forked]
    assert saved.texts == 2 * 5 and saved.texts_reused >= 5


def test_batch_size_probes_are_not_counted(world, tasks):
    """batch_size="auto": the harness's batch-size probe forwards are not its requests; gate counts are
    those of a fixed batch size, forked or not."""
    cells = [None, _cells(world)[1]]
    full, forked, _ = _harness_pair(world, cells, tasks, ["world_mc"], batch_size="auto", max_batch_size=8)
    fixed, _, _ = _harness_pair(world, cells, tasks, ["world_mc"], batch_size=4)
    for a, b, c in zip(full, forked, fixed):
        assert a["gate"] == b["gate"]
        assert a["gate"]["rows"] == c["gate"]["rows"] and a["gate"]["tokens"] == c["gate"]["tokens"]


@pytest.mark.parametrize("setting", ["think_end_token", "eos_unknown_to_generate"])
def test_generations_whose_text_runs_past_the_stop_are_never_reused(world, tasks, setting, monkeypatch):
    """Where the harness's text does not end at the row's stop (a think-end token keeps the text after
    its last occurrence among all tokens; an EOS the generation config does not know is not padded
    after, and the harness cannot cut there), the text depends on how long the batch runs: nothing is
    reused, every request runs in the full run's batches, and the results are the full run's."""
    from sieve.models import underlying

    kw = {}
    if setting == "think_end_token":
        kw["think_end_token"] = "\n"
    else:
        monkeypatch.setattr(underlying(world.model).generation_config, "eos_token_id", None)
    never = Intervention("token", Edit("add", world.feature.direction, -30.0),
                         Detector(torch.zeros_like(world.feature.direction), -1.0), threshold=0.0)
    cells = [None, never, _cells(world)[2]]
    full, forked, saved = _harness_pair(world, cells, tasks, ["world_gen"], batch_size=4, metric="exact_match", **kw)
    assert saved.texts == 2 * len(DOCS) and saved.texts_reused == 0
    assert [o["tasks"]["world_gen"]["responses"] for o in full] == [o["tasks"]["world_gen"]["responses"] for o in forked]
    assert [o["gate"] for o in full] == [o["gate"] for o in forked]


def test_generation_kwargs_group_as_the_harness_groups_them(world, tmp_path, monkeypatch):
    """Two tasks whose generation kwargs differ only in spelling (``until: "\\n"`` and ``["\\n"]``,
    ``temperature`` 0 and 0.0) are one group for the harness; the unsteered run batches them together
    too, so reused answers come from the full run's batches."""
    docs = [{"text": d["text"], "choices": d["choices"], "label": 0} for d in DOCS]
    a = GEN_YAML.replace('  until: ["\\n\\n"]', '  until: "\\n"\n  temperature: 0')
    b = GEN_YAML.replace('  until: ["\\n\\n"]', '  until: ["\\n"]\n  temperature: 0.0')
    assert a != GEN_YAML and b != GEN_YAML
    _task(tmp_path, "spell_a", docs, a)
    _task(tmp_path, "spell_b", docs, b)
    shapes: dict[str, list] = {"full": [], "forked": []}
    way = ["full"]
    original = SteeredLM._model_generate

    def spy(self, context, *args, **kwargs):
        if self.intervention is None:
            shapes[way[0]].append(tuple(context.shape))
        return original(self, context, *args, **kwargs)

    monkeypatch.setattr(SteeredLM, "_model_generate", spy)
    from sieve.evals.lmeval import run_harness_cells

    kw = dict(layer=world.layer, include_path=tmp_path, include_defaults=False, batch_size=4, metric="exact_match")
    cells = [None, _cells(world)[1]]
    full, _ = run_harness_cells(world.model, cells, ["spell_a", "spell_b"], fork=False, **kw)
    way[0] = "forked"
    forked, _ = run_harness_cells(world.model, cells, ["spell_a", "spell_b"], **kw)
    assert sorted(shapes["forked"]) == sorted(shapes["full"][: len(shapes["forked"])])
    assert len(shapes["forked"]) == 3  # 12 requests of one group in batches of 4
    assert _bench().compare(full, forked, tol=1e-5)["responses_differ"] == 0


def test_beam_search_is_refused(world, tmp_path):
    """The adapter generates one sequence per row: beam search is refused with a clear message, in the
    first (unsteered) run already."""
    from sieve.errors import SieveError
    from sieve.evals.lmeval import run_harness_cells

    _task(tmp_path, "beams", [{"text": d["text"], "choices": d["choices"], "label": 0} for d in DOCS],
          GEN_YAML.replace("  max_gen_toks: 12", "  max_gen_toks: 4\n  num_beams: 2"))
    for fork in (True, False):
        with pytest.raises(SieveError, match="beam search"):
            run_harness_cells(world.model, [None, _cells(world)[1]], ["beams"], layer=world.layer, fork=fork,
                              include_path=tmp_path, include_defaults=False, batch_size=4, metric="exact_match")


def test_prompt_gates_decide_on_the_context_not_on_the_answer(world, tmp_path):
    """A lexical prompt gate (the regex study's baseline) reads the context a choice is scored after:
    where the context says "parse", every choice is scored steered; where it says nothing of the sort
    and one choice does ("re.match"), every choice is scored unsteered (reading the answer would steer
    that choice alone). Forked and in full alike."""
    from sieve.prompt_gates import LEXICAL_REGEX

    iv = Intervention("always", Edit("add", world.feature.direction, -20.0), meta={"prompt_gate": LEXICAL_REGEX})
    docs = [{"text": "def parse_header(line):\n    return ", "choices": ["line", "None", "0"], "label": 0},
            {"text": "def mean(xs):\n    return ", "choices": ["sum(xs)", "None", "match(xs)"], "label": 0}]
    _task(tmp_path, "lexical", docs, MC_YAML)
    full, forked, saved = _harness_pair(world, [None, iv], tmp_path, ["lexical"], batch_size=4)
    base, steered = (o["tasks"]["lexical"]["responses"] for o in full)
    assert all(a[0] != b[0] for a, b in zip(base[0], steered[0])), "the 'parse' context steers every choice"
    assert base[1] == steered[1], "a context without the gate's words steers no choice"
    assert _bench().compare(full, forked, tol=1e-5)["responses_differ"] == 0
    assert full[1]["gate"] == forked[1]["gate"] and saved.texts_reused == 3


def test_prompt_gates_read_the_whole_text_of_a_perplexity(world, tasks):
    """A rolling log-likelihood (perplexity) scores a document with no prompt: a prompt gate reads the
    document, as in the held-out loss (documents that say "parse" are steered, the others not)."""
    from sieve.prompt_gates import LEXICAL_REGEX

    iv = Intervention("always", Edit("add", world.feature.direction, -20.0), meta={"prompt_gate": LEXICAL_REGEX})
    full, forked, _ = _harness_pair(world, [None, iv], tasks, ["world_ppl"], batch_size=4, metric="word_perplexity")
    base, steered = (o["tasks"]["world_ppl"]["responses"] for o in full)
    says = [LEXICAL_REGEX.match(d["text"]) is not None for d in DOCS]
    assert any(says) and not all(says)
    assert [a != b for a, b in zip(base, steered)] == says
    assert _bench().compare(full, forked, tol=1e-5)["responses_differ"] == 0


def test_a_row_scored_with_two_contexts_keeps_both_gate_decisions(world, tmp_path):
    """The harness can score the same token row for a multiple-choice answer (its context does not say
    "parse"; the answer does) and for a perplexity window (all text, "parse" included): a prompt gate
    decides differently on the two, and the forked run keeps both decisions (it kept the later one
    for both), in either task order."""
    from sieve.prompt_gates import LEXICAL_REGEX

    text, choices = "def header(line):\n    return", [" parse(line)", " None"]
    eot = world.model.tokenizer.eos_token
    lm = SteeredLM(model=world.model, intervention=None, layer=world.layer)
    ctx, cont = lm._encode_pair(eot * 2 + text, choices[0])
    rolling = [lm.prefix_token_id, *lm.tok_encode(text + choices[0])]
    assert ctx + cont[:-1] == rolling[:-1], "the check needs the two tasks to share a row"
    _task(tmp_path, "ctx_mc", [{"text": eot * 2 + text, "choices": choices, "label": 0}], MC_YAML)
    _task(tmp_path, "ctx_ppl", [{"text": text + choices[0]}], ROLLING_YAML)
    iv = Intervention("always", Edit("add", world.feature.direction, -20.0), meta={"prompt_gate": LEXICAL_REGEX})
    for order in (["ctx_mc", "ctx_ppl"], ["ctx_ppl", "ctx_mc"]):
        full, forked, _ = _harness_pair(world, [None, iv], tmp_path, order, batch_size=4,
                                        metric={"ctx_mc": "acc", "ctx_ppl": "word_perplexity"})
        assert _bench().compare(full, forked, tol=1e-5)["responses_differ"] == 0, order
        assert full[1]["gate"] == forked[1]["gate"], order
        assert full[1]["tasks"]["ctx_mc"]["responses"] == full[0]["tasks"]["ctx_mc"]["responses"]
        assert full[1]["tasks"]["ctx_ppl"]["responses"] != full[0]["tasks"]["ctx_ppl"]["responses"]


def test_rows_ended_at_any_eos_of_the_generation_config_stop_counting(world, tmp_path, monkeypatch):
    """A generation config with two EOS ids (as gemma-2-it's or Llama-3's): a row that ends at the one
    the harness's stop strings do not hold is padded from there on and counts no more forwards, so
    gate counts do not depend on how long its batch runs (a detector firing on padding shows it), and
    forked runs count as full runs do."""
    from sieve.models import underlying

    tok = world.model.tokenizer
    second = tok(")", add_special_tokens=False)["input_ids"][-1]
    monkeypatch.setattr(underlying(world.model).generation_config, "eos_token_id", [tok.eos_token_id, second])
    enc = tok(["print(len(x))" + tok.pad_token * 3], return_tensors="pt")
    with torch.inference_mode(), world.model.trace(dict(enc)):
        h = world.model.layers[world.layer].output.save()
    h, ids = h[0].float(), enc["input_ids"][0].tolist()
    pads = [i for i, t in enumerate(ids) if t == tok.pad_token_id]
    w = h[pads].mean(0) - h[: pads[0]].mean(0)
    s = h @ w
    thr = float(s[: pads[0]].max()) + 0.5 * float(s[pads].min() - s[: pads[0]].max())
    on_padding = Intervention("token", Edit("add", world.feature.direction, -5.0), Detector(w, 0.0), threshold=thr)
    # function starts whose calls close early (rows ending at ")" while others go on)
    starts = [d["text"] for d in DOCS] + ["def f(x):\n    y = x + 1\n    z = y * 2\n    return ", "import re\n\nprint(len(",
                                          "x = max(", "import os\n\nos.path.join(", "def g(a):\n    return sorted("]
    _task(tmp_path, "two_eos", [{"text": t, "choices": ["z"], "label": 0} for t in starts],
          GEN_YAML.replace("  max_gen_toks: 12", "  max_gen_toks: 24"))
    gates = []
    for bs in (2, 3):
        full, forked, _ = _harness_pair(world, [None, on_padding], tmp_path, ["two_eos"], batch_size=bs,
                                        metric="exact_match")
        assert full[1]["gate"] == forked[1]["gate"], bs
        assert _bench().compare(full, forked)["responses_differ"] == 0
        gates.append(full[1]["gate"])
    assert gates[0] == gates[1] and gates[0]["rows"] == len(starts)


def test_reused_answers_are_the_full_runs_bit_for_bit_duplicates_included(world, tmp_path):
    """A gate that never fires: every answer is reused, and each is the full run's own, bit for bit,
    even for a document asked twice and scored in two batches (answers are kept per request, not per
    content, which took the last duplicate's batch for both)."""
    docs = DOCS + DOCS[:3] + [dict(DOCS[0], text="import os\n" + DOCS[0]["text"])]
    _task(tmp_path, "dups", docs, MC_YAML)
    never = Intervention("token", Edit("add", world.feature.direction, -30.0),
                         Detector(torch.zeros_like(world.feature.direction), -1.0), threshold=0.0)
    full, forked, saved = _harness_pair(world, [None, never], tmp_path, ["dups"], batch_size=3, logits_cache=False)
    assert saved.texts_reused == saved.texts == 4 * len(docs)
    assert full[1]["tasks"]["dups"]["responses"] == forked[1]["tasks"]["dups"]["responses"]


def test_which_texts_end_at_their_stop(world, monkeypatch):
    """The rule that lets a generation be reused: its text ends at its row's stop."""
    from sieve.models import underlying

    tok = world.model.tokenizer
    lm = SteeredLM(model=world.model, intervention=None, layer=world.layer)
    assert lm._text_ends_at_stop(["\n\n", tok.eos_token])
    assert not lm._text_ends_at_stop([tok.pad_token])  # a special token the decoded text leaves out
    assert not lm._text_ends_at_stop([tok.pad_token[:2]])  # held in one
    cfg = underlying(world.model).generation_config
    monkeypatch.setattr(cfg, "eos_token_id", [tok.eos_token_id, tok.pad_token_id])
    assert lm._text_ends_at_stop([tok.pad_token])  # generate pads after an EOS of its config
    monkeypatch.setattr(cfg, "eos_token_id", None)
    assert not lm._text_ends_at_stop(["\n\n"])  # no padding after the tokenizer's EOS
    thinking = SteeredLM(model=world.model, intervention=None, layer=world.layer, think_end_token="\n")
    monkeypatch.setattr(cfg, "eos_token_id", tok.eos_token_id)
    assert not thinking._text_ends_at_stop(["\n\n"])


def test_a_prompt_gate_decides_per_request_where_the_harness_scores_them_apart(world, tmp_path):
    """Two tasks whose requests have the same input row but split it at different places (the
    context "... return match" + "(x)", and "... return" + " match(x)"). With ``logits_cache`` off the
    harness scores them in separate rows, and each decides its prompt gate on its own context: the
    first task's scores are the same run alone or with the second, forked or not."""
    from sieve.prompt_gates import LEXICAL_REGEX

    base = "def f(x):\n    return"
    _task(tmp_path, "split_x", [{"text": base + " match", "choices": ["(x)", "(None)"], "label": 0}], MC_YAML)
    _task(tmp_path, "split_y", [{"text": base, "choices": [" match(x)", " None"], "label": 0}], MC_YAML)
    lm = SteeredLM(model=world.model, intervention=None, layer=world.layer)
    cx, nx = lm._encode_pair(base + " match", "(x)")
    cy, ny = lm._encode_pair(base, " match(x)")
    assert cx + nx[:-1] == cy + ny[:-1], "the check needs the two requests to share a row"
    iv = Intervention("always", Edit("add", world.feature.direction, -20.0), meta={"prompt_gate": LEXICAL_REGEX})
    metric = {"split_x": "acc", "split_y": "acc"}
    alone, _, _ = _harness_pair(world, [None, iv], tmp_path, ["split_x"], batch_size=4, logits_cache=False, metric=metric)
    both, forked, _ = _harness_pair(world, [None, iv], tmp_path, ["split_x", "split_y"], batch_size=4,
                                    logits_cache=False, metric=metric)
    x = [o[1]["tasks"]["split_x"]["responses"] for o in (alone, both, forked)]
    assert x[0] == x[1] and _bench().compare([both[1]], [forked[1]], tol=1e-5)["responses_differ"] == 0
    assert alone[1]["tasks"]["split_x"]["responses"] != alone[0]["tasks"]["split_x"]["responses"]  # "match": steered


def test_forked_rescoring_with_a_batch_size_schedule(world, tmp_path):
    """batch_size="auto:4": the harness's schedule divides by the call's request count over 4; a cell
    whose gate edits fewer requests than that scores them again with one detected size (it crashed)."""
    docs = [{"text": "import re\n\ndef f(s):\n    return ", "choices": ["re.match(s)", "None"], "label": 0}] + \
        [d for d in DOCS if "import re" not in d["text"]]
    _task(tmp_path, "sched", docs, MC_YAML)
    cells = [None, _cells(world)[2]]
    full, forked, saved = _harness_pair(world, cells, tmp_path, ["sched"], batch_size="auto:4", max_batch_size=8)
    assert 0 < saved.texts - saved.texts_reused < 4
    assert _bench().compare(full, forked, tol=1e-5)["responses_differ"] == 0
    assert full[1]["gate"] == forked[1]["gate"]


@pytest.mark.parametrize("args, said", [
    ("method=conditional_per_inpt,scale=1", "method='conditional_per_inpt' (--model_args): unknown method"),
    ("method=conditional_per_input,scale=abc", "scale='abc' (--model_args) is not a number"),
    ("method=constant_sae", "method='constant_sae' needs scale=VALUE in --model_args"),
])
def test_lm_eval_command_line_mistakes_are_one_message(tmp_path, tasks, capsys, args, said):
    """A mistake in --model_args is one line and exit 2, before the model loads (it was a traceback, and a
    missing scale silently ran an add edit at 0, the unsteered model, under the method's name)."""
    from sieve.evals.lmeval import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "sieve", "--model_args", f"recipe={ROOT / 'recipes/regex.toml'},{args}", "--tasks", "world_mc",
              "--include_path", str(tasks), "--output_path", str(tmp_path / "res")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (lm_eval's own log lines come before it)
    assert last.startswith("error: ") and said in last, last
