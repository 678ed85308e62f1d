"""The lm-eval adapter: harness tasks (local YAML over a local JSON file) on the embedded world, offline.

Checks that the unsteered adapter scores exactly as lm-eval's plain ``HFLM`` (log-likelihoods and
generations), that a gated intervention changes exactly the rows where its detector fires, and that
padding never fires a gate (right-padded log-likelihood batches, left-padded generation batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

pytest.importorskip("lm_eval", reason="the [lmeval] extra is not installed")

import lm_eval
from lm_eval.models.huggingface import HFLM

from recipes import regex
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


def write_tasks(folder: Path) -> Path:
    """A local harness task folder: two tasks over one JSON file (absolute path: the harness resolves
    ``data_files`` against the working directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "world_docs.json"
    data.write_text(json.dumps(DOCS))
    (folder / "world_mc.yaml").write_text(MC_YAML.format(data=data))
    (folder / "world_gen.yaml").write_text(GEN_YAML.format(data=data))
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
    into the same results table, summary and Pareto charts."""
    out = tmp_path / "run"
    _prepare(out, detector_cache)
    k, thr = import_re_feature()  # a gate that opens on the `import re` contexts of the task
    ov = _overrides(out, **{"sweep.methods": '["unsteered","conditional_per_input"]', "eval.general": '"lmeval"',
                            "eval.lmeval_tasks": '["world_mc"]', "eval.lmeval_include": f'"{tasks}"',
                            "sae.feature": str(k), "sae.threshold": repr(thr)})
    assert regex.main([str(ROOT / "recipes/regex.toml"), *ov, "--no-progress"]) == 0
    ability = ResultStore(out / "ability").table().sort("method")
    assert ability["method"].to_list() == ["conditional_per_input", "unsteered"]
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
