"""Real SAEs offline: GemmaScope's own layout and the study's TopK layout, from a folder and the hub cache.

The files are small, but written in exactly the layouts the real releases use: GemmaScope's
``LAYER/WIDTH/L0/params.npz`` (numpy arrays ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``,
``b_dec``, ``threshold``), and the study's ``config.json`` (``sae_cfg``: ``d_model``, ``expansion_factor``,
``activation_fn_kwargs``) with ``layer_N.pt`` written by plain ``pickle.dump`` (its reader uses
``pickle.load``). The hub cache is laid out as huggingface_hub lays it out (refs/main, snapshots/<commit>/...
symlinked into blobs/).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from sieve.errors import NotAvailableOffline, SieveError
from sieve.saes import feature, load_sae

D, F = 16, 48
GS_REPO = "google/gemma-scope-2b-pt-res"
GS_RELEASE = "gemma-scope-2b-pt-res"
GS_ID = "layer_8/width_16k/average_l0_71"


def _gemma_scope_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32),
        "W_dec": rng.normal(size=(F, D)).astype(np.float32),
        "b_enc": (0.3 * rng.normal(size=F)).astype(np.float32),
        "b_dec": rng.normal(size=D).astype(np.float32),  # large on purpose: GemmaScope never subtracts it
        "threshold": rng.uniform(0.2, 1.5, size=F).astype(np.float32),
    }


def _write_gemma_scope(root: Path, arrays: dict[str, np.ndarray], sae_id: str = GS_ID) -> Path:
    leaf = root / sae_id
    leaf.mkdir(parents=True)
    np.savez(leaf / "params.npz", **arrays)
    return leaf / "params.npz"


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay ``files`` (repo path -> local file) into a hub cache the way huggingface_hub does."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "blobs").mkdir()
    for rel, src in files.items():
        blob = base / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copy(src, blob)
        dst = base / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(Path("../" * (len(Path(rel).parts) + 1)) / "blobs" / blob.name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _reference_jumprelu(a: dict[str, np.ndarray], h: torch.Tensor) -> torch.Tensor:
    """GemmaScope's published encoder: pre = h·W_enc + b_enc, kept where pre > threshold."""
    pre = h @ torch.from_numpy(a["W_enc"]) + torch.from_numpy(a["b_enc"])
    return pre * (pre > torch.from_numpy(a["threshold"])) * (pre > 0)


def _sae_lens_own(release: str, sae_id: str):
    """sae-lens's own GemmaScope loader on the same (cached) file, only its width guess overridden
    (it derives d_in/d_sae from the repo and folder names, which a small test file cannot match)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import gemma_2_sae_huggingface_loader

    def converter(repo_id, folder_name, device="cpu", force_download=False, cfg_overrides=None):
        return gemma_2_sae_huggingface_loader(repo_id, folder_name, device, force_download,
                                              {**(cfg_overrides or {}), "d_in": D, "d_sae": F})

    return SAE.from_pretrained(release, sae_id, converter=converter)


def test_gemma_scope_local_folder_in_its_own_layout(tmp_path):
    a = _gemma_scope_arrays()
    root = tmp_path / "gemma-scope-2b-pt-res"  # as `hf download google/gemma-scope-2b-pt-res --local-dir` leaves it
    params = _write_gemma_scope(root, a)
    _write_gemma_scope(root, _gemma_scope_arrays(1), "layer_8/width_16k/average_l0_22")
    h = 2 * torch.randn(3, 5, D)
    want = _reference_jumprelu(a, h)
    for sae in (load_sae(root, GS_ID), load_sae(params.parent), load_sae(params)):
        assert sae.cfg.architecture() == "jumprelu" and not sae.cfg.apply_b_dec_to_input
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, F)
        torch.testing.assert_close(sae.encode(h), want)
        for i in (0, 7, F - 1):
            f = feature(sae, i)
            assert f.threshold == pytest.approx(float(a["threshold"][i]))
            torch.testing.assert_close(f.activation(h), want[..., i])
    assert 0 < (want > 0).float().mean() < 1  # the threshold really cuts
    with pytest.raises(SieveError, match=r"has no 'layer_8/width_16k/average_l0_99'.*average_l0_22.*average_l0_71"):
        load_sae(root, "layer_8/width_16k/average_l0_99")
    with pytest.raises(SieveError, match="holds several GemmaScope SAEs; pass one of them as the SAE id"):
        load_sae(root)


def test_gemma_scope_matches_sae_lens_own_loader_from_the_hub_cache(tmp_path, hub_cache):
    a = _gemma_scope_arrays(2)
    params = _write_gemma_scope(tmp_path / "src", a)
    _fake_hub_cache(hub_cache, GS_REPO, {f"{GS_ID}/params.npz": params})
    ours_release = load_sae(GS_RELEASE, GS_ID)  # the sae-lens release name, resolved offline
    ours_repo = load_sae(GS_REPO, GS_ID)  # the hub repo id + folder
    theirs = _sae_lens_own(GS_RELEASE, GS_ID)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours_release.state_dict()[k], v)
    assert theirs.cfg.apply_b_dec_to_input == ours_release.cfg.apply_b_dec_to_input is False
    h = 3 * torch.randn(4, 6, D)
    enc = theirs.encode(h)
    torch.testing.assert_close(ours_release.encode(h), enc)
    torch.testing.assert_close(ours_repo.encode(h), enc)
    for i in range(F):  # the detector sieve builds equals sae-lens's JumpReLU, feature by feature
        torch.testing.assert_close(feature(ours_repo, i).activation(h), enc[..., i], atol=1e-5, rtol=1e-5)


def test_gemma_scope_not_cached_offline_hint_is_one_that_works(hub_cache):
    with pytest.raises(NotAvailableOffline) as e:
        load_sae(GS_RELEASE, GS_ID)
    msg = str(e.value)
    assert f"`hf download {GS_REPO} {GS_ID}/params.npz`" in msg
    assert "--local-dir DIR" in msg and "same id" in msg
    assert msg.count("(") == msg.count(")")  # no stray bracket
    with pytest.raises(NotAvailableOffline, match=GS_REPO):
        load_sae(GS_REPO, GS_ID)


def test_gemma_scope_bad_files_say_what_is_wrong(tmp_path):
    a = _gemma_scope_arrays()
    del a["threshold"]
    with pytest.raises(SieveError, match=r"lacks \['threshold'\]"):
        load_sae(_write_gemma_scope(tmp_path / "a", a))
    b = _gemma_scope_arrays()
    b["W_dec"] = b["W_dec"][:, :-1]
    with pytest.raises(SieveError, match=r"W_dec has shape \[48, 15\], expected \[48, 16\]"):
        load_sae(_write_gemma_scope(tmp_path / "b", b))
    with pytest.raises(SieveError, match="does not exist"):
        load_sae(tmp_path / "nowhere" / "params.npz")


def _study_files(folder: Path, layer: int, *, k: int = 4, exp: int = 3, seed: int = 3) -> OrderedDict:
    torch.manual_seed(seed)
    d_sae = D * exp
    cfg = {"sae_cfg": {"d_model": D, "expansion_factor": exp, "device": "cuda", "dtype": "torch.bfloat16",
                       "apply_activation_fn": True, "activation_fn_names": ["topk", "topk"],
                       "activation_fn_kwargs": [{"k": 64}, {"k": k}], "eval_activation_idx": 1}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = OrderedDict(W_enc_DF=torch.randn(D, d_sae), b_enc_F=0.5 * torch.randn(d_sae),
                     W_dec_FD=torch.randn(d_sae, D), b_dec_D=torch.randn(D))
    with open(folder / f"layer_{layer}.pt", "wb") as fh:
        pickle.dump(sd, fh)  # the study's files are plain pickles (it reads them with pickle.load)
    return sd


def _reference_study_topk(sd: OrderedDict, h: torch.Tensor, k: int) -> torch.Tensor:
    pre = torch.relu(h @ sd["W_enc_DF"] + sd["b_enc_F"])  # no b_dec subtraction in this format
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def test_study_topk_layout_from_folder_and_hub_cache(tmp_path, hub_cache):
    folder = tmp_path / "sieve_coding"
    sd = _study_files(folder, 12)
    _study_files(folder, 8, seed=9)  # another layer beside it
    h = 2 * torch.randn(5, D)
    want = _reference_study_topk(sd, h, k=4)
    local = load_sae(folder, layer=12)
    _fake_hub_cache(hub_cache, "tilde-research/sieve_coding",
                    {"config.json": folder / "config.json", "layer_12.pt": folder / "layer_12.pt"})
    cached = load_sae("tilde-research/sieve_coding", layer=12)
    for sae in (local, cached):
        assert sae.cfg.architecture() == "topk" and sae.cfg.k == 4 and sae.cfg.d_sae == 3 * D
        torch.testing.assert_close(sae.encode(h), want)
        torch.testing.assert_close(sae.decode(want), want @ sd["W_dec_FD"] + sd["b_dec_D"])
        torch.testing.assert_close(feature(sae, 5).activation(h), want[:, 5])
    with pytest.raises(SieveError, match=r"layer_12\.pt.*layer_8\.pt.*set \[sae\] layer"):
        load_sae(folder)
    with pytest.raises(NotAvailableOffline, match=r"hf download tilde-research/sieve_coding layer_8\.pt"):
        load_sae("tilde-research/sieve_coding", layer=8)


def test_study_layer_file_of_parameters_loads(tmp_path):
    """A layer file holding ``nn.Parameter``s (a module's tensors pickled as they are) loads, as their
    tensors: the parameter's rebuild is the one global besides tensors' own that is read."""
    folder = tmp_path / "params"
    sd = _study_files(folder, 12)
    with open(folder / "layer_12.pt", "wb") as fh:
        pickle.dump(OrderedDict((k, torch.nn.Parameter(v)) for k, v in sd.items()), fh)
    h = 2 * torch.randn(5, D)
    torch.testing.assert_close(load_sae(folder, layer=12).encode(h), _reference_study_topk(sd, h, k=4))


def test_study_layer_file_never_unpickles_code(tmp_path):
    import os

    folder = tmp_path / "evil"
    _study_files(folder, 12)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(folder / "layer_12.pt", "wb") as fh:
        pickle.dump({"W_enc_DF": Payload()}, fh)
    with pytest.raises(SieveError, match="not a state dict of tensors.*refusing posix.system"):
        load_sae(folder, layer=12)
    assert not (tmp_path / "pwned").exists()


def test_study_layer_file_in_torch_zip_format_never_unpickles_code(tmp_path):
    """The same payload written by ``torch.save`` (a zip): torch's weights-only unpickler refuses it,
    as one error naming the file."""
    import os

    folder = tmp_path / "evil"
    _study_files(folder, 12)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"W_enc_DF": Payload()}, folder / "layer_12.pt")
    with pytest.raises(SieveError, match=r"layer_12\.pt: not a state dict of tensors"):
        load_sae(folder, layer=12)
    assert not (tmp_path / "pwned").exists()


def test_a_gemma_scope_folder_of_another_width_or_too_few_features_is_refused_before_the_weights_load(tmp_path):
    """GemmaScope's own layout has no cfg.json: its widths are read from W_enc's header (they were
    found only after the model loaded, in a message naming no key)."""
    from sieve.errors import RecipeError
    from sieve.recipe import load_recipe
    from sieve.setting import preflight

    root = tmp_path / "gs"
    _write_gemma_scope(root, _gemma_scope_arrays())
    base = [f'sae.source="{root}"', f'sae.id="{GS_ID}"', "sae.layer=2"]
    with pytest.raises(RecipeError, match=rf"\[sae.source\] the SAE .* reads vectors of width {D} but the model's hidden"):
        preflight(load_recipe("recipes/regex.toml", [*base, "sae.feature=1"]))
    from sieve.world import load_world

    w = load_world()
    width = int(w.sae.cfg.d_in)
    narrow = tmp_path / "gs2"
    a = _gemma_scope_arrays()
    a["W_enc"] = np.zeros((width, 5), np.float32)
    _write_gemma_scope(narrow, a)
    with pytest.raises(RecipeError, match=r"\[sae.feature\] 7 is out of range: the SAE has 5 features"):
        preflight(load_recipe("recipes/regex.toml", [f'sae.source="{narrow}"', f'sae.id="{GS_ID}"', "sae.layer=2",
                                                     "sae.feature=7"]))
