"""World build stage ``sae``: a TopK SAE on one layer of the world's final LM (the intent phase's), in
sae-lens format.

Residual-stream activations of the layer over training chunks (every chunk that uses ``re`` plus a
seeded sample of the rest, of the corpus and the intent packages, then bare versions of the
``re``-using ones: :func:`sae_texts`) train a TopK SAE (unit-norm decoder rows, AuxK loss for dead
latents). Its quality (fraction of variance explained, L0, dead latents) is measured on held-out code.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.world.corpus import Chunk, load_corpus
from sieve.world.prompts import clip_to_tokens
from sieve.world.train_lm import LMConfig

__all__ = ["LAYER", "D_SAE", "K", "train_topk_sae", "sae_quality", "stage_sae", "final_model_dir", "load_lm",
           "activations_list"]

log = logging.getLogger("sieve.world.build")

LAYER = 2
D_SAE = 2048
K = 16
SAE_TOKENS = 300_000  # of plain training chunks; bare regex-using chunks come on top
SAE_ROWS = 700_000  # activation rows the SAE trains on (a seeded sample)
SAE_STEPS = 900
SAE_BATCH = 4096
SAE_LR = 1e-3
SEED = 0


def final_model_dir(out: Path) -> Path:
    """The build's final LM: the intent phase's model (the first phase's when that stage is skipped)."""
    d = out / "intent" / "model"
    return d if d.exists() else out / "model"


def load_lm(out: Path):
    """The build's final LM, loaded for tracing."""
    from sieve.models import load_model

    return load_model(final_model_dir(out))


def _train_texts(chunks: list[Chunk], tok, budget: int, seed: int) -> list[str]:
    train = [c for c in chunks if not c.held_out]
    g = torch.Generator().manual_seed(seed)
    regex = [c.text for c in train if c.uses_regex]
    rest = [train[i].text for i in torch.randperm(len(train), generator=g).tolist() if not train[i].uses_regex]
    texts, n = [], 0
    for t in regex + rest:
        texts.append(t)
        n += min(256, len(t) // 3)
        if n >= budget:
            break
    return texts


def _activations(model, texts: list[str], layer: int, n_ctx: int) -> torch.Tensor:
    """``[N, d]``: the layer's activations at every real token of the texts, each clipped to ``n_ctx``."""
    return torch.cat(activations_list(model, [clip_to_tokens(model.tokenizer, t, n_ctx) for t in texts], layer))


def train_topk_sae(x: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int):
    """A TopK SAE on activations ``x [N, d]``; returns a sae-lens ``TopKSAE`` and training stats."""
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens import TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    N, d = x.shape
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = W_dec.requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = x[torch.randperm(N, generator=g)[:20000]].median(dim=0).values.clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    var = float(((x - x.mean(0)) ** 2).sum(1).mean())
    k_aux, dead_after = min(256, d_sae // 2), 200
    bar = tqdm(range(steps), desc="world SAE", mininterval=10)
    for step in bar:
        idx = torch.randint(0, N, (batch,), generator=g)
        xb = x[idx]
        pre = (xb - b_dec) @ W_enc + b_enc
        vals, inds = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, inds, vals.relu())
        recon = acts @ W_dec + b_dec
        err = xb - recon
        loss = (err ** 2).sum(1).mean() / var
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[inds[vals > 0].unique()] = True
        last_fired[fired] = step
        dead = (step - last_fired) > dead_after
        if dead.any():
            dpre = pre.masked_fill(~dead, float("-inf"))
            kk = min(k_aux, int(dead.sum()))
            dv, di = dpre.topk(kk, dim=-1)
            dacts = torch.zeros_like(pre).scatter(-1, di, dv.relu())
            aux = ((err.detach() - dacts @ W_dec) ** 2).sum(1).mean() / var
            loss = loss + aux / 32
        opt.zero_grad()
        loss.backward()
        # Keep decoder rows unit-norm: project out the radial part of the gradient, then renormalise.
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        if step % 50 == 0:
            bar.set_postfix(fvu=f"{float((err.detach() ** 2).sum(1).mean()) / var:.3f}", dead=int(dead.sum()))
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=d_sae, k=k, apply_b_dec_to_input=True,
                                rescale_acts_by_decoder_norm=False))
    sae.load_state_dict({"W_enc": W_enc.detach().contiguous(), "b_enc": b_enc.detach(),
                         "W_dec": W_dec.detach().contiguous(), "b_dec": b_dec.detach()})
    return sae


@torch.inference_mode()
def sae_quality(sae, x: torch.Tensor) -> dict[str, float]:
    """Fraction of variance explained, mean L0 and dead fraction on activations ``x``."""
    feats = sae.encode(x)
    recon = sae.decode(feats)
    fve = 1 - float(((x - recon) ** 2).sum()) / float(((x - x.mean(0)) ** 2).sum())
    alive = (feats > 0).any(0)
    return {"fve": fve, "l0": float((feats > 0).sum(1).float().mean()), "dead_fraction": 1 - float(alive.float().mean())}


def sae_texts(chunks: list[Chunk], tok, budget: int = SAE_TOKENS, seed: int = SEED) -> list[str]:
    """The SAE's training texts: training chunks as :func:`_train_texts` picks them (``re``-using ones
    first), then bare versions (no import lines) of the ``re``-using training chunks, half as many, so
    the SAE sees functions whose use of ``re`` shows only in what they are for, as the intent prompts do.
    """
    from sieve.world.train_intent import bare_text

    texts = _train_texts(chunks, tok, budget, seed)
    bare = [bare_text(c) for c in chunks if not c.held_out and c.uses_regex]
    return texts + bare[: len(texts) // 2]


def stage_sae(out: Path, cfg: LMConfig, layer: int = LAYER) -> dict:
    """Train the world's SAE on the build's final LM (the intent phase's), at ``layer``."""
    from sieve.saes import save_sae
    from sieve.world.corpus import load_intent_corpus

    t0 = time.time()
    chunks = load_corpus()[0] + load_intent_corpus()[0]
    model = load_lm(out)
    torch.manual_seed(SEED)
    x = _activations(model, sae_texts(chunks, model.tokenizer), layer, cfg.n_ctx)
    g = torch.Generator().manual_seed(SEED)
    x = x[torch.randperm(len(x), generator=g)[:SAE_ROWS]]
    log.info("SAE activations: %s in %.0fs", tuple(x.shape), time.time() - t0)
    sae = train_topk_sae(x, D_SAE, K, SAE_STEPS, SAE_BATCH, SAE_LR, SEED)
    heldout = [c.text for c in chunks if c.held_out][:400]
    q = sae_quality(sae, _activations(model, heldout, layer, cfg.n_ctx))
    q.update({"layer": layer, "d_sae": D_SAE, "k": K, "train_tokens": int(x.shape[0]),
              "steps": SAE_STEPS, "seconds": round(time.time() - t0)})
    sae.cfg.metadata.hook_name = f"model.layers.{layer}"  # the layer it reads, for sieve.steering.sae_layer
    save_sae(sae, out / "sae")
    (out / "sae_stats.json").write_text(json.dumps(q, indent=1))
    log.info("SAE: %s", q)
    return q


def activations_list(model, texts: list[str], layer: int) -> list[torch.Tensor]:
    from sieve.detectors import token_activations

    return token_activations(model, texts, layer, batch_size=32, progress=False)

