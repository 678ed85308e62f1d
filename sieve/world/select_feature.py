"""World build stage ``feature``: choose the SAE feature that tracks the *intent* to use ``re``.

On the *select* half of the held-out intent prompts (function heads with no ``re`` token; the study
evaluates on the other half, never seen here):

1. the model completes every prompt, unsteered (``SAMPLES`` samples of each regex-prone prompt,
   ``NEUTRAL_SAMPLES`` of each neutral one, seeded); a completion is labelled by whether its function
   uses ``re``;
2. every latent is scored on each row by its highest pre-activation over the prompt and the completion
   *before* its first use of ``re`` (the whole completion when there is none): where a gate reading it
   could act before the model writes ``re``. A latent that fires only on ``re`` itself scores nothing;
3. each latent's threshold is set on the neutral rows: it passes on at most ``MAX_NEUTRAL_FIRES`` of
   them (a gate that opens on a neutral row changes it). Latents are ranked by *recall*: the share of
   the regex-using rows on which they pass before the use (the most a gate on them can cut);
4. the best ``CANDIDATES`` latents each gate ``input_steering_vector`` (latched from the first firing,
   the CAA vector of the intent pairs at ``SCALE``) on the same prompts and seeds; the one that cuts
   regex use most while changing at most ``MAX_NEUTRAL_CHANGED`` of the neutral completions wins (none
   qualifying: the fewest neutral changes).

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
from sieve.world.train_sae import activations_list, load_lm

__all__ = ["SAMPLES", "CANDIDATES", "feature_matrix", "auroc", "before_use_scores",
           "neutral_thresholds", "stage_feature"]

log = logging.getLogger("sieve.world.build")

SAMPLES = 8
NEUTRAL_SAMPLES = 2
MAX_NEW_TOKENS = 56  # as the intent recipe generates
TEMPERATURE = 0.8
CANDIDATES = 5
MAX_NEUTRAL_FIRES = 0.04
MAX_NEUTRAL_CHANGED = 0.05
SCALE = -10.0
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


def before_use_scores(model, layer: int, W: torch.Tensor, b: torch.Tensor, prompts: list[str],
                      completions: list[str]) -> torch.Tensor:
    """``[N, F]``: each latent's highest pre-activation over a prompt and its completion's tokens that
    end before the completion's first use of ``re`` (all of them when it has none).

    The text is tokenized whole, so the last token kept is the one the model read before writing the
    token that starts the use (``" ="`` before ``" re"``), never a fragment such as a trailing space.
    """
    from sieve.evals.regex_use import find_regex_use

    tok = model.tokenizer
    texts, keep = [], []
    for p, c in zip(prompts, completions):
        text = p + c
        use = find_regex_use(text)
        cut = len(text) if not use.spans else max(len(p), use.spans[0][0])
        ends = [e for _, e in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        texts.append(text)
        keep.append(max(1, sum(e <= cut for e in ends)))
    acts = activations_list(model, texts, layer)
    return torch.stack([(a[:k] @ W + b).max(0).values for a, k in zip(acts, keep)])


def neutral_thresholds(neutral_scores: torch.Tensor, max_fires: float = MAX_NEUTRAL_FIRES) -> torch.Tensor:
    """Per column of ``neutral_scores [N, F]``: the lowest threshold that at most ``max_fires`` of the
    rows pass (strictly above it).

    Example:
        >>> neutral_thresholds(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), 0.25).tolist()
        [3.0]
    """
    ranked = neutral_scores.sort(0, descending=True).values
    return ranked[min(int(max_fires * len(ranked)), len(ranked) - 1)]


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
    from sieve.detectors import caa_vector
    from sieve.interventions import Detector
    from sieve.methods import Parts, build
    from sieve.saes import load_sae
    from sieve.world.prompts import intent_pairs, intent_prompt_sets

    t0 = time.time()
    chunks = load_corpus()[0] + load_intent_corpus()[0]
    model = load_lm(out)
    tok = model.tokenizer
    layer = int(json.loads((out / "sae_stats.json").read_text())["layer"])
    sae = load_sae(out / "sae")
    W, b = feature_matrix(sae)
    sets = intent_prompt_sets(chunks, tok, cfg.n_ctx - 56)
    rx = [p.prompt for p in sets["select_regex"]]
    neu = [p.prompt for p in sets["select_neutral"]]
    prompts = [p for p in rx for _ in range(SAMPLES)] + [p for p in neu for _ in range(NEUTRAL_SAMPLES)]
    is_rx = torch.tensor([True] * (len(rx) * SAMPLES) + [False] * (len(neu) * NEUTRAL_SAMPLES))
    seeds = [SEED * 1_000_003 + i for i in range(len(prompts))]
    texts, used = _complete(model, layer, prompts, seeds)
    base_rate = float(used[is_rx].float().mean())
    log.info("select half: %d regex-prone prompts x %d, %d neutral x %d; unsteered regex use %.3f (neutral %.3f)",
             len(rx), SAMPLES, len(neu), NEUTRAL_SAMPLES, base_rate, float(used[~is_rx].float().mean()))
    scores = before_use_scores(model, layer, W, b, prompts, texts)
    thr = neutral_thresholds(scores[~is_rx])
    recall = (scores[is_rx & used] > thr).float().mean(0)
    au = auroc(scores, used)
    cands = recall.argsort(descending=True)[:CANDIDATES].tolist()
    log.info("top latents by recall before use at <= %.0f%% neutral firing: %s", MAX_NEUTRAL_FIRES * 100,
             [(i, round(float(recall[i]), 3), round(float(thr[i]), 2)) for i in cands])

    pairs = intent_pairs(sets)
    caa = caa_vector(model, [p.prompt for p, _ in pairs], [n.prompt for _, n in pairs], layer, progress=False)
    results = []
    for i in cands:
        w, bb = W[:, i], float(b[i])
        parts = Parts()
        parts.add_detector("sae", Detector(w, bb, kind="sae"), float(thr[i]))
        parts.add_direction("caa", caa)
        s_texts, s_used = _complete(model, layer, prompts, seeds, build("input_steering_vector", parts, SCALE))
        rate = float(s_used[is_rx].float().mean())
        changed = sum(a != c for a, c, r in zip(texts, s_texts, is_rx.tolist()) if not r) / max(1, int((~is_rx).sum()))
        results.append({"feature": i, "recall": float(recall[i]), "auroc": float(au[i]), "threshold": float(thr[i]),
                        "neutral_fires": float((scores[~is_rx, i] > thr[i]).float().mean()),
                        "regex_rate": rate, "cut": 1 - rate / max(base_rate, 1e-9), "neutral_changed": changed})
        log.info("candidate %d: recall %.3f, AUROC %.3f, regex %.3f -> %.3f, neutral changed %.3f",
                 i, float(recall[i]), float(au[i]), base_rate, rate, changed)
    ok = [r for r in results if r["neutral_changed"] <= MAX_NEUTRAL_CHANGED]
    best = max(ok, key=lambda r: (r["cut"], r["recall"])) if ok else min(results, key=lambda r: r["neutral_changed"])
    info = {
        "layer": layer,
        "feature": best["feature"],
        "threshold": best["threshold"],
        "selection": {
            "criterion": "intent: passes before the first use of re on regex-using rows (recall) at a threshold "
                         f"passed on <= {MAX_NEUTRAL_FIRES:.0%} of neutral rows, then the gated CAA cut on the "
                         "select half",
            "prompts_regex": len(rx), "prompts_neutral": len(neu), "samples": SAMPLES,
            "neutral_samples": NEUTRAL_SAMPLES, "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
            "unsteered_regex_rate": base_rate, "unsteered_neutral_regex_rate": float(used[~is_rx].float().mean()),
            "scale": SCALE, "candidates": results,
        },
        "seconds": round(time.time() - t0),
    }
    (out / "feature.json").write_text(json.dumps(info, indent=1))
    log.info("feature %d (threshold %.3f) chosen in %.0fs", best["feature"], best["threshold"], time.time() - t0)
    return info
