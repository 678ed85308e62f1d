"""MMLU accuracy under each method and scale of a recipe (and unsteered).

    python -m recipes.mmlu [RECIPE.toml] [key=value ...]

Scored from the answer-letter logits, one forward per question, batched, with the chat template for
instruct models (``model.chat = true``) and the shots and subjects of the recipe's ``[eval]`` table.
Data: ``eval.mmlu_data`` (a local parquet/JSON file in the cais/mmlu schema) or ``cais/mmlu`` from the
hub. With no recipe it runs the embedded world on sieve's own small multiple-choice fixture: the
world is a tiny code model, so its accuracy is near chance — the run shows the machinery, not a score.
Writes ``<output>/mmlu.parquet`` and prints accuracy with 95% intervals.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from recipes.regex import intervention
from sieve.evals.metrics import wilson
from sieve.evals.mmlu import load_mmlu, mmlu_accuracy
from sieve.recipe import UNSTEERED, load_recipe, recipe_hash

DEFAULT_RECIPE = Path(__file__).parent / "regex.toml"
FIXTURE = "data/mmlu_fixture.json"


def run(recipe, progress: bool = True) -> pl.DataFrame:
    """Accuracy per (method, scale), with Wilson 95% intervals."""
    from sieve.setting import load_setting

    needs_probe = any(m != UNSTEERED and recipe.method(m).detector == "probe" for m in recipe.sweep.methods)
    setting = load_setting(recipe, progress=progress, with_probe=needs_probe)
    qs = load_mmlu(recipe)
    rows = []
    cells = [(UNSTEERED, 0.0)] + [(m, float(s)) for m in recipe.sweep.methods if m != UNSTEERED
                                  for s in recipe.scales_for(m)]
    for method, scale in tqdm(cells, desc="MMLU", disable=not progress):
        iv = intervention(setting.parts, method, scale, recipe=recipe)
        correct = mmlu_accuracy(setting.model, qs, iv, chat=recipe.model.chat,
                                shots=recipe.eval.mmlu_shots, batch_size=recipe.sweep.batch_size or 16)
        k, n = sum(correct), len(correct)
        lo, hi = wilson(k, n)
        rows.append({"method": method, "scale": scale, "accuracy": k / n, "lo": lo, "hi": hi, "n": n,
                     "recipe_hash": recipe_hash(recipe)})
    return pl.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.mmlu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = list(args.overrides)
    if args.recipe is None or ("=" in args.recipe and not Path(args.recipe).exists()):
        if args.recipe:
            overrides.insert(0, args.recipe)
        path = DEFAULT_RECIPE
        overrides = [f'eval.mmlu_data="{FIXTURE}"', *overrides]
    else:
        path = Path(args.recipe)
    recipe = load_recipe(path, overrides)
    table = run(recipe, progress=not args.no_progress)
    out = recipe.resolve(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out / "mmlu.parquet")
    with pl.Config(tbl_rows=100, tbl_cols=10):
        print(table.select("method", "scale", "accuracy", "lo", "hi", "n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
