"""The world build's intent phase: continue training the LM where a function's purpose, not an import,
says whether it reaches for ``re``.

The first phase (:mod:`sieve.world.train_lm`) sees every chunk under its file's imports, so the model
learns "``import re`` above → ``re`` below": a feature that tracks regex use can then be read off the
import line. This phase continues from that model on the training files of the corpus plus those of
:data:`~sieve.world.corpus.INTENT_PACKAGES` (more code that uses ``re``, never seen before), and shows
half of the chunks *bare*, without their import lines (which half is a seeded function of the chunk and
the epoch). A bare function that uses ``re`` can only be predicted from its name, signature and
docstring: what it is for.

Resumable like the first phase: the batch of a step is a function of (seed, step); checkpoints are
safetensors (model and AdamW moments), the final model goes to ``<out>/intent/model``.

Example:
    >>> from sieve.world.train_intent import IntentConfig
    >>> IntentConfig().steps > 0
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.world.corpus import Chunk
from sieve.world.train_lm import _load_ckpt, _save_ckpt

__all__ = ["IntentConfig", "bare_text", "train_intent"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntentConfig:
    """Schedule of the intent phase (batch 32 × 256 tokens per step)."""

    steps: int = 160
    batch_size: int = 16
    n_ctx: int = 256
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.05
    # Each epoch: every chunk that uses ``re`` once, and ``other_per_regex`` times as many of the
    # rest (a seeded sample), so a short phase sees many functions of both kinds.
    other_per_regex: float = 2.0
    bare_fraction: float = 0.75
    seed: int = 1
    threads: int = 2
    checkpoint_every: int = 10


def _unit(*parts: object) -> float:
    h = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def bare_text(chunk: Chunk) -> str:
    """A chunk without its import lines.

    Example:
        >>> bare_text(Chunk("m.py", "f", "import re", "def f():\\n    pass", False, False))
        'def f():\\n    pass\\n'
    """
    return f"{chunk.body}\n"


def _stream(tok, chunks: list[Chunk], cfg: IntentConfig, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    regex = [i for i, c in enumerate(chunks) if c.uses_regex]
    other = [i for i, c in enumerate(chunks) if not c.uses_regex]
    n_other = min(len(other), int(len(regex) * cfg.other_per_regex))
    order = regex + [other[j] for j in torch.randperm(len(other), generator=g)[:n_other].tolist()]
    perm = torch.randperm(len(order), generator=g).tolist()
    texts = []
    for p in perm:
        c = chunks[order[p]]
        bare = c.header and _unit(cfg.seed, epoch, c.file, c.name) < cfg.bare_fraction
        texts.append(bare_text(c) if bare else c.text)
    flat: list[int] = []
    for ids in tok(texts, add_special_tokens=True)["input_ids"]:
        flat.extend(ids)
    n = len(flat) // cfg.n_ctx * cfg.n_ctx
    return torch.tensor(flat[:n], dtype=torch.long).view(-1, cfg.n_ctx)


def _lr(cfg: IntentConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def train_intent(cfg: IntentConfig, start_model: Path, chunks: list[Chunk], out_dir: Path,
                 *, stop_after: int | None = None) -> Path:
    """Continue training the model in ``start_model`` on the training chunks (see the module
    docstring); returns ``out_dir/model``. ``stop_after`` ends the run early at that step (the
    checkpoint then holds it; a later call resumes)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast.from_pretrained(start_model)
    model = GPT2LMHeadModel.from_pretrained(start_model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ckpt = out_dir / "ckpt.safetensors"
    step, losses = 0, []
    if ckpt.exists():
        step, losses = _load_ckpt(ckpt, model, opt)
        log.info("intent phase: resuming from step %d", step)
    train = [c for c in chunks if not c.held_out]
    key, data = -1, None
    per_epoch = None
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, desc="world intent", unit="step", mininterval=10)
    t0 = time.time()
    while step < end:
        if per_epoch is None:
            data, key = _stream(tok, train, cfg, 0), 0
            per_epoch = data.shape[0] // cfg.batch_size
        epoch, pos = divmod(step, per_epoch)
        if epoch != key:
            data, key = _stream(tok, train, cfg, epoch), epoch
        x = data[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}", s_step=f"{(time.time() - t0) / 10:.2f}")
            log.info("intent step %d loss %.3f (%.2fs/step)", step, sum(losses[-10:]) / 10, (time.time() - t0) / 10)
            t0 = time.time()
        if step % cfg.checkpoint_every == 0 or step == end:
            _save_ckpt(ckpt, model, opt, step, cfg, losses)
            snap = out_dir / "snapshots" / f"step{step:05d}"
            model.save_pretrained(snap)
            tok.save_pretrained(snap)
    bar.close()
    model.eval()
    model_dir = out_dir / "model"
    if step >= cfg.steps:
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        (out_dir / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "losses": losses}))
    return model_dir
