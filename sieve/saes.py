"""Load sparse autoencoders and look at one feature of one.

``load_sae`` reads (a) a sae-lens pretrained release + id (GemmaScope, ...), (b) a local sae-lens
directory (``cfg.json`` + ``sae_weights.safetensors``), or (c) the study's own TopK format (a
``config.json`` with an ``sae_cfg`` block and per-layer weights, safetensors or a torch state dict
read with ``weights_only=True``). All come back as sae-lens ``SAE`` objects.

``Feature`` is the view sieve steers with: the encoder column, encoder bias, threshold and decoder row of
one feature, and its pre-activation computed by that SAE's own rule (``b_dec`` subtracted only where
the SAE applies it; decoder-norm rescaling where it uses it).

sae-lens is imported lazily: it pulls transformer-lens and costs ~10 s at import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sieve.errors import NotAvailableOffline, ShapeMismatch, SieveError
from sieve.models import _hub_hint, _offline, hidden_size

__all__ = ["load_sae", "Feature", "feature", "check_compatible", "save_sae", "convert_study_sae"]


def _sae_lens():
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    import sae_lens

    return sae_lens


def load_sae(
    source: str | Path,
    sae_id: str | None = None,
    *,
    layer: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
):
    """Load an SAE from a sae-lens release + id, a local sae-lens dir, or the study's own format.

    Args:
        source: a sae-lens release name (``"gemma-scope-2b-pt-res"``), a local directory, or a hub repo
            in the study's format (``"tilde-research/sieve_coding"``).
        sae_id: the SAE's id inside the release (``"layer_8/width_16k/average_l0_71"``).
        layer: for the study's format, which layer's weights to read.

    Example:
        >>> from sieve.world import world_sae_dir
        >>> sae = load_sae(world_sae_dir())
        >>> sae.cfg.d_in > 0
        True
    """
    path = Path(source)
    if path.is_dir():
        if (path / "cfg.json").exists():
            sae = _sae_lens().SAE.load_from_disk(path, device=device, dtype=dtype)
            return sae
        if (path / "config.json").exists() and "sae_cfg" in json.loads((path / "config.json").read_text()):
            return convert_study_sae(path, layer=layer, device=device, dtype=dtype)
        raise SieveError(
            f"{path} is neither a sae-lens SAE directory (cfg.json + sae_weights.safetensors) nor the "
            "study's format (config.json with an 'sae_cfg' block)"
        )
    if path.suffix in {".json", ".safetensors", ".pt"} or "/" in str(source) and sae_id is None:
        # A hub repo in the study's format.
        return _load_study_from_hub(str(source), layer=layer, device=device, dtype=dtype)
    if sae_id is None:
        raise SieveError(f"SAE release {source!r} needs an sae_id (e.g. 'layer_8/width_16k/average_l0_71')")
    sl = _sae_lens()
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if source not in directory:
        raise SieveError(f"unknown sae-lens release {source!r}; known releases include "
                         f"{sorted(directory)[:12]} ... (see sae_lens pretrained_saes.yaml)")
    ids = directory[source].saes_map
    if sae_id not in ids:
        close = [i for i in ids if i.split("/")[0] == sae_id.split("/")[0]][:8]
        raise SieveError(f"release {source!r} has no SAE {sae_id!r}; ids on that layer: {close}")
    repo = directory[source].repo_id
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        probe = f"{ids[sae_id]}/cfg.json" if "gemma-scope" not in source else f"{ids[sae_id]}/params.npz"
        if not isinstance(try_to_load_from_cache(repo, probe), str):
            raise NotAvailableOffline(_hub_hint(f"SAE {source}/{sae_id} (repo", repo + ")"))
    try:
        return sl.SAE.from_pretrained(source, sae_id, device=device, dtype=dtype)
    except OSError as e:
        raise NotAvailableOffline(_hub_hint(f"SAE {source}/{sae_id} (repo", repo + ")")) from e


def _pick(tensors: dict[str, Tensor], d_in: int, d_sae: int) -> dict[str, Tensor]:
    """Find encoder/decoder weights and biases by shape (names carry shape suffixes, vary by version)."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        low = name.lower()
        if t.dim() == 2 and tuple(t.shape) == (d_in, d_sae) and ("enc" in low or d_in != d_sae):
            out["W_enc"] = t
        elif t.dim() == 2 and tuple(t.shape) == (d_sae, d_in) and ("dec" in low or d_in != d_sae):
            out["W_dec"] = t
        elif t.dim() == 2 and tuple(t.shape) == (d_sae, d_in) and "enc" in low:
            out["W_enc"] = t.T  # stored as nn.Linear weight [d_sae, d_in]
        elif t.dim() == 1 and t.shape[0] == d_sae and d_sae != d_in:
            out["b_enc"] = t
        elif t.dim() == 1 and t.shape[0] == d_in and d_sae != d_in:
            out["b_dec"] = t
        elif t.dim() == 1 and "enc" in low:
            out["b_enc"] = t
        elif t.dim() == 1 and "dec" in low:
            out["b_dec"] = t
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(out)
    if missing:
        raise SieveError(
            f"could not find {sorted(missing)} among the SAE's tensors "
            f"{ {k: tuple(v.shape) for k, v in tensors.items()} } (d_in={d_in}, d_sae={d_sae})"
        )
    return out


def convert_study_sae(path: Path, *, layer: int | None, device: str = "cpu", dtype: str = "float32"):
    """Read the study's TopK SAE format into a sae-lens ``TopKSAE``.

    Its encoder is ``TopK(x·W_enc + b_enc)`` without subtracting ``b_dec`` (``apply_b_dec_to_input`` is
    therefore False), decoding ``f·W_dec + b_dec``.
    """
    from safetensors.torch import load_file

    cfg_all = json.loads((path / "config.json").read_text())
    cfg = cfg_all["sae_cfg"]
    d_in = int(cfg.get("d_in") or cfg.get("d_model") or cfg.get("input_dim"))
    d_sae = int(cfg.get("d_sae") or cfg.get("num_features") or cfg.get("n_features") or cfg.get("dict_size"))
    k = int(cfg.get("k") or cfg.get("topk") or cfg.get("top_k") or 64)
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".pt", ".pth", ".bin"})
    if layer is not None:
        by_layer = [p for p in files if any(f"{layer}" == s for s in _digits(p.stem))]
        files = by_layer or files
    if len(files) != 1:
        raise SieveError(f"{path}: expected one weights file for layer {layer}, found {[p.name for p in files]}"
                         " (pass layer=)")
    f = files[0]
    if f.suffix == ".safetensors":
        tensors = load_file(str(f))
    else:
        # A torch state dict: the restricted unpickler only, never arbitrary objects.
        tensors = torch.load(f, map_location="cpu", weights_only=True)
        tensors = {k2: v for k2, v in tensors.items() if isinstance(v, Tensor)}
    w = _pick(tensors, d_in, d_sae)
    sl = _sae_lens()
    sae = sl.TopKSAE(sl.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=False,
                                      dtype=dtype, device=device))
    sae.load_state_dict({k2: v.to(torch.float32).contiguous() for k2, v in w.items()}, strict=True)
    return sae.to(device=device, dtype=getattr(torch, dtype))


def _digits(stem: str) -> list[str]:
    import re

    return re.findall(r"\d+", stem)


def _load_study_from_hub(repo: str, *, layer: int | None, device: str, dtype: str):
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo, local_files_only=_offline())
    except Exception as e:
        raise NotAvailableOffline(_hub_hint("SAE repo", repo)) from e
    sub = Path(local)
    cands = [p for p in sub.rglob("config.json") if "sae_cfg" in p.read_text()]
    if layer is not None:
        cands = [p for p in cands if str(layer) in _digits(p.parent.name)] or cands
    if not cands:
        raise SieveError(f"{repo}: no config.json with an 'sae_cfg' block found")
    return convert_study_sae(cands[0].parent, layer=layer, device=device, dtype=dtype)


def save_sae(sae: Any, out_dir: str | Path) -> Path:
    """Save an SAE in sae-lens format (``cfg.json`` + ``sae_weights.safetensors``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sae.save_model(str(out))
    return out


def check_compatible(sae: Any, model: Any) -> None:
    """Raise ``ShapeMismatch`` when the SAE's d_in differs from the model's hidden size."""
    d = hidden_size(model)
    if int(sae.cfg.d_in) != d:
        raise ShapeMismatch(
            f"SAE d_in={sae.cfg.d_in} does not match the model's hidden size {d}; "
            "this SAE was trained on another model or layer type"
        )


@dataclass(frozen=True)
class Feature:
    """One SAE feature, as sieve detects and steers with it.

    ``pre_activation(h)`` is the feature's true pre-activation by the SAE's own rule;
    ``activation(h)`` equals ``sae.encode(h)[..., index]``. ``direction`` is the unit decoder row.
    """

    sae: Any
    index: int

    @property
    def encoder(self) -> Tensor:
        return self.sae.W_enc[:, self.index].detach()

    @property
    def encoder_bias(self) -> float:
        return float(self.sae.b_enc[self.index].detach())

    @property
    def decoder(self) -> Tensor:
        return self.sae.W_dec[self.index].detach()

    @property
    def direction(self) -> Tensor:
        d = self.decoder.float()
        return d / d.norm()

    @property
    def threshold(self) -> float | None:
        """The JumpReLU threshold, or None for SAEs without one."""
        t = getattr(self.sae, "threshold", None)
        return None if t is None else float(t[self.index].detach())

    @property
    def _scale(self) -> float:
        if getattr(self.sae.cfg, "rescale_acts_by_decoder_norm", False):
            return float(self.sae.W_dec[self.index].norm())
        return 1.0

    def linear(self) -> tuple[Tensor, float]:
        """(w, b) such that ``pre_activation(h) = h·w + b`` exactly.

        Raises for SAEs that normalise their input non-linearly (then no linear detector exists).
        """
        norm = getattr(self.sae.cfg, "normalize_activations", "none")
        if norm not in ("none", None):
            raise SieveError(f"SAE normalises its input ({norm!r}): its features are not linear detectors")
        w = self.encoder.float() * self._scale
        b = self.encoder_bias
        if getattr(self.sae.cfg, "apply_b_dec_to_input", False):
            b -= float(self.sae.b_dec.detach().float() @ self.encoder.float())
        return w, b * self._scale

    def pre_activation(self, h: Tensor) -> Tensor:
        """``[..., d] -> [...]``: the feature's pre-activation by the SAE's own rule."""
        w, b = self.linear()
        return h.float() @ w.to(h.device) + b

    def activation(self, h: Tensor) -> Tensor:
        """``[..., d] -> [...]``: the feature's activation, equal to ``sae.encode(h)[..., index]``."""
        arch = self.sae.cfg.architecture()
        pre = self.pre_activation(h)
        if arch == "jumprelu":
            return pre * (pre > self.threshold)
        if arch == "standard":
            return torch.relu(pre)
        return self.sae.encode(h.to(self.sae.dtype))[..., self.index].float()


def feature(sae: Any, index: int) -> Feature:
    """The view of feature ``index`` of ``sae``, with a range check.

    Example:
        >>> f = feature(sae, 931)  # doctest: +SKIP
        >>> f.direction.norm()  # doctest: +SKIP
        tensor(1.)
    """
    n = int(sae.cfg.d_sae)
    if not isinstance(index, int) or not 0 <= index < n:
        raise SieveError(f"feature {index!r} is out of range: this SAE has {n} features (0..{n - 1})")
    return Feature(sae, index)
