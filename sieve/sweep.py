"""The sweep: method × scale cells, the rows they expand to, each row's key and seed, and the schema of
the result tables every recipe writes and :mod:`sieve.results` reads.

- :class:`Cell`: one (method, scale); ``UNSTEERED`` is the cell with no intervention (scale 0).
- :func:`cells`: a recipe's cells in recipe order (optionally with the unsteered baseline first).
- :class:`PlannedRow`: one generation (prompt set, cell, prompt, sample) with its key and seed;
  :func:`plan` lists them all; :func:`shard` keeps every n-th.
- :class:`GenRow` / :class:`AbilityRow`: the typed result rows; :func:`columns` and :func:`schema`
  give their table columns (the key first) and polars types, so every part file of a store has the
  same column types.

A row's key names everything that makes it (set, method, scale, prompt, sample): resume skips keys
already stored, merge drops duplicate keys. A row's seed depends on its prompt and sample only, so
methods are compared on the same random numbers.

Example:
    >>> from sieve.recipe import load_recipe
    >>> r = load_recipe("recipes/regex_lexical.toml", ['sweep.methods=["unsteered","clamping"]'])
    >>> [c.key for c in cells(r)]
    ['unsteered|0', 'clamping|-3', 'clamping|-10']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from sieve.methods import UNSTEERED

if TYPE_CHECKING:
    import polars as pl

    from sieve.interventions import Intervention
    from sieve.methods import Parts
    from sieve.prompts import PromptSets
    from sieve.recipe import Recipe

__all__ = [
    "UNSTEERED", "PROMPT_SETS", "Cell", "cells", "needs_detector", "row_seed", "PlannedRow", "plan", "shard",
    "GenRow", "AbilityRow", "columns", "schema",
]

# The generation sets of a sweep, in plan order: regex-prone prompts, then the neutral set.
PROMPT_SETS = ("regex", "neutral")


@dataclass(frozen=True)
class Cell:
    """One (method, scale) of a sweep.

    Example:
        >>> Cell("clamping", -3.0).key, Cell(UNSTEERED).steered
        ('clamping|-3', False)
    """

    method: str
    scale: float = 0.0

    @property
    def steered(self) -> bool:
        return self.method != UNSTEERED

    @property
    def key(self) -> str:
        return f"{self.method}|{self.scale:g}"

    def intervention(self, parts: Parts, recipe: Recipe | None = None) -> Intervention | None:
        """The cell's intervention built from a setting's parts; None for the unsteered baseline. The
        method is looked up in ``recipe`` first (its ``[methods.NAME]`` tables), then in the registry."""
        from sieve.methods import build

        if not self.steered:
            return None
        return build(recipe.method(self.method) if recipe is not None else self.method, parts, self.scale)


def cells(recipe: Recipe, *, baseline: bool = False) -> list[Cell]:
    """The recipe's cells, method by method in recipe order, each method's scales in order.

    ``baseline=True`` puts the unsteered cell first (once) whether or not the recipe lists it.
    """
    out = [Cell(m, float(s)) for m in recipe.sweep.methods for s in recipe.scales_for(m)]
    if baseline:
        out = [Cell(UNSTEERED)] + [c for c in out if c.steered]
    return out


def needs_detector(recipe: Recipe, name: str) -> bool:
    """Whether any method of the recipe uses detector ``name`` (e.g. ``"probe"``)."""
    return any(m != UNSTEERED and recipe.method(m).detector == name for m in recipe.sweep.methods)


def row_seed(base: int, *parts: Any) -> int:
    """A stable 31-bit seed from the recipe seed and the row's prompt/sample (not its method).

    Example:
        >>> row_seed(0, "regex", 0, "p", 0) == row_seed(0, "regex", 0, "p", 0) != row_seed(1, "regex", 0, "p", 0)
        True
    """
    h = hashlib.sha256(json.dumps([base, *parts]).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class PlannedRow:
    """One generation of the sweep, before it runs."""

    set: str
    method: str
    scale: float
    prompt_index: int
    prompt_id: str
    sample: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.set}|{self.method}|{self.scale:g}|{self.prompt_index}:{self.prompt_id}|{self.sample}"

    @property
    def cell(self) -> Cell:
        return Cell(self.method, self.scale)


def plan(recipe: Recipe, prompts: PromptSets) -> list[PlannedRow]:
    """Every generation row of the sweep, in a stable order (set, cell, prompt, sample)."""
    rows = []
    for set_name in PROMPT_SETS:
        items = getattr(prompts, set_name)
        for cell in cells(recipe):
            for pi, p in enumerate(items):
                for s in range(recipe.sweep.samples):
                    rows.append(PlannedRow(set_name, cell.method, cell.scale, pi, p.id, s,
                                           row_seed(recipe.sweep.seed, set_name, pi, p.id, s)))
    return rows


T = TypeVar("T")


def shard(items: Sequence[T], part: tuple[int, int]) -> list[T]:
    """Every n-th item, starting at i, for ``part = (i, n)``.

    Example:
        >>> shard(list("abcde"), (1, 2))
        ['b', 'd']
    """
    i, n = part
    return [x for k, x in enumerate(items) if k % n == i]


@dataclass(frozen=True)
class GenRow(PlannedRow):
    """One evaluated generation, as stored in ``<output>/gen``: the planned row (and its key), the
    recipe hash, the completion and its evaluation: regex use (parsed from the code), syntax,
    execution of generated tests (None when not run), the judge's verdict (None when off), and what the
    detector did (firings and edits on prompt and generated tokens).
    """

    recipe_hash: str
    text: str
    code: str
    has_code: bool
    regex: bool
    regex_parsed: str  # how regex use was read: "ast", "partial" or "text"
    syntax: bool  # valid: complete and parsing, or a valid prefix when the token budget ran out
    validity: str  # which: "complete", "prefix" or "empty" (an empty completion is never valid), or "invalid"
    empty: bool
    complete: bool
    executed: bool | None
    exec_status: str
    n_tokens: int
    finished: bool
    prompt_fired: int
    gen_fired: int
    prompt_edited: int
    gen_edited: int
    prompt_gate_opened: int | None = None  # 0 or 1 for a row whose intervention has a prompt gate
    judge_follows: bool | None = None
    judge_sensible: bool | None = None
    token_ends: list[int] | None = None  # where each generated token ends in ``text`` (the run report)
    # where the detector fired / the edit acted (Steerer.positions): prompt token and generated token indices
    prompt_fired_at: list[int] | None = None
    gen_fired_at: list[int] | None = None
    gen_edited_at: list[int] | None = None

    @classmethod
    def of(cls, planned: PlannedRow, recipe_hash: str, **evaluation: Any) -> GenRow:
        """The stored row of ``planned`` with its evaluation's fields."""
        return cls(**dataclasses.asdict(planned), recipe_hash=recipe_hash, **evaluation)


@dataclass(frozen=True)
class AbilityRow:
    """General ability of one cell, as stored in ``<output>/ability``: the metric (``loss``, ``mmlu``
    or ``lmeval:<metric>``), its mean, and the per-item values the interval is computed from."""

    method: str
    scale: float
    metric: str
    value: float
    values: list[float]
    recipe_hash: str
    detail: str | None = None  # JSON: the harness's per-task scores and gate counts (``lmeval``)

    @staticmethod
    def key_of(cell: Cell) -> str:
        return f"ability|{cell.key}"

    @property
    def key(self) -> str:
        return self.key_of(Cell(self.method, self.scale))

    @classmethod
    def of(cls, cell: Cell, metric: str, values: list[float], recipe_hash: str, detail: str | None = None) -> AbilityRow:
        return cls(cell.method, cell.scale, metric, sum(values) / max(1, len(values)), values, recipe_hash, detail)


def columns(rows: Sequence[Any]) -> dict[str, list[Any]]:
    """Typed rows (all of one class) as table columns: ``key``, then every field.

    Example:
        >>> columns([AbilityRow.of(Cell("clamping", -3.0), "loss", [1.0, 2.0], "h")])["key"]
        ['ability|clamping|-3']
    """
    names = [f.name for f in dataclasses.fields(rows[0])]
    return {"key": [r.key for r in rows], **{n: [getattr(r, n) for r in rows] for n in names}}


def schema(row_type: type) -> dict[str, pl.DataType]:
    """The polars schema of a row dataclass's :func:`columns` (``X | None`` columns are nullable, as
    all are).

    Example:
        >>> schema(AbilityRow)["values"]
        List(Float64)
    """
    import polars as pl

    simple = {str: pl.String, int: pl.Int64, float: pl.Float64, bool: pl.Boolean}

    def dtype(tp: Any) -> pl.DataType:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is list:
            return pl.List(dtype(typing.get_args(tp)[0]))
        return simple[tp]

    hints = get_type_hints(row_type)
    return {"key": pl.String, **{f.name: dtype(hints[f.name]) for f in dataclasses.fields(row_type)}}
