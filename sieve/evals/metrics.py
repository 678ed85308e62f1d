"""Detector metrics and interval statistics: precision, recall, F1, AUROC, PR curves, Wilson and t intervals."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["binary_metrics", "auroc", "pr_curve", "wilson", "mean_ci"]


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (ties count one half), by ranks.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    s = scores.flatten().double()
    y = labels.flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.double)
    # Average ranks over ties.
    uniq, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).scatter_add_(0, inv, ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 of ``scores > threshold`` against ``labels``, plus AUROC and counts.

    Example:
        >>> m = binary_metrics(torch.tensor([3.0, 1.0, 2.5, 0.0]), torch.tensor([1, 0, 0, 1]), 2.0)
        >>> m["precision"], m["recall"], round(m["f1"], 3)
        (0.5, 0.5, 0.5)
    """
    y = labels.flatten().bool()
    pred = scores.flatten() > threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {
        "precision": precision, "recall": recall, "f1": f1, "auroc": auroc(scores, labels),
        "threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "n": int(y.numel()),
        "positives": int(y.sum()),
    }


def pr_curve(scores: Tensor, labels: Tensor, points: int = 200) -> dict[str, list[float]]:
    """Precision and recall at up to ``points`` thresholds (quantiles of the scores)."""
    s = scores.flatten().float()
    y = labels.flatten().bool()
    qs = torch.quantile(s, torch.linspace(0, 1, points)).unique()
    prec, rec, thr = [], [], []
    pos = max(1, int(y.sum()))
    for t in qs.tolist():
        pred = s >= t
        tp = int((pred & y).sum())
        n = int(pred.sum())
        if n == 0:
            continue
        prec.append(tp / n)
        rec.append(tp / pos)
        thr.append(t)
    return {"threshold": thr, "precision": prec, "recall": rec}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion.

    Example:
        >>> lo, hi = wilson(5, 10)
        >>> round(lo, 3), round(hi, 3)
        (0.237, 0.763)
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its ``confidence`` interval from Student's t with n − 1 degrees of freedom (at small n
    the normal z would be too narrow: 17% at n = 8). The values are taken as independent draws.

    Example:
        >>> m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
        >>> m, round(hi - m, 3)  # t(0.975, 3) = 3.182 standard errors of 0.645
        (2.5, 2.054)
    """
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    m = sum(values) / n
    if n == 1:
        return (m, m, m)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (m, m - half, m + half)
