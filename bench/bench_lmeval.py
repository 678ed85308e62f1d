"""lm-evaluation-harness tasks under every cell of a recipe: each cell in full, against forked.

    python bench/bench_lmeval.py [--repeats 2] [--docs 200] [--out lmeval.json]

The default recipe's method × scale cells (``recipes/regex.toml``, the unsteered one included) run
three harness tasks over the embedded world's own texts, written as local task YAMLs (nothing is
downloaded):

- ``world_next_line``: multiple choice, the next line of a held-out regex-free code file (the
  recipe's ``code`` prompts, cut at a line) against three lines from other files: log-likelihoods of
  multi-token continuations, four model rows per document (the harness's ability check, as MMLU is);
- ``world_mmlu``: the recipe's MMLU fixture in MMLU's own prompt format (one-token answers: one row
  per question, the harness's ``logits_cache``);
- ``world_regex_gen``: greedy generation (``generate_until``, up to 32 tokens, stopping at a blank
  line) from the recipe's regex-prone function starts, where the regex gates do open.

Two ways, interleaved, ``--repeats`` times each: every cell in full (``run_harness_cells(...,
fork=False)``: one harness run per cell, as ``eval.general = "lmeval"`` did) and forked (one
unsteered run records and replays every cell; each cell's run computes only the requests its gate
edits). Reported: the time of each way (medians, per-pair ratios), the requests reused per task kind,
and whether both ways give every cell the same per-document values and gate counts (responses to
float noise: a request run again sits in another batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["world_next_line", "world_mmlu", "world_regex_gen"]
METRICS = {"world_next_line": "acc", "world_mmlu": "acc", "world_regex_gen": "exact_match"}

# Every task reads a local JSON file ({data}: an absolute path, as the harness resolves it).
HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: {kind}
"""

MC = HEAD.format(name="world_next_line", kind="multiple_choice") + """doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

MMLU = HEAD.format(name="world_mmlu", kind="multiple_choice") + """\
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\n\\
  C. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN = HEAD.format(name="world_regex_gen", kind="generate_until") + """doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 32
  do_sample: false
metric_list:
  - metric: exact_match
"""


def next_line_docs(texts: list[str], n: int) -> list[dict]:
    """Multiple-choice documents from code files: the file up to a line in its middle, the true next
    line and the lines at the same place of the next three usable files (deterministic)."""
    usable = []
    for t in texts:
        lines = [ln for ln in t.splitlines() if ln.strip()]
        if len(lines) >= 3:
            k = len(lines) // 2
            usable.append(("\n".join(lines[:k]) + "\n", lines[k]))
    docs = []
    for i, (ctx, line) in enumerate(usable[:n]):
        others = []
        j = i + 1
        while len(others) < 3 and j < i + len(usable):
            cand = usable[j % len(usable)][1]
            if cand != line and cand not in others:
                others.append(cand)
            j += 1
        docs.append({"context": ctx, "choices": [line, *others], "label": 0})
    return docs


def write_tasks(folder: Path, setting, n: int) -> dict[str, int]:
    """The three task YAMLs and their JSON data in ``folder``; the documents per task."""
    next_docs = next_line_docs(list(setting.prompts.code), n)
    mmlu = json.loads((ROOT / "recipes" / "data" / "mmlu_fixture.json").read_text())
    gen = [{"prompt": p.text, "reference": getattr(p, "reference", "") or ""} for p in setting.prompts.regex]
    for name, docs, yaml in (("world_next_line", next_docs, MC), ("world_mmlu", mmlu, MMLU),
                             ("world_regex_gen", gen, GEN)):
        data = folder / f"{name}.json"
        data.write_text(json.dumps(docs))
        (folder / f"{name}.yaml").write_text(yaml.format(data=data))
    return {"world_next_line": len(next_docs), "world_mmlu": len(mmlu), "world_regex_gen": len(gen)}


def _close(a, b, tol: float = 1e-4) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(a)))


def compare(full: list[dict], forked: list[dict], tol: float = 1e-4) -> dict[str, int]:
    """Cells whose values or gate counts differ between the two ways, and responses that differ
    (texts and flags exactly, numbers beyond ``tol`` relative: a perplexity's values and a
    log-likelihood move by float noise where a request was run again in another batch)."""
    out = {"cells_values_differ": 0, "cells_gate_differ": 0, "responses_differ": 0, "responses": 0}
    for a, b in zip(full, forked):
        out["cells_gate_differ"] += a["gate"] != b["gate"]
        out["cells_values_differ"] += any(not _close(a["tasks"][t]["values"], b["tasks"][t]["values"], tol)
                                          for t in a["tasks"])
        for t in a["tasks"]:
            for x, y in zip(a["tasks"][t]["responses"], b["tasks"][t]["responses"]):
                out["responses"] += 1
                out["responses_differ"] += not _close(x, y, tol)
    return out


def first_edits(model, ivs: list, kw: dict) -> dict:
    """Where each (generation request, replayable cell) pair of ``world_regex_gen`` first edits in the
    unsteered run's replay: ``never`` (the request reuses the unsteered answer), ``prompt``, or at a
    generated token (``generated``; ``tokens_before``: the tokens up to and including it, which a
    continuation from the first edit would not generate again). Cells under an ``always`` gate are not
    replayed (they edit from the first token)."""
    import sieve.evals.lmeval as lmeval

    out = {"never": 0, "prompt": 0, "generated": 0, "tokens_before": 0}
    note = lmeval._Fork.note

    def counting(self, keys, tokens, steers):
        note(self, keys, tokens, steers)
        if not (keys and isinstance(keys[0], tuple) and isinstance(keys[0][0], str)):
            return  # log-likelihood rows
        for s in steers.values():
            k, pos = s.counts(), s.positions()
            for b in range(len(keys)):
                if k["prompt_edited"][b]:
                    out["prompt"] += 1
                elif pos["gen_edited"][b]:
                    out["generated"] += 1
                    out["tokens_before"] += pos["gen_edited"][b][0] + 1
                else:
                    out["never"] += 1

    lmeval._Fork.note = counting
    try:
        lmeval.run_harness_cells(model, ivs, ["world_regex_gen"], **kw)
    finally:
        lmeval._Fork.note = note
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--docs", type=int, default=200, help="next-line documents (at most the recipe's code prompts)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "regex.toml"))
    ap.add_argument("--cache", default=None, help="detector cache folder (trained there if absent)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--first-edits", action="store_true",
                    help="only count, for the generation task, where each replayed (request, cell) first edits: "
                         "never, in the prompt, or at a generated token (what continuing from the first edit "
                         "could save)")
    args = ap.parse_args()

    import torch

    from sieve.evals.lmeval import run_harness_cells, task_manager
    from sieve.models import underlying
    from sieve.recipe import load_recipe
    from sieve.setting import load_setting
    from sieve.sweep import cells

    recipe = load_recipe(args.recipe)
    setting = load_setting(recipe, progress=False, cache_dir=Path(args.cache) if args.cache else None)
    cs = cells(recipe, baseline=True)
    ivs = [c.intervention(setting.parts, recipe) for c in cs]
    folder = Path(tempfile.mkdtemp(prefix="sieve-lmeval-bench-"))
    docs = write_tasks(folder, setting, args.docs)
    task_manager(folder, include_defaults=False)  # index once, outside the timings
    kw = dict(layer=setting.layer, include_path=folder, include_defaults=False, batch_size=args.batch,
              metric=METRICS)
    print(f"{len(cs)} cells; documents {docs}; torch threads {torch.get_num_threads()}", flush=True)
    if args.first_edits:
        print(json.dumps(first_edits(setting.model, ivs, kw), indent=1))
        return
    times: dict[str, list[float]] = {"full": [], "forked": []}
    results: dict[str, list] = {}
    saved = None
    for r in range(args.repeats):
        for way in (("full", "forked") if r % 2 == 0 else ("forked", "full")):
            t0 = time.perf_counter()
            outs, s = run_harness_cells(setting.model, ivs, TASKS, fork=way == "forked", **kw)
            times[way].append(time.perf_counter() - t0)
            results[way] = outs
            saved = s if way == "forked" else saved
            print(f"repeat {r}: {way} {times[way][-1]:.1f} s", flush=True)
    ratios = [a / b for a, b in zip(times["full"], times["forked"])]
    per_task = {}
    for t in TASKS:  # the requests reused per task (untimed)
        _, s = run_harness_cells(setting.model, ivs, [t], **kw)
        per_task[t] = {"requests": s.texts, "reused": s.texts_reused}
    diff = compare(results["full"], results["forked"])
    out = {
        "commit": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                 text=True).stdout.strip(),
        "cells": len(cs), "steered_cells": sum(c.steered for c in cs), "documents": docs,
        "threads": torch.get_num_threads(),
        "device": str(next(underlying(setting.model).parameters()).device)
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "torch": torch.__version__,
        "seconds": times, "median_full": statistics.median(times["full"]),
        "median_forked": statistics.median(times["forked"]),
        "speedup": statistics.median(times["full"]) / statistics.median(times["forked"]),
        "pair_ratios": ratios, "requests": saved.texts, "requests_reused": saved.texts_reused, **diff,
        "per_task": per_task,
        "gate": {str(c): results["forked"][i]["gate"] for i, c in enumerate(cs)},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "gate"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
