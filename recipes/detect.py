"""How good is each detector (SAE feature, CAA projection, probe) at telling regex use from the rest?

    python -m recipes.detect [RECIPE.toml] [key=value ...]

The question the study's activation-counting script asked, on labelled data held apart from what
trained the CAA vector and the probe (for the embedded world: held-out files; the detectors were fit on
training files). Tokens are labelled by regex use (imports, ``re.*`` calls and their pattern
arguments); a text is positive when it uses ``re`` at all. For each detector: precision, recall and F1
at the threshold its methods actually use, and AUROC, at token level and at text level (a text's score
is its highest token score); precision–recall curves as a chart (HTML + PNG) with the operating points
marked. Writes ``<output>/detect.parquet``, ``detect_curves.parquet`` and ``detect_pr.{html,png}``; the
run report (``report.html`` of ``recipes.regex`` in the same folder) shows them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import polars as pl
import torch

from sieve.detectors import token_activations
from sieve.evals.ability import char_spans_to_tokens
from sieve.evals.metrics import binary_metrics, pr_curve
from sieve.evals.regex_use import find_regex_use
from sieve.recipe import load_recipe, recipe_hash

DEFAULT_RECIPE = Path(__file__).parent / "regex.toml"


def labelled_texts(setting) -> list[str]:
    """Held-apart texts: the regex-prone and neutral prompts with what followed them, and the code set."""
    from sieve.models import clip_to_tokens, max_context

    ps = setting.prompts
    texts = [p.text + p.reference for p in ps.regex] + [p.text + p.reference for p in ps.neutral] + list(ps.code)
    n = max_context(setting.model)
    return [clip_to_tokens(setting.model.tokenizer, t, n) for t in texts] if n else texts


def run(recipe, progress: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Metrics per detector and level, and the token-level PR curves."""
    from sieve.setting import load_setting

    setting = load_setting(recipe, progress=progress)
    tok = setting.model.tokenizer
    texts = labelled_texts(setting)
    acts = token_activations(setting.model, texts, setting.layer, progress=progress)
    labels = []
    for t, a in zip(texts, acts):
        lab = char_spans_to_tokens(tok, t, find_regex_use(t).spans)[1:]
        labels.append(lab[: a.shape[0]])
    x = torch.cat(acts)
    y = torch.cat(labels)
    text_y = torch.tensor([bool(lab.any()) for lab in labels])
    rows, curves = [], []
    for name, (det, thr) in sorted(setting.parts.detectors.items()):
        s = det.score(x)
        per_text = torch.stack([det.score(a).max() if a.shape[0] else torch.tensor(float("-inf")) for a in acts])
        for level, sc, lab in (("token", s, y), ("text", per_text, text_y)):
            m = binary_metrics(sc, lab, thr)
            rows.append({"detector": name, "level": level, **m, "recipe_hash": recipe_hash(recipe)})
        c = pr_curve(s, y)
        curves += [{"detector": name, "recall": r, "precision": p, "threshold": t}
                   for r, p, t in zip(c["recall"], c["precision"], c["threshold"])]
    return pl.DataFrame(rows), pl.DataFrame(curves)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.detect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if "=" in args.recipe and not Path(args.recipe).exists():
        args.overrides.insert(0, args.recipe)
        args.recipe = str(DEFAULT_RECIPE)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipe = load_recipe(args.recipe, args.overrides)
    metrics, curves = run(recipe, progress=not args.no_progress)
    out = recipe.resolve(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics.write_parquet(out / "detect.parquet")
    curves.write_parquet(out / "detect_curves.parquet")  # the run report draws them
    if recipe.output.charts:
        from sieve.plots import pr_chart, save_chart

        marks = metrics.filter(pl.col("level") == "token").select("detector", "recall", "precision", "threshold")
        save_chart(pr_chart(curves, marks), out / "detect_pr")
    with pl.Config(tbl_rows=50, tbl_cols=12, float_precision=3):
        print(metrics.select("detector", "level", "threshold", "precision", "recall", "f1", "auroc", "positives", "n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
