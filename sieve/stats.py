"""Intervals that respect the study's design: samples of one prompt are not independent.

A sweep draws ``samples`` completions per prompt, with seeds that depend on (prompt, sample) only, so
every method runs on the same random numbers. Two consequences for the statistics:

- A rate (regex use, validity, neutral completions changed) varies from prompt to prompt more than a
  binomial over all completions allows: the Wilson interval counts every completion as independent and
  is too narrow when the samples of one prompt agree (at the extreme, ``k`` identical samples per
  prompt carry the information of one). :func:`cluster_rate` resamples whole prompts instead (a cluster
  bootstrap: the prompts are the sampled units).
- A method is compared with unsteered on the same (prompt, sample) pairs: :func:`paired_difference`
  takes the per-pair differences and resamples prompts with their pairs kept together, so the prompt's
  own difficulty cancels.

Both are percentile intervals of a seeded bootstrap (same data and seed, same interval). With few
prompts (fewer than about 20) any prompt-level interval is rough, and so is a paired interval when
only a few prompts differ at all: if 4 of 56 prompts each lose one regex completion, a replicate
misses all four with probability (52/56)^56 < 0.025, so the percentile interval excludes 0 however
weak the evidence. :func:`sign_flip` is the test for that case: under "the method changes nothing",
each prompt's summed difference is as likely negative as positive, so its two-sided p-value counts
the sign assignments whose total is at least as far from 0 (exact over up to 20 differing prompts);
:func:`summarize` reports it with the number of prompts that differ. When every prompt has the same
rate (e.g. no event at all) the bootstrap interval collapses to a point, so read the Wilson bound there.
:func:`cluster_se` is the cluster-robust (sandwich, CR1) standard error of a mean, the analytic
counterpart the bootstrap is checked against in the tests.

Example:
    >>> y = [1, 1, 0, 0, 0, 0]          # two prompts: one always regex, two never
    >>> prompts = [0, 0, 1, 1, 2, 2]
    >>> r = cluster_rate(y, prompts, seed=0)
    >>> r.estimate, r.clusters
    (0.3333333333333333, 3)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Interval", "cluster_rate", "paired_difference", "rate_difference", "sign_flip", "SignFlip",
           "cluster_se", "DEFAULT_BOOTSTRAP"]

DEFAULT_BOOTSTRAP = 2000


class Interval(NamedTuple):
    """A point estimate and its interval; ``n`` observations in ``clusters`` clusters (prompts)."""

    estimate: float
    lo: float
    hi: float
    n: int
    clusters: int


_NAN = Interval(float("nan"), float("nan"), float("nan"), 0, 0)


def _sums(values: Sequence[float], clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values for {len(clusters)} cluster labels")
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters], dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    sums = np.bincount(ids, weights=v, minlength=len(index))
    counts = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums, counts


def _replicates(sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    G = len(sums)
    # Each replicate draws G prompts with replacement: a multinomial count per prompt.
    w = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
    return (w @ sums) / np.maximum(w @ counts, 1e-300)


def _bootstrap(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int, level: float) -> Interval:
    G = len(sums)
    n = int(counts.sum())
    if G == 0 or n == 0:
        return _NAN
    est = float(sums.sum() / counts.sum())
    return _percentile(est, _replicates(sums, counts, n_boot, np.random.default_rng(seed)), level, n, G)


def _percentile(est: float, reps: np.ndarray, level: float, n: int, clusters: int) -> Interval:
    """``est`` with the percentile interval of its bootstrap replicates ``reps``."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return Interval(est, float(lo), float(hi), n, clusters)


def cluster_rate(
    values: Sequence[float | bool],
    clusters: Sequence[Hashable],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The mean of ``values`` (a rate, for 0/1 values) with a cluster-bootstrap interval: prompts
    (``clusters``) are resampled with replacement, each with all its samples.

    Example:
        >>> r = cluster_rate([1, 1, 1, 1, 0, 0, 0, 0], ["a", "a", "b", "b", "c", "c", "d", "d"], seed=1)
        >>> r.estimate, r.lo <= 0.5 <= r.hi, r.clusters
        (0.5, True, 4)
    """
    if not len(values):
        return _NAN
    sums, counts = _sums([float(v) for v in values], clusters)
    return _bootstrap(sums, counts, n_boot, seed, level)


def paired_difference(
    values: Sequence[float | bool],
    baseline: Sequence[float | bool],
    clusters: Sequence[Hashable],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Mean of ``values - baseline`` over pairs (the same prompt and seed, steered and unsteered), with
    a cluster-bootstrap interval that resamples prompts and keeps each prompt's pairs together.

    Example:
        >>> steered, unsteered = [0, 0, 0, 1], [1, 1, 0, 1]
        >>> d = paired_difference(steered, unsteered, [0, 0, 1, 1], seed=0)
        >>> d.estimate, d.n
        (-0.5, 4)
    """
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} values for {len(baseline)} baseline values")
    if not len(values):
        return _NAN
    diffs = [float(a) - float(b) for a, b in zip(values, baseline)]
    sums, counts = _sums(diffs, clusters)
    return _bootstrap(sums, counts, n_boot, seed, level)


def rate_difference(
    values: Sequence[float | bool],
    clusters: Sequence[Hashable],
    other: Sequence[float | bool],
    other_clusters: Sequence[Hashable],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The mean of ``values`` minus the mean of ``other``, two sets of distinct prompts (not paired: e.g.
    regex use on regex-prone against neutral prompts), with a percentile interval from resampling each
    set's prompts independently. ``n`` and ``clusters`` count both sets.

    Example:
        >>> d = rate_difference([1, 1, 0, 1], ["a", "a", "b", "b"], [0, 0, 0, 1], ["c", "c", "d", "d"], seed=0)
        >>> d.estimate, d.clusters
        (0.5, 4)
    """
    if not len(values) or not len(other):
        return _NAN
    a_sums, a_counts = _sums([float(v) for v in values], clusters)
    b_sums, b_counts = _sums([float(v) for v in other], other_clusters)
    rng = np.random.default_rng(seed)
    reps = _replicates(a_sums, a_counts, n_boot, rng) - _replicates(b_sums, b_counts, n_boot, rng)
    est = float(a_sums.sum() / a_counts.sum() - b_sums.sum() / b_counts.sum())
    return _percentile(est, reps, level, len(values) + len(other), len(a_sums) + len(b_sums))


class SignFlip(NamedTuple):
    """A paired sign-flip test over clusters: the two-sided ``p``, the ``clusters`` whose summed
    difference is not 0 (the only ones that carry evidence), and whether ``p`` is ``exact``."""

    p: float
    clusters: int
    exact: bool


EXACT_SIGN_FLIP = 20  # clusters that differ: up to 2^20 sign assignments are enumerated


def sign_flip(
    values: Sequence[float | bool],
    baseline: Sequence[float | bool],
    clusters: Sequence[Hashable],
    *,
    n_perm: int = 20000,
    seed: int = 0,
) -> SignFlip:
    """Two-sided sign-flip (paired permutation) test of ``values - baseline`` over ``clusters``
    (prompts): under the null the distribution of each prompt's summed difference is symmetric about
    0, so every assignment of signs to the prompts' sums is equally likely. ``p`` is the share of
    assignments whose |total| reaches the observed |total|: exact over all ``2^k`` assignments of the
    ``k`` prompts that differ when ``k <= 20``, else from ``n_perm`` seeded random ones (with the
    observed one counted). p = 1 when no prompt differs.

    Example:
        >>> steered, unsteered = [0, 0, 0, 0, 1, 1], [1, 0, 1, 0, 1, 1]
        >>> t = sign_flip(steered, unsteered, [0, 0, 1, 1, 2, 2])
        >>> t.p, t.clusters, t.exact
        (0.5, 2, True)
    """
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} values for {len(baseline)} baseline values")
    sums, _ = _sums([float(a) - float(b) for a, b in zip(values, baseline)], clusters)
    d = sums[np.abs(sums) > 1e-12]
    k = len(d)
    if k == 0:
        return SignFlip(1.0, 0, True)
    observed = abs(float(d.sum())) - 1e-9 * max(1.0, float(np.abs(d).sum()))  # ties count as extreme
    if k <= EXACT_SIGN_FLIP:
        totals = np.zeros(1)
        for x in d:  # every sign assignment's total, 2^k of them (8 MB at k = 20)
            totals = np.concatenate([totals + x, totals - x])
        return SignFlip(float((np.abs(totals) >= observed).mean()), k, True)
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, k))
    hits = int((np.abs(signs @ d) >= observed).sum())
    return SignFlip((hits + 1) / (n_perm + 1), k, False)


def cluster_se(values: Sequence[float | bool], clusters: Sequence[Hashable]) -> float:
    """Cluster-robust standard error of the mean of ``values`` (the sandwich estimator with the CR1
    small-sample factor G/(G-1), as statsmodels' ``cov_type="cluster"`` for an intercept-only model).

    Example:
        >>> round(cluster_se([1, 1, 0, 0], [0, 0, 1, 1]), 3)
        0.5
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    sums, counts = _sums(v, clusters)
    G, n = len(sums), len(v)
    if G < 2:
        return float("nan")
    resid = sums - counts * v.mean()  # per-cluster sum of residuals
    return math.sqrt(G / (G - 1) * float((resid**2).sum())) / n
