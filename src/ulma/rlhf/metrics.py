"""Held-out metrics of a reward model: rank correlation and calibration.

Pair accuracy is :func:`ulma.evaluation.metrics.reward_accuracy` (shared with the
implicit reward of DPO); what is new here needs human *scores* or *binary labels*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rankdata(x: Tensor) -> Tensor:
    """1-based ranks, ties get the mean of their ranks: ``[3, 1, 3] -> [2.5, 1, 2.5]``."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    _, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1 if len(x) else 0, dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse).to(x.dtype)
    return (sums / counts)[inverse]


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation; NaN when either side is constant or has fewer than 2 values."""
    x, y = x.double().flatten(), y.double().flatten()
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denom if denom > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the tie-averaged ranks (as scipy's)."""
    return pearson(rankdata(x), rankdata(y))


def calibration(rewards: Tensor, labels: Tensor, bins: int = 10) -> dict:
    """How well ``p = sigma(r)`` matches binary labels (Eq. 6 reads sigma(r) as P(z = 1)).

    ``ece``: expected calibration error over ``bins`` equal-width bins of p,
    ``sum_b (n_b / N) * |mean(z in b) - mean(p in b)|``; ``brier``: ``mean((p - z)^2)``;
    ``log_loss``: the mean of Eq. 7.  ``rewards``, ``labels``: ``[N]``.
    """
    if len(rewards) == 0:
        return {"ece": float("nan"), "brier": float("nan"), "log_loss": float("nan")}
    r, z = rewards.double(), labels.double()
    p = torch.sigmoid(r)
    which = torch.clamp((p * bins).long(), max=bins - 1)  # p = 1 falls in the last bin
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += float(sel.double().mean()) * abs(float(z[sel].mean() - p[sel].mean()))
    log_loss = -(z * torch.nn.functional.logsigmoid(r) + (1 - z) * torch.nn.functional.logsigmoid(-r)).mean()
    return {"ece": ece, "brier": float(((p - z) ** 2).mean()), "log_loss": float(log_loss)}
