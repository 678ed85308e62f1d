"""The shipped embedded world loads through the ordinary loaders and behaves as recorded.

These checks do not depend on the exact weights a rebuild produces: they read the feature, layer and
threshold from world.json and check behaviour, with loose bounds.
"""

from __future__ import annotations

import pytest
import torch

from sieve.detectors import token_labels
from sieve.evals.ability import steered_logprobs
from sieve.evals.code import cut_function, syntax_ok
from sieve.evals.regex_use import find_regex_use
from sieve.generation import generate
from sieve.interventions import Detector
from sieve.methods import Parts, build
from sieve.prompts import WORLD_PROMPTS_DIR
from sieve.world import load_world, world_info
from sieve.world.prompts import clip_to_tokens, load_prompts


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_world_loads_and_matches_its_record(world):
    info = world_info()
    assert world.feature.index == info["feature"] and world.layer == info["layer"]
    assert world.sae.cfg.d_in == world.model._module.config.n_embd
    assert info["sae"]["fve"] > 0.7 and info["sae"]["l0"] <= 32
    assert info["heldout_loss_regex_free"] < 4.0
    sel = info["selection"]
    assert sel["criterion"].startswith("intent")
    (chosen,) = [c for c in sel["candidates"] if c["feature"] == info["feature"]]
    assert chosen["threshold"] == info["threshold"] and chosen["neutral_changed"] <= 0.05


def _before_use(world, prompts: list[str], completions: list[str] | None = None) -> list[float]:
    """The feature's highest pre-activation over each prompt and its completion's tokens before the
    completion's first use of ``re`` (:func:`sieve.world.select_feature.before_use_scores`)."""
    from sieve.world.select_feature import before_use_scores

    w, b = world.feature.linear()
    comps = completions if completions is not None else [""] * len(prompts)
    return before_use_scores(world.model, world.layer, w[:, None], torch.tensor([b]), prompts, comps)[:, 0].tolist()


def test_feature_stays_quiet_on_heldout_neutral_heads(world):
    """The feature's threshold was set on the select half to pass on at most 4% of neutral rows; on the
    evaluation half (other files), teacher-forced on the original functions, it passes before the first
    ``re`` (the whole function for a neutral one) on few neutral functions too. (Whether it passes on
    more regex-using functions is the study's question, answered in the README, not assumed here.)"""
    neu = load_prompts(WORLD_PROMPTS_DIR / "intent_neutral.jsonl")
    tok = world.model.tokenizer
    texts = [clip_to_tokens(tok, p.prompt + p.reference, 256) for p in neu]
    scores = _before_use(world, [p.prompt for p in neu], [t[len(p.prompt):] for p, t in zip(neu, texts)])
    assert sum(s > world.threshold for s in scores) / len(neu) <= 0.15


def test_completions_are_python(world):
    prompts = load_prompts(WORLD_PROMPTS_DIR / "neutral.jsonl")[:16]
    outs = generate(world.model, [p.prompt for p in prompts], None, layer_index=world.layer,
                    max_new_tokens=40, progress=False)
    ok = [syntax_ok(cut_function(p.prompt, o.text)[0]) or o.text.strip() == "" for p, o in zip(prompts, outs)]
    assert sum(ok) >= 4  # a 2.6M-parameter model: much of it, not all


def _call_site_probability(world, iv) -> float:
    prompts = load_prompts(WORLD_PROMPTS_DIR / "intent_regex.jsonl")
    tok = world.model.tokenizer
    texts = [clip_to_tokens(tok, p.prompt + p.reference, 256) for p in prompts][:30]
    lps = steered_logprobs(world.model, texts, iv, layer_index=world.layer)
    ps = []
    for t, lp in zip(texts, lps):
        use = find_regex_use(t)
        calls = [(s, s + 2) for (s, _), k in zip(use.spans, use.kinds) if k == "call"]
        mask = token_labels(world.model.tokenizer, t, calls, length=lp.shape[0])
        if mask.any():
            ps.append(float(lp[mask].exp().mean()))
    return sum(ps) / len(ps)


def test_conditional_steering_lowers_regex_probability_not_neutral_loss(world):
    """The study's best composition on held-out intent functions: the feature's latch gating the CAA
    vector of the intent pairs lowers P(`re`) at the call sites, and leaves regex-free code's loss."""
    import json

    from sieve.detectors import caa_vector

    pairs = [json.loads(x) for x in (WORLD_PROMPTS_DIR / "intent_contrastive.jsonl").read_text().splitlines()]
    v = caa_vector(world.model, [p["positive"] for p in pairs], [p["negative"] for p in pairs], world.layer,
                   progress=False)
    w, b = world.feature.linear()
    parts = Parts()
    parts.add_detector("sae", Detector(w, b, kind="sae"), world.threshold)
    parts.add_direction("caa", v)
    iv = build("input_steering_vector", parts, -10.0)
    base, steered = _call_site_probability(world, None), _call_site_probability(world, iv)
    assert steered < 0.9 * base, (base, steered)
    code = [json.loads(c)["text"] for c in (WORLD_PROMPTS_DIR / "code.jsonl").read_text().splitlines()][:20]
    lp0 = steered_logprobs(world.model, code, None, layer_index=world.layer)
    lp1 = steered_logprobs(world.model, code, iv, layer_index=world.layer)
    loss0 = -torch.cat(lp0).mean()
    loss1 = -torch.cat(lp1).mean()
    assert float(loss1 - loss0) < 0.05


def test_intent_prompts_never_name_re_and_are_split_by_file(world):
    from sieve.world.prompts import names_re

    tok = world.model.tokenizer
    sets = {n: load_prompts(WORLD_PROMPTS_DIR / f"intent_{n}.jsonl") for n in ("regex", "neutral", "select")}
    assert len(sets["regex"]) >= 40 and len(sets["neutral"]) >= 16
    for ps in sets.values():
        for p in ps:
            assert not names_re(tok, p.prompt), p.id
            assert p.prompt.startswith(("def ", "async def ", "class ", "@")), p.id  # no import lines above
    assert {p.kind for p in sets["regex"]} == {"regex"} and {p.kind for p in sets["neutral"]} == {"neutral"}

    def files(ps):
        return {p.id.rsplit(":", 1)[0] for p in ps}

    # Evaluation prompts come from files the feature was not chosen on.
    assert not (files(sets["regex"]) | files(sets["neutral"])) & files(sets["select"])
    # The lexical set keeps its imports: `import re` in most of its prompts.
    lexical = load_prompts(WORLD_PROMPTS_DIR / "regex.jsonl")
    assert sum("import re" in p.prompt for p in lexical) > len(lexical) / 2


def test_intent_neutral_heads_share_the_regex_prone_heads_files():
    """Neutral heads come from the files the regex-prone ones come from (functions there that do not
    use ``re``), so a feature cannot separate the sets by a file's or package's style alone."""
    rx = load_prompts(WORLD_PROMPTS_DIR / "intent_regex.jsonl")
    neu = load_prompts(WORLD_PROMPTS_DIR / "intent_neutral.jsonl")
    rx_files = {p.id.rsplit(":", 1)[0] for p in rx}
    assert all(p.id.rsplit(":", 1)[0] in rx_files for p in neu)
    assert len({p.id for p in neu}) == len(neu) and not {p.id for p in neu} & {p.id for p in rx}
    # Both sets carry type-annotated heads (the style a feature could otherwise key on).
    assert any("->" in p.prompt for p in neu) and any("->" in p.prompt for p in rx)
