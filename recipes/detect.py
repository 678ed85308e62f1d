"""How good is each detector (SAE feature, CAA projection, probe) at telling regex use from the rest?

    python -m recipes.detect [RECIPE.toml] [key=value ...] [--out DIR] [--no-progress] [--debug]

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

import sys

import polars as pl
import torch

from recipes.cli import RecipeCLI, Run
from sieve.detectors import token_activations, token_labels
from sieve.evals.metrics import binary_metrics, pr_curve
from sieve.evals.regex_use import find_regex_use
from sieve.files import write_signed
from sieve.recipe import Recipe, recipe_hash

CLI = RecipeCLI("recipes.detect", __doc__)


def labelled_texts(setting) -> list[str]:
    """Held-apart texts: the regex-prone and neutral prompts with what followed them, and the code set."""
    from sieve.models import clip_to_tokens, max_context

    ps = setting.prompts
    texts = [p.text + p.reference for p in ps.regex] + [p.text + p.reference for p in ps.neutral] + list(ps.code)
    n = max_context(setting.model)
    return [clip_to_tokens(setting.model.tokenizer, t, n) for t in texts] if n else texts


def run(recipe: Recipe, progress: bool = True, cache_dir=None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Metrics per detector and level, and the token-level PR curves."""
    from sieve.setting import load_setting

    setting = load_setting(recipe, progress=progress, cache_dir=cache_dir)
    tok = setting.model.tokenizer
    texts = labelled_texts(setting)
    acts = token_activations(setting.model, texts, setting.layer, progress=progress)
    labels = [token_labels(tok, t, find_regex_use(t).spans, length=a.shape[0]) for t, a in zip(texts, acts)]
    x = torch.cat(acts)
    y = torch.cat(labels)
    text_y = torch.tensor([bool(lab.any()) for lab in labels])
    rows, curves = [], []
    for name in setting.parts.detector_names():
        det, thr = setting.parts.detector(name)
        s = det.score(x)
        per_text = torch.stack([det.score(a).max() if a.shape[0] else torch.tensor(float("-inf")) for a in acts])
        for level, sc, lab in (("token", s, y), ("text", per_text, text_y)):
            m = binary_metrics(sc, lab, thr)
            rows.append({"detector": name, "level": level, **m, "recipe_hash": recipe_hash(recipe)})
        c = pr_curve(s, y)
        curves += [{"detector": name, "recall": r, "precision": p, "threshold": t}
                   for r, p, t in zip(c["recall"], c["precision"], c["threshold"])]
    return pl.DataFrame(rows), pl.DataFrame(curves)


def body(r: Run) -> int:
    with r.lock("detect"):
        metrics, curves = run(r.recipe, progress=r.progress, cache_dir=r.out / "cache")
        rh = recipe_hash(r.recipe)  # a later run reads only what is signed for its recipe
        write_signed(r.out / "detect.parquet", metrics.write_parquet, context=rh)
        write_signed(r.out / "detect_curves.parquet", curves.write_parquet, context=rh)  # the run report draws them
        if r.recipe.output.charts:
            from sieve.plots import pr_chart, save_chart

            marks = metrics.filter(pl.col("level") == "token").select("detector", "recall", "precision", "threshold")
            save_chart(pr_chart(curves, marks), r.out / "detect_pr")
    from sieve.tables import format_table

    print("Detectors against regex-use labels, at the threshold each method uses (token level: every token; "
          "text level: a text's highest score):\n")
    print(format_table(metrics.sort(["level", "detector"], descending=[True, False]),
                       ["detector", "level", "threshold", "precision", "recall", "f1", "auroc", "positives", "n"],
                       formats={"threshold": ".3g"}))
    charts = [r.out / "detect_pr.html", r.out / "detect_pr.png"] if r.recipe.output.charts else []
    print(f"\nWrote {r.out / 'detect.parquet'}" + (f"; precision-recall curves: {', '.join(map(str, charts))}"
                                                   if charts else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return CLI.main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
