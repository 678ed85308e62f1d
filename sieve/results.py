"""Results: an append-only parquet store that resumes, shards and merges; summaries with intervals;
Pareto fronts.

A store is a folder of part files (``part-<shard>-<n>.parquet``), each written atomically when a batch
finishes. Every row has a unique ``key``; on resume, keys already present are skipped, and reading
the table drops duplicates, so a crash at any point loses at most the batch in flight and never
duplicates a row. A part that cannot be read (truncated by a full disk, a copy cut short) is named in a
warning and moved to ``<folder>/quarantine/``; its rows count as not done and are generated again.
Shards write their own parts; ``merge`` combines shard folders into one. Rows are typed
(:class:`~sieve.sweep.GenRow`, :class:`~sieve.sweep.AbilityRow`): every part of a store has the same
column types.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from sieve.errors import SieveError, first_line
from sieve.evals.metrics import mean_ci, wilson
from sieve.files import mac_path, move_aside, signed, write_signed
from sieve.stats import DEFAULT_BOOTSTRAP, cluster_rate, paired_difference, rate_difference, sign_flip
from sieve.sweep import UNSTEERED, columns, schema

log = logging.getLogger(__name__)

__all__ = ["ResultStore", "merge_stores", "summarize", "pareto_front", "parse_shard"]


class ResultStore:
    """An append-only table in ``folder`` (one parquet part per append).

    Example:
        >>> s = ResultStore(tmp_path / "gen")  # doctest: +SKIP
        >>> s.append([{"key": "a", "x": 1}]); s.done_keys()  # doctest: +SKIP
        {'a'}
    """

    def __init__(self, folder: str | Path, shard: str = "0of1", context: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self.context = context  # what its parts' HMACs are bound to: the run's recipe hash
        self._counter = itertools.count(len(list(self.folder.glob("part-*.parquet"))))

    def parts(self) -> list[Path]:
        """The part files, in name order: regular files only (a FIFO or folder named like a part is not
        read, so it cannot hang or stop a run)."""
        out = []
        for p in sorted(self.folder.glob("part-*.parquet")):
            try:
                if p.is_file():
                    out.append(p)
            except OSError:
                continue
        return out

    def _read(self, columns: list[str] | None = None) -> list[pl.DataFrame]:
        """Every readable part; an unreadable one is quarantined (named in a warning), so its rows are
        generated again instead of every later run failing on it."""
        frames = []
        for p in self.parts():
            try:
                frames.append(pl.read_parquet(p, columns=columns))
            except (Exception, pl.exceptions.PanicException) as e:  # a crafted file can make polars panic
                reason = first_line(e) or e.__class__.__name__
                try:
                    moved = self.set_aside([p], "quarantine")
                except SieveError:  # a shipped link would move the file wherever it points: leave the part
                    log.warning("%s cannot be read (%s) and %s is not a folder of this store: part skipped",
                                p, e.__class__.__name__, self.folder / "quarantine")
                    continue
                log.warning("%s cannot be read (%s); moved to %s, its rows will be generated again",
                            p, reason, moved / p.name)
        return frames

    def set_aside(self, parts: Sequence[Path], into: str = "foreign") -> Path:
        """Move ``parts`` of this store, with their HMAC files, into ``<folder>/<into>/``: out of the
        table, so their rows count as not done; nothing is deleted (a name already there gets a suffix).
        Returns that folder. Raises :class:`SieveError` where it is a link or not a folder (moving
        into it would put the files wherever a shipped link points).

        Example:
            >>> s = ResultStore(tmp_path / "gen"); s.set_aside(s.foreign_parts()).name  # doctest: +SKIP
            'foreign'
        """
        return move_aside(list(parts), self.folder / into, "this result store")

    def append(self, rows: Sequence[Any]) -> Path | None:
        """Write ``rows`` (typed row dataclasses, or dicts) as one new part, atomically (temp file,
        then rename), with its HMAC under this user's key beside it (:func:`sieve.files.sign`)."""
        if not rows:
            return None
        if dataclasses.is_dataclass(rows[0]):
            df = pl.DataFrame(columns(rows), schema=schema(type(rows[0])))
        else:
            df = pl.DataFrame(list(rows), infer_schema_length=None)
        name = f"part-{self.shard}-{next(self._counter):06d}-{uuid.uuid4().hex[:8]}.parquet"
        return write_signed(self.folder / name, df.write_parquet, b"part", self.context)  # HMAC first: no race

    def foreign_parts(self) -> list[Path]:
        """The parts this user's sieve did not write for this store's ``context`` (no valid HMAC beside
        them, :func:`sieve.files.signed`): a folder shipped with a shared recipe, copied from someone
        else, the user's own parts of another study (another recipe hash), or parts written by a
        version of sieve before the HMACs (every part, where this user has no key). A run sets them
        aside (:meth:`set_aside`) unless told to keep them.

        Example:
            >>> s = ResultStore(tmp_path / "gen"); _ = s.append([{"key": "a"}]); s.foreign_parts()  # doctest: +SKIP
            []
        """
        return [p for p in self.parts() if not signed(p, b"part", self.context)]

    def table(self) -> pl.DataFrame:
        """All rows, one per key (the first written wins), in key order of writing."""
        frames = self._read()
        if not frames:
            return pl.DataFrame()
        df = pl.concat(frames, how="diagonal_relaxed")
        return df.unique(subset="key", keep="first", maintain_order=True)

    def done_keys(self) -> set[str]:
        """The keys of every stored row."""
        frames = self._read(["key"])
        return set(pl.concat(frames)["key"].to_list()) if frames else set()


def _edited_share(rows: pl.DataFrame) -> float:
    """The share of ``rows`` the intervention edited at all (for a gated method: the gate opened in time)."""
    return float(((rows["prompt_edited"] + rows["gen_edited"]) > 0).cast(pl.Float64).mean())


def merge_stores(folders: Iterable[str | Path], out: str | Path, context: str = "") -> pl.DataFrame:
    """Combine several stores (e.g. one per shard) into ``out``, dropping duplicate keys; the merged
    part is signed for ``context`` (the run's recipe hash, :class:`ResultStore`). Parts ``out`` held
    before go: an earlier merge's own (signed) part is deleted, anything else moved to ``replaced/``.

    Example:
        >>> merge_stores(["runs/a/gen", "runs/b/gen"], "runs/merged/gen")  # doctest: +SKIP
    """
    frames = [ResultStore(f).table() for f in folders]
    frames = [f for f in frames if f.height]
    store = ResultStore(out, shard="merged", context=context)
    # The merge's rows are the shards' alone, whatever ``out`` held before: an earlier merge's own part
    # goes (the shards hold its rows), any other part is moved to ``replaced/``, never deleted.
    earlier = [p for p in store.parts() if p.name.startswith("part-merged-") and signed(p, b"part", context)]
    for p in earlier:
        p.unlink()
        mac_path(p).unlink(missing_ok=True)
    others = store.parts()
    if others:
        store.set_aside(others, "replaced")
        log.warning("%s held %d result parts besides an earlier merge's: moved to %s", out, len(others),
                    store.folder / "replaced")
    if not frames:
        return pl.DataFrame()
    df = pl.concat(frames, how="diagonal_relaxed").unique(subset="key", keep="first", maintain_order=True)
    store.append(df.to_dicts())
    return df


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with a clear error.

    Example:
        >>> parse_shard("1/4")
        (1, 4)
    """
    if not text:
        return (0, 1)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SieveError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise SieveError(f"--shard {text}: need 0 <= i < n")
    return (i, n)


def _rate(col: pl.Series) -> tuple[float, float, float]:
    vals = [bool(v) for v in col.to_list() if v is not None]
    k, n = sum(vals), len(vals)
    lo, hi = wilson(k, n)
    return (k / n if n else float("nan"), lo, hi)


def _moved(base: str, other: str) -> float:
    """1 − (common prefix of ``other`` with ``base``) / len(base): 0 unchanged, 1 different from the start."""
    if not base:
        return 0.0 if not other else 1.0
    n = 0
    for a, b in zip(base, other):
        if a != b:
            break
        n += 1
    return 1.0 - n / len(base)


def _flags(col: pl.Series) -> list[bool]:
    return [bool(v) for v in col.to_list()]


def summarize(
    gen: pl.DataFrame,
    ability: pl.DataFrame | None,
    *,
    validity: str = "syntax",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> pl.DataFrame:
    """Per method and scale, on the regex-prone set: regex rate and validity rate, each with a Wilson
    95% interval (``*_lo``/``*_hi``: every completion counted as independent) and a prompt-clustered
    bootstrap interval (``*_clo``/``*_chi``: prompts resampled, see :mod:`sieve.stats`); the paired
    difference from unsteered on the same (prompt, sample) (``regex_diff``, ``valid_diff`` with clustered
    intervals, the sign-flip test's two-sided p over prompts, ``*_diff_p``, and the prompts that differ
    at all, ``*_diff_prompts``: an interval resting on a handful of prompts is rough, :mod:`sieve.stats`);
    empty completions (``empty_n``, ``empty_rate``: never valid) and how valid splits
    (``complete_rate``: the code ended and parses; ``prefix_rate``: valid so far when the token budget
    ran out). General ability (mean and CI). Side effects on the neutral set: detector firings per
    completion, the share of completions changed from unsteered with the same seed (with a clustered
    interval) and how far (the share of the unsteered text lost after the first difference), empties,
    regex use (``neutral_regex_rate`` with a clustered interval) and how much more the regex-prone
    prompts use it (``regex_gap``: regex-prone minus neutral rate, prompts of each set resampled).
    The share of rows the intervention edited at all (``edited_rate``, ``neutral_edited_rate``: for a
    gated method, the rows whose gate opened in time). Methods with a prompt gate (the lexical
    baseline) also get the share of prompts it opened for (``gate_open_rate``, ``neutral_gate_open_rate``).

    ``validity``: the column that says a completion is valid (``syntax`` or ``executed``). Bootstrap
    intervals use ``n_boot`` replicates from ``seed`` (same data, same numbers).

    Example:
        >>> rows = [{"set": "regex", "method": m, "scale": 0.0, "prompt_index": p, "sample": s,
        ...          "regex": m == "unsteered" and p == 0, "syntax": True, "text": "x"}
        ...         for m in ("unsteered", "m") for p in range(4) for s in range(2)]
        >>> s = summarize(pl.DataFrame(rows), None)
        >>> s.select("method", "regex_rate", "regex_diff", "n_prompts").rows()
        [('unsteered', 0.25, None, 4), ('m', 0.0, -0.25, 4)]
    """
    rows = []
    rx = gen.filter(pl.col("set") == "regex")
    nt = gen.filter(pl.col("set") == "neutral")
    base: dict[tuple[Any, Any], str] = {}
    if nt.height:
        for r in nt.filter(pl.col("method") == UNSTEERED).iter_rows(named=True):
            base[(r["prompt_index"], r["sample"])] = r["text"]
    has_valid = validity in rx.columns
    base_rx: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in rx.filter(pl.col("method") == UNSTEERED).iter_rows(named=True):
        base_rx[(r["prompt_index"], r["sample"])] = r
    boot = {"n_boot": n_boot, "seed": seed}
    for (method, scale), grp in rx.group_by(["method", "scale"], maintain_order=True):
        regex = _rate(grp["regex"])
        valid = _rate(grp[validity]) if has_valid else (float("nan"),) * 3
        prompts = grp["prompt_index"].to_list()
        regex_c = cluster_rate(_flags(grp["regex"]), prompts, **boot)
        row: dict[str, Any] = {
            "method": method, "scale": scale, "n": grp.height, "n_prompts": regex_c.clusters,
            "regex_rate": regex[0], "regex_lo": regex[1], "regex_hi": regex[2],
            "regex_clo": regex_c.lo, "regex_chi": regex_c.hi,
            "valid_rate": valid[0], "valid_lo": valid[1], "valid_hi": valid[2],
        }
        if has_valid:
            known = grp.filter(pl.col(validity).is_not_null())
            valid_c = cluster_rate(_flags(known[validity]), known["prompt_index"].to_list(), **boot)
            row.update({"valid_clo": valid_c.lo, "valid_chi": valid_c.hi})
        if "validity" in grp.columns:
            kinds = grp["validity"].to_list()
            row["complete_rate"] = sum(k == "complete" for k in kinds) / len(kinds)
            row["prefix_rate"] = sum(k == "prefix" for k in kinds) / len(kinds)
        if "empty" in grp.columns:
            row["empty_n"] = int(sum(_flags(grp["empty"])))
            row["empty_rate"] = row["empty_n"] / grp.height
        if "gen_edited" in grp.columns:
            row["edited_rate"] = _edited_share(grp)
        if "prompt_gate_opened" in grp.columns and grp["prompt_gate_opened"].drop_nulls().len():
            row["gate_open_rate"] = float(grp["prompt_gate_opened"].drop_nulls().cast(pl.Float64).mean())
        # Paired with unsteered: the same prompt and sample (hence the same seed).
        diff: dict[str, Any] = {"regex_diff": None, "regex_diff_lo": None, "regex_diff_hi": None,
                                "regex_diff_p": None, "regex_diff_prompts": None}
        if has_valid:
            diff.update({"valid_diff": None, "valid_diff_lo": None, "valid_diff_hi": None,
                         "valid_diff_p": None, "valid_diff_prompts": None})
        if method != UNSTEERED and base_rx:
            pairs = [(r, base_rx[(r["prompt_index"], r["sample"])]) for r in grp.iter_rows(named=True)
                     if (r["prompt_index"], r["sample"]) in base_rx]
            cols = [("regex", "regex")] + ([("valid", validity)] if has_valid else [])
            for name, col in cols:
                ok = [(a, b) for a, b in pairs if a[col] is not None and b[col] is not None]
                if ok:
                    args = ([bool(a[col]) for a, _ in ok], [bool(b[col]) for _, b in ok],
                            [a["prompt_index"] for a, _ in ok])
                    d = paired_difference(*args, **boot)
                    t = sign_flip(*args, seed=seed)
                    diff.update({f"{name}_diff": d.estimate, f"{name}_diff_lo": d.lo, f"{name}_diff_hi": d.hi,
                                 f"{name}_diff_p": t.p, f"{name}_diff_prompts": t.clusters})
        row.update(diff)
        ng = nt.filter((pl.col("method") == method) & (pl.col("scale") == scale))
        if ng.height:
            row["neutral_fired_per_row"] = float(ng["gen_fired"].mean() + ng["prompt_fired"].mean())
            paired = [(base[(r["prompt_index"], r["sample"])], r["text"], r["prompt_index"])
                      for r in ng.iter_rows(named=True) if (r["prompt_index"], r["sample"]) in base]
            changed = cluster_rate([a != b for a, b, _ in paired], [p for _, _, p in paired], **boot)
            row["neutral_changed"] = changed.estimate
            row["neutral_changed_clo"], row["neutral_changed_chi"] = changed.lo, changed.hi
            # How far they moved: the share of the unsteered completion lost after the first difference.
            row["neutral_moved"] = (sum(_moved(a, b) for a, b, _ in paired) / len(paired)) if paired else float("nan")
            row["neutral_regex_rate"] = float(ng["regex"].mean())
            if "gen_edited" in ng.columns:
                row["neutral_edited_rate"] = _edited_share(ng)
            # How much more the regex-prone prompts use re than the neutral ones (distinct prompts: unpaired)
            nr = cluster_rate(_flags(ng["regex"]), ng["prompt_index"].to_list(), **boot)
            gap = rate_difference(_flags(grp["regex"]), prompts, _flags(ng["regex"]), ng["prompt_index"].to_list(), **boot)
            row.update({"neutral_regex_clo": nr.lo, "neutral_regex_chi": nr.hi, "regex_gap": gap.estimate,
                        "regex_gap_lo": gap.lo, "regex_gap_hi": gap.hi})
            if "empty" in ng.columns:
                row["neutral_empty_rate"] = float(ng["empty"].cast(pl.Float64).mean())
            if "prompt_gate_opened" in ng.columns and ng["prompt_gate_opened"].drop_nulls().len():
                row["neutral_gate_open_rate"] = float(ng["prompt_gate_opened"].drop_nulls().cast(pl.Float64).mean())
        if ability is not None and ability.height:
            ab = ability.filter((pl.col("method") == method) & (pl.col("scale") == scale))
            if ab.height:
                vals = ab["values"][0].to_list() if "values" in ab.columns else [ab["value"][0]]
                m, lo, hi = mean_ci(vals)
                row.update({"ability_metric": ab["metric"][0], "ability": m, "ability_lo": lo, "ability_hi": hi})
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def pareto_front(summary: pl.DataFrame, *, lower_ability_is_better: bool) -> pl.DataFrame:
    """Rows of ``summary`` not dominated on (regex rate ↓, validity ↑, ability ↑ or ↓), flagged
    ``pareto = True`` (within each method, and over all rows as ``pareto_all``).
    """
    if not summary.height:
        return summary
    direction = -1.0 if lower_ability_is_better else 1.0

    def objectives(r: dict[str, Any]) -> tuple[float, float, float]:
        ab = r.get("ability")
        return (-r["regex_rate"], r["valid_rate"], direction * ab if ab is not None else 0.0)

    recs = summary.to_dicts()
    objs = [objectives(r) for r in recs]

    def dominated(i: int, pool: list[int]) -> bool:
        a = objs[i]
        for j in pool:
            b = objs[j]
            if j != i and all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b)):
                return True
        return False

    all_idx = list(range(len(recs)))
    by_method: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        by_method.setdefault(r["method"], []).append(i)
    flags = [not dominated(i, by_method[recs[i]["method"]]) for i in all_idx]
    flags_all = [not dominated(i, all_idx) for i in all_idx]
    return summary.with_columns(pl.Series("pareto", flags), pl.Series("pareto_all", flags_all))
