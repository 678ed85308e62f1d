"""The regex study: steer a code model away from regular expressions while its code stays valid.

    python -m recipes.regex [RECIPE.toml] [key=value ...] [--out DIR] [--shard i/n] [--merge DIR ...]
                            [--launch [--shards N --executor slurm|local ...]] [--no-progress] [--debug]
    python -m recipes.regex --report-only DIR

With no recipe it runs ``recipes/regex.toml``, the embedded world (a tiny code model shipped with sieve),
offline on a CPU in minutes. ``key=value`` overrides any recipe key (``sweep.samples=2``,
``sweep.methods=["unsteered","constant_sae"]``; values in TOML syntax).

What it does, in one direction:

1. plan (:mod:`sieve.sweep`): every (prompt set, method, scale, prompt, sample) row; a row's sampling
   seed depends on the prompt and sample only, so methods are compared on the same random numbers;
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
duplicated; a part file that cannot be read is quarantined and its rows generated again. A folder
holding another recipe's results is refused (``--out`` another one), and so is a second process
writing the same shard of one folder. ``--shard i/n`` runs every n-th row (for several machines, each
with its own output folder or the same one); ``--merge DIR ...`` combines shard outputs into the
recipe's output folder. ``--launch`` does both through submitit: each shard a job (a SLURM job array,
at most ``--parallelism`` running, requeued when preempted or out of time, resuming from its stored
rows; or processes on this machine, one per GPU slot), then the merge and the report once all have
finished (:mod:`sieve.launch`; the recipe's ``[launch]`` table, or the flags). The shared arguments are
:mod:`recipes.cli`'s.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.std import tqdm

from recipes.cli import RecipeCLI, Run
from sieve.errors import SieveError, first_line, printable
from sieve.evals.code import answer_validity, evaluate_code, function_validity
from sieve.files import read_json, write_atomic, write_signed
from sieve.fork import ForkSummary, generate_forked
from sieve.generation import default_batch_size, generate
from sieve.launch import EXECUTORS
from sieve.prompts import user_prompt_files
from sieve.recipe import Recipe, recipe_hash
from sieve.results import ResultStore, merge_stores, pareto_front, parse_shard, summarize
from sieve.rundir import check, refuse_links
from sieve.sweep import AbilityRow, Cell, GenRow, cells, plan, shard

log = logging.getLogger("recipes.regex")

CLI = RecipeCLI("recipes.regex", __doc__, claims_folder=lambda args: args.report_only is None)
CLI.add_argument("--shard", default=None, help="run shard i of n (i/n), e.g. 0/4")
CLI.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                 help="merge these run folders (shards) into the output folder, then report")
CLI.add_argument("--report-only", nargs="?", const="", default=None, metavar="DIR",
                 help="only summarise, chart and write report.html for what is there (in DIR, a run folder, "
                      "with the recipe it was run with; else in the recipe's output folder)")
CLI.add_override("--regex-prompts", "prompts.regex_file", path=True, metavar="FILE",
                 help="your own regex-prone completion prompts (.jsonl with a 'prompt' field per line, or a .py "
                      "file of blocks separated by '# ---' lines); replaces the recipe's regex-prone set")
CLI.add_override("--neutral-prompts", "prompts.neutral_file", path=True, metavar="FILE",
                 help="your own neutral completion prompts (same formats); replaces the recipe's neutral set")
CLI.add_argument("--trust-task-code", action="store_true",
                 help="run the Python that the recipe's harness task folder (eval.lmeval_include) names: "
                      "!function tags, task classes, metrics loaded through HF evaluate. Without it a recipe's "
                      "task files are read as data and any such construct is refused before the model loads")
CLI.add_argument("--keep-foreign-parts", action="store_true",
                 help="resume the rows of result parts in the output folder that this user's sieve did not write "
                      "(a folder copied from elsewhere, or written before parts were signed); without it such parts "
                      "are moved to <store>/foreign/ and their rows generated again")
CLI.add_argument("--launch", action="store_true",
                 help="run every shard as a job (a SLURM job array, or processes on this machine; submitit), wait, "
                      "then merge them into the output folder and report; settings from the recipe's [launch] "
                      "table and the flags below")
CLI.add_override("--executor", "launch.executor", choices=EXECUTORS,
                 help="with --launch: slurm, local (this machine, one shard per GPU slot), debug (in this process) "
                      "or auto (slurm where sbatch exists, else local)")
CLI.add_override("--shards", "launch.shards", type=int, metavar="N", help="with --launch: number of shards (jobs)")
CLI.add_override("--parallelism", "launch.parallelism", type=int, metavar="K",
                 help="with --launch: shards running at once (SLURM's array %%K; locally one per GPU slot)")
CLI.add_override("--partition", "launch.partition", help="with --launch: the SLURM partition")
CLI.add_override("--gpus-per-task", "launch.gpus_per_task", type=int, metavar="G", help="with --launch: GPUs per shard")
CLI.add_override("--cpus-per-task", "launch.cpus_per_task", type=int, metavar="C", help="with --launch: CPUs per shard")
CLI.add_override("--mem-gb", "launch.mem_gb", type=float, metavar="GB", help="with --launch: memory per shard")
CLI.add_override("--time-min", "launch.timeout_min", type=int, metavar="MIN",
                 help="with --launch: time limit of one attempt of a shard, minutes")
CLI.add_override("--max-requeue", "launch.max_requeue", type=int, metavar="R",
                 help="with --launch: requeues of a shard after its time limit (preemptions are always requeued)")


def evaluate_row(recipe: Recipe, prompt, completion, memo: dict | None = None) -> dict[str, Any]:
    """Evaluate one completion: code, regex use, syntax, (instruct models) task success, and the
    optional judge's verdict; the evaluation fields of a :class:`~sieve.sweep.GenRow`.

    ``memo``: a dict shared by the rows of a run: a completion whose prompt, text and end were evaluated
    already (a gated row that reused its unsteered trajectory, samples that wrote the same text) takes
    that evaluation (evaluation reads nothing else; in the sandbox, each distinct text runs once)."""
    key = (prompt.style, prompt.kind, prompt.text, getattr(prompt, "setup", None), completion.text, completion.finished)
    ev_fields = memo.get(key) if memo is not None else None
    if ev_fields is None:
        ev_fields = _evaluate_text(recipe, prompt, completion.text, completion.finished)
        if memo is not None:
            memo[key] = ev_fields
    return {
        **ev_fields, "n_tokens": len(completion.token_ids), "finished": completion.finished,
        **{k: int(v) for k, v in completion.counts.items()},
        **{f"{k}_at": list(v) for k, v in completion.positions.items()},
    }


def _evaluate_text(recipe: Recipe, prompt, text: str, finished: bool) -> dict[str, Any]:
    # Empty completions are counted and never valid; "valid" is complete-and-parsing or a valid prefix
    # at the token budget (the kind says which).
    if prompt.style == "instruct":
        validity = answer_validity(text, finished, prefilled_fence=True)
        code = validity.code
        ev = evaluate_code(code, setup=prompt.setup, execute=recipe.eval.execute and prompt.kind == "regex",
                           timeout_s=recipe.eval.timeout_s, memory_mb=recipe.eval.memory_mb,
                           sandbox=recipe.eval.sandbox)
    else:
        validity = function_validity(prompt.text, text, finished)
        code = validity.code
        ev = evaluate_code(code, execute=False)
    ev = replace(ev, syntax=validity.valid)
    return {
        "text": text, "code": code or "", "has_code": ev.has_code, "regex": ev.regex,
        "regex_parsed": ev.regex_parsed, "syntax": ev.syntax, "validity": validity.kind,
        "empty": validity.empty, "complete": validity.kind == "complete", "executed": ev.executed,
        "exec_status": ev.exec_status,
    }


def prompt_table(tokenizer, prompts) -> pl.DataFrame:
    """Each generation prompt's text as the model reads it and where its tokens end (the report marks
    detector firings on it): the rows of ``prompts.parquet``."""
    from sieve.models import tokenize_prompts
    from sieve.report import token_ends

    rows = []
    for set_name, items in (("regex", prompts.regex), ("neutral", prompts.neutral)):
        if not items:
            continue
        ids = tokenize_prompts(tokenizer, [p.text for p in items])
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for i, (p, text, ends) in enumerate(zip(items, texts, token_ends(tokenizer, ids, texts))):
            rows.append({"set": set_name, "prompt_index": i, "prompt_id": p.id, "text": text, "token_ends": ends,
                         "prompt": p.text})
    return pl.DataFrame(rows, schema={"set": pl.Utf8, "prompt_index": pl.Int64, "prompt_id": pl.Utf8,
                                      "text": pl.Utf8, "token_ends": pl.List(pl.Int64), "prompt": pl.Utf8})


def check_inputs(out: Path, table: pl.DataFrame, sources: dict, context: str) -> None:
    """Before the weights load, refuse to resume this user's rows in ``out`` where they were made on
    other inputs under the same recipe: other prompt texts under the same prompt ids (a recipe names
    its prompt files, not their content), or another model, SAE or MMLU data under the same name
    (``sources.json``, :func:`sieve.setting.sources_identity`: a model retrained in its folder, a hub
    id whose ``main`` moved)."""
    from sieve.files import signed
    from sieve.report import SOURCES_FILE

    path = out / "prompts.parquet"
    if not signed(path, context=context):
        raise SieveError(f"{out} holds rows of this recipe but not the prompt texts they were made on (its "
                         "prompts.parquet is missing, or was not written by this user's sieve for this recipe), so "
                         "whether the prompt files changed since cannot be told: write to a fresh folder (--out DIR)")
    try:
        old = pl.read_parquet(path)
    except (Exception, pl.exceptions.PanicException):
        old = None
    now = {(r["set"], r["prompt_index"]): r for r in table.iter_rows(named=True)}
    for r in old.iter_rows(named=True) if old is not None else ():
        # every prompt the folder's rows were made on is still there, as it was (more may follow)
        n = now.get((r.get("set"), r.get("prompt_index")))
        what = f"{printable(str(r.get('set')))} prompt {r.get('prompt_index')} ({printable(str(r.get('prompt_id')))})"
        if n is None or n["prompt_id"] != r.get("prompt_id"):
            raise SieveError(f"{out} holds rows made on {what}, which the prompt files no longer hold (now "
                             f"{'nothing' if n is None else printable(n['prompt_id'])} there). The prompt files "
                             "changed since; write to a fresh folder (--out DIR), or restore them")
        if n["text"] != r.get("text") or ("prompt" in r and r["prompt"] is not None and n["prompt"] != r["prompt"]):
            before = str(r.get("prompt") or r.get("text"))[:60]
            raise SieveError(f"{out} holds rows made on other prompt texts: {what} now reads "
                             f"{printable(n['prompt'][:60])!r}, before {printable(before)!r}. "
                             "The prompt files changed since; write to a fresh folder (--out DIR), or restore them")
    spath = out / SOURCES_FILE
    if not signed(spath, context=context):
        raise SieveError(f"{out} holds rows of this recipe but no record of the model, SAE and data they were made "
                         f"with (its {SOURCES_FILE} is missing, or was not written by this user's sieve for this "
                         "recipe), so whether they changed since cannot be told: write to a fresh folder (--out DIR)")
    try:
        before_s = read_json(spath)
    except ValueError:
        before_s = None
    from sieve.setting import with_unrecorded

    filled = with_unrecorded(before_s, sources)
    if filled != before_s and filled == sources:
        added = [what for key, what in (("sae", "the hub SAE's commit"), ("mmlu_data", "the MMLU data's commit"))
                 if filled.get(key) != before_s.get(key)]
        log.warning("%s: its %s was written by an earlier sieve, which did not record %s: taken as they are now",
                    out, SOURCES_FILE, " or ".join(added))
    before_s = filled
    if before_s != sources:
        raise SieveError(f"{out} holds rows made with other inputs: {sources_change(before_s, sources)}. Rows of "
                         "both would mix: write to a fresh folder (--out DIR), or restore them")


_PART_NAMES = {"model": "the model", "sae": "the SAE", "judge": "the judge model", "mmlu_data": "the MMLU data",
               "lmeval_include": "the harness task folder"}


def sources_change(before: object, now: dict) -> str:
    """What changed between two :func:`sieve.setting.sources_identity` records, in words.

    Example:
        >>> sources_change({"model": {"files": {"model.safetensors": "ab"}}, "sae": {}},
        ...                {"model": {"files": {"model.safetensors": "cd"}}, "sae": {}})
        'the model: model.safetensors changed'
    """
    if not isinstance(before, dict):
        return "the record of the model, SAE and data is not readable"
    said = []
    for part in dict.fromkeys([*now, *before]):
        old, new, name = before.get(part), now.get(part), _PART_NAMES.get(part, printable(part))
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and "files" in old and "files" in new:
            o, n = old["files"], new["files"]
            names = [f"{printable(k)} changed" for k in n if k in o and o[k] != n[k]]
            names += [f"{printable(k)} is new" for k in n if k not in o]
            names += [f"{printable(k)} is gone" for k in o if k not in n]
            said.append(f"{name}: " + ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else ""))
        elif isinstance(old, dict) and isinstance(new, dict) and old.get("hub") == new.get("hub") is not None and \
                old.get("id") != new.get("id"):
            said.append(f"{name}: {printable(new.get('hub'))} id {printable(str(old.get('id')))!r}, now "
                        f"{printable(str(new.get('id')))!r}")
        elif isinstance(old, dict) and isinstance(new, dict) and "commit" in new and old.get("hub") == new.get("hub"):
            said.append(f"{name}: {printable(new.get('hub'))} was at commit {printable(old.get('commit'))}, now "
                        f"{printable(new.get('commit'))}")
        else:
            said.append(f"{name}'s source")
    return "; ".join(said) or "the record differs"


def check_unchanged(recipe: Recipe, sources: dict, when: str) -> None:
    """Refuse to go on where a local source changed since ``sources`` was recorded at the start of the
    run (hub entries are taken as recorded): a model folder written to while the weights loaded, MMLU
    data or a harness task folder edited before the run read them. Rows stored until then stay."""
    from sieve.setting import sources_identity

    now = sources_identity(recipe, known=sources)
    if now != sources:
        raise SieveError(f"{sources_change(sources, now)} {when}, after this run recorded it: which version this run "
                         "read cannot be told, so it stops here (the rows stored so far were made before, and "
                         "stay). Run the command again once nothing writes to it any more")


def write_inputs(out: Path, table: pl.DataFrame, sources: dict, context: str) -> None:
    """Write ``prompts.parquet`` and ``sources.json``, signed for ``context`` (the run's recipe hash)."""
    from sieve.report import SOURCES_FILE

    write_signed(out / "prompts.parquet", table.write_parquet, context=context)
    write_signed(out / SOURCES_FILE, json.dumps(sources, indent=1, sort_keys=True), context=context)


def run_generation(recipe: Recipe, setting, store: ResultStore, part: tuple[int, int], progress: bool,
                   work: ForkSummary | None = None) -> int:
    """Generate and evaluate this shard's rows not yet in ``store``, a chunk at a time; rows generated.

    With ``sweep.fork`` (the default) a chunk holds whole (prompt, sample) groups, generated by
    :func:`sieve.fork.generate_forked`: gated rows reuse or fork from their group's unsteered trajectory
    (regenerated in memory where the unsteered row is stored already or in another shard). ``work``,
    when given, adds up the work saved."""
    rows = shard(plan(recipe, setting.prompts), part)
    from sieve.report import token_ends

    done = store.done_keys()
    todo = [r for r in rows if r.key not in done]
    log.info("generation: %d rows in this shard, %d done, %d to go", len(rows), len(rows) - len(todo), len(todo))
    if not todo:
        return 0
    ivs = {c: c.intervention(setting.parts, recipe) for c in dict.fromkeys(r.cell for r in todo)}
    bs = recipe.sweep.batch_size or None
    chunk = (bs or default_batch_size(setting.model)) * 4  # rows generated, then stored, at a time
    fork = recipe.sweep.fork
    if fork:
        # Whole (prompt, sample) groups per chunk, at least a batch of them, so the unsteered trajectories
        # of a chunk fill a generation batch and its gated rows find theirs in it.
        groups: dict[tuple[str, int, int], list] = {}
        for r in todo:
            groups.setdefault((r.set, r.prompt_index, r.sample), []).append(r)
        chunks, cur, n_groups = [], [], 0
        for g in groups.values():
            cur, n_groups = cur + g, n_groups + 1
            if len(cur) >= chunk and n_groups >= chunk // 4:
                chunks.append(cur)
                cur, n_groups = [], 0
        chunks += [cur] if cur else []
    else:
        chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    rh = recipe_hash(recipe)
    # Advanced per generated batch; the ETA averages over the whole sweep so far (smoothing=0), so the
    # evaluation of each chunk (run in the sandbox for instruct models) is in it too.
    bar = tqdm(total=len(todo), desc="sweep (generate + evaluate)", unit="row", smoothing=0, disable=not progress)
    memo: dict = {}  # evaluations by prompt, text and end: each distinct completion is evaluated once
    for batch in chunks:
        prompts = [getattr(setting.prompts, r.set)[r.prompt_index] for r in batch]
        kw = dict(max_new_tokens=recipe.sweep.max_new_tokens, temperature=recipe.sweep.temperature,
                  top_p=recipe.sweep.top_p, seeds=[r.seed for r in batch], stop=recipe.sweep.stop, batch_size=bs,
                  progress=False, on_batch=bar.update, share_prefill=recipe.sweep.share_prefill,
                  kv_cache=recipe.sweep.kv_cache,
                  drop_ended=None if recipe.sweep.drop_ended == "auto" else recipe.sweep.drop_ended,
                  cascade=None if recipe.sweep.cascade == "auto" else recipe.sweep.cascade)
        if fork:
            outs, saved = generate_forked(setting.model, [p.text for p in prompts], [ivs[r.cell] for r in batch], **kw)
            if work is not None:
                work.add(saved)
        else:
            outs = generate(setting.model, [p.text for p in prompts], [ivs[r.cell] for r in batch], **kw)
        # Token ends in ``text``: a healed row's first token also re-spells the prompt's tail, cut from text.
        ends = token_ends(setting.model.tokenizer, [o.token_ids for o in outs], [o.healed + o.text for o in outs])
        ends = [[max(0, e - len(o.healed)) for e in row] for o, row in zip(outs, ends)]
        store.append([GenRow.of(r, rh, **evaluate_row(recipe, p, o, memo), token_ends=e)
                      for r, p, o, e in zip(batch, prompts, outs, ends)])
    bar.close()
    return len(todo)


# Cells whose held-out loss is computed together (and stored together) with sweep.fork: one unsteered
# forward per text serves them all (the default recipe's 19 cells in one group).
_ABILITY_CELLS = 32


def run_judge(recipe: Recipe, setting, judge, out: Path, part: tuple[int, int], progress: bool,
              sources: dict | None = None) -> None:
    """The optional LLM judge over this shard's generated tests, after generation: verdicts go to
    ``<output>/judge`` (one row per judged test); tests the judge could not answer are not stored, so
    running the same command again asks about those only. A local judge model is loaded here, and
    refused if it changed since the run recorded ``sources`` (:func:`check_unchanged`)."""
    if judge is None:
        return
    from sieve.evals.judge import HFJudge, judge_rows

    if isinstance(judge, HFJudge) and sources is not None:
        hub = sources.get("judge") or {}
        if hub.get("hub") and hub.get("commit"):  # (a judge loaded already keeps the model it has)
            judge.revision = hub["commit"]  # the commit recorded when the run began, not where main is now
        judge.model  # noqa: B018 (loaded now, then compared with the record)
        check_unchanged(recipe, sources, "while the judge model loaded")

    mine = {r.key for r in shard(plan(recipe, setting.prompts), part) if r.set == "regex"}
    gen = ResultStore(out / "gen").table()
    rows = [{"key": r["key"], "function": setting.prompts.regex[r["prompt_index"]].setup, "code": r["code"]}
            for r in gen.iter_rows(named=True) if r["key"] in mine and r["code"]]
    judged, failed = judge_rows(judge, rows, ResultStore(out / "judge", f"{part[0]}of{part[1]}", recipe_hash(recipe)),
                                progress=progress)
    log.info("judge: %d tests judged now, %d could not be judged%s", judged, failed,
             " (run the same command again to retry them)" if failed else "")


def ability_values(recipe: Recipe, setting, cell: Cell, questions=None,
                   trust_task_code: bool = False) -> tuple[str, list[float], str | None]:
    """General ability of one cell: the metric (``loss``: per-text held-out loss; ``lmeval:<metric>``:
    per-document harness values; ``mmlu``: per-question correctness), its values, and details as JSON
    (the harness's per-task scores and gate counts) or None. ``trust_task_code``: run the Python that
    the recipe's harness task folder names (the command line's ``--trust-task-code``)."""
    iv = cell.intervention(setting.parts, recipe)
    if recipe.eval.general == "loss":
        from sieve.evals.ability import steered_logprobs

        lps = steered_logprobs(setting.model, setting.prompts.code, iv, batch_size=recipe.forward_batch_size)
        return "loss", [float(-lp.mean()) for lp in lps if lp.numel()], None
    if recipe.eval.general == "lmeval":
        values, extra = harness_values(recipe, setting, iv, trust_task_code)
        return f"lmeval:{recipe.eval.lmeval_metric}", values, extra["detail"]
    from sieve.evals.mmlu import mmlu_accuracy

    correct = mmlu_accuracy(setting.model, questions, iv, chat=recipe.model.chat, shots=recipe.eval.mmlu_shots,
                            batch_size=recipe.forward_batch_size)
    return "mmlu", [float(c) for c in correct], None


def run_ability(recipe: Recipe, setting, store: ResultStore, part: tuple[int, int], progress: bool,
                work: ForkSummary | None = None, trust_task_code: bool = False, sources: dict | None = None) -> None:
    """General ability per cell (held-out loss on regex-free code, or MMLU accuracy), into ``store``.

    The held-out loss and MMLU with ``sweep.fork``: cells a few at a time, one unsteered forward per
    batch of texts, and a steered forward only for the texts a cell's gate edits
    (:func:`sieve.fork.forked_forward`); harness tasks likewise, per request
    (:func:`sieve.evals.lmeval.run_harness_cells`); ``work`` adds up the texts reused.
    ``trust_task_code``: as in :func:`ability_values`. ``sources``: the run's record of its inputs
    (:func:`sieve.setting.sources_identity`); MMLU data or harness tasks that changed since are refused
    once read (:func:`check_unchanged`)."""

    def unchanged(what: str) -> None:
        if sources is not None:
            check_unchanged(recipe, sources, f"while {what}")

    if recipe.eval.general == "none":
        return
    done = store.done_keys()
    todo = [c for c in shard(cells(recipe), part) if AbilityRow.key_of(c) not in done]
    rh = recipe_hash(recipe)
    questions = None
    if recipe.eval.general == "mmlu" and todo:
        from sieve.evals.mmlu import load_mmlu

        questions = load_mmlu(recipe)  # once, not per cell
        unchanged("the MMLU questions were read")
    if recipe.sweep.fork and recipe.eval.general in ("loss", "mmlu", "lmeval"):
        from sieve.evals.ability import token_logprobs
        from sieve.evals.mmlu import mmlu_accuracy_cells
        from sieve.fork import forked_forward

        bar = tqdm(total=len(todo), desc="general ability", disable=not progress)
        for i in range(0, len(todo), _ABILITY_CELLS):
            group = todo[i : i + _ABILITY_CELLS]
            ivs = [c.intervention(setting.parts, recipe) for c in group]
            if recipe.eval.general == "lmeval":
                rows, saved = harness_rows(recipe, setting, group, ivs, rh, trust_task_code)
                unchanged("the harness tasks ran")
            elif recipe.eval.general == "loss":
                lps, saved = forked_forward(setting.model, setting.prompts.code, ivs, token_logprobs,
                                            batch_size=recipe.forward_batch_size)
                rows = [AbilityRow.of(c, "loss", [float(-lp.mean()) for lp in v if lp.numel()], rh)
                        for c, v in zip(group, lps)]
            else:
                correct, saved = mmlu_accuracy_cells(setting.model, questions, ivs, chat=recipe.model.chat,
                                                     shots=recipe.eval.mmlu_shots, batch_size=recipe.forward_batch_size)
                rows = [AbilityRow.of(c, "mmlu", [float(x) for x in v], rh) for c, v in zip(group, correct)]
            store.append(rows)
            if work is not None:
                work.add(saved)
            bar.update(len(group))
        bar.close()
        return
    for cell in tqdm(todo, desc="general ability", disable=not progress):
        metric, values, detail = ability_values(recipe, setting, cell, questions, trust_task_code)
        if recipe.eval.general == "lmeval":
            unchanged("the harness tasks ran")
        store.append([AbilityRow.of(cell, metric, values, rh, detail=detail)])


def _harness_kwargs(recipe: Recipe, trust_task_code: bool) -> dict[str, Any]:
    """The harness's arguments. Read as data, a task folder's data files lie in the folder's parent
    (the recipe's folder for ``tasks/`` beside the recipe), or in the folder itself when it is the
    recipe's folder."""
    ev = recipe.eval
    include = recipe.resolve(ev.lmeval_include).resolve() if ev.lmeval_include else None
    root = None
    if include is not None:
        here = recipe.path.parent.resolve() if recipe.path is not None else None
        root = include if here is not None and here.is_relative_to(include) else include.parent
    return dict(include_path=include, limit=ev.lmeval_limit or None,
                num_fewshot=None if ev.lmeval_fewshot < 0 else ev.lmeval_fewshot, metric=ev.lmeval_metric,
                allow_code=trust_task_code, data_root=root)


def check_harness(recipe: Recipe, trust_task_code: bool = False) -> None:
    """Before any model loads: the recipe's harness task folder holds data only (unless
    ``trust_task_code``) and names every task it asks for; the hub datasets the general-ability axis
    reads are not shadowed by folders in the working directory; a local MMLU file reads as questions."""
    if recipe.eval.general == "mmlu" and not recipe.eval.mmlu_data:
        from sieve.evals.task_files import check_hub_id

        check_hub_id("cais/mmlu", "MMLU (eval.mmlu_data empty: the hub's)")
    if recipe.eval.general == "mmlu" and recipe.eval.mmlu_data:
        from sieve.evals.mmlu import load_questions

        load_questions(recipe.resolve(recipe.eval.mmlu_data))  # a malformed row fails here, not after the sweep
    if recipe.eval.general != "lmeval":
        return
    from sieve.evals.lmeval import harness_tasks

    kw = _harness_kwargs(recipe, trust_task_code)
    harness_tasks(recipe.eval.lmeval_tasks, kw["include_path"], allow_code=kw["allow_code"], data_root=kw["data_root"])


def _harness_result(out: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
    for task, t in out["tasks"].items():
        if any(isinstance(v, list) for v in t["values"]):
            raise SieveError(f"eval.lmeval_metric: task {task!r} gives this metric per document as a pair the harness "
                             "aggregates over the corpus (a perplexity); give a per-document score such as acc")
    values = [v for t in out["tasks"].values() for v in t["values"]]
    detail = {"tasks": {k: t["metrics"] for k, t in out["tasks"].items()}, "gate": out["gate"]}
    return values, {"detail": json.dumps(detail, sort_keys=True)}


def harness_values(recipe: Recipe, setting, iv, trust_task_code: bool = False) -> tuple[list[float], dict[str, Any]]:
    """lm-evaluation-harness tasks under one cell's intervention: the per-document values of the
    recipe's metric over all its tasks, and the per-task scores and gate counts as JSON."""
    from sieve.evals.lmeval import SteeredLM, run_harness

    lm = SteeredLM(model=setting.model, intervention=iv, layer=setting.layer, batch_size=recipe.forward_batch_size)
    return _harness_result(run_harness(lm, recipe.eval.lmeval_tasks, **_harness_kwargs(recipe, trust_task_code)))


def harness_rows(recipe: Recipe, setting, group: list[Cell], ivs: list, rh: str, trust_task_code: bool = False):
    """The harness tasks under a group of cells at once, forked (:func:`sieve.evals.lmeval.run_harness_cells`:
    one unsteered run, and each cell's run only for the requests its gate edits): their ability rows,
    and the work saved."""
    from sieve.evals.lmeval import run_harness_cells

    outs, saved = run_harness_cells(setting.model, ivs, recipe.eval.lmeval_tasks, layer=setting.layer,
                                    batch_size=recipe.forward_batch_size,
                                    **_harness_kwargs(recipe, trust_task_code))
    rows = []
    for c, out in zip(group, outs):
        values, extra = _harness_result(out)
        rows.append(AbilityRow.of(c, f"lmeval:{recipe.eval.lmeval_metric}", values, rh, detail=extra["detail"]))
    return rows, saved


def report(recipe: Recipe, out: Path, *, charts: bool = True, quiet: bool = False) -> pl.DataFrame:
    """Summary with intervals, Pareto flags, charts, ``report.html``; returns the summary table."""
    from sieve.evals.judge import attach_verdicts, judge_rates

    gen = ResultStore(out / "gen").table()
    if not gen.height:
        raise SieveError(f"no results in {out / 'gen'} yet")
    gen = attach_verdicts(gen, ResultStore(out / "judge").table() if (out / "judge").is_dir() else None)
    ability = ResultStore(out / "ability").table()
    try:
        validity = "executed" if recipe.eval.execute and gen["executed"].drop_nulls().len() else "syntax"
        summary = summarize(gen, ability if ability.height else None, validity=validity)
    except pl.exceptions.PolarsError as e:  # a shared folder's parts need not hold what a run writes
        raise SieveError(f"the rows in {out / 'gen'} or {out / 'ability'} lack what a run writes "
                         f"({first_line(e):.160}): parts of another kind, or of a damaged folder; move them away "
                         "to report the rest") from None
    lower = recipe.eval.general == "loss"
    summary = pareto_front(summary, lower_ability_is_better=lower)
    rates = judge_rates(gen)
    if rates is not None:
        summary = summary.join(rates, on=["method", "scale"], how="left")
    from sieve.methods import family

    declared = {name: recipe.method(name) for name in recipe.methods}  # a recipe's own methods have families too
    summary = summary.with_columns(pl.Series("family", [family(m, declared) for m in summary["method"].to_list()],
                                             dtype=pl.String))
    write_atomic(out / "summary.parquet", summary.write_parquet)
    write_atomic(out / "summary.csv", summary.write_csv)
    general = recipe.eval.general
    title = ("held-out loss on regex-free code (nats, lower is better)" if lower
             else f"lm-eval {recipe.eval.lmeval_metric} ({', '.join(recipe.eval.lmeval_tasks)})"
             if general == "lmeval" else "MMLU accuracy" if general == "mmlu"
             else "general ability (not measured: eval.general = none)")
    written: list[Path] = []  # a chart left from an earlier report (or shipped) is not this one's
    if charts and recipe.output.charts:
        from sieve.plots import pareto_chart, save_chart

        written = list(save_chart(pareto_chart(summary, ability_title=title), out / "pareto"))
    from sieve.report import write_report

    path = write_report(out, recipe, summary, validity=validity, ability_title=title)
    log.info("report: %s (%.1f MB)", path, path.stat().st_size / 1e6)
    if not quiet:
        from sieve.tables import summary_table

        ability_name = ("held-out loss" if lower else "lm-eval" if general == "lmeval" else "MMLU" if general == "mmlu"
                        else None)
        print(summary_table(summary, validity, out=out, ability_name=ability_name, charts=written))
        if "empty_n" in summary.columns:
            n_empty, n_all = int(summary["empty_n"].fill_null(0).sum()), int(summary["n"].sum())
            if n_empty:
                print(f"WARNING: {n_empty} of {n_all} regex-prone completions were empty (counted as not valid "
                      "and as no regex use); see empty_n/empty_rate in summary.csv")
        print(f"One page with all of it (tables, charts, completions): {path}")
    return summary


# Files of a run folder that a run reads back (beside the result parts): signed by the writer
# (sieve.files.sign), set aside when this user's sieve did not write them.
READ_BACK = ("run.json", "detect.parquet", "detect_curves.parquet", "mmlu.parquet")


def _not_signed(out: Path, rh: str, names: Sequence[str], *, tag: str = "0of1", quarantine: bool = False
                ) -> tuple[dict[str, ResultStore], dict[str, list[Path]], list[Path]]:
    """The result stores of ``out``, the parts of each that this user's sieve did not sign for recipe
    hash ``rh``, and which of the files ``names`` are unsigned. ``quarantine``: unreadable parts are
    quarantined first (named as such, not as someone else's)."""
    from sieve.files import signed

    stores = {sub: ResultStore(out / sub, tag, rh) for sub in ("gen", "ability", "judge") if (out / sub).is_dir()}
    if quarantine:
        for s in stores.values():
            s.done_keys()
    found = {sub: s.foreign_parts() for sub, s in stores.items()}
    files = [out / n for n in names if ((out / n).exists() or (out / n).is_symlink()) and not signed(out / n, context=rh)]
    return stores, found, files


def foreign_parts(out: Path, tag: str, recipe: Recipe, *, keep: bool) -> dict[str, Any]:
    """Result parts and files in ``out`` that this user's sieve did not write for ``recipe`` (no valid
    HMAC under the user's key bound to the recipe's hash, :func:`sieve.files.signed`: a folder shipped
    with a shared recipe or copied from elsewhere, a file edited, the user's own files of another
    study, or files written before sieve signed them). Parts are set aside into ``<store>/foreign/`` so
    that their rows are generated here; the files the run reads back (``run.json``, the detector and
    MMLU tables: :data:`READ_BACK`) into ``<out>/foreign/``. Unless ``keep`` (``--keep-foreign-parts``):
    then they stay, with a warning. Every part counts, whatever shard ``tag`` it names: shards writing
    into one folder share one key (one home folder, or ``SIEVE_SECRET_FILE``). With no key to tell them
    apart the run is refused (unless ``keep``), naming why. Returns what ``run.json`` records (empty
    when there were none).

    Example:
        >>> foreign_parts(Path("runs/shared"), "0of1", recipe, keep=False)  # doctest: +SKIP
        {'gen': 3, 'kept': False}
    """
    from sieve.files import key_problem, move_aside

    stores, found, files = _not_signed(out, recipe_hash(recipe), READ_BACK, tag=tag, quarantine=True)
    counts = {sub: len(v) for sub, v in found.items() if v} | ({"files": len(files)} if files else {})
    if not counts:
        return {}
    listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
    if keep:
        log.warning("%s holds result parts or files this user's sieve did not write (%s); kept as they are "
                    "(--keep-foreign-parts): their rows are not generated again.", out, listed)
        return counts | {"kept": True}
    problem = key_problem()
    if problem:
        raise SieveError(f"{out} holds result parts or files ({listed}) that may not be this user's, and sieve has no "
                         f"key to tell: {problem}. Fix that (or set SIEVE_SECRET_FILE to a file sieve may create), "
                         "write to a fresh folder (--out DIR), or keep them as they are with --keep-foreign-parts")
    for sub, parts in found.items():
        if parts:
            stores[sub].set_aside(parts)
    if files:
        move_aside(files, out / "foreign")
    where = [str(out / sub / "foreign") for sub in found if found[sub]] + ([str(out / "foreign")] if files else [])
    log.warning("%s holds result parts or files this user's sieve did not write (%s: a folder shipped or copied "
                "from elsewhere, or written before sieve signed them); set aside in %s, their rows will be "
                "generated again. To use them as they are, move them back and run with --keep-foreign-parts.",
                out, listed, " and ".join(where))
    return counts | {"kept": False}


def launch_shards(run: Run) -> int:
    """``--launch``: every shard of this run as a submitit job, then their merge (:mod:`sieve.launch`)."""
    from sieve.launch import launch

    args = run.args
    if args.shard or args.merge or args.report_only is not None:
        raise SieveError("--launch runs and merges every shard itself: leave out --shard, --merge and --report-only")
    if run.recipe.path is None:
        raise SieveError("--launch needs the recipe as a file: the jobs read it")
    check_harness(run.recipe, args.trust_task_code)  # before any job starts
    trust = ["--trust-task-code"] if args.trust_task_code else []
    trust += ["--keep-foreign-parts"] if args.keep_foreign_parts else []
    launch("recipes.regex", [str(run.recipe.path), *run.overrides, *trust], run.out, run.recipe.launch)
    return 0


def body(run: Run) -> int:
    recipe, out = run.recipe, run.out
    args = run.args
    if args.launch:
        return launch_shards(run)
    if args.report_only is not None:
        from sieve.report import run_recipe

        out = Path(args.report_only) if args.report_only else out
        if not (out / "gen").is_dir():
            raise SieveError(f"--report-only {out}: not a run folder (no {out / 'gen'})")
        refuse_links(out, "--report-only")
        saved = run_recipe(out)  # the recipe the folder was run with, where it says
        check(out, saved or recipe)  # refuses to report another recipe's rows (or run.json's) as this one's
        _, unsigned, files = _not_signed(out, recipe_hash(saved or recipe), (*READ_BACK, "prompts.parquet"))
        if any(unsigned.values()) or files:  # reported as they are (--report-only is for that), but said
            log.warning("%s: result parts or files this user's sieve did not write for this recipe (%s): the report "
                        "shows them as they are", out,
                        ", ".join([f"{k}: {len(v)}" for k, v in unsigned.items() if v] + [f.name for f in files]))
        report(saved or recipe, out)
        return 0
    user_prompt_files(recipe)  # a bad prompt file fails here, before any model is loaded
    check_harness(recipe, args.trust_task_code)  # so do harness tasks that are code, or unknown
    from sieve.evals.judge import make_judge

    judge_model = recipe.eval.judge_model
    if recipe.eval.judge == "hf" and judge_model:
        from sieve.setting import judge_source

        judge_model = str(judge_source(recipe))  # a folder beside the recipe, or a hub id no folder stands in for
    judge = make_judge(recipe.eval.judge, judge_model, lazy=True)  # a bad judge setting, likewise (loaded later)
    if args.merge:
        from sieve.report import merge_runs, shard_inputs

        for d in args.merge:
            src = Path(d)
            if not (src / "recipe.json").exists():
                raise SieveError(f"--merge {d}: not a run folder of this recipe (no recipe.json in {src.resolve()})")
            refuse_links(src, "--merge")
            check(src, recipe)  # refuses a shard made by another recipe
        shard_inputs([Path(d) for d in args.merge])  # or on other prompt texts, or from other sources
        with run.lock():
            # the merged folder holds the shards' rows alone: what it held that this user did not write goes
            foreign_parts(out, "merged", recipe, keep=args.keep_foreign_parts)
            for sub in ("gen", "ability", "judge"):
                merge_stores([Path(d) / sub for d in args.merge if (Path(d) / sub).is_dir()], out / sub,
                             recipe_hash(recipe))
            merge_runs([Path(d) for d in args.merge], out, recipe)
            report(recipe, out)
        return 0
    if args.report_only is None:
        from sieve.report import record_run
        from sieve.setting import checked_inputs, load_setting, sources_identity

        part = parse_shard(args.shard)
        if recipe.eval.execute and recipe.prompts.source != "world":  # generated tests will run
            from sieve.evals.sandbox import check_sandbox

            check_sandbox(recipe.eval.sandbox)  # refuses before the model loads where bwrap is missing
            if recipe.eval.sandbox == "process":
                log.warning("eval.sandbox = 'process': generated code runs WITHOUT OS-level isolation")
        tag = f"{part[0]}of{part[1]}"
        with run.lock(f"shard-{tag}"):
            t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            foreign = foreign_parts(out, tag, recipe, keep=args.keep_foreign_parts)
            rh = recipe_hash(recipe)  # parts are signed for this recipe: another study's do not pass as its own
            tok, prompts = checked_inputs(recipe)  # bad input fails here, before the weights load
            table, sources = prompt_table(tok, prompts), sources_identity(recipe)
            # rows of this user's to resume: every part left after foreign_parts, but those kept on request
            kept = foreign.get("gen", 0) if foreign.get("kept") else 0
            if len(ResultStore(out / "gen").parts()) > kept:
                check_inputs(out, table, sources, rh)  # made on other prompt texts, weights or data: refused
            setting = load_setting(recipe, progress=run.progress, cache_dir=out / "cache", checked=True,
                                   sources=sources)
            check_unchanged(recipe, sources, "while the weights loaded")  # weights are the model's own from here
            write_inputs(out, table, sources, rh)
            work = ForkSummary() if recipe.sweep.fork else None
            n = run_generation(recipe, setting, ResultStore(out / "gen", tag, rh), part, run.progress, work)
            if work is not None and work.rows:
                log.info("forked generation: %s", work)
            run_judge(recipe, setting, judge, out, part, run.progress, sources)
            run_ability(recipe, setting, ResultStore(out / "ability", tag, rh), part, run.progress, work,
                        args.trust_task_code, sources)
            if work is not None and work.texts:
                log.info("forked general ability: %d of %d (%s, cell) pairs reused the unsteered answer",
                         work.texts_reused, work.texts, "request" if recipe.eval.general == "lmeval" else "text")
            log.info("sweep finished in %.0fs; results in %s", time.time() - t0, out)
            record_run(out, recipe, overrides=run.overrides, started=started,
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), seconds=time.time() - t0,
                       shard=f"{part[0]}/{part[1]}", rows=n, work=work.as_dict() if work is not None else None,
                       foreign_parts=foreign)
        if part[1] > 1:
            log.info("shard %s done; merge shards with --merge", args.shard)
            return 0
    report(recipe, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return CLI.main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
