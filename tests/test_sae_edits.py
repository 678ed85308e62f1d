"""SAE-space edits and SAE-code detectors against sae-lens's own edit with the error term.

sae-lens runs an SAE in the loop as ``decode(f') + (h − decode(encode(h)))`` (``use_error_term``), with
latents edited by a hook on ``hook_sae_acts_post``. sieve's edit is ``h + dec(f') − dec(f)`` on only the
edited latents. Both must give the same layer output (within 1e-5) and the same greedy tokens, for
every SAE kind sieve loads: ReLU (standard), JumpReLU (GemmaScope's kind), TopK, and the study's TopK
format read by ``load_sae``.
"""

from __future__ import annotations

import json

import pytest
import torch

from sieve.errors import ShapeMismatch, SieveError
from sieve.generation import generate
from sieve.interventions import Always, Detector, Edit, Fires, Intervention, LatentEdit, SAECode, Steerer
from sieve.models import encode_prompts, underlying
from tests.conftest import PROMPTS

LAYER = 1
N_NEW = 8
KINDS = ["standard", "jumprelu", "topk", "topk_rescaled", "study"]


def make_sae(kind: str, d: int = 64, f: int = 256, tmp=None):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(7)
    if kind == "study":
        from safetensors.torch import save_file

        from sieve.saes import load_sae

        sd = {"encoder_DF": torch.randn(d, f) / d**0.5, "encoder_bias_F": 0.1 * torch.randn(f),
              "decoder_FD": torch.randn(f, d) / d**0.5, "decoder_bias_D": 0.1 * torch.randn(d)}
        (tmp / "config.json").write_text(json.dumps({"sae_cfg": {"d_in": d, "d_sae": f, "k": 16}}))
        save_file(sd, str(tmp / "layer_1.safetensors"))
        return load_sae(tmp, layer=1)
    sae = {
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=d, d_sae=f)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=f, apply_b_dec_to_input=False)),
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=d, d_sae=f, k=16)),
        "topk_rescaled": lambda: TopKSAE(TopKSAEConfig(d_in=d, d_sae=f, k=16, rescale_acts_by_decoder_norm=True)),
    }[kind]()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.05 + 0.2 * torch.rand_like(sae.threshold))
    return sae.eval()


def sae_lens_edit(sae, h: torch.Tensor, feats: list[int], fn) -> torch.Tensor:
    """sae-lens's own edit: a hook on the code, the SAE run with its error term."""

    def hook(acts, hook=None):
        acts = acts.clone()
        acts[..., feats] = fn(acts[..., feats])
        return acts

    sae.use_error_term = True
    sae.hook_sae_acts_post.add_hook(hook)
    try:
        with torch.no_grad():
            return sae(h)
    finally:
        sae.reset_hooks()
        sae.use_error_term = False


def _layer_out(model) -> torch.Tensor:
    enc = encode_prompts(model.tokenizer, PROMPTS)
    with torch.inference_mode():
        return underlying(model)(**enc, output_hidden_states=True).hidden_states[LAYER + 1].float()


def _busy_feature(sae, h) -> int:
    """The feature active on most tokens (so an edit of it changes the output)."""
    return int((sae.encode(h) > 0).float().sum(dim=(0, 1)).argmax())


def reference_generate(model, prompt: str, sae, feats, fn) -> list[int]:
    """One row, a forward hook that runs sae-lens's edit on the layer output (BOS left alone)."""
    hf = underlying(model)
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    first = {"v": True}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h2 = sae_lens_edit(sae, h, feats, fn)
        if first["v"] and ids[0, 0] == tok.bos_token_id:
            h2[:, 0] = h[:, 0]
        first["v"] = False
        return (h2, *output[1:]) if isinstance(output, tuple) else h2

    mod = hf.transformer.h[LAYER] if hasattr(hf, "transformer") else hf.model.layers[LAYER]
    handle = mod.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    row = out[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    return row[: row.index(eos)] if eos in row else row


@pytest.mark.parametrize("kind", KINDS)
def test_clamp_and_ablation_match_sae_lens(tiny_models, kind, tmp_path):
    model = tiny_models["llama"]
    sae = make_sae(kind, tmp=tmp_path)
    h = _layer_out(model)
    f = _busy_feature(sae, h)
    c = 4.0 * float(sae.encode(h)[..., f].max().detach())
    cases = {
        # ablate f everywhere
        "ablate": (Intervention(Always(), LatentEdit(sae, [f], "ablate"), layers=LAYER),
                   lambda a: torch.zeros_like(a)),
        # clamp f to c where it is active in the code (the code as a detector, threshold 0)
        "clamp": (Intervention(Fires(SAECode(sae, [f]), 0.0), LatentEdit(sae, [f], "set", c), layers=LAYER),
                  lambda a: torch.where(a > 0, torch.full_like(a, c), a)),
    }
    for name, (iv, fn) in cases.items():
        # activations: sieve's edit of one forward against sae-lens's, every token eligible
        ours = Steerer([iv] * h.shape[0])(h.clone())
        theirs = sae_lens_edit(sae, h, [f], fn)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"{kind} {name}")
        assert (ours - h).abs().max() > 1e-3  # the edit does something
        # tokens: greedy generation, left-padded batch against one row at a time with sae-lens in the loop
        # (the reference feeds the prompt tokens as they are: healing off)
        outs = generate(model, PROMPTS, iv, max_new_tokens=N_NEW, progress=False, token_healing=False)
        for p, o in zip(PROMPTS, outs):
            assert o.token_ids == reference_generate(model, p, sae, [f], fn), f"{kind} {name} {p!r}"
    plain = generate(model, PROMPTS, None, max_new_tokens=N_NEW, progress=False)
    clamped = generate(model, PROMPTS, cases["clamp"][0], max_new_tokens=N_NEW, progress=False)
    assert [o.token_ids for o in plain] != [o.token_ids for o in clamped]  # not vacuous


@pytest.mark.parametrize("kind", ["standard", "jumprelu"])
def test_sparse_path_equals_full_encode(kind):
    """JumpReLU / ReLU edits read only the edited features' encoder columns; the result is the full one's."""
    sae = make_sae(kind)
    h = torch.randn(3, 5, 64) * 2
    feats = [3, 17, 200]
    for op, vals in (("set", [1.0, -2.0, 0.5]), ("scale", 3.0), ("add", [0.5, 0.5, -1.0]), ("ablate", ())):
        sparse = Steerer([Intervention("always", LatentEdit(sae, feats, op, vals), layers=0)] * 3)(h)
        full = Steerer([Intervention("always", LatentEdit(sae, feats, op, vals, encode="full"), layers=0)] * 3)(h)
        torch.testing.assert_close(sparse, full, atol=1e-5, rtol=0)
    assert Steerer([Intervention("always", LatentEdit(sae, feats, "ablate"), layers=0)])._groups[(id(sae), 0)] \
        .tensors.W_enc.shape == (64, 3)  # only the k columns


def test_rows_carry_different_features_and_values():
    """One batch, each row its own SAE-space edit (or none, or two composed): each row equals itself alone."""
    sae = make_sae("jumprelu")
    h = torch.randn(4, 6, 64) * 2
    rows = [
        [Intervention("always", LatentEdit(sae, [1, 2], "set", [3.0, -1.0]), layers=0)],
        [Intervention("always", LatentEdit(sae, [5], "scale", 2.5), layers=0),
         Intervention("token", LatentEdit(sae, [9, 1], "add", 1.0), SAECode(sae, [9, 11], "any"), 0.0, layers=0)],
        [],
        [Intervention("always", LatentEdit(sae, [7, 8, 9], "ablate"), layers=0)],
    ]
    together = Steerer(rows)(h)
    for i, row in enumerate(rows):
        alone = Steerer([row])(h[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(together[2], h[2])  # the unsteered row is untouched
    # row 0 by hand: h + Σ (f'_i − f_i)·W_dec[i]
    f = sae.encode(h[0])
    want = h[0] + (3.0 - f[:, 1:2]) * sae.W_dec[1] + (-1.0 - f[:, 2:3]) * sae.W_dec[2]
    torch.testing.assert_close(together[0], want.detach(), atol=1e-5, rtol=0)


def test_feature_set_detectors_any_all_sum():
    sae = make_sae("standard")
    h = torch.randn(2, 9, 64) * 2
    code = sae.encode(h).detach()
    feats = [4, 10, 30]
    sub = code[..., feats]
    torch.testing.assert_close(SAECode(sae, feats, "any").score(h), sub.max(-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(SAECode(sae, feats, "all").score(h), sub.min(-1).values, atol=1e-5, rtol=0)
    w = [0.5, -1.0, 2.0]
    torch.testing.assert_close(SAECode(sae, feats, weights=w).score(h), sub @ torch.tensor(w), atol=1e-5, rtol=0)
    # as gates: "any" fires where some feature is active, "all" where every one is
    u = torch.zeros(64)
    u[0] = 1.0
    for reduce, want in (("any", (sub > 0).any(-1)), ("all", (sub > 0).all(-1))):
        steer = Steerer([Intervention(Fires(SAECode(sae, feats, reduce), 0.0), Edit("add", u, 1.0), layers=0)] * 2)
        out = steer(h)
        assert ((out - h)[..., 0] > 0.5).tolist() == want.tolist()


def test_sae_inputs_are_checked():
    sae = make_sae("jumprelu")
    with pytest.raises(SieveError, match="feature 256 is out of range: this SAE has 256 features"):
        LatentEdit(sae, [256], "set", 1.0)
    with pytest.raises(SieveError, match="op 'clip' is unknown"):
        LatentEdit(sae, [1], "clip", 1.0)
    with pytest.raises(SieveError, match="2 values for 1 features"):
        LatentEdit(sae, [1], "set", [1.0, 2.0])
    with pytest.raises(SieveError, match="a clamp edit needs a linear Detector"):
        Intervention("token", Edit("clamp", torch.ones(64), 1.0), SAECode(sae, [1]))
    with pytest.raises(ShapeMismatch, match="widths differ"):
        Intervention("always", LatentEdit(sae, [1], "ablate"), Detector(torch.ones(32)))
    assert len(repr(Intervention("always", LatentEdit(sae, list(range(100)), "ablate"), layers=2))) < 160
