"""The twelve methods against a plain-torch reference, on tiny GPT-2, Llama and Gemma2.

The reference below is written independently of sieve's vectorised edit: one row at a time, no
padding, a forward hook on the HF layer and explicit per-method code. sieve's steered generation of
a left-padded batch mixing all methods must be token-identical (greedy).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sieve.errors import SieveError
from sieve.generation import generate
from sieve.interventions import Detector, Edit, Intervention, Steerer, eligible_mask
from sieve.methods import STUDY_METHODS, Parts, build
from sieve.models import encode_prompts, underlying
from tests.conftest import ARCHS, PROMPTS

LAYER = 1
N_NEW = 8


def _parts(model, seed: int = 0) -> Parts:
    """Random detectors/directions with thresholds at the 70th percentile of the prompts' scores."""
    hf = underlying(model)
    d = hf.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    enc = encode_prompts(model.tokenizer, PROMPTS)
    with torch.inference_mode():
        hs = hf(**enc, output_hidden_states=True).hidden_states[LAYER + 1]
    real = eligible_mask(enc["input_ids"], enc["attention_mask"], model.tokenizer.bos_token_id)
    parts = Parts()
    for name in ("sae", "caa", "probe"):
        w = torch.randn(d, generator=g)
        b = float(torch.randn((), generator=g))
        scores = hs.float() @ w + b
        thr = float(scores[real].quantile(0.7))
        parts.add_detector(name, Detector(w, b, kind=name), thr if name != "probe" else 0.0)
        if name == "probe":
            # Make the probe fire on some tokens: shift its bias so its 70th percentile is 0.
            parts.add_detector(name, Detector(w, b - thr, kind=name), 0.0)
        parts.add_direction(name, torch.randn(d, generator=g) + 0.5 * w / w.norm())
    return parts


def _norm(model) -> float:
    hf = underlying(model)
    enc = encode_prompts(model.tokenizer, PROMPTS[:1])
    with torch.inference_mode():
        hs = hf(**enc, output_hidden_states=True).hidden_states[LAYER + 1]
    return float(hs.norm(dim=-1).mean())


def _value(method, norm: float) -> float:
    return 0.5 * norm if method.edit == "clamp" else -2.0 * norm


def reference_generate(model, prompt: str, iv: Intervention | None) -> list[int]:
    """One row, no padding, a forward hook with the method written out by hand."""
    hf = underlying(model)
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    state = {"first": True, "latched": False}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if iv is None:
            return output
        T = h.shape[1]
        real = torch.ones(T, dtype=torch.bool)
        if state["first"] and ids[0, 0] == tok.bos_token_id:
            real[0] = False
        state["first"] = False
        det, u = iv.detector, iv.edit.direction
        a = (h[0].float() @ det.w.float() + det.b) if det is not None else torch.zeros(T)
        fired = (a > iv.threshold) & real
        if iv.gate == "always":
            where = real
        elif iv.gate == "token":
            where = fired
        else:
            where = torch.zeros(T, dtype=torch.bool)
            for t in range(T):  # causal latch, position by position
                state["latched"] = state["latched"] or bool(fired[t])
                where[t] = real[t] and state["latched"]
        if iv.edit.kind == "add":
            coef = torch.full((T,), iv.edit.value)
        else:
            coef = (iv.edit.value - a) / float(det.w.float() @ u)
        coef = torch.where(where, coef, torch.zeros_like(coef))
        h2 = h + (coef[None, :, None] * u[None, None, :]).to(h.dtype)
        return (h2, *output[1:]) if isinstance(output, tuple) else h2

    layer_mod = hf.transformer.h[LAYER] if hasattr(hf, "transformer") else hf.model.layers[LAYER]
    handle = layer_mod.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    row = out[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    return row[: row.index(eos)] if eos in row else row


@pytest.mark.parametrize("arch", ARCHS)
def test_twelve_methods_match_reference_in_one_mixed_batch(tiny_models, arch):
    model = tiny_models[arch]
    parts, norm = _parts(model), _norm(model)
    rows, ivs = [], []
    for m in STUDY_METHODS:
        for p in PROMPTS[:2]:
            rows.append(p)
            ivs.append(build(m, parts, _value(m, norm)))
    rows += PROMPTS[:2]
    ivs += [None, None]
    # The reference feeds the prompts' tokens as they are: healing off (tests/test_healing.py covers it).
    outs = generate(model, rows, ivs, layer_index=LAYER, max_new_tokens=N_NEW, progress=False, batch_size=64,
                    token_healing=False)
    changed = 0
    for p, iv, o in zip(rows, ivs, outs):
        ref = reference_generate(model, p, iv)
        assert o.token_ids == ref, f"{arch} {iv.name if iv else 'unsteered'}: {o.token_ids} != {ref}"
        changed += iv is not None and o.token_ids != reference_generate(model, p, None)
    # The check is not vacuous: most methods change the greedy output.
    assert changed >= len(STUDY_METHODS)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_rows_alone(tiny_models, arch):
    model = tiny_models[arch]
    parts, norm = _parts(model, seed=3), _norm(model)
    ivs = [build(m, parts, _value(m, norm)) for m in STUDY_METHODS[:4]]
    prompts = PROMPTS[:4]
    together = generate(model, prompts, ivs, layer_index=LAYER, max_new_tokens=N_NEW, progress=False)
    for p, iv, o in zip(prompts, ivs, together):
        alone = generate(model, [p], [iv], layer_index=LAYER, max_new_tokens=N_NEW, progress=False)[0]
        assert alone.token_ids == o.token_ids


def test_sampling_is_per_row_reproducible(tiny_models):
    model = tiny_models["llama"]
    a = generate(model, PROMPTS, None, layer_index=LAYER, max_new_tokens=N_NEW, temperature=1.0,
                 seeds=[5, 6, 7, 8], progress=False)
    b = generate(model, PROMPTS[2:], None, layer_index=LAYER, max_new_tokens=N_NEW, temperature=1.0,
                 seeds=[7, 8], progress=False)
    assert [o.token_ids for o in a[2:]] == [o.token_ids for o in b]
    c = generate(model, PROMPTS, None, layer_index=LAYER, max_new_tokens=N_NEW, temperature=1.0,
                 seeds=[1, 2, 3, 4], progress=False)
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_never_firing_detector_is_unsteered(tiny_models):
    model = tiny_models["gpt2"]
    d = underlying(model).config.hidden_size
    never = Intervention("token", Edit("add", torch.ones(d), -100.0), Detector(torch.zeros(d), -1.0), threshold=0.0)
    latch = Intervention("input", Edit("add", torch.ones(d), -100.0), Detector(torch.zeros(d), -1.0), threshold=0.0)
    plain = generate(model, PROMPTS, None, layer_index=LAYER, max_new_tokens=N_NEW, progress=False)
    for iv in (never, latch):
        steered = generate(model, PROMPTS, iv, layer_index=LAYER, max_new_tokens=N_NEW, progress=False)
        assert [o.token_ids for o in steered] == [o.token_ids for o in plain]
        assert all(o.counts["gen_edited"] == 0 and o.counts["prompt_edited"] == 0 for o in steered)


BOS0 = SimpleNamespace(bos_token_id=0)


def test_padding_and_bos_never_trigger():
    # A detector that fires everywhere: only real, non-BOS tokens may count.
    ids = torch.tensor([[7, 7, 0, 5, 6], [0, 4, 5, 6, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    elig = eligible_mask(ids, mask, bos_token_id=0)
    assert elig.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    iv = Intervention("input", Edit("add", torch.ones(2), 1.0), Detector(torch.zeros(2), 1.0), threshold=0.0)
    steer = Steerer([iv, iv], {"input_ids": ids, "attention_mask": mask}, BOS0, layer=0)
    out = steer(torch.zeros(2, 5, 2))
    assert (out[..., 0] != 0).tolist() == elig.tolist()
    assert steer.counts()["prompt_fired"] == [2, 4] and steer.counts()["prompt_edited"] == [2, 4]
    # BOS (and padding) alone firing does not latch: a detector that fires only there never edits.
    bos_only = Detector(torch.tensor([1.0, 0.0]), 0.0)
    iv2 = Intervention("input", Edit("add", torch.tensor([0.0, 1.0]), 1.0), bos_only, threshold=0.5)
    steer = Steerer([iv2, iv2], {"input_ids": ids, "attention_mask": mask}, BOS0, layer=0)
    h = torch.zeros(2, 5, 2)
    h[0, :3, 0] = 1.0  # row 0: padding and BOS
    h[1, 0, 0] = 1.0  # row 1: BOS
    assert steer(h)[..., 1].abs().sum() == 0
    assert steer(torch.zeros(2, 1, 2))[..., 1].abs().sum() == 0  # not latched either


def test_input_latch_persists_across_decode_steps():
    d = 2
    det = Detector(torch.tensor([1.0, 0.0]))
    iv = Intervention("input", Edit("add", torch.tensor([0.0, 1.0]), 5.0), det, threshold=0.5)
    steer = Steerer([iv, iv], {"input_ids": torch.tensor([[1, 2], [1, 2]])}, layer=0)
    prefill = torch.zeros(2, 2, d)
    prefill[0, 1, 0] = 1.0  # row 0 fires at its second prompt token
    prefill[1, 0, 0] = 1.0  # row 1 fires at its first prompt token, BOS-free here
    prefill[0, 0, 0] = 0.0
    out = steer(prefill)
    # Causal: row 0 is edited from its firing token on, not before it.
    assert out[0, :, 1].tolist() == [0.0, 5.0] and out[1, :, 1].tolist() == [5.0, 5.0]
    for _ in range(3):  # decode steps that never fire: both rows stay latched
        step = steer(torch.zeros(2, 1, d))
        assert step[0, 0, 1] == 5.0 and step[1, 0, 1] == 5.0
    assert steer.counts()["gen_edited"] == [3, 3]
    fresh = Steerer([iv], layer=0)
    for _ in range(3):
        assert fresh(torch.zeros(1, 1, d))[0, 0, 1] == 0.0  # never fired: never edited


def test_clamp_reads_back_clamp_value():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    u = torch.randn(16, generator=g)
    iv = Intervention("token", Edit("clamp", u, 2.5), Detector(w, 0.3), threshold=-1e9)
    h = torch.randn(3, 4, 16, generator=g)
    steer = Steerer([iv] * 3, layer=0)
    out = steer(h)
    assert steer.counts()["prompt_edited"] == [4, 4, 4]
    torch.testing.assert_close(iv.detector.score(out), torch.full((3, 4), 2.5), atol=1e-4, rtol=0)


def test_steerer_in_users_own_trace(tiny_models):
    """The notebook way: a user's own model.generate trace, sieve's Steerer on any layer."""
    model = tiny_models["gemma2"]
    d = underlying(model).config.hidden_size
    iv = Intervention("always", Edit("add", torch.ones(d), -3.0))
    enc = encode_prompts(model.tokenizer, PROMPTS[:2])
    steer = Steerer(iv, enc, model.tokenizer, layer=2)
    with torch.inference_mode():
        with model.generate(enc, max_new_tokens=4, min_new_tokens=4, do_sample=False) as tracer:
            for _ in tracer.iter[:4]:
                model.layers[2].output = steer(model.layers[2].output)
            ids = tracer.result.save()
    assert ids.shape[1] == enc["input_ids"].shape[1] + 4
    assert steer.calls == 4
    assert steer.counts()["gen_edited"] == [3, 3]


def test_generation_stops_once_every_row_has_finished(tiny_dirs):
    """A model that always says EOS: rows end at once and no further decode step runs."""
    from transformers import GPT2LMHeadModel

    from sieve.models import load_model

    hf = GPT2LMHeadModel.from_pretrained(tiny_dirs["gpt2"]).eval()
    tok_model = load_model(tiny_dirs["gpt2"])
    tok = tok_model.tokenizer
    with torch.no_grad():
        head = torch.nn.Linear(hf.config.n_embd, hf.config.vocab_size, bias=True)
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0
        hf.lm_head = head
    model = load_model(hf, tokenizer=tok)
    d = hf.config.n_embd
    iv = Intervention("always", Edit("add", torch.ones(d), 0.5))
    # Healing off: a healed row must first re-spell its prompt's last token (EOS is masked there).
    outs = generate(model, PROMPTS, iv, layer_index=LAYER, max_new_tokens=16, progress=False, token_healing=False)
    assert all(o.finished and o.token_ids == [] and o.text == "" for o in outs)
    # only the prefill ran: the edit never saw a decode step
    assert all(o.counts["gen_edited"] == 0 and o.counts["prompt_edited"] > 0 for o in outs)


def test_stop_strings_end_rows_and_keep_the_stop(tiny_models):
    """A row ends once its text ends with a stop string (kept, like a closing code fence); the tokens
    before it are those of the same run without stop strings, and rows without a match run on."""
    model = tiny_models["llama"]
    free = generate(model, PROMPTS, None, layer_index=LAYER, max_new_tokens=12, progress=False)
    # A stop string the first row produces in the middle of its completion.
    tok = model.tokenizer
    first = free[0].token_ids
    k = next(i for i in range(2, len(first)) if tok.decode(first[i : i + 1]).strip())
    stop = tok.decode(first[k : k + 1]).strip()
    stopped = generate(model, PROMPTS, None, layer_index=LAYER, max_new_tokens=12, stop=[stop], progress=False)
    for a, b in zip(free, stopped):
        hit = next((i for i in range(len(a.token_ids)) if stop in tok.decode(a.token_ids[: i + 1])), None)
        if hit is None:
            assert b.token_ids == a.token_ids and b.finished == a.finished
        else:
            assert b.token_ids == a.token_ids[: hit + 1] and b.finished and stop in b.text
    assert stopped[0].finished and len(stopped[0].token_ids) <= k + 1
    with pytest.raises(SieveError, match="stop strings"):
        generate(model, PROMPTS, None, layer_index=LAYER, max_new_tokens=4, stop=[""], progress=False)


def test_row_tracker_counts_only_kept_tokens():
    """EOS is cut and a stop-string token is kept; a row that ended is left out of the counts: the
    forward reading its last token counts where it predicts the EOS, not where a stop string ended the
    row (that forward predicts nothing of the row, and runs only when its batch goes on)."""
    from sieve.generation import RowTracker

    class StopAt7:  # a stand-in for StopStringCriteria: "the text now ends with the stop string"
        def __call__(self, ids, scores):
            return ids[:, -1] == 7

    tr = RowTracker(prompt_len=2, eos_token_ids=[0], stop=StopAt7())
    assert tr.keeps(0) is None
    tr(torch.tensor([[1, 1, 5], [1, 1, 7], [1, 1, 0]]), None)
    assert tr.ends.tolist() == [-1, 1, 0] and tr.keeps(0).tolist() == [True, False, False]
    done = tr(torch.tensor([[1, 1, 5, 0], [1, 1, 7, 0], [1, 1, 0, 7]]), None)
    assert done.all() and tr.ends.tolist() == [1, 1, 0]
    assert tr.completions() == [([5], True), ([7], True), ([], True)]
    # row 0 ended at EOS after token 5: the forward reading 5 predicted that EOS and counts
    assert tr.keeps(0).tolist() == [True, False, False] and tr.keeps(1).tolist() == [False, False, False]


def test_over_long_prompt_is_refused_before_any_batch_runs(tiny_models):
    """A model with learned positions would fail inside its embedding mid-sweep: the prompt is named first."""
    model = tiny_models["gpt2"]
    limit = underlying(model).config.n_positions
    long_prompt = "x = 1\n" * limit
    prompts = [*PROMPTS, long_prompt]
    with pytest.raises(SieveError, match=rf"prompt {len(PROMPTS)} has \d+ tokens; with max_new_tokens=4"):
        generate(model, prompts, None, layer_index=LAYER, max_new_tokens=4, batch_size=1, progress=False)
    # rotary models have no hard limit: no check
    from sieve.generation import check_context

    check_context(tiny_models["llama"], [10**6], 4)


def test_a_steerer_with_fewer_rows_than_its_encoding_is_refused_when_built():
    """It surfaced inside the trace, as a long nnsight traceback."""
    from sieve.errors import ShapeMismatch
    from sieve.interventions import Steerer
    from sieve.models import encode_prompts
    from sieve.world import load_world

    w = load_world()
    enc = encode_prompts(w.model.tokenizer, ["def f(x):", "import re"])
    iv = Intervention("always", Edit("add", w.feature.direction, 1.0), layers=w.layer)
    with pytest.raises(ShapeMismatch, match="1 rows of interventions for an encoding of 2 prompts"):
        Steerer([iv], enc, w.model.tokenizer)
    assert len(Steerer(iv, enc, w.model.tokenizer).rows) == 2  # one for all
