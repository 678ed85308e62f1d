"""What steering costs, and how much faster a batched sweep is. One command, ratios from one run.

    python bench/bench_steering.py [--config world|mid|gemma2-2b] [--device cpu|cuda] [--repeats 5]

1. **Overhead**: sieve's steered generation (nnsight trace, one vectorised edit per step) against plain
   HF ``generate`` on the same batch and token count, for each gate/edit kind. Runs are interleaved
   (plain, sieve, plain, sieve, ...) and the ratio of medians is reported with the spread of the
   per-pair ratios.
2. **Sweep**: the same methods × scales × prompts done two ways: sieve's (all rows in batched
   generation, rows mixing methods and scales) and the study's (one ``generate`` per method × scale,
   batch 20, a forward hook on the layer). Greedy, so both must give the same tokens; the script checks.
3. Tokens per second and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS growth).

Configs: ``world`` (the embedded model), ``mid`` (a random 8-layer d=512 Llama), ``gemma2-2b``
(gemma-2-2b's published config with random weights; for a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sieve.generation import generate  # noqa: E402
from sieve.interventions import Detector, Edit, Intervention, eligible_mask  # noqa: E402
from sieve.methods import STUDY_METHODS, Parts, build  # noqa: E402
from sieve.models import encode_prompts, load_model, underlying  # noqa: E402

PROMPTS = [
    "import re\n\ndef parse_header(line):\n    m =",
    "def mean(xs):\n    total =",
    "class Point:\n    def __init__(self, x, y):\n       ",
    "import os\n\ndef walk(root):\n    for",
]


def build_model(config: str, device: str):
    if config == "world":
        from sieve.world import world_model_dir

        return load_model(world_model_dir(), device=device), 2
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from sieve.world import world_model_dir

    tok = AutoTokenizer.from_pretrained(world_model_dir())
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if config == "mid":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=4, **common))
        layer = 4
    elif config == "gemma2-2b":  # gemma-2-2b's published sizes, random weights
        m = Gemma2ForCausalLM(Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                           num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                           sliding_window=4096, **common))
        layer = 8
    else:
        raise SystemExit(f"unknown config {config!r}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = m.to(device=device, dtype=dtype).eval()
    return load_model(m, tokenizer=tok, device=device), layer


def parts_for(model, layer: int) -> Parts:
    d = underlying(model).config.hidden_size
    g = torch.Generator().manual_seed(0)
    p = Parts()
    for name in ("sae", "caa", "probe"):
        w = torch.randn(d, generator=g)
        p.add_detector(name, Detector(w / w.norm(), 0.0, kind=name), 0.5)
        p.add_direction(name, torch.randn(d, generator=g))
    return p


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def plain_generate(model, enc, n: int):
    with torch.inference_mode():
        return underlying(model).generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=model.tokenizer.pad_token_id)


def bench_overhead(model, layer: int, device: str, batch: int, n: int, repeats: int) -> list[dict]:
    prompts = (PROMPTS * batch)[:batch]
    enc = {k: v.to(device) for k, v in encode_prompts(model.tokenizer, prompts).items()}
    d = underlying(model).config.hidden_size
    u = torch.randn(d)
    det = Detector(torch.randn(d), 0.0)
    kinds = {
        "always/add": Intervention("always", Edit("add", u, -4.0)),
        "token/add": Intervention("token", Edit("add", u, -4.0), det, 0.0),
        "input/add": Intervention("input", Edit("add", u, -4.0), det, 0.0),
        "token/clamp": Intervention("token", Edit("clamp", u, -1.0), det, 0.0),
    }
    rows = []
    plain_generate(model, enc, 2)  # warm-up
    generate(model, prompts, None, layer_index=layer, max_new_tokens=2, progress=False)
    for name, iv in kinds.items():
        plain_t, sieve_t = [], []
        for _ in range(repeats):
            plain_t.append(timed(lambda: plain_generate(model, enc, n), device))
            sieve_t.append(timed(lambda iv=iv: generate(model, prompts, iv, layer_index=layer, max_new_tokens=n,
                                                  batch_size=batch, progress=False), device))
        ratios = [s / p for s, p in zip(sieve_t, plain_t)]
        rows.append({"kind": name, "plain_s": statistics.median(plain_t), "sieve_s": statistics.median(sieve_t),
                     "ratio": statistics.median(sieve_t) / statistics.median(plain_t),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "sieve_tok_s": batch * n / statistics.median(sieve_t)})
    return rows


def study_way(model, layer: int, cells, parts, prompts, n: int, device: str) -> list[list[int]]:
    """One generate per method × scale, batch 20, a forward hook on the layer (the study's structure)."""
    hf = underlying(model)
    layers = hf.model.layers if hasattr(hf, "model") and hasattr(hf.model, "layers") else hf.transformer.h
    tok = model.tokenizer
    outs = []
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
                    ids = hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
                outs += ids[:, enc["input_ids"].shape[1]:].tolist()
        finally:
            handle.remove()
    return outs


def bench_sweep(model, layer: int, device: str, n: int, per_cell: int, repeats: int) -> dict:
    parts = parts_for(model, layer)
    methods = [m.name for m in STUDY_METHODS if m.edit == "add" and m.gate != "input"]
    cells = [(m, s) for m in methods for s in (-2.0, -4.0, -8.0)]
    prompts = (PROMPTS * per_cell)[:per_cell]
    rows = [p for _ in cells for p in prompts]
    ivs = [build(m, parts, s) for m, s in cells for _ in prompts]
    sieve_t, study_t = [], []
    for _ in range(repeats):
        study_t.append(timed(lambda: study_way(model, layer, cells, parts, prompts, n, device), device))
        sieve_t.append(timed(lambda: generate(model, rows, ivs, layer_index=layer, max_new_tokens=n,
                                              batch_size=len(rows) if device == "cuda" else 64,
                                              progress=False), device))
    a = study_way(model, layer, cells, parts, prompts, n, device)
    b = [o.token_ids for o in generate(model, rows, ivs, layer_index=layer, max_new_tokens=n, progress=False,
                                       batch_size=len(rows) if device == "cuda" else 64)]
    same = sum(x[: len(y)] == y for x, y in zip(a, b)) / len(a)  # sieve cuts rows at EOS
    return {"cells": len(cells), "rows": len(rows), "tokens": len(rows) * n,
            "study_s": statistics.median(study_t), "sieve_s": statistics.median(sieve_t),
            "speedup": statistics.median(study_t) / statistics.median(sieve_t),
            "speedup_min": min(s / t for s, t in zip(study_t, sieve_t)),
            "speedup_max": max(s / t for s, t in zip(study_t, sieve_t)),
            "sieve_tok_s": len(rows) * n / statistics.median(sieve_t),
            "study_tok_s": len(rows) * n / statistics.median(study_t), "same_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="world", choices=["world", "mid", "gemma2-2b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--per-cell", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, layer = build_model(args.config, args.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    overhead = bench_overhead(model, layer, args.device, args.batch, args.tokens, args.repeats)
    sweep = bench_sweep(model, layer, args.device, args.tokens, args.per_cell, max(1, args.repeats // 2))
    mem = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
           else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    result = {"config": args.config, "device": args.device, "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}",
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "batch": args.batch, "tokens": args.tokens, "overhead": overhead, "sweep": sweep,
              "peak_memory_mb": round(mem, 1)}
    print(f"# {args.config} on {args.device} ({result['machine']}), batch {args.batch}, {args.tokens} new tokens")
    print("| edit | plain generate (s) | sieve (s) | ratio (median) | ratio range |")
    print("|---|---|---|---|---|")
    for r in overhead:
        print(f"| {r['kind']} | {r['plain_s']:.3f} | {r['sieve_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    s = sweep
    print(f"\nsweep: {s['cells']} method×scale cells, {s['rows']} rows, {s['tokens']} tokens: study way "
          f"{s['study_s']:.1f}s ({s['study_tok_s']:.0f} tok/s), sieve {s['sieve_s']:.1f}s ({s['sieve_tok_s']:.0f} tok/s)"
          f" -> {s['speedup']:.1f}x faster (range {s['speedup_min']:.1f}-{s['speedup_max']:.1f}); "
          f"identical tokens in {100 * s['same_tokens']:.0f}% of rows; peak memory +{result['peak_memory_mb']} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
