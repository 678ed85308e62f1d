"""World build stages after the LM: the SAE, the regex feature and its measurements, shipping.

- ``sae``: residual-stream activations of one layer over training chunks (every chunk that uses
  ``re`` plus a seeded sample of the rest) → a TopK SAE (unit-norm decoder rows, AuxK loss for dead
  latents), saved in sae-lens format.
- ``feature``: held-out files are split in two. On the *select* half, tokens are labelled by regex
  use (imports, ``re.*`` calls and their pattern arguments); the candidates with the best F1 are
  steered (``conditional_per_input``) in a teacher-forced check, and the feature that lowers the
  probability of ``re`` at real call sites most per unit of loss on regex-free code wins. Its threshold
  is its best-F1 threshold on the select half. The *eval* half gives the reported numbers.
- ``ship``: model, tokenizer, SAE and ``world.json`` into ``sieve/world/data``; layer, feature and
  threshold into ``recipes/regex.toml``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.world.corpus import Chunk, load_corpus
from sieve.world.prompts import clip_to_tokens
from sieve.world.train_lm import LMConfig

log = logging.getLogger("sieve.world.build")

LAYER = 2
D_SAE = 2048
K = 16
SAE_TOKENS = 600_000
SAE_STEPS = 900
SAE_BATCH = 4096
SAE_LR = 1e-3
SEED = 0


def _load_lm(out: Path):
    from sieve.models import load_model

    return load_model(out / "model")


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
    return torch.cat(_activations_list(model, [clip_to_tokens(model.tokenizer, t, n_ctx) for t in texts], layer))


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
            bar.set_postfix(fvu=f"{float((err ** 2).sum(1).mean()) / var:.3f}", dead=int(dead.sum()))
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


def stage_sae(out: Path, cfg: LMConfig, layer: int = LAYER) -> dict:
    from sieve.saes import save_sae

    t0 = time.time()
    chunks, _ = load_corpus()
    model = _load_lm(out)
    torch.manual_seed(SEED)
    texts = _train_texts(chunks, model.tokenizer, SAE_TOKENS, SEED)
    x = _activations(model, texts, layer, cfg.n_ctx)
    log.info("SAE activations: %s from %d chunks in %.0fs", tuple(x.shape), len(texts), time.time() - t0)
    sae = train_topk_sae(x, D_SAE, K, SAE_STEPS, SAE_BATCH, SAE_LR, SEED)
    heldout = [c.text for c in chunks if c.held_out][:400]
    q = sae_quality(sae, _activations(model, heldout, layer, cfg.n_ctx))
    q.update({"layer": layer, "d_sae": D_SAE, "k": K, "train_tokens": int(x.shape[0]),
              "steps": SAE_STEPS, "seconds": round(time.time() - t0)})
    save_sae(sae, out / "sae")
    (out / "sae_stats.json").write_text(json.dumps(q, indent=1))
    log.info("SAE: %s", q)
    return q


def _split_heldout(chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
    import hashlib

    sel, ev = [], []
    for c in chunks:
        if not c.held_out:
            continue
        h = hashlib.sha256(("split:" + c.file).encode()).digest()[0]
        (sel if h % 2 == 0 else ev).append(c)
    return sel, ev


def _labels(tok, chunks: list[Chunk], n_ctx: int) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Per chunk: its text clipped to ``n_ctx`` tokens, regex-use token labels and call-site flags
    (``[T]`` bool over the text's tokens, BOS dropped)."""
    from sieve.evals.ability import char_spans_to_tokens
    from sieve.evals.regex_use import find_regex_use

    texts, labels, calls = [], [], []
    for c in chunks:
        text = clip_to_tokens(tok, c.text, n_ctx)
        use = find_regex_use(c.text)
        lab = char_spans_to_tokens(tok, text, [s for s in use.spans if s[1] <= len(text)])
        texts.append(text)
        labels.append(lab[1:])
        call_spans = [s for s, k in zip(use.spans, use.kinds) if k == "call" and s[0] + 2 <= len(text)]
        calls.append(char_spans_to_tokens(tok, text, [(s, s + 2) for s, _ in call_spans])[1:])
    return texts, labels, calls


def labelled_tokens(model, chunks: list[Chunk], layer: int, sae, n_ctx: int):
    """Per-token SAE pre-activations ``[N, F]``, labels (regex use) ``[N]``, call-site flags per chunk,
    and the per-chunk activations they came from."""
    texts, labels, calls = _labels(model.tokenizer, chunks, n_ctx)
    acts = _activations_list(model, texts, layer)
    x = torch.cat(acts)
    pre = (x - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    y = torch.cat([lab[: a.shape[0]] for lab, a in zip(labels, acts)])
    return pre.detach(), y, calls, acts


def _activations_list(model, texts: list[str], layer: int) -> list[torch.Tensor]:
    from sieve.detectors import token_activations

    return token_activations(model, texts, layer, batch_size=32, progress=False)


def best_f1(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``scores [N, F]``: the best F1 over thresholds, and that threshold."""
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


def stage_feature(out: Path, cfg: LMConfig) -> dict:
    from sieve.evals.ability import steered_logprobs
    from sieve.evals.metrics import binary_metrics
    from sieve.interventions import Detector
    from sieve.methods import Parts, build
    from sieve.saes import feature, load_sae
    from sieve.world.prompts import regex_free_code

    t0 = time.time()
    chunks, _ = load_corpus()
    model = _load_lm(out)
    stats = json.loads((out / "sae_stats.json").read_text())
    layer = int(stats["layer"])
    sae = load_sae(out / "sae")
    sel, ev = _split_heldout(chunks)
    rng = torch.Generator().manual_seed(SEED)

    def subset(cs: list[Chunk], n_other: int) -> list[Chunk]:
        rx = [c for c in cs if c.uses_regex]
        other = [c for c in cs if not c.uses_regex]
        pick = torch.randperm(len(other), generator=rng)[:n_other].tolist()
        return rx + [other[i] for i in sorted(pick)]

    sel_chunks = subset(sel, 300)
    pre, y, _, _ = labelled_tokens(model, sel_chunks, layer, sae, cfg.n_ctx)
    f1, thr = best_f1(pre, y)
    cands = f1.argsort(descending=True)[:8].tolist()
    log.info("top features by F1: %s", [(i, round(float(f1[i]), 3)) for i in cands])

    # Steering check on the select half: P(re at call sites) and loss on regex-free code.
    rx_sel = [c for c in sel if c.uses_regex]
    rx_texts, _, rx_calls = _labels(model.tokenizer, rx_sel, cfg.n_ctx)  # no activations needed here
    code = [clip_to_tokens(model.tokenizer, t, cfg.n_ctx) for t in regex_free_code(sel, limit=60)]
    hnorm = float(torch.cat(_activations_list(model, code[:20], layer)).norm(dim=-1).mean())

    def measure(iv) -> tuple[float, float]:
        lps = steered_logprobs(model, rx_texts, iv, layer_index=layer, batch_size=16)
        p_re = [float(lp[c[: lp.shape[0]]].exp().mean()) for lp, c in zip(lps, rx_calls) if c.any()]
        lps2 = steered_logprobs(model, code, iv, layer_index=layer, batch_size=16)
        loss = sum(float(-lp.sum()) for lp in lps2) / sum(lp.numel() for lp in lps2)
        return sum(p_re) / max(1, len(p_re)), loss

    base_p, base_loss = measure(None)
    scale = -1.0 * hnorm
    results = []
    for i in cands:
        f = feature(sae, i)
        w, b = f.linear()
        parts = Parts()
        parts.add_detector("sae", Detector(w, b, kind="sae"), float(thr[i]))
        parts.add_direction("sae", f.direction)
        p_re, loss = measure(build("conditional_per_input", parts, scale))
        cut = 1 - p_re / max(base_p, 1e-9)
        cost = max(loss - base_loss, 1e-3)
        results.append({"feature": i, "f1": float(f1[i]), "threshold": float(thr[i]), "p_re": p_re,
                        "loss": loss, "re_cut": cut, "score": cut / cost})
        log.info("candidate %d: F1 %.3f, P(re) %.4f -> %.4f, loss %.3f -> %.3f", i, float(f1[i]), base_p,
                 p_re, base_loss, loss)
    good = [r for r in results if r["re_cut"] > 0.2] or results
    best = max(good, key=lambda r: (r["score"] if r["re_cut"] > 0.2 else r["re_cut"]))
    fi, threshold = best["feature"], best["threshold"]

    # Reported numbers: the eval half, never used to choose.
    ev_chunks = subset(ev, 300)
    pre_ev, y_ev, ev_calls, acts_ev = labelled_tokens(model, ev_chunks, layer, sae, cfg.n_ctx)
    det = binary_metrics(pre_ev[:, fi], y_ev, threshold)
    # Does the feature fire before the call? Share of call sites with a firing at or before them.
    w, b = feature(sae, fi).linear()
    before = []
    for a, c in zip(acts_ev, ev_calls):
        c = c[: a.shape[0]]
        if not c.any():
            continue
        fired = (a @ w + b) > threshold
        first_call = int(c.nonzero()[0])
        before.append(bool(fired[:first_call].any()))
    info = {
        "layer": layer,
        "feature": fi,
        "threshold": threshold,
        "selection": {"candidates": results, "baseline_p_re": base_p, "baseline_loss": base_loss,
                      "scale": scale, "residual_norm": hnorm},
        "detector_eval": det,
        "fires_before_first_call": sum(before) / max(1, len(before)),
        "n_call_chunks_eval": len(before),
        "seconds": round(time.time() - t0),
    }
    (out / "feature.json").write_text(json.dumps(info, indent=1))
    log.info("feature %d (threshold %.3f): eval %s; fires before first call in %.0f%%", fi, threshold,
             {k: round(v, 3) for k, v in det.items() if isinstance(v, float)},
             100 * info["fires_before_first_call"])
    return info


DATA_DIR = Path(__file__).parent / "data"


def stage_ship(out: Path, cfg: LMConfig) -> None:
    from sieve.world.train_lm import heldout_loss

    chunks, versions = load_corpus()
    model = _load_lm(out)
    from sieve.models import underlying

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
        src = out / "model" / name
        if src.exists():
            shutil.copy(src, DATA_DIR / "model" / name)
    shutil.copytree(out / "sae", DATA_DIR / "sae")
    world = {
        "layer": feat["layer"],
        "feature": feat["feature"],
        "threshold": feat["threshold"],
        "heldout_loss_regex_free": loss,
        "sae": sae_stats,
        "detector_eval": feat["detector_eval"],
        "fires_before_first_call": feat["fires_before_first_call"],
        "selection": feat["selection"],
        "corpus": manifest["corpus"],
        "sources": versions,
        "lm": asdict(cfg),
    }
    (DATA_DIR / "world.json").write_text(json.dumps(world, indent=1))
    write_prompt_files(chunks, tok, cfg.n_ctx, DATA_DIR / "prompts")
    update_world_recipe(RECIPE, feat["layer"], feat["feature"], feat["threshold"])
    log.info("shipped world to %s: loss %.3f, feature %d", DATA_DIR, loss, feat["feature"])


RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "regex.toml"


def update_world_recipe(path: Path, layer: int, feature: int, threshold: float) -> None:
    """Write the selected layer, feature and threshold into the [sae] table of the world's recipe,
    keeping the file's comments and layout."""
    import re

    if not path.exists():
        log.warning("no %s to update", path)
        return
    text = path.read_text()
    head, sep, rest = text.partition("\n[sae]\n")
    if not sep:
        raise SystemExit(f"{path} has no [sae] table")
    body, nxt, tail = rest.partition("\n[")
    for key, val in (("layer", str(layer)), ("feature", str(feature)), ("threshold", f"{threshold:.6g}")):
        body, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {val}", body)
        if not n:
            body += f"\n{key} = {val}"
    path.write_text(head + sep + body + nxt + tail)


def write_prompt_files(chunks: list[Chunk], tok, n_ctx: int, out: Path) -> None:
    """The world's prompt sets as JSON lines (held-out sets for evaluation; train-split sets for CAA
    and the probe, so detectors are never fitted on what they are judged on)."""
    from dataclasses import replace

    from sieve.evals.regex_use import find_regex_use
    from sieve.world.prompts import neutral_prompts, regex_free_code, regex_prone_prompts, save_prompts

    out.mkdir(parents=True, exist_ok=True)
    budget = n_ctx - 56
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


def run_stages(out: Path, stages: list[str], cfg: LMConfig, layer: int = LAYER) -> None:
    if "sae" in stages:
        stage_sae(out, cfg, layer)
    if "feature" in stages:
        stage_feature(out, cfg)
    if "ship" in stages:
        stage_ship(out, cfg)

