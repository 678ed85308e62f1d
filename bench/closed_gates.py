"""Gated rows whose gate never edited, against the unsteered row of the same prompt and seed.

    python bench/closed_gates.py RUN_FOLDER

A row whose interventions edited nothing computes what the unsteered row computes, so its completion
is the unsteered one, up to the float noise of another batch composition (``sieve.generation``). In a
forked run (``sweep.fork = true``, the default) such rows are the unsteered rows by construction; in a
run with every row generated in full (``sweep.fork=false``) this counts, per gated cell, the closed-gate
rows whose text and whose regex flag differ from the unsteered row's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def closed_gate_differences(gen: pl.DataFrame) -> pl.DataFrame:
    """Per (set, method, scale): closed-gate rows, and how many differ from unsteered in text / regex.

    Example:
        >>> closed_gate_differences(ResultStore("runs/x/gen").table())  # doctest: +SKIP
    """
    keys = ["set", "prompt_index", "sample"]
    base = gen.filter(pl.col("method") == "unsteered").select(*keys, pl.col("text").alias("u_text"),
                                                              pl.col("regex").alias("u_regex"))
    closed = gen.filter((pl.col("method") != "unsteered") & ((pl.col("prompt_edited") + pl.col("gen_edited")) == 0))
    j = closed.join(base, on=keys)
    return (j.group_by(["set", "method", "scale"], maintain_order=True)
             .agg(pl.len().alias("closed"), (pl.col("text") != pl.col("u_text")).sum().alias("text_differs"),
                  (pl.col("regex") != pl.col("u_regex")).sum().alias("regex_differs"))
             .sort(["set", "method", "scale"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder of recipes.regex")
    args = ap.parse_args()
    from sieve.results import ResultStore

    table = closed_gate_differences(ResultStore(Path(args.run) / "gen").table())
    with pl.Config(tbl_rows=200, tbl_width_chars=200):
        print(table)
    print(f"closed-gate rows: {int(table['closed'].sum())}, text differs: {int(table['text_differs'].sum())}, "
          f"regex flag differs: {int(table['regex_differs'].sum())}")


if __name__ == "__main__":
    main()
