"""The regex study: steer a code model away from regular expressions while its code stays valid.

    python -m recipes.regex [RECIPE.toml] [key=value ...] [--shard i/n] [--merge DIR ...]
    python -m recipes.regex --report-only DIR

With no recipe it runs ``recipes/regex.toml``, the embedded world (a tiny code model shipped with sieve),
offline on a CPU in minutes. ``key=value`` overrides any recipe key (``sweep.samples=2``,
``sweep.methods=["unsteered","constant_sae"]``; values in TOML syntax).

What it does, in one direction:

1. plan: every (prompt set, method, scale, prompt, sample) row; a row's sampling seed depends on the
   prompt and sample only, so methods are compared on the same random numbers;
2. generate: rows mixing methods and scales run as batched generation with the edit at every step;
   each finished chunk of rows is evaluated (regex use by parsing, syntax, and for instruct models the
   generated tests run in the sandbox) and appended to ``<output>/gen`` (parquet parts);
3. general ability per (method, scale): held-out next-token loss on regex-free code (embedded world),
   MMLU accuracy (real models) or lm-evaluation-harness tasks (``eval.general = "lmeval"``), appended
   to ``<output>/ability``;
4. report: a summary table with 95% intervals and the Pareto front, charts (HTML + PNG), and
   ``report.html``, one self-contained page to open or share (:mod:`sieve.report`);
   ``--report-only DIR`` rebuilds them from a run folder.

Your own prompts: ``--regex-prompts FILE`` and ``--neutral-prompts FILE`` (or the recipe keys
``prompts.regex_file`` / ``prompts.neutral_file``) replace the regex-prone and neutral sets with plain
completion prompts, which the model continues as written:

- ``.jsonl``: one JSON object per line, ``{"prompt": "def parse_date(s):\\n", "id": "dates"}`` (``id``
  optional, defaults to FILE:LINE; ``reference`` optional);
- ``.py``: blocks separated by lines starting with ``# ---`` (``# --- name`` names the next block);
  each block is used exactly as written (less empty lines at its ends); the file is never run.

A file is used whole (``prompts.*_limit`` apply to the shipped sets only). A prompt that ends where the
tokenizer would merge (a newline before indentation) is healed at generation. A wrong file stops the
run before any model loads, naming the file and line (exit status 2).

An interrupted run started again with the same recipe resumes: finished rows are skipped, none is
duplicated. ``--shard i/n`` runs every n-th row (for several machines, each with its own output
folder or the same one); ``--merge DIR ...`` combines shard outputs into the recipe's output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from sieve.errors import SieveError
from sieve.evals.code import answer_validity, evaluate_code, function_validity
from sieve.generation import default_batch_size, generate
from sieve.methods import build
from sieve.prompts import PromptFileError, user_prompt_files
from sieve.recipe import UNSTEERED, Recipe, load_recipe, recipe_hash
from sieve.results import ResultStore, merge_stores, pareto_front, parse_shard, summarize

log = logging.getLogger("recipes.regex")

DEFAULT_RECIPE = Path(__file__).parent / "regex.toml"


def row_seed(base: int, *parts: Any) -> int:
    """A stable 31-bit seed from the recipe seed and the row's prompt/sample (not its method)."""
    h = hashlib.sha256(json.dumps([base, *parts]).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def intervention(parts, method: str, scale: float, recipe: Recipe | None = None):
    """The intervention of one (method, scale) cell; None for the unsteered baseline. ``recipe``: where
    to look the method up first (its ``[methods.NAME]`` tables), before the registry."""
    if method == UNSTEERED:
        return None
    return build(recipe.method(method) if recipe is not None else method, parts, scale)


def plan(recipe: Recipe, prompts) -> list[dict[str, Any]]:
    """Every generation row of the sweep, in a stable order."""
    rows = []
    for set_name, items in (("regex", prompts.regex), ("neutral", prompts.neutral)):
        for method in recipe.sweep.methods:
            for scale in recipe.scales_for(method):
                for pi, p in enumerate(items):
                    for s in range(recipe.sweep.samples):
                        rows.append({
                            "key": f"{set_name}|{method}|{scale:g}|{pi}:{p.id}|{s}",
                            "set": set_name, "method": method, "scale": float(scale),
                            "prompt_index": pi, "prompt_id": p.id, "sample": s,
                            "seed": row_seed(recipe.sweep.seed, set_name, pi, p.id, s),
                        })
    return rows


def _shard(rows: list[dict[str, Any]], shard: tuple[int, int]) -> list[dict[str, Any]]:
    i, n = shard
    return [r for k, r in enumerate(rows) if k % n == i]


def evaluate_row(recipe: Recipe, prompt, completion, judge=None) -> dict[str, Any]:
    """Evaluate one completion: code, regex use, syntax, (instruct models) task success, and the
    optional judge's verdict."""
    # Empty completions are counted and never valid; "valid" is complete-and-parsing or a valid prefix
    # at the token budget (the kind says which).
    if prompt.style == "instruct":
        validity = answer_validity(completion.text, completion.finished, prefilled_fence=True)
        code = validity.code
        ev = evaluate_code(code, setup=prompt.setup, execute=recipe.eval.execute and prompt.kind == "regex",
                           timeout_s=recipe.eval.timeout_s, memory_mb=recipe.eval.memory_mb,
                           sandbox=recipe.eval.sandbox)
    else:
        validity = function_validity(prompt.text, completion.text, completion.finished)
        code = validity.code
        ev = evaluate_code(code, execute=False)
    ev = replace(ev, syntax=validity.valid)
    verdict = judge(prompt.setup, code) if judge is not None and code and prompt.kind == "regex" else None
    return {
        "judge_follows": verdict.follows_prompt if verdict else None,
        "judge_sensible": verdict.sensible if verdict else None,
        "text": completion.text, "code": code or "", "has_code": ev.has_code, "regex": ev.regex,
        "regex_parsed": ev.regex_parsed, "syntax": ev.syntax, "validity": validity.kind,
        "empty": validity.empty, "complete": validity.kind == "complete", "executed": ev.executed,
        "exec_status": ev.exec_status, "n_tokens": len(completion.token_ids), "finished": completion.finished,
        **{k: int(v) for k, v in completion.counts.items()},
        **{f"{k}_at": list(v) for k, v in completion.positions.items()},
    }


def write_prompts(setting, out: Path) -> Path:
    """``out/prompts.parquet``: each prompt's text as the model reads it and where its tokens end (the
    report marks detector firings on it)."""
    from sieve.models import tokenize_prompts
    from sieve.report import token_ends

    tok = setting.model.tokenizer
    rows = []
    for set_name, items in (("regex", setting.prompts.regex), ("neutral", setting.prompts.neutral)):
        if not items:
            continue
        ids = tokenize_prompts(tok, [p.text for p in items])
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        for i, (p, text, ends) in enumerate(zip(items, texts, token_ends(tok, ids, texts))):
            rows.append({"set": set_name, "prompt_index": i, "prompt_id": p.id, "text": text, "token_ends": ends})
    path = out / "prompts.parquet"
    pl.DataFrame(rows, schema={"set": pl.Utf8, "prompt_index": pl.Int64, "prompt_id": pl.Utf8, "text": pl.Utf8,
                               "token_ends": pl.List(pl.Int64)}).write_parquet(path)
    return path


def run_generation(recipe: Recipe, setting, store: ResultStore, shard: tuple[int, int], progress: bool) -> int:
    from sieve.report import token_ends

    rows = _shard(plan(recipe, setting.prompts), shard)
    done = store.done_keys()
    todo = [r for r in rows if r["key"] not in done]
    log.info("generation: %d rows in this shard, %d done, %d to go", len(rows), len(rows) - len(todo), len(todo))
    if not todo:
        return 0
    ivs: dict[tuple[str, float], Any] = {}
    for r in todo:
        cell = (r["method"], r["scale"])
        if cell not in ivs:
            ivs[cell] = intervention(setting.parts, *cell, recipe=recipe)
    sets = {"regex": setting.prompts.regex, "neutral": setting.prompts.neutral}
    bs = recipe.sweep.batch_size or None
    chunk = (bs or default_batch_size(setting.model)) * 4  # rows generated, then stored, at a time
    rh = recipe_hash(recipe)
    from sieve.evals.judge import make_judge

    judge = make_judge(recipe.eval.judge, recipe.eval.judge_model)
    bar = tqdm(total=len(todo), desc="sweep", unit="row", disable=not progress)
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        prompts = [sets[r["set"]][r["prompt_index"]] for r in part]
        outs = generate(
            setting.model, [p.text for p in prompts], [ivs[(r["method"], r["scale"])] for r in part],
            max_new_tokens=recipe.sweep.max_new_tokens,
            temperature=recipe.sweep.temperature, top_p=recipe.sweep.top_p,
            seeds=[r["seed"] for r in part], stop=recipe.sweep.stop, batch_size=bs, progress=False,
        )
        # Token ends in ``text``: a healed row's first token also re-spells the prompt's tail, cut from text.
        ends = token_ends(setting.model.tokenizer, [o.token_ids for o in outs], [o.healed + o.text for o in outs])
        ends = [[max(0, e - len(o.healed)) for e in row] for o, row in zip(outs, ends)]
        store.append([{**r, "recipe_hash": rh, **evaluate_row(recipe, p, o, judge), "token_ends": e}
                      for r, p, o, e in zip(part, prompts, outs, ends)])
        bar.update(len(part))
    bar.close()
    return len(todo)


def run_ability(recipe: Recipe, setting, store: ResultStore, shard: tuple[int, int], progress: bool) -> None:
    """General ability per (method, scale): loss on regex-free code, or MMLU accuracy."""
    if recipe.eval.general == "none":
        return
    cells = [(m, float(s)) for m in recipe.sweep.methods for s in recipe.scales_for(m)]
    cells = _shard([{"cell": c} for c in cells], shard)
    done = store.done_keys()
    todo = [c["cell"] for c in cells if f"ability|{c['cell'][0]}|{c['cell'][1]:g}" not in done]
    rh = recipe_hash(recipe)
    questions = None
    if recipe.eval.general == "mmlu" and todo:
        from sieve.evals.mmlu import load_mmlu

        questions = load_mmlu(recipe)  # once, not per cell
    for method, scale in tqdm(todo, desc="general ability", disable=not progress):
        iv = intervention(setting.parts, method, scale, recipe=recipe)
        extra: dict[str, Any] = {}
        if recipe.eval.general == "loss":
            from sieve.evals.ability import steered_logprobs

            lps = steered_logprobs(setting.model, setting.prompts.code, iv, batch_size=recipe.sweep.batch_size or 16)
            values = [float(-lp.mean()) for lp in lps if lp.numel()]
            metric = "loss"
        elif recipe.eval.general == "lmeval":
            values, extra = harness_values(recipe, setting, iv)
            metric = f"lmeval:{recipe.eval.lmeval_metric}"
        else:
            from sieve.evals.mmlu import mmlu_accuracy

            correct = mmlu_accuracy(setting.model, questions, iv, chat=recipe.model.chat,
                                    shots=recipe.eval.mmlu_shots)
            values = [float(c) for c in correct]
            metric = "mmlu"
        store.append([{"key": f"ability|{method}|{scale:g}", "method": method, "scale": scale,
                       "metric": metric, "value": sum(values) / max(1, len(values)), "values": values,
                       "recipe_hash": rh, **extra}])


def harness_values(recipe: Recipe, setting, iv) -> tuple[list[float], dict[str, Any]]:
    """lm-evaluation-harness tasks under one cell's intervention: the per-document values of the
    recipe's metric over all its tasks, and the per-task scores and gate counts as JSON."""
    from sieve.evals.lmeval import SteeredLM, run_harness

    ev = recipe.eval
    lm = SteeredLM(model=setting.model, intervention=iv, layer=setting.layer, batch_size=recipe.sweep.batch_size or 16)
    out = run_harness(lm, ev.lmeval_tasks, include_path=recipe.resolve(ev.lmeval_include) if ev.lmeval_include else None,
                      limit=ev.lmeval_limit or None, num_fewshot=None if ev.lmeval_fewshot < 0 else ev.lmeval_fewshot,
                      metric=ev.lmeval_metric)
    values = [v for t in out["tasks"].values() for v in t["values"]]
    detail = {"tasks": {k: t["metrics"] for k, t in out["tasks"].items()}, "gate": out["gate"]}
    return values, {"detail": json.dumps(detail, sort_keys=True)}


def report(recipe: Recipe, out: Path, *, charts: bool = True, quiet: bool = False) -> pl.DataFrame:
    """Summary with intervals, Pareto flags, charts, ``report.html``; returns the summary table."""
    gen = ResultStore(out / "gen").table()
    if not gen.height:
        raise SieveError(f"no results in {out / 'gen'} yet")
    ability = ResultStore(out / "ability").table()
    validity = "executed" if recipe.eval.execute and gen["executed"].drop_nulls().len() else "syntax"
    summary = summarize(gen, ability if ability.height else None, validity=validity)
    lower = recipe.eval.general == "loss"
    summary = pareto_front(summary, lower_ability_is_better=lower)
    summary.write_parquet(out / "summary.parquet")
    summary.write_csv(out / "summary.csv")
    title = ("held-out loss on regex-free code (nats, lower is better)" if lower
             else f"lm-eval {recipe.eval.lmeval_metric} ({', '.join(recipe.eval.lmeval_tasks)})"
             if recipe.eval.general == "lmeval" else "MMLU accuracy")
    if charts and recipe.output.charts:
        from sieve.plots import pareto_chart, save_chart

        save_chart(pareto_chart(summary, ability_title=title), out / "pareto")
    from sieve.report import write_report

    path = write_report(out, recipe, summary, validity=validity, ability_title=title)
    log.info("report: %s (%.1f MB)", path, path.stat().st_size / 1e6)
    if not quiet:
        print(format_summary(summary, validity))
    return summary


def _iv(r: dict[str, Any], est: str, lo: str, hi: str, signed: bool = False) -> str:
    v, a, b = r.get(est), r.get(lo), r.get(hi)
    if v is None or a is None or b is None:
        return "-"
    f = "+.3f" if signed else ".3f"
    return f"{v:{f}} [{a:{f}},{b:{f}}]"


def format_summary(summary: pl.DataFrame, validity: str) -> str:
    """The printed summary: per method, its Pareto-front scales. Rates come with two 95% intervals:
    Wilson (every completion independent), then clustered by prompt (bootstrap over prompts); Δ is the
    paired difference from unsteered on the same prompt and seed, with a prompt-clustered interval."""
    lines = [f"{'method':32s} {'scale':>7s}  {'regex rate [95% CI] [by prompt]':>36s}  {'Δ regex [by prompt]':>24s}  "
             f"{validity + ' rate [95% CI] [by prompt]':>37s}  {'Δ valid':>24s}  {'complete/prefix/empty':>21s}  "
             f"{'ability [95% CI]':>24s}  neutral changed [by prompt] / moved"]
    for r in summary.sort(["method", "scale"]).iter_rows(named=True):
        if not r.get("pareto", True):
            continue
        regex = _iv(r, "regex_rate", "regex_lo", "regex_hi") + (
            f" [{r['regex_clo']:.3f},{r['regex_chi']:.3f}]" if r.get("regex_clo") is not None else "")
        valid = _iv(r, "valid_rate", "valid_lo", "valid_hi") + (
            f" [{r['valid_clo']:.3f},{r['valid_chi']:.3f}]" if r.get("valid_clo") is not None else "")
        split = (f"{r['complete_rate']:.2f}/{r['prefix_rate']:.2f}/{r.get('empty_rate') or 0.0:.2f}"
                 if r.get("complete_rate") is not None else "-")
        ab = _iv(r, "ability", "ability_lo", "ability_hi")
        nc = (_iv(r, "neutral_changed", "neutral_changed_clo", "neutral_changed_chi") + f" / {r['neutral_moved']:.2f}"
              if r.get("neutral_changed") is not None else "-")
        d_regex = _iv(r, "regex_diff", "regex_diff_lo", "regex_diff_hi", True)
        d_valid = _iv(r, "valid_diff", "valid_diff_lo", "valid_diff_hi", True)
        lines.append(
            f"{r['method']:32s} {r['scale']:7.2f}  {regex:>36s}  {d_regex:>24s}"
            f"  {valid:>37s}  {d_valid:>24s}  {split:>21s}"
            f"  {ab:>24s}  {nc}"
        )
    if "empty_n" in summary.columns:
        n_empty, n_all = int(summary["empty_n"].fill_null(0).sum()), int(summary["n"].sum())
        if n_empty:
            lines.append(f"WARNING: {n_empty} of {n_all} regex-prone completions were empty (counted as not valid "
                         "and as no regex use); see empty_n/empty_rate in summary.csv")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.regex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe TOML (default: the embedded world)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sweep.samples=2")
    p.add_argument("--shard", default=None, help="run shard i of n (i/n), e.g. 0/4")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="merge these run folders (shards) into the recipe's output folder, then report")
    p.add_argument("--report-only", nargs="?", const="", default=None, metavar="DIR",
                   help="only summarise, chart and write report.html for what is there (in DIR, a run folder, "
                        "with the recipe it was run with; else in the recipe's output folder)")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's output.dir)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--regex-prompts", default=None, metavar="FILE",
                   help="your own regex-prone completion prompts (.jsonl with a 'prompt' field per line, or a .py "
                        "file of blocks separated by '# ---' lines); replaces the recipe's regex-prone set")
    p.add_argument("--neutral-prompts", default=None, metavar="FILE",
                   help="your own neutral completion prompts (same formats); replaces the recipe's neutral set")
    args = p.parse_args(argv)
    if args.recipe and "=" in args.recipe and not Path(args.recipe).exists():
        args.overrides.insert(0, args.recipe)
        args.recipe = str(DEFAULT_RECIPE)
    # Prompt files given here are relative to the working directory (in a recipe, to the recipe file).
    for key, value in (("prompts.regex_file", args.regex_prompts), ("prompts.neutral_file", args.neutral_prompts)):
        if value:
            args.overrides.append(f"{key}={json.dumps(str(Path(value).resolve()))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report_only:
        from sieve.report import run_recipe

        out = Path(args.report_only)
        if not (out / "gen").is_dir():
            print(f"error: --report-only {out}: not a run folder (no {out / 'gen'})", file=sys.stderr)
            return 2
        recipe = run_recipe(out) or load_recipe(args.recipe, args.overrides)
        report(recipe, out)
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        user_prompt_files(recipe)  # a bad prompt file fails here, before any model is loaded
    except PromptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else recipe.resolve(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps({"hash": recipe_hash(recipe), "file": str(recipe.path)}))
    if args.merge:
        from sieve.report import merge_runs

        for sub in ("gen", "ability"):
            merge_stores([Path(d) / sub for d in args.merge], out / sub)
        merge_runs([Path(d) for d in args.merge], out)
        report(recipe, out)
        return 0
    if args.report_only is None:
        from sieve.report import record_run
        from sieve.setting import load_setting

        shard = parse_shard(args.shard)
        if recipe.eval.execute and recipe.prompts.source != "world":  # generated tests will run
            from sieve.evals.sandbox import check_sandbox

            check_sandbox(recipe.eval.sandbox)  # refuses before the model loads where bwrap is missing
            if recipe.eval.sandbox == "process":
                log.warning("eval.sandbox = 'process': generated code runs WITHOUT OS-level isolation")
        t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        setting = load_setting(recipe, progress=not args.no_progress)
        tag = f"{shard[0]}of{shard[1]}"
        write_prompts(setting, out)
        n = run_generation(recipe, setting, ResultStore(out / "gen", tag), shard, not args.no_progress)
        run_ability(recipe, setting, ResultStore(out / "ability", tag), shard, not args.no_progress)
        log.info("sweep finished in %.0fs; results in %s", time.time() - t0, out)
        record_run(out, recipe, overrides=args.overrides, started=started,
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), seconds=time.time() - t0,
                   shard=f"{shard[0]}/{shard[1]}", rows=n)
        if shard[1] > 1:
            log.info("shard %s done; merge shards with --merge", args.shard)
            return 0
    report(recipe, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
