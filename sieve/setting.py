"""A recipe's setting: the loaded model, SAE and feature, and the :class:`~sieve.methods.Parts` (SAE
feature, CAA vector, probe) that the methods are built from. CAA vectors and probes are cached by a hash
of everything that made them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sieve.detectors import (
    caa_vector,
    cached,
    calibrate_threshold,
    fingerprint,
    token_activations,
    train_probe,
)
from sieve.errors import RecipeError, SieveError
from sieve.interventions import Detector, SAECode
from sieve.methods import Parts
from sieve.prompts import PromptSets, load_prompt_sets
from sieve.recipe import Recipe

__all__ = ["Setting", "load_setting"]

log = logging.getLogger(__name__)


@dataclass
class Setting:
    """Everything a recipe's methods need, loaded."""

    recipe: Recipe
    model: Any
    sae: Any
    feature: Any
    layer: int
    threshold: float
    parts: Parts
    prompts: PromptSets
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Setting({self.recipe.name!r}, layer {self.layer}, {self.feature!r}, {self.parts!r})"


def _model_source(r: Recipe) -> str | Path:
    if r.model.source == "world":
        from sieve.world import world_model_dir

        return world_model_dir()
    p = r.resolve(r.model.source)
    return p if p.exists() else r.model.source


def _sae(r: Recipe):
    from sieve.saes import load_sae

    if r.sae.source == "world":
        from sieve.world import world_sae_dir

        return load_sae(world_sae_dir())
    p = r.resolve(r.sae.source)
    src = p if p.exists() else r.sae.source
    return load_sae(src, r.sae.id or None, layer=r.sae.layer)


def _weights_fingerprint(source: str | Path) -> list:
    """What identifies the weights behind a source: for a local folder, its weight files' names, sizes
    and modification times (a rebuilt model in the same folder must not reuse a stale cache)."""
    p = Path(source)
    if not p.exists():
        return [str(source)]
    files = sorted(f for f in p.rglob("*") if f.suffix in {".safetensors", ".bin", ".pt", ".npz"})
    return [str(p)] + [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]


def load_setting(recipe: Recipe, *, progress: bool = True, with_probe: bool = True) -> Setting:
    """Load model, SAE, feature and build every detector and direction the recipe's methods use.

    Example:
        >>> from sieve.recipe import load_recipe
        >>> s = load_setting(load_recipe("recipes/regex.toml"), progress=False)  # doctest: +SKIP
        >>> sorted(s.parts.detectors)  # doctest: +SKIP
        ['caa', 'probe', 'sae']
    """
    from sieve.models import layer as layer_of
    from sieve.models import load_model
    from sieve.saes import check_compatible, feature

    r = recipe
    model = load_model(_model_source(r), device=r.model.device, dtype=r.model.dtype,
                       revision=r.model.revision or None)
    layer_of(model, r.sae.layer)  # range check with a clear error
    sae = _sae(r)
    check_compatible(sae, model)
    feat = feature(sae, r.sae.feature)
    threshold = r.sae.threshold if r.sae.threshold is not None else (feat.threshold or 0.0)
    prompts = load_prompt_sets(r, model.tokenizer)
    parts = Parts(layer=r.sae.layer)
    w, b = feat.linear()
    parts.add_detector("sae", Detector(w, b, kind="sae", name=f"feature {r.sae.feature}"), threshold)
    parts.add_direction("sae", feat.direction)
    try:  # the SAE's code: SAE-space edits and code detectors (JumpReLU, ReLU, TopK SAEs)
        parts.add_detector("sae_code", SAECode(sae, [r.sae.feature], name=f"feature {r.sae.feature} code"), 0.0)
        parts.add_latents("sae", sae, [r.sae.feature])
    except SieveError as e:
        log.warning("SAE-space methods are not available with this SAE: %s", e)
    cache_dir = r.resolve(r.output.dir) / "cache"
    sae_src = r.resolve(r.sae.source) if r.sae.source != "world" else None
    key_base = [_weights_fingerprint(_model_source(r)), _weights_fingerprint(sae_src or "world-sae"),
                r.sae.id, r.sae.layer]

    # CAA: mean difference at the last prompt token over contrastive pairs.
    pos, neg = prompts.contrastive
    if not pos:
        raise RecipeError(r.path or "<recipe>", "caa.prompts", "no contrastive prompts")
    caa = cached(cache_dir / "caa.safetensors", fingerprint(key_base, pos, neg),
                 lambda: {"v": caa_vector(model, pos, neg, r.sae.layer, progress=progress)})["v"]
    # Its threshold: fire as often as the SAE feature over the calibration prompts' tokens.
    if isinstance(r.caa.threshold, str):
        acts = torch.cat(token_activations(model, prompts.calibration, r.sae.layer, progress=progress))
        ref = feat.pre_activation(acts) > threshold
        caa_thr = calibrate_threshold(acts @ caa, ref) + r.caa.threshold_bias
    else:
        caa_thr = float(r.caa.threshold)
    parts.add_detector("caa", Detector(caa, 0.0, kind="caa", name="CAA projection"), caa_thr)
    parts.add_direction("caa", caa)
    info: dict[str, Any] = {"caa_threshold": caa_thr, "sae_threshold": threshold}

    if with_probe:
        texts, labels = prompts.probe_data(model, r)
        key = fingerprint(key_base, texts, r.probe.data, r.probe.l2, r.probe.seed)

        def fit() -> dict[str, torch.Tensor]:
            acts = token_activations(model, texts, r.sae.layer, progress=progress)
            x = torch.cat(acts)
            y = torch.cat([lab[: a.shape[0]] for lab, a in zip(labels, acts)]).long()
            groups = torch.cat([torch.full((a.shape[0],), i) for i, a in enumerate(acts)])
            p = train_probe(x, y, groups=groups, l2=r.probe.l2, seed=r.probe.seed)
            return {"w": p.w, "b": torch.tensor([p.b]),
                    "acc": torch.tensor([p.train_accuracy, p.test_accuracy])}

        t = cached(cache_dir / "probe.safetensors", key, fit)
        parts.add_detector("probe", Detector(t["w"], float(t["b"][0]), kind="probe", name="probe"), 0.0)
        parts.add_direction("probe", t["w"])
        info["probe_accuracy"] = {"train": float(t["acc"][0]), "test": float(t["acc"][1])}
        log.info("probe accuracy train %.3f test %.3f", *t["acc"].tolist())
    return Setting(r, model, sae, feat, r.sae.layer, float(threshold), parts, prompts, info)
