"""Where a default run's time goes, on one chunk of its rows. One command, shares from one run.

    python bench/profile_chunk.py [--recipe recipes/regex.toml] [--cache runs/cache] [--groups 64]
                                  [--batch-sizes 64,128,256] [--plain-profile] [--exactness] [--cascade N]

1. **The chunk**: the first ``--groups`` (prompt, sample) groups of the recipe's plan, every cell, as
   ``recipes.regex`` makes a chunk with ``sweep.fork`` (64 groups: 4 prompts × 16 samples × the cells).
   It is generated as the run generates it (forked, prefill shared, growing cache, rows leaving their
   batch when they end), with every generation batch timed: the share of the chunk spent in batches
   (the rest: the replays of gated rows over the trajectories, and deciding them), and of the
   row-forwards the batches computed (forwards times the rows each held), the share that kept no token
   (rows that had ended, and each row's EOS-predicting forward). Then the same chunk with every row
   kept until its batch's last row ends (``drop_ended=False``): its time and that share.
2. **Evaluation**: parsing and evaluating the chunk's completions (``recipes.regex.evaluate_row``) and
   the token ends the report needs, in seconds per 1,000 rows.
3. ``--batch-sizes``: the chunk at each batch size, in turn (does a larger batch pay on this device?).
4. ``--plain-profile``: plain HF ``generate`` (batch 64, the recipe's longest prompts, its token budget,
   HF's own cache) under the torch profiler: the share of ``aten::cat`` (HF's dynamic cache copying
   itself each step), and the share of one prefill forward in the whole generation.
5. ``--exactness``: the chunk generated with its prefill shared and with every row's own (growing
   cache both): the rows that differ; and, on its distinct prompts, how far the last prompt
   position's logits move when it is read over the cache of the others instead of in one prefill.
6. ``--cascade N``: the chunk with cascade attention (the default on a CPU) and without it, ``N``
   interleaved runs each: the times, the rows that differ (float noise: the attention summed in two
   parts), and under the torch profiler the share of each run's CPU time in attention kernels and in
   the matmuls (``addmm``: the layers' projections and MLPs; ``mm``: the LM head).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chunk(recipe_path: Path, cache: Path | None, groups: int):
    from sieve.recipe import load_recipe
    from sieve.setting import load_setting
    from sieve.sweep import plan

    r = load_recipe(recipe_path)
    setting = load_setting(r, progress=False, cache_dir=cache)
    by_group: dict = {}
    for row in plan(r, setting.prompts):
        by_group.setdefault((row.set, row.prompt_index, row.sample), []).append(row)
    todo = [row for g in list(by_group.values())[:groups] for row in g]
    ivs = {c: c.intervention(setting.parts, r) for c in dict.fromkeys(row.cell for row in todo)}
    prompts = [getattr(setting.prompts, row.set)[row.prompt_index] for row in todo]
    kw = dict(max_new_tokens=r.sweep.max_new_tokens, temperature=r.sweep.temperature, top_p=r.sweep.top_p,
              stop=r.sweep.stop, seeds=[row.seed for row in todo], progress=False)
    return r, setting, todo, prompts, [ivs[row.cell] for row in todo], kw


def timed_batches(model, texts, ivs, kw, batch_size, **engine):
    """The chunk generated as the run does (``engine``: generate_forked's engine switches), each
    generation batch timed: (completions, summary, seconds, per batch (rows, the longest row's new
    tokens, new tokens kept, seconds, row-forwards: the forwards times the rows each held))."""
    import sieve.generation as g
    from sieve.fork import generate_forked

    batches = []
    real = g._generate_batch
    real_tracker = g.RowTracker.__call__
    held = [0]

    def count(self, input_ids, scores, **k):  # one call per forward, with the rows it held
        held[0] += input_ids.shape[0]
        return real_tracker(self, input_ids, scores, **k)

    def spy(model, prompts, rows, token_ids, **k):
        t0 = time.perf_counter()
        held[0] = 0
        outs = real(model, prompts, rows, token_ids, **k)
        cont = k.get("continued") or [0] * len(rows)
        kept = [len(o.token_ids) - c for o, c in zip(outs, cont)]
        batches.append((len(rows), max(kept), sum(kept), time.perf_counter() - t0, held[0]))
        return outs

    g._generate_batch = spy
    g.RowTracker.__call__ = count
    try:
        t0 = time.perf_counter()
        outs, work = generate_forked(model, texts, ivs, batch_size=batch_size, **kw, **engine)
        return outs, work, time.perf_counter() - t0, batches
    finally:
        g._generate_batch = real
        g.RowTracker.__call__ = real_tracker


_ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


def op_shares(model, texts, ivs, kw, batch_size, **engine) -> dict:
    """One run of the chunk under the torch profiler: the shares of its self CPU time in attention
    kernels, ``addmm`` and ``mm``."""
    with torch.profiler.profile() as prof:
        timed_batches(model, texts, ivs, kw, batch_size, **engine)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1

    def share(*keys: str) -> float:
        return sum(e.self_cpu_time_total for e in ev if e.key in keys) / total

    return {"attention": share(*_ATTENTION_OPS), "addmm": share("aten::addmm"), "mm": share("aten::mm")}


def plain_profile(model, texts: list[str], n: int) -> dict:
    from sieve.models import pad_id, pad_left, tokenize_prompts, underlying

    hf = underlying(model)
    longest = sorted(set(texts), key=len)[-4:]
    enc = pad_left(tokenize_prompts(model.tokenizer, [t for t in longest for _ in range(16)]), pad_id(model.tokenizer))

    def run():
        with torch.inference_mode():
            hf.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id(model.tokenizer))

    def prefill():
        with torch.inference_mode():
            hf(**enc)

    run()  # warm-up
    t0 = time.perf_counter()
    prefill()
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    t_run = time.perf_counter() - t0
    with torch.profiler.profile() as prof:
        run()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    cat = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::cat")
    return {"batch": int(enc["input_ids"].shape[0]), "width": int(enc["input_ids"].shape[1]), "new_tokens": n,
            "generate_s": t_run, "prefill_s": t_prefill, "prefill_share": t_prefill / t_run,
            "cat_share": cat / total if total else 0.0}


def split_logit_gap(model, texts: list[str]) -> float:
    """The largest absolute difference, over the distinct prompts, between the last prompt position's
    logits read in one prefill and read over a KV cache of the positions before it (the shared prefill)."""
    from transformers import DynamicCache

    from sieve.models import tokenize_prompts, underlying

    hf = underlying(model)
    gap = 0.0
    with torch.inference_mode():
        for ids in tokenize_prompts(model.tokenizer, sorted(set(texts))):
            x = torch.tensor([ids])
            if x.shape[1] < 2:
                continue
            whole = hf(input_ids=x).logits[0, -1]
            cache = DynamicCache(config=hf.config)
            hf(input_ids=x[:, :-1], past_key_values=cache, use_cache=True)
            last = hf(input_ids=x[:, -1:], past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[x.shape[1] - 1]])).logits[0, -1]
            gap = max(gap, float((whole - last).abs().max()))
    return gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "regex.toml"))
    ap.add_argument("--cache", default=None, help="detector cache folder (trained there if absent)")
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--batch-sizes", default="", help="comma-separated batch sizes to time the chunk at")
    ap.add_argument("--plain-profile", action="store_true")
    ap.add_argument("--exactness", action="store_true")
    ap.add_argument("--cascade", type=int, default=0, metavar="N",
                    help="time the chunk with and without cascade attention, N interleaved runs each")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    from recipes.regex import evaluate_row
    from sieve.report import token_ends

    r, setting, todo, prompts, ivs, kw = chunk(Path(args.recipe), Path(args.cache) if args.cache else None,
                                               args.groups)
    model, bs = setting.model, r.sweep.batch_size or None
    texts = [p.text for p in prompts]
    timed_batches(model, texts[: len(texts) // 8], ivs[: len(texts) // 8], {**kw, "seeds": kw["seeds"][: len(texts) // 8]},
                  bs)  # warm-up
    outs, work, total, batches = timed_batches(model, texts, ivs, kw, bs)
    in_batches = sum(b[3] for b in batches)
    steps = sum(b[4] for b in batches)
    kept = sum(b[2] for b in batches)
    # the same chunk with every row kept in its batch until the batch's last row ends
    _, _, total_kept, batches_kept = timed_batches(model, texts, ivs, kw, bs, drop_ended=False)
    steps_kept = sum(b[4] for b in batches_kept)
    t0 = time.perf_counter()
    ends = token_ends(model.tokenizer, [o.token_ids for o in outs], [o.healed + o.text for o in outs])
    for p, o in zip(prompts, outs):
        evaluate_row(r, p, o)
    t_eval = time.perf_counter() - t0
    res = {"recipe": args.recipe, "rows": len(todo), "groups": args.groups, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "chunk_s": total, "in_batches_s": in_batches,
           "batch_share": in_batches / total, "ended_row_steps_share": 1 - kept / steps, "batches": batches,
           "rows_kept_in_batch": {"chunk_s": total_kept,
                                  "ended_row_steps_share": 1 - sum(b[2] for b in batches_kept) / steps_kept,
                                  "row_forwards": steps_kept},
           "row_forwards": steps,
           "evaluate_s_per_1000_rows": 1000 * t_eval / len(outs), "token_ends_rows": len(ends), "work": work.as_dict()}
    print(f"# {args.recipe}: {len(todo)} rows ({args.groups} groups), {torch.get_num_threads()} torch threads")
    print(f"chunk {total:.2f}s: {100 * res['batch_share']:.0f}% in {len(batches)} generation batches, the rest replaying "
          f"and deciding gated rows; {100 * res['ended_row_steps_share']:.1f}% of the batches' row-forwards were for rows "
          f"that had ended; evaluating: {res['evaluate_s_per_1000_rows']:.2f}s per 1,000 rows")
    k = res["rows_kept_in_batch"]
    print(f"with every row kept until its batch ends (drop_ended=False): chunk {k['chunk_s']:.2f}s, "
          f"{100 * k['ended_row_steps_share']:.1f}% of {k['row_forwards']} row-forwards for rows that had ended "
          f"(with rows leaving: {steps})")
    if args.batch_sizes:
        res["batch_sizes"] = {}
        for size in [int(x) for x in args.batch_sizes.split(",")]:
            t = timed_batches(model, texts, ivs, kw, size)[2]
            res["batch_sizes"][size] = t
            print(f"batch size {size}: {t:.2f}s")
    if args.plain_profile:
        res["plain"] = p = plain_profile(model, texts, r.sweep.max_new_tokens)
        print(f"plain HF generate, batch {p['batch']} x {p['width']} prompt tokens, {p['new_tokens']} new tokens: "
              f"{p['generate_s']:.2f}s; one prefill forward {p['prefill_s']:.2f}s ({100 * p['prefill_share']:.0f}%); "
              f"aten::cat {100 * p['cat_share']:.0f}% of the profiled CPU time")
    if args.cascade:
        import statistics

        runs: dict[bool, list[float]] = {True: [], False: []}
        toks: dict[bool, list] = {}
        for _ in range(args.cascade):
            for c in (False, True):
                o, _, t, _ = timed_batches(model, texts, ivs, kw, bs, cascade=c)
                runs[c].append(t)
                toks[c] = [(x.token_ids, x.counts) for x in o]
        on, off = statistics.median(runs[True]), statistics.median(runs[False])
        res["cascade"] = {"on_s": runs[True], "off_s": runs[False], "speedup": off / on,
                          "differ": sum(a != b for a, b in zip(toks[True], toks[False])),
                          "ops_on": op_shares(model, texts, ivs, kw, bs, cascade=True),
                          "ops_off": op_shares(model, texts, ivs, kw, bs, cascade=False)}
        c = res["cascade"]
        print(f"cascade attention: chunk {on:.2f}s with, {off:.2f}s without ({c['speedup']:.2f}x, medians of "
              f"{args.cascade}); {c['differ']} of {len(texts)} rows differ; attention kernels "
              f"{100 * c['ops_off']['attention']:.0f}% of the profiled CPU time without, "
              f"{100 * c['ops_on']['attention']:.0f}% with (addmm {100 * c['ops_off']['addmm']:.0f}%/"
              f"{100 * c['ops_on']['addmm']:.0f}%, mm {100 * c['ops_off']['mm']:.0f}%/{100 * c['ops_on']['mm']:.0f}%)")
    if args.exactness:
        from sieve.generation import generate

        own = generate(model, texts, ivs, batch_size=bs, share_prefill=False, **kw)
        shared = generate(model, texts, ivs, batch_size=bs, **kw)
        differ = sum(a.token_ids != b.token_ids or a.counts != b.counts for a, b in zip(own, shared))
        res["exactness"] = {"rows": len(own), "differ": differ, "last_logit_gap": split_logit_gap(model, texts)}
        print(f"prefill shared vs every row's own: {differ} of {len(own)} rows differ; the last prompt position's "
              f"logits move by at most {res['exactness']['last_logit_gap']:.1e} read over the cache")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
