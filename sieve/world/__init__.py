"""The embedded default world: a tiny code LM trained on Python source, its SAE and its regex feature.

Shipped in ``sieve/world/data`` (safetensors), rebuilt from scratch by ``python -m sieve.world.build``.

Example:
    >>> w = load_world()
    >>> w.feature.index == w.info["feature"]
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sieve.errors import SieveError

__all__ = ["World", "load_world", "world_model_dir", "world_sae_dir", "world_info", "DATA_DIR"]

DATA_DIR = Path(__file__).parent / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        raise SieveError(
            f"the embedded world is missing {path}; rebuild it with `python -m sieve.world.build` "
            "(about an hour on 2 CPU cores)"
        )
    return path


def world_model_dir() -> Path:
    """Directory of the world's model and tokenizer (a ``save_pretrained`` folder)."""
    return _need(DATA_DIR / "model")


def world_sae_dir() -> Path:
    """Directory of the world's SAE (sae-lens format)."""
    return _need(DATA_DIR / "sae")


@lru_cache(maxsize=1)
def world_info() -> dict[str, Any]:
    """``world.json``: layer, feature, threshold and the measurements made when it was built."""
    return json.loads(_need(DATA_DIR / "world.json").read_text())


@dataclass
class World:
    """The loaded world: nnsight model, SAE, regex feature, its layer and threshold."""

    model: Any
    sae: Any
    feature: Any
    layer: int
    threshold: float
    info: dict[str, Any]

    def __repr__(self) -> str:
        arch = type(getattr(self.model, "_module", self.model)).__name__
        return (f"World({arch}, layer {self.layer}, feature {self.feature.index}, threshold {self.threshold:.3f}, "
                f"SAE {self.sae.cfg.d_sae} latents)")


def load_world(device: str = "cpu") -> World:
    """Load the embedded world (model, SAE, feature).

    Example:
        >>> load_world().layer >= 0
        True
    """
    from sieve.models import load_model
    from sieve.saes import feature, load_sae

    info = world_info()
    model = load_model(world_model_dir(), device=device)
    sae = load_sae(world_sae_dir(), device=device)
    return World(model, sae, feature(sae, int(info["feature"])), int(info["layer"]), float(info["threshold"]), info)
