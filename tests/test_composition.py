"""Composed interventions against a hand-written reference: several interventions per row, gates read at
one layer and edits at others, gate expressions with and / or / not and the latch.

The reference is written independently of sieve's packed, vectorised engine: one row at a time, no
padding, forward hooks on the HF layers, the gate expression evaluated recursively token by token with
plain Python booleans, and each edit written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from sieve.errors import ShapeMismatch, SieveError
from sieve.generation import generate
from sieve.interventions import Always, Detector, Edit, Fires, Intervention, Latch, Not, Steerer
from sieve.models import encode_prompts, underlying
from tests.conftest import ARCHS, PROMPTS

N_NEW = 8


def _hidden(model, layer: int) -> torch.Tensor:
    hf = underlying(model)
    enc = encode_prompts(model.tokenizer, PROMPTS)
    with torch.inference_mode():
        return hf(**enc, output_hidden_states=True).hidden_states[layer + 1][enc["attention_mask"].bool()]


def _detector(model, layer: int, g: torch.Generator, q: float = 0.7) -> tuple[Detector, float]:
    """A random linear detector and the threshold at which it fires on ~30% of the prompts' tokens."""
    d = underlying(model).config.hidden_size
    w = torch.randn(d, generator=g)
    b = float(torch.randn((), generator=g))
    return Detector(w, b), float((_hidden(model, layer).float() @ w + b).quantile(q))


def _norm(model) -> float:
    return float(_hidden(model, 1).norm(dim=-1).mean())


def composed_rows(model, seed: int = 0) -> list[list[Intervention]]:
    g = torch.Generator().manual_seed(seed)
    d = underlying(model).config.hidden_size
    s = _norm(model)
    d0, t0 = _detector(model, 0, g)
    d1, t1 = _detector(model, 1, g)
    d0b, t0b = _detector(model, 0, g, 0.4)
    u = [torch.randn(d, generator=g) for _ in range(4)]
    a, b, c = Fires(d0, t0), Fires(d1, t1), Fires(d0b, t0b)
    return [
        # read at 0, edit at 1 and 2: latched (a and not c); plus a per-token clamp of d1 at layer 1
        [Intervention(Latch(a & ~c), Edit("add", u[0], -1.5 * s), layers=[1, 2], read_layer=0),
         Intervention("token", Edit("clamp", u[1] + 0.5 * d1.w / d1.w.norm(), 0.3 * s), d1, t1, layers=1)],
        # or of two detectors at layer 0, editing at layer 2; an always-add at layer 0 on top
        [Intervention(a | c, Edit("add", u[2], -2.0 * s), layers=2, read_layer=0),
         Intervention("always", Edit("add", u[3], 0.5 * s), layers=0)],
        # not(latch(b)) at layer 1 (edit until the detector first fires), and a plain input gate at 0
        [Intervention(Not(Latch(b)), Edit("add", u[1], 1.0 * s), layers=[1, 2]),
         Intervention("input", Edit("add", u[0], -1.0 * s), d0, t0, layers=0)],
        # one intervention, multi-layer CAA-style constant add
        [Intervention(Always(), Edit("add", u[2], -0.7 * s), layers=[0, 1, 2])],
        [],  # unsteered
    ]


def _ev(g, t: int, h_by_layer: dict, real: bool, latch: dict) -> bool:
    """A gate at token t, by recursion (the reference's own evaluator)."""
    if isinstance(g, Always):
        return real
    if isinstance(g, Fires):
        h = h_by_layer["read"][t]
        return real and float(h.float() @ g.detector.w + g.detector.b) > g.threshold
    name = type(g).__name__
    if name == "And":
        return all([_ev(p, t, h_by_layer, real, latch) for p in g.parts])
    if name == "Or":
        return any([_ev(p, t, h_by_layer, real, latch) for p in g.parts])
    if name == "Not":
        return real and not _ev(g.part, t, h_by_layer, real, latch)
    if name == "Latch":
        latch[id(g)] = latch.get(id(g), False) or _ev(g.part, t, h_by_layer, real, latch)
        return real and latch[id(g)]
    raise AssertionError(g)


def reference_generate(model, prompt: str, ivs: list[Intervention]) -> list[int]:
    hf = underlying(model)
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    layers_mod = hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers
    touched = sorted({L for iv in ivs for L in [*iv.layers, iv.reads_at]})
    state = {"forward": 0, "gates": {}, "latch": {iv_i: {} for iv_i in range(len(ivs))}}

    def make_hook(L):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            T = h.shape[1]
            real = [True] * T
            if state["forward"] == 0 and ids[0, 0] == tok.bos_token_id:
                real[0] = False
            for i, iv in enumerate(ivs):
                if iv.reads_at == L:
                    state["gates"][i] = [_ev(iv.condition, t, {"read": h[0]}, real[t], state["latch"][i])
                                         for t in range(T)]
            delta = torch.zeros_like(h[0], dtype=torch.float32)
            for i, iv in enumerate(ivs):
                if L not in iv.layers:
                    continue
                u = iv.edit.direction
                for t in range(T):
                    if not state["gates"][i][t]:
                        continue
                    if iv.edit.kind == "add":
                        delta[t] += iv.edit.value * u
                    else:
                        a = float(h[0, t].float() @ iv.detector.w + iv.detector.b)
                        delta[t] += (iv.edit.value - a) / float(iv.detector.w @ u) * u
            if L == touched[-1]:
                state["forward"] += 1
            h2 = h + delta[None].to(h.dtype)
            return (h2, *output[1:]) if isinstance(output, tuple) else h2

        return hook

    handles = [layers_mod[L].register_forward_hook(make_hook(L)) for L in touched]
    try:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)
    finally:
        for hd in handles:
            hd.remove()
    row = out[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    return row[: row.index(eos)] if eos in row else row


@pytest.mark.parametrize("arch", ARCHS)
def test_composed_rows_match_reference(tiny_models, arch):
    model = tiny_models[arch]
    rows = composed_rows(model)
    prompts = [p for p in PROMPTS for _ in rows]
    ivs = [r for _ in PROMPTS for r in rows]
    outs = generate(model, prompts, ivs, max_new_tokens=N_NEW, progress=False, token_healing=False)
    changed = 0
    for p, row, o in zip(prompts, ivs, outs):
        ref = reference_generate(model, p, row)
        assert o.token_ids == ref, f"{arch} {row}: {o.token_ids} != {ref}"
        changed += bool(row) and ref != reference_generate(model, p, [])
    assert changed >= 2 * len(PROMPTS)  # not vacuous: composed rows change the greedy output


def test_gate_reads_before_edits_and_counts():
    """A gate read at layer 0 drives an edit at layer 1 in the same forward; layer 0 itself is untouched."""
    det = Detector(torch.tensor([1.0, 0.0]))
    iv = Intervention("token", Edit("add", torch.tensor([0.0, 1.0]), 5.0), det, 0.5, layers=1, read_layer=0)
    steer = Steerer([iv])
    assert steer.layers == [0, 1]
    h0 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert torch.equal(steer(h0, layer=0), h0)
    out1 = steer(torch.zeros(1, 2, 2), layer=1)
    assert out1[0, :, 1].tolist() == [5.0, 0.0]
    assert steer.counts()["prompt_fired"] == [1] and steer.counts()["prompt_edited"] == [1]
    with pytest.raises(SieveError, match="layer 1 came when layer 0 was due"):
        steer(torch.zeros(1, 1, 2), layer=1)


def test_layers_and_widths_checked_at_entry(tiny_models):
    model = tiny_models["gpt2"]
    d = underlying(model).config.hidden_size
    with pytest.raises(SieveError, match="read_layer 2 is after the first edit layer 1"):
        Intervention("token", Edit("add", torch.ones(d), 1.0), Detector(torch.ones(d)), layers=1, read_layer=2)
    with pytest.raises(ShapeMismatch, match="widths differ"):
        Intervention("token", Edit("add", torch.ones(d), 1.0), Detector(torch.ones(d + 1)))
    wide = Intervention("always", Edit("add", torch.ones(d + 3), 1.0))
    with pytest.raises(ShapeMismatch, match=f"width {d + 3}, but the model's hidden size is {d}"):
        generate(model, PROMPTS[:1], wide, layer_index=1, max_new_tokens=2, progress=False)
    with pytest.raises(SieveError, match="has no layer"):
        generate(model, PROMPTS[:1], Intervention("always", Edit("add", torch.ones(d), 1.0)), max_new_tokens=2,
                 progress=False)
    with pytest.raises(SieveError, match="uses layer 7, but the model has 3 decoder layers"):
        generate(model, PROMPTS[:1], Intervention("always", Edit("add", torch.ones(d), 1.0), layers=7),
                 max_new_tokens=2, progress=False)
    with pytest.raises(SieveError, match="got one str"):
        generate(model, "def f(", None, max_new_tokens=2, progress=False)
    with pytest.raises(SieveError, match="threshold must be a number, got None"):
        Intervention("token", Edit("add", torch.ones(d), 1.0), Detector(torch.ones(d)), threshold=None)


def test_legacy_layer_index_binds_unbound_interventions(tiny_models):
    """``generate(..., layer_index=L)`` with unbound interventions equals binding them to L."""
    model = tiny_models["llama"]
    d = underlying(model).config.hidden_size
    iv = Intervention("always", Edit("add", torch.randn(d, generator=torch.Generator().manual_seed(1)), -3.0))
    a = generate(model, PROMPTS, iv, layer_index=1, max_new_tokens=N_NEW, progress=False)
    b = generate(model, PROMPTS, iv.at(1), max_new_tokens=N_NEW, progress=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
