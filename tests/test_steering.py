"""Notebook ergonomics: the steering() context manager on plain nnsight models and sieve's own, sieve's
generate on a plain nnsight model, from_feature, compact reprs."""

from __future__ import annotations

import pytest
import torch

from sieve.errors import SieveError
from sieve.generation import generate
from sieve.interventions import Detector, Edit, Fires, Intervention
from sieve.models import encode_prompts, pad_id, underlying
from sieve.steering import from_feature, steering
from tests.conftest import PROMPTS

N = 6


def _plain(path):
    from nnsight import TransformersModel

    return TransformersModel(str(path), task="text-generation", dispatch=True)


def _composed(d: int) -> list[Intervention]:
    g = torch.Generator().manual_seed(3)
    det = Detector(torch.randn(d, generator=g), 0.0)
    return [Intervention(Fires(det, 0.0).latch(), Edit("add", torch.randn(d, generator=g), -6.0), layers=[1, 2],
                         read_layer=0),
            Intervention("always", Edit("add", torch.randn(d, generator=g), 2.0), layers=0)]


def _own_trace(model, enc) -> list[list[int]]:
    with torch.inference_mode():
        with model.generate(enc, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                            pad_token_id=pad_id(model.tokenizer)) as tracer:
            ids = tracer.result.save()
    return ids[:, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_context_manager_on_a_plain_nnsight_model_equals_generate(tiny_dirs, tiny_models, arch):
    plain = _plain(tiny_dirs[arch])
    d = underlying(plain).config.hidden_size
    ivs = _composed(d)
    enc = encode_prompts(plain.tokenizer, PROMPTS)  # left-padded, BOS as sieve adds it
    unsteered = _own_trace(plain, enc)
    with steering(plain, ivs) as s:
        steered = _own_trace(plain, enc)
        again = _own_trace(plain, enc)  # each trace starts afresh (its own prefill, latch, counts)
    assert steered == again and steered != unsteered
    assert s.traces == 2 and s.counts()["gen_edited"] == [N - 1] * len(PROMPTS)
    assert _own_trace(plain, enc) == unsteered  # the edit is gone after the block
    # sieve's generate, on the plain model and on sieve's own loaded one, gives the same tokens
    for model in (plain, tiny_models[arch]):
        outs = generate(model, PROMPTS, [ivs] * len(PROMPTS), max_new_tokens=N, progress=False,
                        token_healing=False)
        for o, ref in zip(outs, steered):
            assert o.token_ids == ref[: len(o.token_ids)] and len(o.token_ids) >= 1


def test_context_manager_on_sieves_model_in_a_plain_trace(tiny_models):
    model = tiny_models["gemma2"]
    d = underlying(model).config.hidden_size
    iv = Intervention("always", Edit("add", torch.ones(d), -5.0), layers=1)
    enc = encode_prompts(model.tokenizer, PROMPTS[:2])
    with torch.inference_mode():
        with model.trace(enc):
            clean = model.output.logits.save()
        with steering(model, iv):
            with model.trace(enc):
                edited = model.output.logits.save()
    from sieve.generation import steered_logits

    (_, _, ref), = list(steered_logits(model, PROMPTS[:2], iv))
    torch.testing.assert_close(edited, ref)
    assert not torch.allclose(edited, clean)


def test_from_feature_edits_and_errors(tiny_models):
    from tests.test_sae_edits import make_sae

    sae = make_sae("jumprelu")
    with pytest.raises(SieveError, match="does not name its layer; pass layer="):
        from_feature(sae, 3, -4.0)
    add = from_feature(sae, 3, -4.0, layer=1)
    assert add.edit.kind == "add" and add.condition.threshold == pytest.approx(float(sae.threshold[3].detach()))
    clamp = from_feature(sae, 3, -1.0, edit="clamp", gate="input", layer=1)
    assert clamp.edit.kind == "clamp" and clamp.detector is not None
    abl = from_feature(sae, 3, edit="ablate", gate="always", layer=1)
    assert abl.edit.op == "ablate"
    with pytest.raises(SieveError, match="feature 999 is out of range"):
        from_feature(sae, 999, layer=1)
    outs = generate(tiny_models["llama"], PROMPTS, [add, clamp, abl, None], max_new_tokens=4, progress=False)
    assert len(outs) == 4


def test_reprs_are_compact(tiny_models):
    from sieve.methods import Parts
    from sieve.world import load_world

    w = load_world()
    assert len(repr(w)) < 200 and "Linear" not in repr(w)  # the model is named, not dumped
    assert len(repr(w.feature)) < 120
    iv = from_feature(w.sae, w.feature.index, -8.0, layer=w.layer)
    assert len(repr(iv)) < 160
    p = Parts(layer=2)
    p.add_direction("sae", torch.ones(192))
    assert len(repr(p)) < 200


def test_sampling_settings_outside_their_range_are_refused_before_any_batch(tiny_models):
    """top_p <= 0 kept no token (every row became the vocabulary's last id) and a NaN temperature decoded
    greedily: both, and their like, are refused by generate and generate_forked alike."""
    from sieve.fork import generate_forked

    model = tiny_models["llama"]
    for fn in (generate, lambda *a, **k: generate_forked(*a, **k)[0]):
        for bad in (0.0, -1.0, 1.5, float("nan")):
            with pytest.raises(SieveError, match="top_p must be in"):
                fn(model, PROMPTS[:2], None, max_new_tokens=2, temperature=1.0, top_p=bad, progress=False)
        for t in (float("nan"), float("inf"), -0.5):
            with pytest.raises(SieveError, match="temperature must be a finite number"):
                fn(model, PROMPTS[:2], None, max_new_tokens=2, temperature=t, progress=False)
    assert len(generate(model, PROMPTS[:2], None, max_new_tokens=2, temperature=1.0, top_p=0.5, progress=False)) == 2


def test_steering_refuses_a_layer_the_model_lacks_on_entry(tiny_models):
    model = tiny_models["llama"]
    d = underlying(model).config.hidden_size
    iv = Intervention("always", Edit("add", torch.ones(d), -1.0), layers=99)
    with pytest.raises(SieveError, match=r"^steering: .* uses layer 99, but the model has 3 decoder layers"):
        with steering(model, iv):
            raise AssertionError("the block must not run")


def test_a_steerer_without_the_batch_encoding_is_refused_or_warns(tiny_models):
    """Without the encoding a padded batch's padding and BOS would open gates and be edited: forward(model)
    refuses several rows, a prompt of several rows given by hand warns, one row is fine."""
    from sieve.interventions import Steerer, UnmaskedPrompt

    model = tiny_models["llama"]
    d = underlying(model).config.hidden_size
    iv = Intervention("token", Edit("add", torch.ones(d), -1.0), Detector(torch.ones(d)), 0.0, layers=1)
    enc = encode_prompts(model.tokenizer, PROMPTS[:2])
    steer = Steerer([iv] * 2, layer=1)
    with pytest.raises(SieveError, match="needs the batch's encoding"):
        with model.trace(enc):
            steer.forward(model)
    with pytest.warns(UnmaskedPrompt, match="padding and BOS included"):
        Steerer([iv] * 2, layer=1)(torch.zeros(2, 5, d))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Steerer([iv], layer=1)(torch.zeros(1, 5, d))  # one row of the user's own: no padding to mistake
        Steerer([iv] * 2, enc, model.tokenizer, layer=1)(torch.zeros(*enc["input_ids"].shape, d))


def test_sieve_steering_is_the_module_and_the_context_manager():
    """``import sieve.steering as st`` gave the function (the package rebound the name): now the module,
    callable as its ``steering``."""
    import importlib

    import sieve
    import sieve.steering as st

    assert st is importlib.import_module("sieve.steering") and callable(st.from_feature)
    assert sieve.steering is st and callable(sieve.steering)
    from sieve.world import load_world

    w = load_world()
    iv = sieve.from_feature(w.sae, w.feature.index, -8.0, gate="always", layer=w.layer)
    with sieve.steering(w.model, iv) as live:
        assert type(live).__name__ == "LiveSteering"
