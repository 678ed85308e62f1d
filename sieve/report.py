"""The run report: one self-contained HTML page per run, written next to its results.

``write_report(out, recipe, summary)`` reads a run folder (``gen/``, ``ability/``, ``prompts.parquet``,
``run.json``, and when present ``detect.parquet`` / ``detect_curves.parquet`` from ``recipes.detect``
and ``mmlu.parquet`` from ``recipes.mmlu``) and writes ``report.html``: the resolved recipe, its hash,
model/SAE/feature, when and how long the run took; the summary table with 95% intervals (sortable,
Pareto-front rows marked); the Pareto charts; completions side by side for a chosen prompt and sample,
unsteered and every method and scale, with the tokens where the detector fired and where the edit
acted marked; detector and general-ability tables.

The page is a template (``sieve/templates/report.html``) filled with the data: no server, no network.
The Vega runtime is inlined (from ``vl-convert``), the data is gzip-compressed JSON (the page
decompresses it with the browser's ``DecompressionStream``). When the completions would push the page
over ``budget_bytes`` a deterministic, evenly spaced subset of prompts is embedded (every sample and
every method of each chosen prompt, so the side by side stays complete), and the page says so.

Example:
    >>> from sieve.report import write_report  # doctest: +SKIP
    >>> write_report(Path("runs/regex-world"), recipe, summary)  # doctest: +SKIP
    PosixPath('runs/regex-world/report.html')
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import gzip
import json
import logging
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from sieve.errors import SieveError, first_line
from sieve.files import read_json, write_atomic, write_signed
from sieve.methods import FAMILIES, family
from sieve.recipe import Recipe, recipe_from_dict, recipe_hash

__all__ = [
    "REPORT_NAME", "RUN_FILE", "DEFAULT_BUDGET", "token_ends", "record_run", "load_run", "run_recipe",
    "report_data", "render_report", "write_report", "SOURCES_FILE", "shard_inputs", "merge_runs",
]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
RUN_FILE = "run.json"
SOURCES_FILE = "sources.json"  # what identifies the model, SAE and data the rows were made with
# The budget is 5 MB for the default run; keep a margin for what the page adds around the data.
DEFAULT_BUDGET = 4_800_000
_GEN_POSITIONS = ("prompt_fired_at", "gen_fired_at", "gen_edited_at")


# --- what generation records for the report -------------------------------------------------------


def token_ends(tokenizer: Any, rows: Sequence[Sequence[int]], texts: Sequence[str] | None = None) -> list[list[int]]:
    """For each row of token ids, the character offset where each token ends in the row's decoded text
    (``decode(row, skip_special_tokens=True)``, or ``texts[i]`` when given).

    One batched decode of single tokens serves rows whose pieces add up to their text (byte-level BPE);
    any other row (a multi-byte character split across tokens, a tokenizer that drops a leading
    space) is decoded prefix by prefix, and offsets stay monotonic and within the text.

    Example:
        >>> from sieve.world import load_world
        >>> tok = load_world().model.tokenizer
        >>> ids = tok("def add(a, b):", add_special_tokens=False)["input_ids"]
        >>> ends = token_ends(tok, [ids])[0]
        >>> len(ends) == len(ids) and ends[-1] == len("def add(a, b):")
        True
    """
    rows = [list(r) for r in rows]
    if texts is None:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True) if rows else []
    flat = [[t] for r in rows for t in r]
    pieces = tokenizer.batch_decode(flat, skip_special_tokens=True) if flat else []
    out, k = [], 0
    for row, text in zip(rows, texts):
        own = pieces[k : k + len(row)]
        k += len(row)
        if "".join(own) == text:
            ends, n = [], 0
            for p in own:
                n += len(p)
                ends.append(n)
        else:
            prefixes = tokenizer.batch_decode([row[: i + 1] for i in range(len(row))], skip_special_tokens=True)
            ends, n = [], 0
            for p in prefixes:
                if text.startswith(p):
                    n = max(n, len(p))
                ends.append(n)
        out.append(ends)
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def record_run(out: Path, recipe: Recipe, *, overrides: Sequence[str] = (), started: str, finished: str,
               seconds: float, shard: str = "0/1", rows: int = 0, work: dict[str, Any] | None = None,
               foreign_parts: dict[str, Any] | None = None) -> Path:
    """Add one session (a run or a resume of it) to ``out/run.json``, with the resolved recipe;
    ``work``: what forked generation saved in it (:class:`sieve.fork.ForkSummary`), when it ran;
    ``foreign_parts``: result parts per store that this user's sieve did not write, found when it
    started (:meth:`sieve.results.ResultStore.foreign_parts`), and whether their rows were ``kept``.

    Example:
        >>> record_run(out, recipe, started=t0, finished=t1, seconds=12.5, rows=96)  # doctest: +SKIP
    """
    from sieve.recipe import recipe_dict

    path = Path(out) / RUN_FILE
    run = load_run(out) or {}
    run.update({"recipe": recipe_dict(recipe), "hash": recipe_hash(recipe),
                "file": str(recipe.path) if recipe.path else None})
    run.setdefault("sessions", []).append({"started": started, "finished": finished, "seconds": round(seconds, 1),
                                           "shard": shard, "rows": int(rows), "overrides": list(overrides)}
                                          | ({"work": work} if work is not None else {})
                                          | ({"foreign_parts": foreign_parts} if foreign_parts else {}))
    return write_signed(path, json.dumps(run, indent=1), context=recipe_hash(recipe))


def load_run(out: Path) -> dict[str, Any] | None:
    """``out/run.json`` as a dict, or None when the folder has none; a :class:`~sieve.errors.SieveError`
    naming the file where it is not a JSON object in a regular file."""
    path = Path(out) / RUN_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        run = read_json(path)  # not a FIFO, nor a link to what never ends
    except ValueError as e:
        raise SieveError(f"{path} is not readable ({first_line(e):.120}): it records the folder's sessions and "
                         "recipe; restore it, or move it away to report without it") from None
    if not isinstance(run, dict):
        raise SieveError(f"{path} is not a JSON object: restore it, or move it away to report without it")
    return run


def run_recipe(out: Path) -> Recipe | None:
    """The resolved recipe a run folder was made with (from its ``run.json``), or None."""
    run = load_run(out)
    if not run or "recipe" not in run:
        return None
    file = run.get("file")
    if not isinstance(run["recipe"], dict) or not isinstance(file, (str, type(None))):
        raise SieveError(f"{Path(out) / RUN_FILE}: its recipe is not a table of settings: restore it, or move it "
                         "away to report without it")
    return recipe_from_dict(run["recipe"], Path(file) if file else None)


def merge_runs(folders: Sequence[Path], out: Path, recipe: Recipe | None = None) -> None:
    """Combine the ``run.json`` (sessions) and ``prompts.parquet`` of shard folders into ``out``. With
    ``recipe`` (the merge's own, checked against each shard's ``recipe.json``), the merged run.json
    names it, whatever a shard's run.json says (a shard's run.json is not checked, and decides how
    the merged folder is reported later)."""
    sessions, base = [], None
    for d in folders:
        run = load_run(d)
        if run:
            base = base or run
            sessions += run.get("sessions", [])
    if base is not None:
        have = load_run(out) or {}
        known = {json.dumps(s, sort_keys=True) for s in have.get("sessions", [])}
        merged = {**base, **{k: v for k, v in have.items() if k != "sessions"}}
        merged["sessions"] = have.get("sessions", []) + [s for s in sessions if json.dumps(s, sort_keys=True) not in known]
        if recipe is not None:
            from sieve.recipe import recipe_dict

            merged.update({"recipe": recipe_dict(recipe), "hash": recipe_hash(recipe),
                           "file": str(recipe.path) if recipe.path else None})
        write_signed(Path(out) / RUN_FILE, json.dumps(merged, indent=1),
                     context=recipe_hash(recipe) if recipe is not None else "")
    context = recipe_hash(recipe) if recipe is not None else ""
    df, weights = shard_inputs(folders)
    if df is not None:
        write_signed(Path(out) / "prompts.parquet", df.write_parquet, context=context)
    if weights is not None:
        write_signed(Path(out) / SOURCES_FILE, json.dumps(weights, indent=1, sort_keys=True), context=context)


def shard_inputs(folders: Sequence[Path]) -> tuple[pl.DataFrame | None, dict | None]:
    """The prompt texts and the record of the model, SAE and data (``sources.json``) that shard folders
    share; refused (:class:`~sieve.errors.SieveError`) where shards were made on other prompt texts or
    from other sources. The record is None unless every shard has one.

    Example:
        >>> import tempfile
        >>> shard_inputs([Path(tempfile.mkdtemp())])
        (None, None)
    """
    frames = []
    for d in folders:
        path = Path(d) / "prompts.parquet"
        if not path.exists():
            continue
        try:
            if not path.is_file():
                raise ValueError("not a regular file")
            frames.append((d, pl.read_parquet(path)))
        except (Exception, pl.exceptions.PanicException) as e:
            raise SieveError(f"--merge: {path} cannot be read ({type(e).__name__}: {first_line(e):.120})") from None
    df = None
    if frames:
        df = pl.concat([f for _, f in frames], how="diagonal_relaxed")
        same = [c for c in ("prompt_id", "text", "prompt") if c in df.columns]
        clash = df.group_by(["set", "prompt_index"]).agg(pl.max_horizontal([pl.col(c).drop_nulls().n_unique()
                                                                             for c in same]).alias("n")).filter(pl.col("n") > 1)
        if clash.height:
            row = clash.sort(["set", "prompt_index"]).row(0, named=True)
            raise SieveError(f"--merge: the shards were made on other prompt texts ({row['set']} prompt "
                             f"{row['prompt_index']} differs between {', '.join(str(d) for d, _ in frames)}): "
                             "their rows are not one study")
        df = df.unique(subset=["set", "prompt_index"], keep="first").sort(["set", "prompt_index"])
    weights = {}
    for d in folders:
        if (Path(d) / SOURCES_FILE).is_file():
            with contextlib.suppress(ValueError):
                weights[str(d)] = read_json(Path(d) / SOURCES_FILE)
    from sieve.setting import with_unrecorded

    records = list(weights.values())
    fullest = max(records, key=lambda w: len(json.dumps(w)), default=None)  # an earlier sieve recorded less
    if len({json.dumps(with_unrecorded(w, fullest), sort_keys=True) for w in records}) > 1:
        raise SieveError(f"--merge: the shards were made with another model, SAE or data (their {SOURCES_FILE} differ: "
                         f"{', '.join(weights)}): their rows are not one study")
    return df, (fullest if weights and len(weights) == len(folders) else None)


# --- the data the page shows ----------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _read(path: Path) -> pl.DataFrame | None:
    """A table the page shows, or None (absent, or unreadable: named in a warning)."""
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except (Exception, pl.exceptions.PanicException) as e:  # a crafted file can make polars panic
        log.warning("%s cannot be read (%s): left out of the report", path, first_line(e) or e.__class__.__name__)
        return None


def _store(folder: Path) -> pl.DataFrame:
    from sieve.results import ResultStore

    return ResultStore(folder).table() if folder.exists() else pl.DataFrame()


def _charts(summary: pl.DataFrame, ability_title: str, detect_metrics: pl.DataFrame | None,
            curves: pl.DataFrame | None) -> dict[str, Any]:
    from sieve import plots

    charts: dict[str, Any] = {}
    if summary.height:
        charts["pareto"] = plots.pareto_chart(summary, ability_title=ability_title).to_dict()
    if curves is not None and curves.height:
        marks = None
        if detect_metrics is not None and "level" in detect_metrics.columns:
            marks = detect_metrics.filter(pl.col("level") == "token").select("detector", "recall", "precision",
                                                                              "threshold")
        charts["detect_pr"] = plots.pr_chart(curves, marks).to_dict()
    return charts


def _method_colors(cells: list[dict[str, Any]]) -> dict[str, str]:
    """The charts' colour of each method (:func:`sieve.plots.method_colors`), for the page's chips."""
    from sieve.plots import method_colors

    domain, colors = method_colors([c["method"] for c in cells])
    return dict(zip(domain, colors))


def _session_info(run: dict[str, Any] | None) -> dict[str, Any]:
    sessions = (run or {}).get("sessions", [])
    # a shared folder's run.json may hold anything: sessions without their times are not reported
    sessions = [s for s in sessions if isinstance(s, dict) and isinstance(s.get("started"), str)
                and isinstance(s.get("finished"), str) and isinstance(s.get("seconds", 0.0), (int, float))] \
        if isinstance(sessions, list) else []
    if not sessions:
        return {"sessions": []}
    return {"sessions": sessions, "started": min(s["started"] for s in sessions),
            "finished": max(s["finished"] for s in sessions), "seconds": sum(s.get("seconds", 0.0) for s in sessions)}


def _units(gen: pl.DataFrame) -> list[tuple[str, int]]:
    """(set, prompt_index) pairs present, regex-prone set first."""
    pairs = gen.select("set", "prompt_index").unique().sort(["set", "prompt_index"]).rows()
    order = {"regex": 0, "neutral": 1}
    return sorted(pairs, key=lambda p: (order.get(p[0], 2), p[0], p[1]))


def _pick(items: list[Any], k: int) -> list[Any]:
    """``k`` evenly spaced items (first and last included), in order."""
    if k >= len(items):
        return list(items)
    if k <= 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _completions(gen: pl.DataFrame, prompts: pl.DataFrame | None, chosen: list[tuple[str, int]],
                 cells: dict[tuple[str, float], int], validity: str) -> dict[str, Any]:
    """Rows of the chosen prompts, compact: per (set, prompt, sample) a list of per-cell records."""
    keep = pl.DataFrame({"set": [c[0] for c in chosen], "prompt_index": [c[1] for c in chosen]},
                        schema={"set": gen.schema["set"], "prompt_index": gen.schema["prompt_index"]})
    rows = gen.join(keep, on=["set", "prompt_index"], how="semi").sort(["set", "prompt_index", "sample"])
    has = set(rows.columns)
    groups: dict[str, list[Any]] = {}
    for r in rows.iter_rows(named=True):
        cell = cells.get((r["method"], float(r["scale"])))
        if cell is None:
            continue
        ends = r.get("token_ends") if "token_ends" in has else None
        lens = [b - a for a, b in zip([0, *ends[:-1]], ends)] if ends else None
        rec = [
            cell, r["text"], lens,
            r.get("gen_fired_at") if "gen_fired_at" in has else None,
            r.get("gen_edited_at") if "gen_edited_at" in has else None,
            r.get("prompt_fired_at") if "prompt_fired_at" in has else None,
            r.get("regex"), r.get(validity), r.get("finished"),
            [r.get(k) for k in ("prompt_fired", "prompt_edited", "gen_fired", "gen_edited")],
            r.get("regex_parsed"), r.get("exec_status"), r.get("validity"),
        ]
        groups.setdefault(f"{r['set']}|{r['prompt_index']}|{r['sample']}", []).append(rec)
    texts: dict[str, Any] = {}
    pids = {(r["set"], r["prompt_index"]): r["prompt_id"]
            for r in gen.select("set", "prompt_index", "prompt_id").unique().iter_rows(named=True)}
    if prompts is not None:
        for r in prompts.iter_rows(named=True):
            if (r["set"], r["prompt_index"]) in set(chosen):
                ends = r.get("token_ends") or []
                texts[f"{r['set']}|{r['prompt_index']}"] = {
                    "id": r.get("prompt_id"), "text": r["text"],
                    "lens": [b - a for a, b in zip([0, *ends[:-1]], ends)]}
    for s, i in chosen:
        texts.setdefault(f"{s}|{i}", {"id": pids.get((s, i)), "text": None, "lens": None})
    return {"groups": groups, "prompts": texts}


def _pack(obj: Any) -> str:
    raw = json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False).encode()
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode()


def report_data(out: Path, recipe: Recipe, summary: pl.DataFrame, *, validity: str = "syntax",
                ability_title: str = "general ability",
                budget_bytes: int = DEFAULT_BUDGET) -> tuple[dict[str, Any], str]:
    """The page's data: ``(meta, packed completions)``; meta is plain JSON, the completions are gzip +
    base64, cut to evenly spaced prompts (all their samples and methods) until the rendered page fits
    in ``budget_bytes`` (one prompt at least)."""
    out = Path(out)
    gen = _store(out / "gen")
    ability = _store(out / "ability")
    prompts = _read(out / "prompts.parquet")
    detect = _read(out / "detect.parquet")
    curves = _read(out / "detect_curves.parquet")
    mmlu = _read(out / "mmlu.parquet")
    run = load_run(out)
    summary = summary.with_columns(pl.col("method").map_elements(family, return_dtype=pl.Utf8).alias("family"))
    cell_rows = summary.select("method", "scale", "family").to_dicts()
    fam_order = {f: i for i, f in enumerate(FAMILIES)}
    cell_rows.sort(key=lambda c: (fam_order.get(c["family"], len(FAMILIES)), c["method"], abs(c["scale"]), c["scale"]))
    cells = {(c["method"], float(c["scale"])): i for i, c in enumerate(cell_rows)}
    rec = recipe
    meta = {
        "name": rec.name, "description": rec.description, "hash": recipe_hash(rec),
        "file": str(rec.path) if rec.path else None,
        "recipe_toml": _toml(rec), "overrides": sorted({o for s in (run or {}).get("sessions", [])
                                                        for o in s.get("overrides", [])}),
        "model": rec.model.source, "sae": {"source": rec.sae.source, "id": rec.sae.id, "layer": rec.sae.layer,
                                            "feature": rec.sae.feature, "threshold": rec.sae.threshold},
        "validity": validity, "general": rec.eval.general, "ability_title": ability_title,
        "ability_lower_is_better": rec.eval.general == "loss",
        **_session_info(run),
        "generated": _now(),
        "n_rows": gen.height, "families": list(FAMILIES),
        "summary": summary.to_dicts(), "cells": cell_rows, "method_colors": _method_colors(cell_rows),
        "ability": ability.drop("values", strict=False).to_dicts() if ability.height else [],
        "detect": detect.drop("recipe_hash", strict=False).to_dicts() if detect is not None else [],
        "mmlu": mmlu.drop("recipe_hash", strict=False).to_dicts() if mmlu is not None else [],
        "charts": _charts(summary, ability_title, detect, curves),
    }
    units = _units(gen) if gen.height else []
    chosen = units
    while True:
        packed = _pack(_completions(gen, prompts, chosen, cells, validity) if chosen else {"groups": {}, "prompts": {}})
        meta["completions"] = {"prompts_total": len(units), "prompts_shown": len(chosen), "rows_total": gen.height}
        size = len(render_report(_clean(meta), packed).encode())
        if size <= budget_bytes or len(chosen) <= 1:
            return _clean(meta), packed
        # Shrink in proportion to what the completions take of the page, a little more than needed.
        room = max(budget_bytes - (size - len(packed)), 0)
        chosen = _pick(units, max(1, min(len(chosen) - 1, int(len(chosen) * room / len(packed) * 0.95))))


def _toml(recipe: Recipe) -> str:
    import tomli_w

    from sieve.recipe import recipe_dict

    return tomli_w.dumps(recipe_dict(recipe))


# --- the page ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bundle() -> str:
    """The Vega, Vega-Lite and Vega-Embed runtime as one script, built offline by vl-convert."""
    import altair as alt
    import vl_convert as vlc

    want = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    version = want if want in vlc.get_vegalite_versions() else None
    # A closing script tag inside the bundle would end the inline script early.
    return vlc.javascript_bundle(vl_version=version).replace("</script", "<\\/script")


def _template() -> str:
    return resources.files("sieve").joinpath("templates/report.html").read_text(encoding="utf-8")


def _script_json(text: str) -> str:
    """Text safe inside ``<script type="application/json">``."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_report(meta: dict[str, Any], packed: str) -> str:
    """Fill the template: the Vega runtime, the meta JSON and the packed completions.

    Example:
        >>> html = render_report({"name": "x"}, "")  # doctest: +SKIP
    """
    from html import escape

    values = {
        "TITLE": escape(f"sieve report: {meta.get('name', '')}"),
        "VEGA": _bundle(),
        "META": _script_json(json.dumps(meta, separators=(",", ":"), allow_nan=False)),
        "PACKED": packed,
    }
    # One pass: nothing substituted is searched again for placeholders.
    return re.sub(r"/\*@(TITLE|VEGA|META|PACKED)@\*/", lambda m: values[m.group(1)], _template())


def write_report(out: Path, recipe: Recipe, summary: pl.DataFrame, *, validity: str = "syntax",
                 ability_title: str = "general ability", budget_bytes: int = DEFAULT_BUDGET) -> Path:
    """Write ``out/report.html`` (atomically) and return its path.

    Example:
        >>> write_report(Path("runs/regex-world"), recipe, summary)  # doctest: +SKIP
    """
    out = Path(out)
    meta, packed = report_data(out, recipe, summary, validity=validity, ability_title=ability_title,
                               budget_bytes=budget_bytes)
    html = render_report(meta, packed)
    return write_atomic(out / REPORT_NAME, html)
