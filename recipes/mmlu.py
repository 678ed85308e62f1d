"""MMLU accuracy under each method and scale of a recipe (and unsteered).

    python -m recipes.mmlu [RECIPE.toml] [key=value ...] [--out DIR] [--no-progress] [--debug]

Scored from the answer-letter logits, one forward per question, batched, with the chat template for
instruct models (``model.chat = true``) and the shots and subjects of the recipe's ``[eval]`` table.
Data: ``eval.mmlu_data`` (a local parquet/JSON file in the cais/mmlu schema) or ``cais/mmlu`` from the
hub. With no recipe it runs the embedded world on sieve's own small multiple-choice fixture: the
world is a tiny code model, so its accuracy is near chance — the run shows the machinery, not a score
(and it writes to ``runs/mmlu-world``: another recipe than the study's). Writes
``<output>/mmlu.parquet`` and prints accuracy with 95% intervals.
"""

from __future__ import annotations

import sys

import polars as pl
from tqdm.std import tqdm

from recipes.cli import RecipeCLI, Run
from sieve.evals.metrics import wilson
from sieve.evals.mmlu import load_mmlu, mmlu_accuracy, mmlu_accuracy_cells
from sieve.files import write_signed
from sieve.recipe import Recipe, recipe_hash
from sieve.sweep import cells, needs_detector

FIXTURE = "data/mmlu_fixture.json"
CLI = RecipeCLI("recipes.mmlu", __doc__,
                default_overrides=(f'eval.mmlu_data="{FIXTURE}"', 'output.dir="runs/mmlu-world"'))


def run(recipe: Recipe, progress: bool = True, cache_dir=None) -> pl.DataFrame:
    """Accuracy per cell (the unsteered baseline first), with Wilson 95% intervals."""
    from sieve.setting import load_setting

    qs = load_mmlu(recipe)  # a bad data source fails here, before the model loads
    setting = load_setting(recipe, progress=progress, with_probe=needs_detector(recipe, "probe"), cache_dir=cache_dir)
    rows = []
    cs = cells(recipe, baseline=True)
    kw = dict(chat=recipe.model.chat, shots=recipe.eval.mmlu_shots, batch_size=recipe.forward_batch_size)
    if recipe.sweep.fork:  # one unsteered forward; a steered one only for the questions a gate edits
        per_cell, _ = mmlu_accuracy_cells(setting.model, qs, [c.intervention(setting.parts, recipe) for c in cs], **kw)
    else:
        per_cell = [mmlu_accuracy(setting.model, qs, c.intervention(setting.parts, recipe), **kw)
                    for c in tqdm(cs, desc="MMLU", disable=not progress)]
    for cell, correct in zip(cs, per_cell):
        k, n = sum(correct), len(correct)
        lo, hi = wilson(k, n)
        rows.append({"method": cell.method, "scale": cell.scale, "accuracy": k / n, "lo": lo, "hi": hi, "n": n,
                     "recipe_hash": recipe_hash(recipe)})
    return pl.DataFrame(rows)


def body(r: Run) -> int:
    with r.lock("mmlu"):
        table = run(r.recipe, progress=r.progress, cache_dir=r.out / "cache")
        # a later run reads only what is signed for its recipe
        write_signed(r.out / "mmlu.parquet", table.write_parquet, context=recipe_hash(r.recipe))
    from sieve.methods import family
    from sieve.tables import format_table, interval

    rows = [{"family": family(c["method"]), "method": c["method"], "scale": c["scale"],
             "accuracy": interval(c["accuracy"], c["lo"], c["hi"]), "n": c["n"]} for c in table.to_dicts()]
    print(f"MMLU accuracy per method and scale (95% Wilson intervals over {rows[0]['n'] if rows else 0} questions):\n")
    print(format_table(rows, {"family": "family", "method": "method", "scale": "scale",
                              "accuracy": "accuracy [95%]", "n": "questions"}, formats={"scale": "g"}))
    print(f"\nWrote {r.out / 'mmlu.parquet'} (one row per method and scale)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return CLI.main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
