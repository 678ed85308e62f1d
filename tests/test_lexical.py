"""The lexical baseline: a gate that opens on the prompt's regex-ish words, applying a method's edit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sieve.evals.ability import steered_logprobs
from sieve.generation import generate
from sieve.interventions import Detector, Edit, Intervention
from sieve.methods import LEXICAL_METHODS, Parts, build, family, get_method
from sieve.models import underlying
from sieve.prompt_gates import LEXICAL_REGEX, REGEX_WORDS, PromptGate, open_prompt_gates
from sieve.recipe import load_recipe

OPEN = [
    "def parse_header(line):\n",
    "def extractEmails(text):\n",
    'def f(s):\n    """Return the parts of s that match a date."""\n',
    "# Check a string against a Regular Expression\ndef check(s):\n",
    "def find_patterns(text):\n",
    "class HTMLParser:\n    def feed(self, data):\n",
]
CLOSED = [
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "def matchbox(n):\n",             # not the word "match"
    "import re\n\ndef f(s):\n",       # `re` is not in the list: the lexical contrast, not the baseline
    "def reparse_all(x):\n",          # "reparse" is not "parse"
    "def compatible(a, b):\n",
]


def test_word_list_is_fixed_and_matches_whole_words_and_identifiers():
    assert {"regex", "pattern", "match", "parse", "extract"} <= set(REGEX_WORDS) and "re" not in REGEX_WORDS
    assert [LEXICAL_REGEX.opens(t) for t in OPEN] == [True] * len(OPEN)
    assert [LEXICAL_REGEX.opens(t) for t in CLOSED] == [False] * len(CLOSED)
    assert LEXICAL_REGEX.match(OPEN[3]) == "regular expression"
    assert PromptGate("x", words=("Colour",)).opens("set_colour = 1")


def test_lexical_methods_are_registered_and_a_recipe_can_name_them(tmp_path):
    for m in LEXICAL_METHODS:
        assert get_method(m.name).prompt_gate is LEXICAL_REGEX and family(m.name) == "lexical"
    methods = 'sweep.methods=["unsteered","lexical_steering_vector","lexical_clamping"]'
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes/regex.toml", [methods, f'output.dir="{tmp_path}"'])
    assert r.scales_for("lexical_steering_vector") == r.sweep.scales["add"]
    assert r.scales_for("lexical_clamping") == r.sweep.scales["clamp"]


def _parts(d: int) -> Parts:
    g = torch.Generator().manual_seed(0)
    parts = Parts()
    parts.add_detector("sae", Detector(torch.randn(d, generator=g), 0.0, kind="sae"), 0.0)
    parts.add_direction("sae", torch.randn(d, generator=g))
    parts.add_direction("caa", torch.randn(d, generator=g))
    return parts


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lexical_rows_get_the_edit_and_the_others_stay_unsteered(tiny_models, arch):
    """In one mixed batch: a row whose prompt has a regex-ish word equals the same edit without the
    gate; a row without equals unsteered (token-identical, greedy)."""
    model = tiny_models[arch]
    d = underlying(model).config.hidden_size
    parts = _parts(d)
    iv = build("lexical_steering_vector", parts, -40.0)
    plain = Intervention("always", Edit("add", parts.direction("caa"), -40.0))
    prompts = [OPEN[0], CLOSED[0], OPEN[2], CLOSED[1]]
    kw = dict(layer_index=1, max_new_tokens=8, progress=False)
    outs = generate(model, prompts, iv, **kw)
    steered = generate(model, prompts, plain, **kw)
    unsteered = generate(model, prompts, None, **kw)
    assert [o.counts["prompt_gate_opened"] for o in outs] == [1, 0, 1, 0]
    for i, o in enumerate(outs):
        ref = steered[i] if LEXICAL_REGEX.opens(prompts[i]) else unsteered[i]
        assert o.token_ids == ref.token_ids
    assert any(s.token_ids != u.token_ids for s, u in zip(steered, unsteered))  # the edit does something


def test_prompt_gate_is_decided_by_the_steerer_for_other_callers(tiny_models):
    """steered_logprobs (and MMLU, lm-eval) build a Steerer from the encoding: the gate reads the
    decoded prompt there."""
    model = tiny_models["gpt2"]
    parts = _parts(underlying(model).config.hidden_size)
    iv = build("lexical_sae", parts, -40.0)
    plain = Intervention("always", Edit("add", parts.direction("sae"), -40.0))
    texts = [OPEN[0] + "    return line\n", CLOSED[0]]
    got = steered_logprobs(model, texts, iv, layer_index=1)
    on = steered_logprobs(model, texts, plain, layer_index=1)
    off = steered_logprobs(model, texts, None, layer_index=1)
    assert torch.allclose(got[0], on[0]) and torch.allclose(got[1], off[1])
    assert not torch.allclose(on[0], off[0])


def test_open_prompt_gates_passes_other_rows_through():
    u = torch.ones(3)
    ungated = Intervention("always", Edit("add", u, 1.0))
    gated = Intervention("always", Edit("add", u, 1.0), meta={"prompt_gate": LEXICAL_REGEX})
    ivs, opened = open_prompt_gates([ungated, gated, gated, None], ["x", "parse it", "x", "parse"])
    assert ivs[0] is ungated and ivs[1] is not None and ivs[2] is None and ivs[3] is None
    assert "prompt_gate" not in ivs[1].meta and opened == [None, True, False, None]
    with pytest.raises(ValueError):
        open_prompt_gates([gated], [])
