"""MMLU scorer against a planted model whose letter logits are known; the detect and mmlu recipes run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from sieve.evals.mmlu import Question, format_question, letter_token_ids, load_questions, mmlu_accuracy
from sieve.interventions import Edit, Intervention
from sieve.models import load_model

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def planted(tiny_dirs):
    """A GPT-2 whose LM head is zero except a bias toward letter 'B', so it always answers B."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_dirs["gpt2"]).eval()
    model = load_model(tiny_dirs["gpt2"])
    tok = model.tokenizer
    letters = letter_token_ids(tok)
    with torch.no_grad():
        head = torch.nn.Linear(hf.config.n_embd, hf.config.vocab_size, bias=True)
        head.weight.zero_()
        head.bias.zero_()
        for i in letters[1]:
            head.bias[i] = 5.0
        hf.lm_head = head
    return load_model(hf, tokenizer=tok), letters


def _questions(answers: list[int]) -> list[Question]:
    return [Question(f"q{i}?", ("w", "x", "y", "z"), a, "toy") for i, a in enumerate(answers)]


def test_planted_model_always_answers_b(planted):
    model, _ = planted
    qs = _questions([1, 1, 0, 2, 1, 3])
    correct = mmlu_accuracy(model, qs, None, layer_index=1, batch_size=4)
    assert correct == [True, True, False, False, True, False]


def test_intervention_changes_the_answer(planted):
    model, letters = planted
    d = model._module.config.n_embd
    # The planted head ignores h, so steering cannot change answers: accuracy is exactly the same.
    iv = Intervention("always", Edit("add", torch.ones(d), 100.0))
    qs = _questions([1, 0, 1])
    assert mmlu_accuracy(model, qs, iv, layer_index=1) == mmlu_accuracy(model, qs, None, layer_index=1)


def test_shots_come_from_dev_rows():
    qs = load_questions(ROOT / "recipes/data/mmlu_fixture.json")
    dev = [q for q in qs if q.split == "dev"]
    text = format_question(qs[0], dev[:1])
    assert text.count("Answer:") == 2 and f"Answer: {'ABCD'[dev[0].answer]}" in text


def test_mmlu_recipe_on_the_fixture(tmp_path, capsys):
    from recipes import mmlu

    ov = ['sweep.methods=["unsteered","constant_sae"]', "sweep.scales.add=[-10.0]", f'output.dir="{tmp_path}"']
    assert mmlu.main([*ov, "--no-progress"]) == 0
    t = pl.read_parquet(tmp_path / "mmlu.parquet")
    assert t.height == 2 and (t["n"] == 24).all()
    assert ((t["lo"] <= t["accuracy"]) & (t["accuracy"] <= t["hi"])).all()
    printed = capsys.readouterr().out
    assert "| family " in printed and "| constant " in printed and "accuracy [95%]" in printed
    assert f"Wrote {tmp_path / 'mmlu.parquet'}" in printed and "shape:" not in printed  # no raw polars frame


def test_detect_recipe_scores_each_detector(tmp_path, capsys):
    from recipes import detect

    ov = ["prompts.regex_limit=8", "prompts.neutral_limit=6", "prompts.code_limit=6"]
    assert detect.main([*ov, "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| detector " in printed and "shape:" not in printed
    assert f"Wrote {tmp_path / 'detect.parquet'}" in printed and str(tmp_path / "detect_pr.png") in printed
    t = pl.read_parquet(tmp_path / "detect.parquet")
    assert set(t["detector"]) == {"sae", "sae_code", "caa", "probe"} and set(t["level"]) == {"token", "text"}
    assert ((t["auroc"] >= 0) & (t["auroc"] <= 1)).all()
    assert (tmp_path / "detect_pr.png").exists()


def test_mmlu_cells_forked_equal_one_cell_at_a_time():
    from sieve.evals.mmlu import mmlu_accuracy_cells
    from sieve.interventions import Detector, Edit, Intervention
    from sieve.world import load_world

    w = load_world()
    wv, b = w.feature.linear()
    qs = load_questions(ROOT / "recipes/data/mmlu_fixture.json")
    cells = [None, Intervention("token", Edit("add", w.feature.direction, -20.0), Detector(wv, b), -5.0, layers=w.layer),
             Intervention("token", Edit("add", w.feature.direction, -20.0), Detector(wv, b), 1e9, layers=w.layer),
             Intervention("always", Edit("add", w.feature.direction, -20.0), layers=w.layer)]
    per_cell, saved = mmlu_accuracy_cells(w.model, qs, cells, batch_size=4)
    assert per_cell == [mmlu_accuracy(w.model, qs, iv, batch_size=4) for iv in cells]
    # a composed pair as a tuple is the pair composed, as a list is (not one intervention per question)
    pair = (cells[1], cells[3])
    assert mmlu_accuracy(w.model, qs, pair, batch_size=4) == mmlu_accuracy(w.model, qs, list(pair), batch_size=4) \
        == mmlu_accuracy_cells(w.model, qs, [pair], batch_size=4)[0][0]
    n = len([q for q in qs if q.split != "dev"])
    # the gate that never opens reuses every unsteered answer; the always-on edit none
    assert saved.texts == 3 * n and n <= saved.texts_reused < 3 * n
