"""sieve's runnable recipes and their shareable recipe files.

``python -m recipes`` lists them. Each recipe is one readable script run as ``python -m recipes.NAME
[RECIPE.toml] [key=value ...]``; each ``*.toml`` beside them is a recipe file (data, never code).
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RECIPES", "recipe_files", "declared_methods"]

HERE = Path(__file__).parent

# name -> (module, what it does)
RECIPES: dict[str, tuple[str, str]] = {
    "regex": ("recipes.regex", "the regex study: methods × scales × samples, evals, Pareto charts"),
    "detect": ("recipes.detect", "how well each detector (SAE feature, CAA, probe) tells regex use apart"),
    "mmlu": ("recipes.mmlu", "MMLU accuracy under each method and scale of a recipe"),
}


def recipe_files() -> list[tuple[str, str, str]]:
    """``(file, name, description)`` of every shipped recipe file."""
    out = []
    for p in sorted(HERE.glob("*.toml")):
        data = tomllib.loads(p.read_text())
        out.append((p.name, str(data.get("name", "")), str(data.get("description", ""))))
    return out


def declared_methods() -> list[tuple[str, str, str]]:
    """``(file, method, description)`` of every method a shipped recipe file declares (``[methods.NAME]``),
    each validated as loading the file does."""
    from sieve.recipe import load_recipe

    out = []
    for p in sorted(HERE.glob("*.toml")):
        r = load_recipe(p)
        for name in r.methods:
            m = r.method(name)
            out.append((p.name, name, f"{m.gate} gate, {m.edit} edit along/at {m.direction!r}"
                        + (f", detector {m.detector!r}" if m.detector else "") + f": {m.description}"))
    return out
