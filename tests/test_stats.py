"""Prompt-clustered intervals and paired differences against hand computations and known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sieve.evals.metrics import wilson
from sieve.stats import cluster_rate, cluster_se, paired_difference


def _design(G: int, k: int, spread: float, seed: int) -> tuple[list[int], list[int], float]:
    """G prompts, k samples each; prompt c's regex probability p_c ~ Beta with mean 0.3 and the given
    spread (0: every prompt alike). Returns (values, prompt labels, the population mean)."""
    rng = np.random.default_rng(seed)
    if spread > 0:
        a = 0.3 * (1 / spread - 1)
        b = 0.7 * (1 / spread - 1)
        p = rng.beta(a, b, size=G)
    else:
        p = np.full(G, 0.3)
    y = (rng.random((G, k)) < p[:, None]).astype(int)
    return y.ravel().tolist(), np.repeat(np.arange(G), k).tolist(), 0.3


def test_cluster_se_is_the_sandwich_formula_by_hand():
    y = [1, 1, 0, 1, 0, 0, 0, 1, 1]
    g = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    m = sum(y) / len(y)
    resid = [sum(v - m for v, c in zip(y, g) if c == k) for k in (0, 1, 2)]
    by_hand = math.sqrt(3 / 2 * sum(r * r for r in resid)) / len(y)
    assert cluster_se(y, g) == pytest.approx(by_hand, rel=1e-12)


def test_cluster_se_matches_statsmodels_cluster_robust():
    sm = pytest.importorskip("statsmodels.api")
    y, g, _ = _design(40, 6, 0.3, seed=3)
    fit = sm.OLS(np.asarray(y, float), np.ones((len(y), 1))).fit(cov_type="cluster", cov_kwds={"groups": np.asarray(g)})
    assert cluster_se(y, g) == pytest.approx(float(fit.bse[0]), rel=1e-9)


def test_cluster_bootstrap_agrees_with_the_cluster_robust_interval():
    """On a design with strong prompt effects, the bootstrap's 95% interval is about mean ± 1.96·SE(CR1)."""
    y, g, _ = _design(80, 8, 0.3, seed=5)
    r = cluster_rate(y, g, n_boot=4000, seed=0)
    se = cluster_se(y, g)
    half = (r.hi - r.lo) / 2
    assert half == pytest.approx(1.96 * se, rel=0.15)
    assert r.lo < r.estimate < r.hi and r.clusters == 80 and r.n == 640


def test_wilson_is_too_narrow_when_the_samples_of_a_prompt_agree():
    """20 prompts × 16 identical samples (half the prompts always regex, half never): 320 completions
    carry the information of 20. Wilson on 320 is about 4x too narrow; the clustered interval is about
    as wide as Wilson on the 20 prompts."""
    G, k = 20, 16
    y = [int(c < G // 2) for c in range(G) for _ in range(k)]
    g = [c for c in range(G) for _ in range(k)]
    lo, hi = wilson(sum(y), len(y))
    r = cluster_rate(y, g, n_boot=4000, seed=0)
    lo20, hi20 = wilson(G // 2, G)
    assert (r.hi - r.lo) > 3 * (hi - lo)
    assert (r.hi - r.lo) == pytest.approx(hi20 - lo20, rel=0.3)


def test_without_prompt_effects_the_clustered_interval_is_about_wilson():
    y, g, _ = _design(100, 4, 0.0, seed=7)
    lo, hi = wilson(sum(y), len(y))
    r = cluster_rate(y, g, n_boot=4000, seed=0)
    assert (r.hi - r.lo) == pytest.approx(hi - lo, rel=0.2)


def test_coverage_clustered_holds_where_wilson_fails():
    """Over 200 simulated studies (40 prompts × 8 samples, strong prompt effects) the clustered 95%
    interval covers the true rate about 95% of the time; Wilson much less often."""
    cover_c = cover_w = 0
    sims = 200
    for s in range(sims):
        y, g, truth = _design(40, 8, 0.4, seed=100 + s)
        r = cluster_rate(y, g, n_boot=1000, seed=s)
        lo, hi = wilson(sum(y), len(y))
        cover_c += r.lo <= truth <= r.hi
        cover_w += lo <= truth <= hi
    assert cover_c / sims >= 0.88
    assert cover_w / sims <= 0.75


def test_paired_difference_by_hand_and_narrower_than_unpaired():
    # Two prompts, two samples each: the method removes the regex of prompt 0, sample 1 only.
    d = paired_difference([1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], seed=0)
    assert d.estimate == -0.25 and d.n == 4 and d.clusters == 2
    # Strong prompt effects, and a method that removes regex use in 1 of every 4 regex completions:
    # pairing cancels the prompt effects, so the paired interval is much narrower than two
    # independent clustered intervals combined.
    base, g, _ = _design(60, 8, 0.4, seed=11)
    rng = np.random.default_rng(0)
    steered = [0 if (b and rng.random() < 0.25) else b for b in base]
    d = paired_difference(steered, base, g, n_boot=4000, seed=0)
    assert d.estimate == pytest.approx((sum(steered) - sum(base)) / len(base))
    assert d.hi < 0  # the drop is detected
    a, b = cluster_rate(steered, g, seed=0), cluster_rate(base, g, seed=0)
    unpaired = math.hypot(a.hi - a.lo, b.hi - b.lo)
    assert (d.hi - d.lo) < 0.5 * unpaired


def test_bootstrap_is_seeded_and_rejects_mismatched_input():
    y, g, _ = _design(30, 4, 0.3, seed=1)
    assert cluster_rate(y, g, seed=3) == cluster_rate(y, g, seed=3)
    a, b = cluster_rate(y, g, seed=3), cluster_rate(y, g, seed=4)
    assert abs(a.lo - b.lo) < 0.03 and abs(a.hi - b.hi) < 0.03  # 2000 replicates: stable across seeds
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_rate([1, 0], [0])
    with pytest.raises(ValueError, match="baseline"):
        paired_difference([1, 0], [1], [0, 0])
    assert math.isnan(cluster_rate([], []).estimate)


def test_sign_flip_is_exact_against_enumeration_by_hand():
    import itertools

    from sieve.stats import sign_flip

    rng = np.random.default_rng(3)
    for _ in range(5):
        G, k = 9, 4
        prompts = np.repeat(np.arange(G), k)
        a, b = rng.random(G * k) < 0.3, rng.random(G * k) < 0.3
        sums = np.bincount(prompts, weights=a.astype(float) - b.astype(float))
        d = sums[sums != 0]
        hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= abs(d.sum()) - 1e-9
                   for signs in itertools.product([1, -1], repeat=len(d)))
        t = sign_flip(a, b, prompts)
        assert t.exact and t.clusters == len(d) and t.p == pytest.approx(hits / 2 ** len(d))


def test_sign_flip_few_prompts_differing_is_not_significant_where_the_bootstrap_says_so():
    """The case the percentile bootstrap gets wrong: 5 completions of 4 prompts out of 56 lose their
    regex use. The bootstrap interval excludes 0; the exact test gives 2/16."""
    from sieve.stats import sign_flip

    prompts = [i // 16 for i in range(56 * 16)]
    base = [1 if i in (0, 16, 32, 48, 49) else 0 for i in range(56 * 16)]
    steered = [0] * len(base)
    d = paired_difference(steered, base, prompts, seed=0)
    assert d.hi < 0  # the bootstrap interval excludes 0...
    t = sign_flip(steered, base, prompts)
    assert (t.p, t.clusters, t.exact) == (0.125, 4, True)  # ...on evidence a sign test calls weak
    assert sign_flip(base, base, prompts) == (1.0, 0, True)


def test_sign_flip_by_sampling_agrees_with_the_exact_test(monkeypatch):
    import sieve.stats as stats

    rng = np.random.default_rng(5)
    prompts = np.repeat(np.arange(14), 6)
    a, b = rng.random(84) < 0.45, rng.random(84) < 0.3
    exact = stats.sign_flip(a, b, prompts)
    monkeypatch.setattr(stats, "EXACT_SIGN_FLIP", 0)
    sampled = stats.sign_flip(a, b, prompts, n_perm=40000, seed=1)
    assert exact.exact and not sampled.exact and abs(exact.p - sampled.p) < 0.01
    with pytest.raises(ValueError):
        stats.sign_flip([1, 0], [1], [0, 0])


def test_rate_difference_of_two_prompt_sets_resamples_each_set():
    from sieve.stats import rate_difference

    rng = np.random.default_rng(2)
    a_cl, b_cl = np.repeat(np.arange(30), 8), np.repeat(np.arange(30, 60), 8)
    a = rng.random(240) < np.repeat(rng.uniform(0.1, 0.5, 30), 8)  # prompt effects in both sets
    b = rng.random(240) < np.repeat(rng.uniform(0.0, 0.2, 30), 8)
    d = rate_difference(a, a_cl, b, b_cl, seed=0)
    assert d.estimate == pytest.approx(a.mean() - b.mean()) and d.clusters == 60 and d.n == 480
    # its half-width is about that of independent cluster intervals combined (sqrt of summed squares)
    ra, rb = cluster_rate(a, a_cl, seed=0), cluster_rate(b, b_cl, seed=1)
    combined = math.hypot((ra.hi - ra.lo) / 2, (rb.hi - rb.lo) / 2)
    assert (d.hi - d.lo) / 2 == pytest.approx(combined, rel=0.15)
    assert rate_difference(a, a_cl, b, b_cl, seed=0) == d and math.isnan(rate_difference([], [], b, b_cl).estimate)
