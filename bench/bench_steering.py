"""What steering costs, and how much faster a batched sweep is. One command, ratios from one run.

    python bench/bench_steering.py [--config world|mid|gemma2-2b] [--device cpu|cuda] [--repeats 5]

1. **Overhead**: sieve's steered generation (nnsight trace, one vectorised edit per step) against plain
   HF ``generate`` on the same batch and token count, for each gate/edit kind: with HF's own KV cache
   (like for like: what steering costs) and with sieve's default growing cache (:mod:`sieve.kvcache`:
   what a user gets). Runs are interleaved (plain, sieve, sieve, plain, ...) and the ratio of medians
   is reported with the spread of the per-pair ratios.
2. **Sweep**: the same methods × scales × prompts done two ways: sieve's (all rows in batched
   generation, rows mixing methods and scales) and the study's (one ``generate`` per method × scale,
   batch 20, a forward hook on the layer). Greedy (every row runs the whole budget), then sampled at
   temperature 1 with rows ending at EOS as in the study (both sides use the same per-row seeds); either
   way both must give the same tokens, and the script checks.
   A third side runs the same sweep forked (:func:`sieve.fork.generate_forked`: gated rows reuse or
   continue their prompt's unsteered trajectory; rows are seeded by prompt, as a sweep's are) and is
   checked to give the same tokens as the unforked sweep. The sweep's random detectors fire on about
   half of all tokens (nearly every row edits in its prompt: forking has little to save); ``--gate-rate
   P`` sets their thresholds to fire on P of held-out neutral tokens instead, as calibrated detectors do.
3. Tokens per second, and peak memory of each side of the sweep, each run alone in a fresh process
   (CUDA: ``max_memory_allocated`` above the loaded model; CPU: peak resident-set growth, polled).

4. ``--sae-cost CONFIG ...``: an SAE-space clamp (encode, set the feature where active, decode, error
   kept) on a 16k-latent JumpReLU SAE, with the sparse encode (the feature's own encoder column and
   decoder row) and with the full encode, against plain ``generate``, for several configs in one run.

5. ``--recipe-prompts N``: the default recipe's own workload (N random prompts, each with all its
   samples and every method × scale cell of ``recipes/regex.toml``, as the run's chunks hold them): the
   study's loop structure (one ``generate`` per cell, batch 20), the sweep as it was (every row in
   full, nothing shared), forking alone, the engine alone (shared prefill, growing KV cache, rows
   leaving their batch when they end) and both (the default), interleaved; the work saved, and the
   rows that differ from the sweep as it was.

Configs: ``world`` (the embedded model), ``mid`` (a random 8-layer d=512 Llama), ``gemma2-2b-width``
(gemma-2-2b's width with 4 layers and a small vocabulary; fits a CPU), ``gemma2-2b`` (gemma-2-2b's
published config with random weights; for a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sieve.fork import generate_forked  # noqa: E402
from sieve.generation import RowSampler, generate  # noqa: E402
from sieve.interventions import Detector, Edit, Intervention, eligible_mask  # noqa: E402
from sieve.methods import STUDY_METHODS, Parts, build  # noqa: E402
from sieve.models import choose_attention, encode_prompts, load_model, underlying  # noqa: E402


def world_prompts(n: int) -> list[str]:
    """``n`` of the embedded world's held-out prompts, regex-prone and neutral alternating: real function
    starts of 5 to 200 tokens (every config shares the world's tokenizer), so batches carry real padding.
    """
    from sieve.prompts import WORLD_PROMPTS_DIR

    sets = [[json.loads(x)["prompt"] for x in (WORLD_PROMPTS_DIR / f"{k}.jsonl").read_text().splitlines() if x.strip()]
            for k in ("regex", "neutral")]
    mixed = [p for pair in zip(*sets) for p in pair]
    if n > len(mixed):
        raise SystemExit(f"at most {len(mixed)} distinct prompts, asked for {n}")
    return mixed[:n]


def build_model(config: str, device: str):
    if config == "world":
        from sieve.world import world_model_dir

        return load_model(world_model_dir(), device=device), 2
    from transformers import AutoTokenizer

    from sieve.world import world_model_dir

    if config not in ("mid", "gemma2-2b-width", "gemma2-2b"):
        raise SystemExit(f"unknown config {config!r}")
    tok = AutoTokenizer.from_pretrained(world_model_dir())
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    # Random weights are drawn where the model will run, in its dtype: gemma-2-2b's 2.6B parameters
    # initialised on a CPU first would take longer than the benchmark's generation on a GPU.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attn = choose_attention("gemma2" if config == "gemma2-2b" else "llama", device, dtype)
    if attn is not None:
        common["attn_implementation"] = attn  # flash-attention 2 on CUDA when installed, as load_model does
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = _random_model(config, common)
    finally:
        torch.set_default_dtype(default_dtype)
    layer = {"mid": 4, "gemma2-2b-width": 2, "gemma2-2b": 8}[config]
    m = m.to(device=device, dtype=dtype).eval()
    return load_model(m, tokenizer=tok, device=device), layer


def _random_model(config: str, common: dict):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    if config == "mid":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=4, **common))
    elif config == "gemma2-2b-width":
        # gemma-2-2b's width (d=2304, MLP 9216, its attention shape) with 4 of its 26 layers and the world's
        # vocabulary: small enough for a CPU; an SAE costs a larger share of a shallower model, so its
        # ratio here bounds the full model's from above.
        m = Gemma2ForCausalLM(Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=4,
                                           num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                           sliding_window=4096, attn_logit_softcapping=50.0,
                                           final_logit_softcapping=30.0, query_pre_attn_scalar=256, **common))
    elif config == "gemma2-2b":
        # gemma-2-2b's published config (2.6B parameters), random weights, its 256k vocabulary included so
        # the LM head costs what it does; prompts use the world's tokenizer, whose ids are a subset.
        common["vocab_size"] = 256000
        m = Gemma2ForCausalLM(Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                           num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                           sliding_window=4096, attn_logit_softcapping=50.0,
                                           final_logit_softcapping=30.0, query_pre_attn_scalar=256, **common))
    else:
        raise SystemExit(f"unknown config {config!r}")
    return m


def parts_for(model, layer: int, gate_rate: float | None = None) -> Parts:
    """Random detectors and directions for the benchmark's sweep. Thresholds: 0.5 (about half of all
    tokens fire: nearly every row edits in its prompt), or with ``gate_rate`` the score each detector
    passes on that share of the tokens of held-out neutral prompts (not the sweep's; a little less
    where prompts sharing an opening tie at the top), as a trained detector's calibrated threshold
    fires rarely on code without the concept."""
    d = underlying(model).config.hidden_size
    g = torch.Generator().manual_seed(0)
    p = Parts()
    dirs = {}
    for name in ("sae", "caa", "probe"):
        w = torch.randn(d, generator=g)
        dirs[name] = w / w.norm()
        p.add_direction(name, torch.randn(d, generator=g))
    scores = _neutral_scores(model, layer, torch.stack(list(dirs.values()), 1)) if gate_rate is not None else None
    for k, (name, w) in enumerate(dirs.items()):
        threshold = 0.5 if scores is None else float(torch.quantile(scores[:, k], 1 - gate_rate))
        p.add_detector(name, Detector(w, 0.0, kind=name), threshold)
    return p


def _neutral_scores(model, layer: int, directions: torch.Tensor) -> torch.Tensor:
    """``[tokens, k]``: the layer's outputs on held-out neutral prompts (the world's neutral set past
    those the sweep uses), each real token (not padding, not BOS) projected on each direction."""
    from sieve.detectors import token_activations
    from sieve.prompts import WORLD_PROMPTS_DIR

    neutral = [json.loads(x)["prompt"] for x in (WORLD_PROMPTS_DIR / "neutral.jsonl").read_text().splitlines()
               if x.strip()][-40:]
    return torch.cat(token_activations(model, neutral, layer, batch_size=8, progress=False)) @ directions


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def progress(msg: str) -> None:
    """A line on stderr as each part ends: a run stopped at its time limit still shows what it measured."""
    print(msg, file=sys.stderr, flush=True)


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def plain_generate(model, enc, n: int, sample: bool = False):
    with torch.inference_mode():
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        return underlying(model).generate(**enc, max_new_tokens=n, min_new_tokens=n,
                                          pad_token_id=model.tokenizer.pad_token_id, **kw)


def bench_overhead(model, layer: int, device: str, batch: int, n: int, repeats: int) -> list[dict]:
    prompts = world_prompts(batch)
    enc = {k: v.to(device) for k, v in encode_prompts(model.tokenizer, prompts).items()}
    d = underlying(model).config.hidden_size
    u = torch.randn(d)
    det = Detector(torch.randn(d), 0.0)
    # (name, intervention, sampled): greedy for each gate/edit kind, then sampling at temperature 1
    # against HF's own sampling. The rows never pick EOS (a random direction of a trained model, or
    # random weights, rarely does within the budget; the script checks), so both do the same steps.
    kinds = [
        ("always/add", Intervention("always", Edit("add", u, -4.0)), False),
        ("token/add", Intervention("token", Edit("add", u, -4.0), det, 0.0), False),
        ("input/add", Intervention("input", Edit("add", u, -4.0), det, 0.0), False),
        ("token/clamp", Intervention("token", Edit("clamp", u, -1.0), det, 0.0), False),
        ("token/add, sampled", Intervention("token", Edit("add", u, -4.0), det, 0.0), True),
    ]
    rows = []
    plain_generate(model, enc, 2)  # warm-up
    generate(model, prompts, None, layer_index=layer, max_new_tokens=2, progress=False)
    # sieve with HF's own KV cache (what steering costs over plain generate, like for like), and with its
    # default growing cache (sieve.kvcache: what a user gets). Prompts are distinct: nothing is shared.
    for name, iv, sample in kinds:
        plain_t, sieve_t, grow_t, steps = [], [], [], []
        for _ in range(repeats):
            plain_t.append(timed(lambda s=sample: plain_generate(model, enc, n, s), device))
            for cache, ts in (("hf", sieve_t), ("grow", grow_t)):
                ts.append(timed(lambda iv=iv, s=sample, steps=steps, cache=cache: steps.append(max(
                    len(o.token_ids) for o in generate(
                        model, prompts, iv, layer_index=layer, max_new_tokens=n, batch_size=batch, progress=False,
                        temperature=1.0 if s else 0.0, seeds=len(steps) // 2, kv_cache=cache))), device))
        if min(steps) < n:
            print(f"warning: {name}: every row ended before {n} tokens in some run; the ratio is not like for like")
        ratios = [s / p for s, p in zip(sieve_t, plain_t)]
        grow_ratios = [s / p for s, p in zip(grow_t, plain_t)]
        rows.append({"kind": name, "plain_s": statistics.median(plain_t), "sieve_s": statistics.median(sieve_t),
                     "ratio": statistics.median(sieve_t) / statistics.median(plain_t),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "grow_s": statistics.median(grow_t), "grow_ratio": statistics.median(grow_t) / statistics.median(plain_t),
                     "grow_ratio_min": min(grow_ratios), "grow_ratio_max": max(grow_ratios),
                     "sieve_tok_s": batch * n / statistics.median(sieve_t)})
        progress(f"overhead {name}: plain {rows[-1]['plain_s']:.3f}s, sieve {rows[-1]['sieve_s']:.3f}s, "
                 f"growing cache {rows[-1]['grow_s']:.3f}s")
    return rows


def sae_for(d: int, latents: int = 16384):
    """A JumpReLU SAE of ``latents`` features on width ``d`` (sae-lens, random weights, threshold 0 so
    about half the tokens activate a feature): what an SAE-space edit costs does not depend on training."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=latents, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.threshold.zero_()
    return sae.eval()


def bench_sae_cost(model, layer: int, device: str, batch: int, n: int, repeats: int, latents: int) -> dict:
    """SAE-space clamp (the feature set to a value where it is active in the code, error term kept) with
    the sparse encode (JumpReLU: only the feature's encoder column and decoder row) and with the full
    encode (all ``latents``), against plain ``generate``; interleaved, ratio of medians."""
    from sieve.interventions import Fires, LatentEdit, SAECode

    prompts = world_prompts(batch)
    enc = {k: v.to(device) for k, v in encode_prompts(model.tokenizer, prompts).items()}
    d = underlying(model).config.hidden_size
    sae = sae_for(d, latents).to(device)
    f = 123
    ivs = {enc_kind: Intervention(Fires(SAECode(sae, [f], encode=enc_kind), 0.0),
                                  LatentEdit(sae, [f], "set", -4.0, encode=enc_kind), layers=layer)
           for enc_kind in ("auto", "full")}
    plain_generate(model, enc, 2)  # warm-up
    for iv in ivs.values():
        generate(model, prompts, iv, max_new_tokens=2, progress=False, token_healing=False)
    t: dict[str, list[float]] = {"plain": [], "auto": [], "full": []}
    steps: list[int] = []
    for _ in range(repeats):
        t["plain"].append(timed(lambda: plain_generate(model, enc, n), device))
        for k, iv in ivs.items():
            t[k].append(timed(lambda iv=iv: steps.append(max(len(o.token_ids) for o in generate(
                model, prompts, iv, max_new_tokens=n, batch_size=batch, progress=False, token_healing=False,
                kv_cache="hf"))), device))  # HF's cache on both sides: the SAE's own cost
    if min(steps) < n:
        print(f"warning: every row ended before {n} tokens in some run; the ratio is not like for like")
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"d": d, "latents": latents, "batch": batch, "tokens": n, "plain_s": med["plain"],
            "sparse_s": med["auto"], "full_s": med["full"], "sparse_ratio": med["auto"] / med["plain"],
            "full_ratio": med["full"] / med["plain"],
            "sparse_range": [min(a / p for a, p in zip(t["auto"], t["plain"])),
                             max(a / p for a, p in zip(t["auto"], t["plain"]))],
            "full_range": [min(a / p for a, p in zip(t["full"], t["plain"])),
                           max(a / p for a, p in zip(t["full"], t["plain"]))]}


def study_way(model, layer: int, cells, parts, prompts, n: int, device: str, sampled: bool = False) -> list[list[int]]:
    """One generate per method × scale, batch 20, a forward hook on the layer (the study's structure).

    Greedy: ``n`` tokens per row. ``sampled``: temperature 1 with sieve's per-row seeded sampler (row k
    of the sweep draws from seed k, as in :func:`sieve_way`, so both give the same tokens), and HF ends
    rows at EOS (padding them, stopping once all 20 have ended), as the study ran."""
    hf = underlying(model)
    layers = hf.model.layers if hasattr(hf, "model") and hasattr(hf.model, "layers") else hf.transformer.h
    tok = model.tokenizer
    outs = []
    eos = underlying(model).generation_config.eos_token_id
    for method, scale in cells:
        iv = build(method, parts, scale)
        det, u = iv.detector, iv.edit.direction.to(device)
        w = det.w.to(device) if det is not None else None

        state = {}

        def hook(mod, args, out, iv=iv, w=w, u=u, det=det, state=state):
            h = out[0] if isinstance(out, tuple) else out
            # Same semantics as sieve's edit (padding and BOS excluded at the prefill) so outputs match.
            real = state["real"] if h.shape[1] > 1 else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            if iv.gate == "always":
                mask = real
                a = None
            else:
                a = h.float() @ w + det.b
                mask = (a > iv.threshold) & real
            if iv.edit.kind == "add":
                h2 = h + (iv.edit.value * mask)[..., None].to(h.dtype) * u.to(h.dtype)
            else:
                h2 = h + (((iv.edit.value - a) / float(w @ u)) * mask)[..., None].to(h.dtype) * u.to(h.dtype)
            return (h2, *out[1:]) if isinstance(out, tuple) else h2

        handle = layers[layer].register_forward_hook(hook)
        try:
            for i in range(0, len(prompts), 20):
                enc = {k: v.to(device) for k, v in encode_prompts(tok, prompts[i : i + 20]).items()}
                state["real"] = eligible_mask(enc["input_ids"], enc["attention_mask"], tok.bos_token_id)
                with torch.inference_mode():
                    if sampled:
                        b = enc["input_ids"].shape[0]
                        seeds = range(i, i + b)  # seeded by prompt, as a sweep's rows are (sieve.sweep)
                        ids = hf.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                          eos_token_id=eos, logits_processor=[RowSampler([1.0] * b, list(seeds))])
                    else:
                        ids = hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
                outs += ids[:, enc["input_ids"].shape[1]:].tolist()
        finally:
            handle.remove()
    return outs


def sweep_plan(model, layer: int, per_cell: int, gate_rate: float | None = None):
    """The sweep: every add method (not input-gated) × 3 scales × ``per_cell`` prompts, one row each."""
    parts = parts_for(model, layer, gate_rate)
    methods = [m.name for m in STUDY_METHODS if m.edit == "add" and m.gate != "input"]
    cells = [(m, s) for m in methods for s in (-2.0, -4.0, -8.0)]
    prompts = world_prompts(per_cell)
    rows = [p for _ in cells for p in prompts]
    ivs = [build(m, parts, s) for m, s in cells for _ in prompts]
    return parts, cells, prompts, rows, ivs


def sieve_way(model, layer: int, rows, ivs, n: int, device: str, sampled: bool = False, fork: bool = False,
              summary: list | None = None, engine: dict | None = None) -> list[list[int]]:
    """All rows of the sweep in batched generation, rows mixing methods and scales, in batches of sieve's
    default size (32 on a CPU; on CUDA as many as fit, :func:`sieve.generation.default_batch_size`: what a
    user gets; until 2026-11-27 this side passed all rows as one batch on CUDA). Token healing is off:
    the study's way feeds the prompts' tokens as they are, and both must do the same work. Rows are seeded
    by prompt, as a sweep's are. ``fork``: :func:`sieve.fork.generate_forked` (its work summary appended
    to ``summary``)."""
    bs = None
    index = {p: i for i, p in enumerate(dict.fromkeys(rows))}
    kw = dict(layer_index=layer, max_new_tokens=n, batch_size=bs, progress=False,
              temperature=1.0 if sampled else 0.0, seeds=[index[p] for p in rows], token_healing=False) | (engine or {})
    if fork:
        outs, work = generate_forked(model, rows, ivs, **kw)
        if summary is not None:
            summary.append(work)
    else:
        outs = generate(model, rows, ivs, **kw)
    return [o.token_ids for o in outs]


def bench_sweep(model, layer: int, device: str, n: int, per_cell: int, repeats: int, sampled: bool = False,
                engines: tuple[str, ...] = (), gate_rate: float | None = None) -> dict:
    """The sweep the study's way, sieve's way and forked, interleaved; ``engines``: then sieve's way
    (unforked and forked) once more under each of these :data:`ENGINES` settings, each timed once.
    ``gate_rate``: the detectors' thresholds (:func:`parts_for`)."""
    parts, cells, prompts, rows, ivs = sweep_plan(model, layer, per_cell, gate_rate)
    sieve_t, study_t, fork_t = [], [], []
    got: dict[str, list] = {}  # each side's tokens from its last timed run
    work: list = []
    for _ in range(repeats):
        study_t.append(timed(lambda: got.__setitem__("a", study_way(model, layer, cells, parts, prompts, n, device,
                                                                     sampled)), device))
        sieve_t.append(timed(lambda: got.__setitem__("b", sieve_way(model, layer, rows, ivs, n, device, sampled)),
                             device))
        fork_t.append(timed(lambda: got.__setitem__("c", sieve_way(model, layer, rows, ivs, n, device, sampled,
                                                                    fork=True, summary=work)), device))
        progress(f"sweep{' sampled' if sampled else ''}: study way {study_t[-1]:.2f}s, sieve {sieve_t[-1]:.2f}s, "
                 f"forked {fork_t[-1]:.2f}s")
    a, b, c = got["a"], got["b"], got["c"]
    by_engine = {}
    for name in engines:
        e = ENGINES[name]
        u = timed(lambda e=e: got.__setitem__("e", sieve_way(model, layer, rows, ivs, n, device, sampled, engine=e)),
                  device)
        f = timed(lambda e=e: got.__setitem__("f", sieve_way(model, layer, rows, ivs, n, device, sampled, fork=True,
                                                              engine=e)), device)
        by_engine[name] = {"sieve_s": u, "fork_s": f, "same_tokens": sum(x == y for x, y in zip(b, got["e"])) / len(b)}
        progress(f"sweep{' sampled' if sampled else ''}, engine {name}: sieve {u:.2f}s, forked {f:.2f}s")
    same = sum(x[: len(y)] == y for x, y in zip(a, b)) / len(a)  # sieve cuts rows at EOS
    same_fork = sum(x == y for x, y in zip(b, c)) / len(b)
    kept = sum(len(y) for y in b)  # tokens of the completions (all n per row when greedy)
    med = {k: statistics.median(v) for k, v in (("study", study_t), ("sieve", sieve_t), ("fork", fork_t))}
    return {"sampled": sampled, "cells": len(cells), "rows": len(rows), "tokens": kept,
            "study_s": med["study"], "sieve_s": med["sieve"], "fork_s": med["fork"],
            "speedup": med["study"] / med["sieve"],
            "speedup_min": min(s / t for s, t in zip(study_t, sieve_t)),
            "speedup_max": max(s / t for s, t in zip(study_t, sieve_t)),
            "fork_speedup": med["sieve"] / med["fork"], "fork_vs_study": med["study"] / med["fork"],
            "sieve_tok_s": kept / med["sieve"],
            "study_tok_s": kept / med["study"], "same_tokens": same, "fork_same_tokens": same_fork,
            "fork_work": work[-1].as_dict(), "engines": by_engine}


def recipe_rows(prompts: int, cache: Path | None, recipe: Path | None = None):
    """A recipe's real workload (default ``recipes/regex.toml``): ``prompts`` prompts drawn at random
    (seed 0) from its prompt sets, each with all of its samples and all of the recipe's method × scale
    cells (the unsteered one included), as ``recipes.regex`` plans them and as its chunks hold them
    (whole prompts: the samples of a prompt share its prefill); the setting's detectors come from
    ``cache`` (trained there if absent)."""
    import random

    from sieve.recipe import load_recipe
    from sieve.setting import load_setting
    from sieve.sweep import plan

    r = load_recipe(recipe or ROOT / "recipes" / "regex.toml")
    setting = load_setting(r, progress=False, cache_dir=cache)
    by_prompt: dict = {}
    for row in plan(r, setting.prompts):
        by_prompt.setdefault((row.set, row.prompt_index), []).append(row)
    keys = list(by_prompt)
    random.Random(0).shuffle(keys)
    todo = [row for k in keys[:prompts] for row in sorted(by_prompt[k], key=lambda x: x.sample)]
    ivs = {c: c.intervention(setting.parts, r) for c in dict.fromkeys(row.cell for row in todo)}
    texts = [getattr(setting.prompts, row.set)[row.prompt_index].text for row in todo]
    kw = dict(max_new_tokens=r.sweep.max_new_tokens, temperature=r.sweep.temperature, top_p=r.sweep.top_p,
              stop=r.sweep.stop, progress=False)
    return setting.model, todo, texts, [ivs[row.cell] for row in todo], kw, r.sweep.batch_size or None


# The engine before and after: each saving can be switched off (the same completions either way).
# ``drop_ended=None`` and ``cascade=None`` are the defaults: rows leave their batch, and a shared
# prompt's keys are read once per step, on a CPU, not on a GPU (see ENGINES).
BEFORE = dict(share_prefill=False, kv_cache="hf", drop_ended=False, cascade=False)
AFTER = dict(share_prefill=True, kv_cache="grow", drop_ended=None, cascade=None)
# The engine's savings one at a time (``--engines``): which of them pays on this device. The cascade
# needs the shared prefill and the growing cache: "cascade" is those two with it.
ENGINES = {"none": BEFORE, "share": dict(BEFORE, share_prefill=True), "grow": dict(BEFORE, kv_cache="grow"),
           "drop": dict(BEFORE, drop_ended=True),
           "share+grow": dict(BEFORE, share_prefill=True, kv_cache="grow"),
           "cascade": dict(BEFORE, share_prefill=True, kv_cache="grow", cascade=True),
           "default": AFTER, "default-cascade": dict(AFTER, cascade=False),
           "default+drop": dict(AFTER, drop_ended=True), "default+cascade": dict(AFTER, cascade=True),
           "default@128": dict(AFTER, batch_size=128)}


def bench_recipe(prompts: int, repeats: int, cache: Path | None, recipe: Path | None = None,
                 engines: tuple[str, ...] = (), warmup: int | None = None) -> dict:
    """The recipe's rows five ways, interleaved: the study's loop structure (one ``generate`` per method
    × scale, batch 20, every row's prefill its own, HF's cache; here with sieve's own edit, since its
    hook cannot express latches or SAE-space edits); the sweep as it was (all rows batched, nothing
    shared: ``sweep.fork = false``, ``share_prefill = false``, ``kv_cache = "hf"``); forking alone; the
    engine alone (prefill shared, growing cache, rows leaving their batch when they end; no forking);
    and all of it (the default: forked rows also read their prefix from their trajectory). ``engines``:
    also the sweep unforked under these :data:`ENGINES` settings (each saving alone). ``warmup``: rounds
    of every side run first and not timed (default: 1 on a GPU, where most sides' first run paid 1.5-4.8x
    its later ones for allocation and kernel selection on an H200; 0 on a CPU)."""
    model, todo, prompts_, ivs, kw, bs = recipe_rows(prompts, cache, recipe)
    seeds = [row.seed for row in todo]
    hf = underlying(model)
    where = {"device": str(next(hf.parameters()).device), "dtype": str(hf.dtype),
             "attention": hf.config._attn_implementation}

    def loop():
        out = {}
        by_cell: dict = {}
        for i, row in enumerate(todo):
            by_cell.setdefault(row.cell, []).append(i)
        for idx in by_cell.values():
            outs = generate(model, [prompts_[i] for i in idx], [ivs[i] for i in idx], seeds=[seeds[i] for i in idx],
                            batch_size=20, **BEFORE, **kw)
            out.update(zip(idx, outs))
        return [out[i] for i in range(len(todo))]

    def full():
        return generate(model, prompts_, ivs, seeds=seeds, batch_size=bs, **BEFORE, **kw)

    def engine(engine_kw=AFTER):
        def run():
            return generate(model, prompts_, ivs, seeds=seeds, **({"batch_size": bs} | engine_kw), **kw)
        return run

    work: dict[str, Any] = {}

    def forked(engine_kw):
        def run():
            outs, w = generate_forked(model, prompts_, ivs, seeds=seeds, batch_size=bs, **engine_kw, **kw)
            work["forked" if engine_kw is BEFORE else "all"] = w
            return outs
        return run

    sides = [("loop", loop), ("full", full), ("forked", forked(BEFORE)), ("engine", engine()), ("all", forked(AFTER))]
    sides += [(f"engine:{name}", engine(e)) for name, e in ENGINES.items() if name in engines]
    t: dict[str, list[float]] = {name: [] for name, _ in sides}
    last: dict[str, list] = {}
    if warmup is None:
        warmup = int(where["device"].startswith("cuda"))
    for i in range(warmup + repeats):
        for name, fn in sides:
            t0 = time.perf_counter()
            last[name] = fn()
            took = time.perf_counter() - t0
            if i >= warmup:
                t[name].append(took)
            progress(f"recipe rows, {name}: {took:.2f}s" + (" (warm-up, not counted)" if i < warmup else ""))
    w = work["all"]

    # Rows that differ from the sweep as it was, by how the default run made them (read off its
    # counts: an edit in the prompt or an always gate, generated in full; an edit in generation,
    # forked; none, the unsteered row reused): differences can only be float noise.
    def differ(other: list) -> dict[str, int]:
        out: dict[str, int] = {}
        for iv, a, b in zip(ivs, last["full"], other):
            if a.token_ids != b.token_ids or a.counts != b.counts or a.positions != b.positions:
                kind = ("unsteered" if iv is None else "full" if b.counts.get("prompt_edited") or iv.gate == "always"
                        else "forked" if b.counts.get("gen_edited") else "reused")
                out[kind] = out.get(kind, 0) + 1
        return out

    med = {k: statistics.median(v) for k, v in t.items()}
    return {**where, "prompts": prompts, "rows": len(todo), "tokens": sum(len(o.token_ids) for o in last["full"]),
            "warmup": warmup,
            "seconds": med, "runs": t,
            "all_vs_full": med["full"] / med["all"], "all_vs_loop": med["loop"] / med["all"],
            "all_vs_full_range": [min(f / g for f, g in zip(t["full"], t["all"])),
                                  max(f / g for f, g in zip(t["full"], t["all"]))],
            "forked_vs_full": med["full"] / med["forked"], "engine_vs_full": med["full"] / med["engine"],
            "full_vs_loop": med["loop"] / med["full"],
            "differ_from_full": {k: differ(last[k]) for k in last if k != "full"},
            "work": w.as_dict()}


class _RssPeak:
    """The peak resident set size while the block runs, polled every millisecond from /proc (the
    process's lifetime maximum, ``ru_maxrss``, is usually set by loading, not by generation)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def peak_memory_probe(config: str, device: str, which: str, n: int, per_cell: int,
                      gate_rate: float | None = None) -> float:
    """Run one side of the sweep once in this (fresh) process; MiB of peak memory above the loaded and
    warmed-up model. CUDA: ``max_memory_allocated``; CPU: peak resident set growth."""
    model, layer = build_model(config, device)
    parts, cells, prompts, rows, ivs = sweep_plan(model, layer, per_cell, gate_rate)
    # Warm both paths up on one row and one token first: one-time costs (lazy imports, nnsight's first
    # trace, thread pools) are not what a sweep needs.
    study_way(model, layer, cells[:1], parts, prompts[:1], 1, device)
    sieve_way(model, layer, rows[:1], ivs[:1], 1, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with _RssPeak() as rss:
        if which == "study":
            study_way(model, layer, cells, parts, prompts, n, device)
        else:
            sieve_way(model, layer, rows, ivs, n, device)
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (rss.peak - rss.base) / 2**20


def peak_memory(args, which: str) -> float:
    """:func:`peak_memory_probe` in a child process, so that each side starts from the same memory."""
    cmd = [sys.executable, __file__, "--config", args.config, "--device", args.device, "--tokens", str(args.tokens),
           "--per-cell", str(args.per_cell), "--probe", which]
    if args.gate_rate is not None:
        cmd += ["--gate-rate", str(args.gate_rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def _commit() -> str | None:
    """The checkout's commit, ``-dirty`` where its files differ from it (None outside git)."""
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="world", choices=["world", "mid", "gemma2-2b-width", "gemma2-2b"])
    ap.add_argument("--sae-cost", nargs="+", default=None, metavar="CONFIG",
                    choices=["world", "mid", "gemma2-2b-width", "gemma2-2b"],
                    help="only the SAE-space edit's cost (sparse and full encode vs plain generate) on these configs, "
                         "side by side in one run")
    ap.add_argument("--latents", type=int, default=16384, help="SAE width for --sae-cost")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--per-cell", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--recipe-prompts", type=int, default=None, metavar="N",
                    help="only the default recipe's real workload: N prompts with all their samples and cells; the "
                         "study's loop, the sweep as it was, forking alone, the engine alone, and both")
    ap.add_argument("--cache", default=None, help="with --recipe-prompts: detector cache folder (trained there if absent)")
    ap.add_argument("--recipe", default=None, help="with --recipe-prompts: the recipe file (default recipes/regex.toml)")
    ap.add_argument("--engines", nargs="*", default=[], choices=list(ENGINES),
                    help="also time sieve's sweep under these engine settings (each saving alone; greedy sweep, and "
                         "the recipe's rows with --recipe-prompts)")
    ap.add_argument("--warmup", type=int, default=None, metavar="N",
                    help="with --recipe-prompts: untimed rounds of every side first (default 1 on a GPU, 0 on a CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (two fresh processes)")
    ap.add_argument("--gate-rate", type=float, default=None, metavar="P",
                    help="the sweep's detectors fire on this share of held-out neutral tokens (default: threshold "
                         "0.5, about half of all tokens)")
    ap.add_argument("--probe", choices=["study", "sieve"], help=argparse.SUPPRESS)  # one memory probe (internal)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.probe:
        print(json.dumps({"peak_mb": peak_memory_probe(args.config, args.device, args.probe, args.tokens,
                                                       args.per_cell, args.gate_rate)}))
        return
    if args.recipe_prompts:
        res = bench_recipe(args.recipe_prompts, args.repeats, Path(args.cache) if args.cache else None,
                           Path(args.recipe) if args.recipe else None, tuple(args.engines), args.warmup)
        res |= {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "commit": _commit()}
        sec = res["seconds"]
        print(f"# {args.recipe or 'recipes/regex.toml'} workload: {res['prompts']} prompts, {res['rows']} rows, "
              f"{res['tokens']} tokens, {args.repeats} interleaved repeats (medians) after {res['warmup']} untimed, "
              f"{res['threads']} torch threads")
        print(f"study's loop (one generate per cell, batch 20): {sec['loop']:.1f}s; the sweep as it was (all rows "
              f"batched, nothing shared): {sec['full']:.1f}s ({res['full_vs_loop']:.2f}x the loop)")
        print(f"forking alone: {sec['forked']:.1f}s ({res['forked_vs_full']:.2f}x); the engine (shared prefill, growing "
              f"cache, rows leaving where the device's default says: on a CPU) alone: {sec['engine']:.1f}s "
              f"({res['engine_vs_full']:.2f}x); both (the default): "
              f"{sec['all']:.1f}s -> "
              f"{res['all_vs_full']:.2f}x the sweep as it was (range {res['all_vs_full_range'][0]:.2f}-"
              f"{res['all_vs_full_range'][1]:.2f}), {res['all_vs_loop']:.2f}x the study's loop")
        w = res["work"]
        print(f"forked work: {w['unsteered']} unsteered, {w['reused']} reused, {w['forked']} forked, {w['full_prompt']} "
              f"edit in the prompt, {w['full_always']} always-gated; {100 * w['saved']:.1f}% of tokens not generated")
        for name in args.engines:
            print(f"the sweep, engine {name} ({ENGINES[name]}): {sec['engine:' + name]:.1f}s "
                  f"({sec['full'] / sec['engine:' + name]:.2f}x the sweep as it was)")
        print(f"rows differing from the sweep as it was: {res['differ_from_full']}")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return
    if args.sae_cost:
        rows = []
        for config in args.sae_cost:
            model, layer = build_model(config, args.device)
            rows.append({"config": config, **bench_sae_cost(model, layer, args.device, args.batch, args.tokens,
                                                            args.repeats, args.latents)})
            del model
        print(f"# SAE-space clamp on {args.device}, {args.latents}-latent JumpReLU SAE, batch {args.batch}, "
              f"{args.tokens} new tokens, {args.repeats} interleaved repeats")
        print("| config | d | plain generate | sparse encode | full encode | sparse ratio (range) | full ratio (range) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | {r['d']} | {r['plain_s']:.3f} s | {r['sparse_s']:.3f} s | {r['full_s']:.3f} s | "
                  f"{r['sparse_ratio']:.2f}x ({r['sparse_range'][0]:.2f}-{r['sparse_range'][1]:.2f}) | "
                  f"{r['full_ratio']:.2f}x ({r['full_range'][0]:.2f}-{r['full_range'][1]:.2f}) |")
        if args.out:
            Path(args.out).write_text(json.dumps({"sae_cost": rows, "device": args.device, "torch": torch.__version__},
                                                 indent=1))
        return
    model, layer = build_model(args.config, args.device)
    overhead = bench_overhead(model, layer, args.device, args.batch, args.tokens, args.repeats)
    sweep = bench_sweep(model, layer, args.device, args.tokens, args.per_cell, max(1, args.repeats // 2),
                        engines=tuple(args.engines), gate_rate=args.gate_rate)
    sweep_sampled = bench_sweep(model, layer, args.device, args.tokens, args.per_cell, max(1, args.repeats // 2),
                                sampled=True, gate_rate=args.gate_rate)
    if not args.no_memory:
        sweep["study_peak_mb"] = round(peak_memory(args, "study"), 1)
        sweep["sieve_peak_mb"] = round(peak_memory(args, "sieve"), 1)
    result = {"config": args.config, "device": args.device, "torch": torch.__version__, "commit": _commit(),
              "dtype": str(underlying(model).dtype), "attention": underlying(model).config._attn_implementation,
              "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}",
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "batch": args.batch, "tokens": args.tokens, "gate_rate": args.gate_rate, "overhead": overhead, "sweep": sweep,
              "sweep_sampled": sweep_sampled}
    gates = "threshold 0.5" if args.gate_rate is None else f"gates firing on {100 * args.gate_rate:g}% of held-out tokens"
    print(f"# {args.config} on {args.device} ({result['machine']}), batch {args.batch}, {args.tokens} new tokens; "
          f"the sweep's detectors: {gates}")
    print("| edit | plain generate (s) | sieve, HF's cache (s) | ratio (range) | sieve, growing cache (s) | ratio (range) |")
    print("|---|---|---|---|---|---|")
    for r in overhead:
        print(f"| {r['kind']} | {r['plain_s']:.3f} | {r['sieve_s']:.3f} | {r['ratio']:.2f}x "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['grow_s']:.3f} | {r['grow_ratio']:.2f}x "
              f"({r['grow_ratio_min']:.2f}-{r['grow_ratio_max']:.2f}) |")
    for s in (sweep, sweep_sampled):
        kind = "sampled (T=1, rows end at EOS)" if s["sampled"] else "greedy"
        print(f"\nsweep, {kind}: {s['cells']} method×scale cells, {s['rows']} rows, {s['tokens']} tokens: study way "
              f"{s['study_s']:.1f}s ({s['study_tok_s']:.0f} tok/s), sieve {s['sieve_s']:.1f}s "
              f"({s['sieve_tok_s']:.0f} tok/s) -> {s['speedup']:.1f}x faster (range {s['speedup_min']:.1f}-"
              f"{s['speedup_max']:.1f}); identical tokens in {100 * s['same_tokens']:.0f}% of rows")
        print(f"  forked: {s['fork_s']:.1f}s -> {s['fork_speedup']:.2f}x sieve unforked, {s['fork_vs_study']:.1f}x the "
              f"study way; same tokens as unforked in {100 * s['fork_same_tokens']:.0f}% of rows; "
              f"{100 * s['fork_work']['saved']:.0f}% of tokens not generated")
    for name, e in sweep["engines"].items():
        print(f"sweep, greedy, engine {name} ({ENGINES[name]}): sieve {e['sieve_s']:.2f}s "
              f"({sweep['study_s'] / e['sieve_s']:.1f}x the study way), forked {e['fork_s']:.2f}s "
              f"({sweep['study_s'] / e['fork_s']:.1f}x); same tokens as the default in {100 * e['same_tokens']:.0f}% of rows")
    if "study_peak_mb" in sweep:
        print(f"peak memory above the model (greedy sweep): study way +{sweep['study_peak_mb']} MiB, "
              f"sieve +{sweep['sieve_peak_mb']} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
