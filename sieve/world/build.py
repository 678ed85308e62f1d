"""Rebuild the embedded world from scratch: ``python -m sieve.world.build [--out DIR] [--stages ...]``.

Stages, each resumable and seeded, each in a module named after what it does:

1. ``lm`` (:mod:`~sieve.world.train_lm`): corpus → byte-level BPE tokenizer → GPT-2 LM (checkpointed;
   a cut-off run resumes).
2. ``intent`` (:mod:`~sieve.world.train_intent`): continue training where most chunks come without
   their imports, with more code that uses ``re``, so regex use follows from what a function is for.
3. ``sae`` (:mod:`~sieve.world.train_sae`): a TopK SAE on one layer's residual stream of the final
   LM (sae-lens format).
4. ``feature`` (:mod:`~sieve.world.select_feature`): choose the feature whose firing before a
   completion's first ``re`` predicts regex use on held-out function heads while it stays quiet on
   neutral ones, and whose gate cuts it.
5. ``ship`` (:mod:`~sieve.world.ship`): model, tokenizer, SAE, ``world.json`` (the one record of layer,
   feature and threshold) and the prompt sets into ``sieve/world/data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from sieve.world.corpus import corpus_fingerprint, load_corpus
from sieve.world.train_lm import LMConfig, encode_chunks, train_lm, train_tokenizer

log = logging.getLogger("sieve.world.build")

DEFAULT_OUT = Path("build/world")
STAGES = ("lm", "intent", "sae", "feature", "ship")


def stage_lm(out: Path, cfg: LMConfig) -> Path:
    """Corpus, tokenizer and LM; returns the model directory."""
    chunks, versions = load_corpus()
    manifest = {
        "corpus": corpus_fingerprint(chunks),
        "sources": versions,
        "chunks": len(chunks),
        "regex_chunks": sum(c.uses_regex for c in chunks),
        "lm": asdict(cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    shipped = Path(__file__).parent / "data" / "world.json"
    if shipped.exists():
        pinned = json.loads(shipped.read_text()).get("sources", {})
        differ = {k: (v, versions.get(k)) for k, v in pinned.items() if versions.get(k) != v}
        if differ:
            log.warning("sources differ from the shipped world's (shipped, here): %s; the rebuild will read "
                        "another corpus and give another world", differ)
    man_path = out / "manifest.json"
    if man_path.exists():
        old = json.loads(man_path.read_text())
        if old.get("corpus") != manifest["corpus"]:
            raise SystemExit(
                f"{out} holds a build from another corpus ({old.get('corpus')} != "
                f"{manifest['corpus']}; sources {old.get('sources')} vs {versions}); "
                "use a fresh --out directory"
            )
    man_path.write_text(json.dumps(manifest, indent=1))
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        t0 = time.time()
        tok = train_tokenizer([c.text for c in chunks if not c.held_out], cfg.vocab_size, tok_dir)
        log.info("tokenizer trained in %.0fs", time.time() - t0)
    ids = encode_chunks(tok, chunks)
    n_train = sum(len(i) for i, c in zip(ids, chunks) if not c.held_out)
    log.info("corpus: %d chunks, %d train tokens", len(chunks), n_train)
    return train_lm(cfg, tok, chunks, ids, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="build directory (default build/world)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--tokens", type=int, default=LMConfig.tokens, help="LM training tokens")
    p.add_argument("--regex-phase-steps", type=int, default=LMConfig.regex_phase_steps)
    p.add_argument("--threads", type=int, default=LMConfig.threads)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = LMConfig(tokens=args.tokens, threads=args.threads, regex_phase_steps=args.regex_phase_steps)
    t0 = time.time()
    if "lm" in args.stages:
        stage_lm(args.out, cfg)
        log.info("lm stage done after %.0fs", time.time() - t0)
    if "intent" in args.stages:
        from sieve.world.corpus import load_intent_corpus
        from sieve.world.train_intent import IntentConfig, train_intent

        chunks = load_corpus()[0] + load_intent_corpus()[0]
        train_intent(IntentConfig(threads=args.threads), args.out / "model", chunks, args.out / "intent")
        log.info("intent stage done after %.0fs", time.time() - t0)
    if "sae" in args.stages:
        from sieve.world.train_sae import stage_sae

        stage_sae(args.out, cfg)
    if "feature" in args.stages:
        from sieve.world.select_feature import stage_feature

        stage_feature(args.out, cfg)
    if "ship" in args.stages:
        from sieve.world.ship import stage_ship

        stage_ship(args.out, cfg)
    log.info("world build finished in %.0fs", time.time() - t0)


if __name__ == "__main__":
    main()
