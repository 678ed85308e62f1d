"""Model and SAE loading: uniform layer access, feature views by the SAE's own rule, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from sieve.errors import NotAvailableOffline, ShapeMismatch, SieveError
from sieve.models import choose_attention, hidden_size, layer, load_model, underlying
from sieve.saes import check_compatible, feature, load_sae, save_sae
from tests.conftest import ARCHS


def _hf_layers(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_access_reads_the_hf_module_output(tiny_models, arch):
    model = tiny_models[arch]
    hf = underlying(model)
    enc = model.tokenizer(["def f(x):\n    return x"], return_tensors="pt")
    seen = {}
    handle = _hf_layers(hf)[1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.inference_mode():
            with model.trace(dict(enc)):
                h = model.layers[1].output.save()
    finally:
        handle.remove()
    torch.testing.assert_close(h, seen["h"])
    assert len(model.layers) == 3 and hidden_size(model) == 64


def test_layer_out_of_range(tiny_models):
    with pytest.raises(SieveError, match=r"layer 7 is out of range: this model has 3 decoder layers \(0..2\)"):
        layer(tiny_models["gpt2"], 7)


def test_unknown_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(SieveError, match="architecture 'bert'.*supported: .*gemma2.*gpt2.*llama.*qwen2"):
        load_model(tmp_path)


def test_hub_id_while_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotAvailableOffline, match="google/gemma-2-2b-it.*hf download.*--local-dir"):
        load_model("google/gemma-2-2b-it")
    with pytest.raises(NotAvailableOffline, match="gemma-scope-2b-pt-res"):
        load_sae("gemma-scope-2b-pt-res", "layer_8/width_16k/average_l0_71")
    with pytest.raises(SieveError, match="has no SAE 'layer_8/width_16k/average_l0_999'"):
        load_sae("gemma-scope-2b-pt-res", "layer_8/width_16k/average_l0_999")


def test_attention_choice_never_forces_sdpa():
    assert choose_attention("gemma2", "cpu") is None
    assert choose_attention("llama", "cpu") is None


def test_flash_attention_only_where_its_kernels_run(monkeypatch):
    """flash-attention 2 was asked for whatever the dtype: a float32 model on a GPU with flash-attn
    installed loaded, then failed at its first forward (its kernels take float16 and bfloat16 only);
    Gemma-2's soft-capping needs flash-attn 2.6 or later."""
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    installed = {"v": "2.7.4.post1"}

    def version(name):
        if name in ("flash_attn", "flash-attn"):
            return installed["v"]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert choose_attention("llama", "cuda", torch.bfloat16) == "flash_attention_2"
    assert choose_attention("gemma2", "cuda:1", torch.float16) == "flash_attention_2"
    assert choose_attention("llama", "cuda", torch.float32) is None
    installed["v"] = "2.5.9"
    assert choose_attention("gemma2", "cuda", torch.bfloat16) is None
    assert choose_attention("llama", "cuda", torch.bfloat16) == "flash_attention_2"


def _saes(d=64, f=96):
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    torch.manual_seed(0)
    out = {
        "standard": StandardSAE(StandardSAEConfig(d_in=d, d_sae=f)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=f, apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(d_in=d, d_sae=f, k=8)),
    }
    for sae in out.values():
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(0.05 + 0.1 * torch.rand_like(sae.threshold))
    return out


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk"])
def test_feature_activation_equals_sae_encode(kind, tmp_path):
    sae = _saes()[kind]
    h = torch.randn(4, 7, 64) * 3
    enc = sae.encode(h)
    for i in (0, 5, 95):
        torch.testing.assert_close(feature(sae, i).activation(h), enc[..., i], atol=1e-5, rtol=1e-5)
    # round trip through disk
    loaded = load_sae(save_sae(sae, tmp_path / kind))
    torch.testing.assert_close(loaded.encode(h), enc)
    f = feature(loaded, 5)
    assert abs(float(f.direction.norm()) - 1) < 1e-6
    if kind == "jumprelu":
        assert f.threshold == pytest.approx(float(sae.threshold[5].detach()))
    else:
        assert f.threshold is None


def test_b_dec_only_where_the_sae_applies_it():
    saes = _saes()
    h = torch.randn(3, 64)
    std, jr = saes["standard"], saes["jumprelu"]
    assert std.cfg.apply_b_dec_to_input and not jr.cfg.apply_b_dec_to_input
    i = 3
    torch.testing.assert_close(feature(std, i).pre_activation(h), (h - std.b_dec) @ std.W_enc[:, i] + std.b_enc[i])
    torch.testing.assert_close(feature(jr, i).pre_activation(h), h @ jr.W_enc[:, i] + jr.b_enc[i])


def test_feature_out_of_range_and_width_mismatch(tiny_models):
    sae = _saes(d=32)["standard"]
    with pytest.raises(SieveError, match=r"feature 96 is out of range: this SAE has 96 features \(0..95\)"):
        feature(sae, 96)
    with pytest.raises(ShapeMismatch, match="SAE d_in=32 does not match the model's hidden size 64"):
        check_compatible(sae, tiny_models["llama"])


def test_study_format_sae_loads_from_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    d, f, k = 16, 40, 4
    torch.manual_seed(1)
    sd = {"encoder_DF": torch.randn(d, f), "encoder_bias_F": torch.randn(f), "decoder_FD": torch.randn(f, d),
          "decoder_bias_D": torch.randn(d)}
    for fmt in ("pt", "safetensors"):
        folder = tmp_path / fmt
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"sae_cfg": {"d_in": d, "d_sae": f, "k": k}}))
        if fmt == "pt":
            torch.save(sd, folder / "layer_12.pt")
        else:
            save_file(sd, str(folder / "layer_12.safetensors"))
        sae = load_sae(folder, layer=12)
        h = torch.randn(5, d)
        pre = h @ sd["encoder_DF"] + sd["encoder_bias_F"]  # no b_dec subtraction in this format
        top = pre.topk(k, dim=-1)
        want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        torch.testing.assert_close(sae.encode(h), want)
        torch.testing.assert_close(sae.decode(want), want @ sd["decoder_FD"] + sd["decoder_bias_D"])


def test_an_sae_read_at_another_layer_than_its_own_is_warned_about(caplog):
    import logging

    from sieve.recipe import load_recipe
    from sieve.setting import preflight
    from sieve.steering import sae_layer
    from sieve.world import load_world, world_info

    assert sae_layer(load_world().sae) == int(world_info()["layer"])  # the world's SAE names its layer
    with caplog.at_level(logging.WARNING, logger="sieve.setting"):
        preflight(load_recipe("recipes/regex.toml"))
        assert "trained on layer" not in caplog.text
        preflight(load_recipe("recipes/regex.toml", ["sae.layer=1"]))
    assert "[sae.layer] is 1, but the SAE was trained on layer 2" in caplog.text


def _overwrite_in_place(path, transform) -> None:
    """Rewrite a safetensors file's bytes in place: same file, same inode, as a job saving into it would."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    data = st_save({k: transform(v) for k, v in load_file(path).items()})
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def test_loaded_weights_do_not_follow_their_file(tmp_path):
    """A write into a model's or SAE's weight file while they are loaded does not reach the loaded
    weights (on a CPU they would otherwise stay mapped onto the file)."""
    import shutil

    from safetensors.torch import load_file

    from sieve.world import world_model_dir, world_sae_dir

    shutil.copytree(world_model_dir(), tmp_path / "model")
    shutil.copytree(world_sae_dir(), tmp_path / "sae")
    hf = underlying(load_model(tmp_path / "model"))
    sae = load_sae(tmp_path / "sae")
    before = {**{f"m.{k}": v.clone() for k, v in hf.state_dict().items()},
              **{f"s.{k}": v.clone() for k, v in sae.state_dict().items()}}
    _overwrite_in_place(tmp_path / "model" / "model.safetensors", torch.zeros_like)
    _overwrite_in_place(tmp_path / "sae" / "sae_weights.safetensors", torch.zeros_like)
    assert all(not v.any() for v in load_file(tmp_path / "model" / "model.safetensors").values())  # it did change
    after = {**{f"m.{k}": v for k, v in hf.state_dict().items()}, **{f"s.{k}": v for k, v in sae.state_dict().items()}}
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied weights stay tied
