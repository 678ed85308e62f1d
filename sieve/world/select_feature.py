"""World build stage ``feature``: choose the SAE feature that tracks the *intent* to use ``re``.

On the *select* half of the held-out intent prompts (function heads with no ``re`` token; the study
evaluates on the other half, never seen here):

1. the model completes every prompt, unsteered (``SAMPLES`` samples each, seeded); a
   completion is labelled by whether its function uses ``re``;
2. every latent is scored on each completion by its highest pre-activation over the prompt and the
   completion's first ``EARLY`` tokens *before* its first use of ``re`` (so a latent that fires only on
   ``re`` itself, too late to steer, scores nothing), and latents are ranked by how well that score
   predicts use (AUROC);
3. the best ``CANDIDATES`` latents, each at its best-F1 threshold, gate ``conditional_per_input``
   (latched from the first firing, along the latent's decoder row, at minus the mean residual norm) on
   the same prompts and seeds; the feature that cuts regex use most while changing at most
   ``MAX_NEUTRAL_CHANGED`` of the neutral completions wins (none qualifying: the largest cut).

Pre-activations are :meth:`sieve.saes.Feature.linear`, the one definition sieve detects with.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from sieve.world.corpus import load_corpus, load_intent_corpus
from sieve.world.train_lm import LMConfig
from sieve.world.train_sae import activations_list, load_lm, sae_quality

__all__ = ["SAMPLES", "EARLY", "CANDIDATES", "feature_matrix", "best_f1", "auroc", "early_scores",
           "stage_feature"]

log = logging.getLogger("sieve.world.build")

SAMPLES = 4
NEUTRAL_SAMPLES = 2
NEUTRAL_PROMPTS = 16
MAX_NEW_TOKENS = 64
TEMPERATURE = 0.8
EARLY = 16
CANDIDATES = 4
MAX_NEUTRAL_CHANGED = 0.05
SEED = 0


def feature_matrix(sae) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d, F], b [F])`` with ``h @ W + b`` every feature's pre-activation, stacked from
    :meth:`~sieve.saes.Feature.linear`.

    Example:
        >>> W, b = feature_matrix(sae)  # doctest: +SKIP
    """
    from sieve.saes import feature

    lin = [feature(sae, i).linear() for i in range(int(sae.cfg.d_sae))]
    return torch.stack([w for w, _ in lin], 1), torch.tensor([b for _, b in lin])


def best_f1(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``scores [N, F]``: the best F1 over thresholds, and that threshold.

    Example:
        >>> f1, thr = best_f1(torch.tensor([[0.1], [0.9], [0.8]]), torch.tensor([0, 1, 1]))
        >>> float(f1[0]), round(float(thr[0]), 2)
        (1.0, 0.45)
    """
    order = scores.argsort(dim=0, descending=True)
    ys = y.float()[order]
    tp = ys.cumsum(0)
    k = torch.arange(1, scores.shape[0] + 1, dtype=torch.float)[:, None]
    prec, rec = tp / k, tp / y.float().sum().clamp_min(1)
    f1 = 2 * prec * rec / (prec + rec).clamp_min(1e-9)
    best = f1.argmax(0)
    cols = torch.arange(scores.shape[1])
    s_sorted = scores.gather(0, order)
    nxt = (best + 1).clamp_max(scores.shape[0] - 1)
    thr = (s_sorted[best, cols] + s_sorted[nxt, cols]) / 2
    return f1[best, cols], thr


def auroc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per column of ``scores [N, F]``: the AUROC of predicting ``y [N]`` (ties count half).

    Example:
        >>> auroc(torch.tensor([[0.1], [0.9], [0.8], [0.1]]), torch.tensor([0, 1, 0, 1])).tolist()
        [0.625]
    """
    y = y.bool()
    pos, neg = scores[y], scores[~y]
    if not len(pos) or not len(neg):
        return torch.full((scores.shape[1],), float("nan"))
    gt = (pos[:, None, :] > neg[None, :, :]).float().mean((0, 1))
    eq = (pos[:, None, :] == neg[None, :, :]).float().mean((0, 1))
    return gt + eq / 2


def early_scores(model, layer: int, W: torch.Tensor, b: torch.Tensor, prompts: list[str], completions: list[str],
                 early: int = EARLY) -> torch.Tensor:
    """``[N, F]``: each latent's highest pre-activation over a prompt and the first ``early`` tokens of
    its completion, stopping before the completion's first use of ``re``."""
    from sieve.evals.regex_use import find_regex_use

    tok = model.tokenizer
    texts, lens = [], []
    for p, c in zip(prompts, completions):
        use = find_regex_use(p + c)
        cut = len(c) if not use.spans else max(0, use.spans[0][0] - len(p))
        texts.append(p + c[:cut])
        lens.append(len(tok(p)["input_ids"]) - 1 + early)
    acts = activations_list(model, texts, layer)
    return torch.stack([(a[:n] @ W + b).max(0).values for a, n in zip(acts, lens)])


def _complete(model, layer: int, prompts: list[str], seeds: list[int], iv=None):
    from sieve.evals.code import cut_function
    from sieve.evals.regex_use import find_regex_use
    from sieve.generation import generate

    outs = generate(model, prompts, iv, layer_index=layer, max_new_tokens=MAX_NEW_TOKENS,
                    temperature=TEMPERATURE, seeds=seeds, progress=False)
    texts = [o.text for o in outs]
    used = [find_regex_use(cut_function(p, t)[0]).used for p, t in zip(prompts, texts)]
    return texts, torch.tensor(used)


def stage_feature(out: Path, cfg: LMConfig) -> dict:
    from sieve.interventions import Detector
    from sieve.methods import Parts, build
    from sieve.saes import feature, load_sae
    from sieve.world.prompts import intent_prompt_sets, regex_free_code

    t0 = time.time()
    chunks = load_corpus()[0] + load_intent_corpus()[0]
    model = load_lm(out)
    tok = model.tokenizer
    layer = int(json.loads((out / "sae_stats.json").read_text())["layer"])
    sae = load_sae(out / "sae")
    W, b = feature_matrix(sae)
    sets = intent_prompt_sets(chunks, tok, cfg.n_ctx - 56)
    rx = [p.prompt for p in sets["select_regex"]]
    neu_all = sets["select_neutral"]
    step = max(1, len(neu_all) // NEUTRAL_PROMPTS)
    neu = [p.prompt for p in neu_all[::step][:NEUTRAL_PROMPTS]]
    prompts = [p for p in rx for _ in range(SAMPLES)] + [p for p in neu for _ in range(NEUTRAL_SAMPLES)]
    is_rx = torch.tensor([True] * (len(rx) * SAMPLES) + [False] * (len(neu) * NEUTRAL_SAMPLES))
    seeds = [SEED * 1_000_003 + i for i in range(len(prompts))]
    texts, used = _complete(model, layer, prompts, seeds)
    base_rate = float(used[is_rx].float().mean())
    log.info("select half: %d regex-prone prompts x %d, %d neutral x %d; unsteered regex use %.3f (neutral %.3f)",
             len(rx), SAMPLES, len(neu), NEUTRAL_SAMPLES, base_rate, float(used[~is_rx].float().mean()))
    scores = early_scores(model, layer, W, b, prompts, texts)
    au = auroc(scores, used)
    f1, thr = best_f1(scores, used)
    au_rank = torch.nan_to_num(au, nan=0.0)
    cands = au_rank.argsort(descending=True)[:CANDIDATES].tolist()
    log.info("top latents by AUROC of early firing vs regex use: %s",
             [(i, round(float(au[i]), 3), round(float(thr[i]), 2)) for i in cands])

    code = regex_free_code([c for c in chunks if c.held_out], limit=20)
    from sieve.world.prompts import clip_to_tokens

    h_code = torch.cat(activations_list(model, [clip_to_tokens(tok, t, cfg.n_ctx) for t in code], layer))
    hnorm = float(h_code.norm(dim=-1).mean())
    sae_on_final = sae_quality(sae, h_code)  # the SAE was trained on the first-phase model
    scale = -hnorm
    results = []
    for i in cands:
        f = feature(sae, i)
        w, bb = f.linear()
        parts = Parts()
        parts.add_detector("sae", Detector(w, bb, kind="sae"), float(thr[i]))
        parts.add_direction("sae", f.direction)
        s_texts, s_used = _complete(model, layer, prompts, seeds, build("conditional_per_input", parts, scale))
        rate = float(s_used[is_rx].float().mean())
        changed = sum(a != c for a, c, r in zip(texts, s_texts, is_rx.tolist()) if not r) / max(1, int((~is_rx).sum()))
        fired = float((scores[:, i] > thr[i]).float().mean())
        results.append({"feature": i, "auroc": float(au[i]), "f1": float(f1[i]), "threshold": float(thr[i]),
                        "fires": fired, "regex_rate": rate, "cut": 1 - rate / max(base_rate, 1e-9),
                        "neutral_changed": changed})
        log.info("candidate %d: AUROC %.3f, fires on %.2f of completions, regex %.3f -> %.3f, neutral changed %.2f",
                 i, float(au[i]), fired, base_rate, rate, changed)
    ok = [r for r in results if r["neutral_changed"] <= MAX_NEUTRAL_CHANGED] or results
    best = max(ok, key=lambda r: (r["cut"], r["auroc"]))
    info = {
        "layer": layer,
        "feature": best["feature"],
        "threshold": best["threshold"],
        "selection": {
            "criterion": "intent: early firing predicts regex use (AUROC), then the gated cut on the select half",
            "prompts_regex": len(rx), "prompts_neutral": len(neu), "samples": SAMPLES,
            "neutral_samples": NEUTRAL_SAMPLES, "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
            "early_tokens": EARLY, "unsteered_regex_rate": base_rate,
            "unsteered_neutral_regex_rate": float(used[~is_rx].float().mean()),
            "scale": scale, "residual_norm": hnorm, "candidates": results,
        },
        "sae_on_final_model": sae_on_final,
        "seconds": round(time.time() - t0),
    }
    (out / "feature.json").write_text(json.dumps(info, indent=1))
    log.info("feature %d (threshold %.3f) chosen in %.0fs", best["feature"], best["threshold"], time.time() - t0)
    return info
