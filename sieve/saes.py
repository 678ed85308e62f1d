"""Load sparse autoencoders and look at one feature of one.

``load_sae`` reads (a) a local sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``), (b)
GemmaScope's own layout (``layer_8/width_16k/average_l0_71/params.npz``) from a local folder or the hub
cache, (c) the study's own TopK layout (``config.json`` with an ``sae_cfg`` block and ``layer_N.pt``), or
(d) a sae-lens release + id. All come back as sae-lens ``SAE`` objects.

``Feature`` is the view sieve steers with: the encoder column, encoder bias, threshold and decoder row of
one feature, and its pre-activation computed by that SAE's own rule (``b_dec`` subtracted only where
the SAE applies it; decoder-norm rescaling where it uses it).

sae-lens is imported lazily: it pulls transformer-lens and costs ~10 s at import.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sieve.errors import NotAvailableOffline, ShapeMismatch, SieveError, first_line
from sieve.models import _offline, hidden_size

__all__ = ["load_sae", "load_gemma_scope", "Feature", "feature", "check_compatible", "save_sae", "convert_study_sae"]


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
    """Load an SAE from a local folder, the hub cache, or a sae-lens release.

    Where ``source`` may point:

    - a sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``);
    - GemmaScope's own layout, as ``hf download google/gemma-scope-2b-pt-res --local-dir DIR`` leaves
      it: ``DIR`` with ``sae_id="layer_8/width_16k/average_l0_71"``, that leaf folder itself, or its
      ``params.npz``;
    - the study's TopK layout (``config.json`` with an ``sae_cfg`` block, ``layer_{i}.pt`` or
      ``layer_{i}.safetensors`` beside it), with ``layer=``;
    - a sae-lens release name (``"gemma-scope-2b-pt-res"`` + ``sae_id``) or a hub repo id
      (``"google/gemma-scope-2b-pt-res"`` + ``sae_id``; ``"tilde-research/sieve_coding"`` + ``layer``):
      read from the hub cache when ``HF_HUB_OFFLINE=1``, downloaded otherwise.

    GemmaScope comes back as a sae-lens ``JumpReLUSAE`` with the same weights and configuration as
    sae-lens's own loader gives it (``apply_b_dec_to_input=False``); the study's SAE as a ``TopKSAE``.

    Example:
        >>> from sieve.world import world_sae_dir
        >>> sae = load_sae(world_sae_dir())
        >>> sae.cfg.d_in > 0
        True
    """
    from sieve.models import own_weights

    return own_weights(_load_sae(source, sae_id, layer=layer, device=device, dtype=dtype))


def _load_sae(source: str | Path, sae_id: str | None, *, layer: int | None, device: str, dtype: str):
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".npz":
            return load_gemma_scope(path, device=device, dtype=dtype)
        if path.name in {"cfg.json", "config.json"}:
            return _load_sae(path.parent, sae_id, layer=layer, device=device, dtype=dtype)
        raise SieveError(f"{path}: an SAE file must be GemmaScope's params.npz, or give the SAE's folder")
    if path.is_dir():
        return _load_local_dir(path, sae_id, layer=layer, device=device, dtype=dtype)
    if str(source).startswith((".", "/", "~")) or path.suffix in {".npz", ".json", ".safetensors", ".pt"}:
        raise SieveError(f"SAE path {str(source)!r} does not exist")
    return _load_from_hub(str(source), sae_id, layer=layer, device=device, dtype=dtype)


def _load_local_dir(path: Path, sae_id: str | None, *, layer: int | None, device: str, dtype: str):
    if sae_id:
        sub = path / sae_id
        if (sub / "params.npz").is_file():
            return load_gemma_scope(sub / "params.npz", device=device, dtype=dtype)
        if (sub / "cfg.json").is_file():
            return _sae_lens().SAE.load_from_disk(sub, device=device, dtype=dtype)
    if (path / "cfg.json").is_file():
        return _sae_lens().SAE.load_from_disk(path, device=device, dtype=dtype)
    if (path / "params.npz").is_file():
        return load_gemma_scope(path / "params.npz", device=device, dtype=dtype)
    cfg = path / "config.json"
    if cfg.is_file() and "sae_cfg" in _read_json(cfg):
        return convert_study_sae(path, layer=layer, device=device, dtype=dtype)
    found = sorted(str(p.parent.relative_to(path)) for p in path.glob("*/*/*/params.npz"))
    if found:
        where = f"has no {sae_id!r}; " if sae_id else "holds several GemmaScope SAEs; "
        raise SieveError(f"{path} {where}pass one of them as the SAE id ([sae] id = ...): "
                         f"{_shortlist(found, sae_id)}")
    raise SieveError(
        f"{path} is not an SAE folder: expected a sae-lens folder (cfg.json + sae_weights.safetensors), "
        "GemmaScope's layout (LAYER/WIDTH/L0/params.npz, with the id naming the subfolder), or the "
        "study's format (config.json with an 'sae_cfg' block and layer_N.pt)"
    )


def _shortlist(ids: list[str], near: str | None, n: int = 8) -> list[str]:
    if near:
        head = near.split("/")[0]
        close = [i for i in ids if i.split("/")[0] == head]
        ids = close or ids
    return ids[:n] + ([f"... {len(ids) - n} more"] if len(ids) > n else [])


def _read_json(p: Path) -> dict:
    from sieve.files import read_json

    try:
        return read_json(p)
    except ValueError as e:
        raise SieveError(f"{p}: not readable JSON ({first_line(e):.160})") from None


def _offline_hint(what: str, repo: str, files: str) -> str:
    return (
        f"{what} is not in the hub cache and the hub cannot be reached (HF_HUB_OFFLINE="
        f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}). Where there is network, run "
        f"`hf download {repo} {files}` (into the hub cache, which works offline afterwards: copy "
        f"~/.cache/huggingface/hub or set HF_HUB_CACHE), or add `--local-dir DIR` and give DIR as the SAE "
        "source with the same id."
    )


def _hub_file(repo: str, filename: str, what: str) -> str:
    """One file of a hub repo: from the cache offline, downloaded (or cached) online."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo, filename, local_files_only=_offline())
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
        raise NotAvailableOffline(_offline_hint(what, repo, filename)) from e
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise SieveError(f"{what}: the hub repo {repo!r} has no file {filename!r}") from e
    except OSError as e:
        raise NotAvailableOffline(_offline_hint(what, repo, filename)) from e


def _load_from_hub(source: str, sae_id: str | None, *, layer: int | None, device: str, dtype: str):
    directory = _releases()
    if source in directory:
        entry = directory[source]
        if not sae_id:
            raise SieveError(f"SAE release {source!r} needs an id (e.g. {next(iter(entry.saes_map))!r})")
        if sae_id not in entry.saes_map:
            raise SieveError(f"release {source!r} has no SAE {sae_id!r}; ids on that layer: "
                             f"{_shortlist(sorted(entry.saes_map), sae_id)}")
        folder = entry.saes_map[sae_id]
        if entry.conversion_func == "gemma_2":
            params = _hub_file(entry.repo_id, f"{folder}/params.npz", f"SAE {source} {sae_id}")
            return load_gemma_scope(params, device=device, dtype=dtype)
        if _offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(entry.repo_id, f"{folder}/cfg.json"), str):
                raise NotAvailableOffline(_offline_hint(f"SAE {source} {sae_id}", entry.repo_id, f"{folder}/*"))
        try:
            return _sae_lens().SAE.from_pretrained(source, sae_id, device=device, dtype=dtype)
        except OSError as e:
            raise NotAvailableOffline(_offline_hint(f"SAE {source} {sae_id}", entry.repo_id, f"{folder}/*")) from e
    if source.count("/") != 1:
        raise SieveError(f"unknown SAE source {source!r}: not a folder, not a sae-lens release (e.g. "
                         "'gemma-scope-2b-pt-res'), not a hub repo id ('owner/name')")
    if sae_id:
        # A hub repo in GemmaScope's layout (ID/params.npz), else a sae-lens folder inside it (ID/cfg.json).
        what = f"SAE {source} {sae_id}"
        try:
            params = _hub_file(source, f"{sae_id}/params.npz", what)
        except SieveError as first:
            try:
                cfg = _hub_file(source, f"{sae_id}/cfg.json", what)
                _hub_file(source, f"{sae_id}/sae_weights.safetensors", what)
            except SieveError:
                raise first from None
            return _sae_lens().SAE.load_from_disk(Path(cfg).parent, device=device, dtype=dtype)
        return load_gemma_scope(params, device=device, dtype=dtype)
    return _load_study_from_hub(source, layer=layer, device=device, dtype=dtype)


def hub_sae_repo(source: str) -> str | None:
    """The hub repo an SAE source names, as :func:`load_sae` reads it: a sae-lens release's repo, or
    the repo id itself (``owner/name``); None for anything else.

    Example:
        >>> hub_sae_repo("gemma-scope-2b-pt-res-canonical")
        'google/gemma-scope-2b-pt-res'
        >>> hub_sae_repo("tilde-research/sieve_coding")
        'tilde-research/sieve_coding'
    """
    directory = _releases()
    if source in directory:
        return directory[source].repo_id
    return source if source.count("/") == 1 else None


def _releases() -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    _sae_lens()
    return get_pretrained_saes_directory()


def load_gemma_scope(params: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """Read one GemmaScope ``params.npz`` into a sae-lens ``JumpReLUSAE``, as sae-lens's loader does.

    The file holds ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``
    and ``threshold [d_sae]`` (lower-case ``w_`` names are accepted, as sae-lens does). GemmaScope encodes
    ``pre = h·W_enc + b_enc`` without subtracting ``b_dec`` and keeps ``pre`` where ``pre > threshold``.
    Embedding SAEs (a folder named ``embedding/...``) get sae-lens's ``sqrt(d_in)`` rescaling.

    Example:
        >>> sae = load_gemma_scope("gemma-scope/layer_8/width_16k/average_l0_71/params.npz")  # doctest: +SKIP
        >>> sae.cfg.architecture(), sae.cfg.apply_b_dec_to_input  # doctest: +SKIP
        ('jumprelu', False)
    """
    import numpy as np

    params = Path(params)
    try:
        with np.load(params, allow_pickle=False) as data:
            arrays = {("W_" + k[2:] if k.startswith("w_") else k): np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as e:
        raise SieveError(f"{params}: not a readable GemmaScope params.npz ({e})") from e
    need = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise SieveError(f"{params}: GemmaScope params.npz lacks {missing}; it has {sorted(arrays)}")
    w_enc = arrays["W_enc"]
    if w_enc.ndim != 2:
        raise SieveError(f"{params}: W_enc must be [d_in, d_sae], found shape {list(w_enc.shape)}")
    d_in, d_sae = (int(n) for n in w_enc.shape)
    shapes = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for k, shape in shapes.items():
        if tuple(arrays[k].shape) != shape:
            raise SieveError(f"{params}: {k} has shape {list(arrays[k].shape)}, expected {list(shape)} "
                             f"(W_enc is [{d_in}, {d_sae}])")
    state = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(torch.float32) for k in need}
    scaling = arrays.get("scaling_factor")
    if scaling is not None and not np.allclose(scaling, 1.0):
        raise SieveError(f"{params}: a scaling_factor other than 1 is not supported (sae-lens rejects it too "
                         "for GemmaScope)")
    if "embedding" in params.parts:
        state["W_enc"] = state["W_enc"] / float(np.sqrt(d_in))
        state["W_dec"] = state["W_dec"] * float(np.sqrt(d_in))
    sl = _sae_lens()
    sae = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False,
                                              dtype="float32", device="cpu"))
    sae.load_state_dict(state, strict=True)
    return sae.to(device=device, dtype=getattr(torch, dtype))


def _pick(tensors: dict[str, Tensor], d_in: int, d_sae: int) -> dict[str, Tensor]:
    """Find encoder/decoder weights and biases: the study's names first, then by shape."""
    study = {"W_enc_DF": "W_enc", "b_enc_F": "b_enc", "W_dec_FD": "W_dec", "b_dec_D": "b_dec"}
    if set(study) <= set(tensors):
        out = {new: tensors[old] for old, new in study.items()}
    else:
        out = {}
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
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    wrong = {k: tuple(v.shape) for k, v in out.items() if tuple(v.shape) != want[k]}
    if missing or wrong:
        raise SieveError(
            f"could not find {sorted(missing) or wrong} with shapes {want} among the SAE's tensors "
            f"{ {k: tuple(v.shape) for k, v in tensors.items()} } (d_in={d_in}, d_sae={d_sae})"
        )
    return out


def _study_dims(cfg: dict, where: Path) -> tuple[int, int, int]:
    """(d_in, d_sae, k) from an ``sae_cfg`` block: the study's keys (``d_model``, ``expansion_factor``,
    ``activation_fn_kwargs[eval_activation_idx]["k"]``) or plain ``d_in``/``d_sae``/``k``."""
    try:
        d_in = int(cfg.get("d_in") or cfg["d_model"])
        d_sae = int(cfg.get("d_sae") or d_in * int(cfg.get("expansion_factor", 8)))
        if cfg.get("k") is not None:
            k = int(cfg["k"])
        else:
            kwargs = cfg["activation_fn_kwargs"][int(cfg.get("eval_activation_idx", 0))]
            k = int(kwargs["k"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SieveError(f"{where}: 'sae_cfg' needs d_model (or d_in), expansion_factor (or d_sae) and "
                         f"activation_fn_kwargs[eval_activation_idx].k (or k); it has {sorted(cfg)} ({e})") from e
    return d_in, d_sae, k


class _StateDictUnpickler(pickle.Unpickler):
    """Reads a state dict written with plain ``pickle.dump`` (the study's ``layer_N.pt``): tensors (also
    as ``nn.Parameter``s, read as their tensors) and ordered dicts only, every other global refused (a
    pickle can otherwise run any code)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):  # a state dict of nn.Parameters
            return lambda data, requires_grad, hooks: data.detach()
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: torch.load(io.BytesIO(b), weights_only=True)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only tensors may be stored in an SAE file")


def _read_state_dict(f: Path) -> dict[str, Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    import zipfile

    if zipfile.is_zipfile(f):  # torch.save: its restricted unpickler only, never arbitrary objects
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise SieveError(f"{f}: not a state dict of tensors ({first_line(e):.200})") from e
    else:
        # Plain pickle.dump of a state dict, as the study wrote its layer files.
        try:
            with open(f, "rb") as fh:
                sd = _StateDictUnpickler(fh).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise SieveError(f"{f}: not a state dict of tensors ({e})") from e
        if not isinstance(sd, dict):  # torch.save's legacy format starts with a magic number
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise SieveError(f"{f}: not a state dict of tensors ({first_line(e):.200})") from None
    if not isinstance(sd, dict):
        raise SieveError(f"{f}: expected a state dict of tensors, found {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def convert_study_sae(path: Path, *, layer: int | None, device: str = "cpu", dtype: str = "float32"):
    """Read the study's TopK SAE layout into a sae-lens ``TopKSAE``.

    The layout (hub repo ``tilde-research/sieve_coding``): ``config.json`` whose ``sae_cfg`` gives
    ``d_model``, ``expansion_factor`` and ``activation_fn_kwargs`` (``[{"k": 64}]``), and one
    ``layer_{i}.pt`` per layer: a pickled state dict ``W_enc_DF``, ``b_enc_F``, ``W_dec_FD``, ``b_dec_D``
    (read with a tensors-only unpickler) — or ``layer_{i}.safetensors`` with the same names. Its encoder
    is ``TopK(ReLU(x·W_enc + b_enc))`` without subtracting ``b_dec`` (``apply_b_dec_to_input=False``),
    decoding ``f·W_dec + b_dec``.

    Example:
        >>> sae = convert_study_sae(Path("sieve_coding"), layer=12)  # doctest: +SKIP
        >>> sae.cfg.k  # doctest: +SKIP
        64
    """
    path = Path(path)
    d_in, d_sae, k = _study_dims(_read_json(path / "config.json")["sae_cfg"], path / "config.json")
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".pt", ".pth", ".bin"})
    if layer is not None:
        files = [p for p in files if str(layer) in _digits(p.stem)]
    if len(files) != 1:
        have = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".pt", ".pth", ".bin"})
        raise SieveError(f"{path}: expected one weights file for layer {layer} (layer_{layer}.pt), found "
                         f"{[p.name for p in files]}; the folder has {have}"
                         + ("" if layer is not None else " (set [sae] layer)"))
    w = _pick(_read_state_dict(files[0]), d_in, d_sae)
    sl = _sae_lens()
    sae = sl.TopKSAE(sl.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=False,
                                      dtype="float32", device="cpu"))
    sae.load_state_dict({k2: v.to(torch.float32).contiguous() for k2, v in w.items()}, strict=True)
    return sae.to(device=device, dtype=getattr(torch, dtype))


def _digits(stem: str) -> list[str]:
    import re

    return re.findall(r"\d+", stem)


def _load_study_from_hub(repo: str, *, layer: int | None, device: str, dtype: str):
    """The study's layout on the hub: ``config.json`` and ``layer_{layer}.pt`` only (not every layer)."""
    if layer is None:
        raise SieveError(f"SAE repo {repo!r} in the study's format needs a layer ([sae] layer)")
    cfg = Path(_hub_file(repo, "config.json", f"SAE repo {repo}"))
    if "sae_cfg" not in _read_json(cfg):
        raise SieveError(f"{repo}: config.json has no 'sae_cfg' block (not the study's SAE format); for "
                         "GemmaScope or sae-lens repos give the SAE id as well")
    _hub_file(repo, f"layer_{layer}.pt", f"SAE repo {repo} layer {layer}")
    return convert_study_sae(cfg.parent, layer=layer, device=device, dtype=dtype)


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

    def __repr__(self) -> str:
        cfg = self.sae.cfg
        return f"Feature({self.index} of {cfg.architecture()} SAE, d_in={cfg.d_in}, {cfg.d_sae} latents)"

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
