"""World build stage ``ship``: the final model, tokenizer, SAE, ``world.json`` and the prompt sets into
``sieve/world/data`` (:data:`sieve.world.DATA_DIR`).

``world.json`` is the one record of the world's layer, feature and threshold: recipes with
``[sae] source = "world"`` read them from it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from sieve.world import DATA_DIR
from sieve.world.corpus import Chunk, load_corpus, load_intent_corpus
from sieve.world.prompts import clip_to_tokens
from sieve.world.train_lm import LMConfig
from sieve.world.train_sae import SEED, final_model_dir, load_lm

__all__ = ["stage_ship", "write_prompt_files"]

log = logging.getLogger("sieve.world.build")


def stage_ship(out: Path, cfg: LMConfig) -> None:
    from sieve.models import underlying
    from sieve.world.train_lm import heldout_loss

    chunks, _ = load_corpus()
    intent_chunks, intent_versions = load_intent_corpus()
    model = load_lm(out)

    tok = model.tokenizer
    held = [c for c in chunks if c.held_out and not c.uses_regex]
    ids = [tok(c.text)["input_ids"] for c in held[:400]]
    loss = heldout_loss(underlying(model), ids, cfg.n_ctx)
    feat = json.loads((out / "feature.json").read_text())
    sae_stats = json.loads((out / "sae_stats.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    if DATA_DIR.exists():
        shutil.rmtree(DATA_DIR)
    (DATA_DIR / "model").mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        src = final_model_dir(out) / name
        if src.exists():
            shutil.copy(src, DATA_DIR / "model" / name)
    shutil.copytree(out / "sae", DATA_DIR / "sae")
    intent_log = out / "intent" / "train_log.json"
    world = {
        "layer": feat["layer"],
        "feature": feat["feature"],
        "threshold": feat["threshold"],
        "heldout_loss_regex_free": loss,
        "sae": sae_stats,
        **{k: v for k, v in feat.items() if k not in ("layer", "feature", "threshold", "seconds")},
        "corpus": manifest["corpus"],
        "sources": manifest["sources"],
        "intent_sources": intent_versions,
        "lm": asdict(cfg),
        "intent": json.loads(intent_log.read_text())["config"] if intent_log.exists() else None,
    }
    (DATA_DIR / "world.json").write_text(json.dumps(world, indent=1))
    write_prompt_files(chunks, intent_chunks, tok, cfg.n_ctx, DATA_DIR / "prompts")
    log.info("shipped world to %s: loss %.3f, feature %d", DATA_DIR, loss, feat["feature"])


def write_prompt_files(chunks: list[Chunk], intent_chunks: list[Chunk], tok, n_ctx: int, out: Path) -> None:
    """The world's prompt sets as JSON lines (held-out sets for evaluation; train-split sets for CAA
    and the probe, so detectors are never fitted on what they are judged on).

    - ``intent_regex``/``intent_neutral``: the intent study (function heads, no ``re`` token; the
      *eval* half of the held-out files); ``intent_select``: the other half, where the build chose the
      feature (and where the CAA threshold is calibrated); ``intent_contrastive``: CAA pairs from
      training files (a regex-using function's head vs. a regex-free one's).
    - ``regex``/``neutral``/``contrastive``: the lexical study (imports kept, cut before the first use;
      pairs with and without ``import re``).
    - ``code``: held-out regex-free code for the loss; ``probe``: training code with regex-use spans.
    """
    from dataclasses import replace

    from sieve.evals.regex_use import find_regex_use
    from sieve.world.prompts import (
        intent_pairs,
        intent_prompt_sets,
        neutral_prompts,
        regex_free_code,
        regex_prone_prompts,
        save_prompts,
    )

    out.mkdir(parents=True, exist_ok=True)
    budget = n_ctx - 56
    sets = intent_prompt_sets(chunks + intent_chunks, tok, budget)
    save_prompts(out / "intent_regex.jsonl", sets["eval_regex"])
    save_prompts(out / "intent_neutral.jsonl", sets["eval_neutral"])
    save_prompts(out / "intent_select.jsonl", sets["select_regex"] + sets["select_neutral"])
    ipairs = [{"id": f"{p.id}|{n.id}", "positive": p.prompt, "negative": n.prompt} for p, n in intent_pairs(sets)]
    (out / "intent_contrastive.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ipairs))
    save_prompts(out / "regex.jsonl", regex_prone_prompts(chunks, tok, budget))
    save_prompts(out / "neutral.jsonl", neutral_prompts(chunks, tok, budget, limit=200))
    code = [clip_to_tokens(tok, t, n_ctx) for t in regex_free_code(chunks, limit=200)]
    (out / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in code))
    # Contrastive pairs from training files: the same function start with and without ``import re``.
    train = [replace(c, held_out=True) for c in chunks if not c.held_out and c.uses_regex]
    pairs = []
    for p in regex_prone_prompts(train, tok, budget):
        header, _, head = p.prompt.partition("\n\n")
        lines = header.splitlines()
        kept = [ln for ln in lines if not find_regex_use(ln).used]
        if len(kept) == len(lines) or not head:
            continue
        neg = ("\n".join(kept) + "\n\n" + head) if kept else head
        pairs.append({"id": p.id, "positive": p.prompt, "negative": neg})
    g = torch.Generator().manual_seed(SEED)
    pairs = [pairs[i] for i in sorted(torch.randperm(len(pairs), generator=g)[:128].tolist())]
    (out / "contrastive.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    probe = [clip_to_tokens(tok, c.text, n_ctx) for c in chunks if not c.held_out and c.uses_regex]
    probe = [probe[i] for i in sorted(torch.randperm(len(probe), generator=g)[:200].tolist())]
    (out / "probe.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in probe))

