"""Ranking and classification metrics, in plain torch (no scikit-learn at run time)."""

from __future__ import annotations

import math

import torch


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """ROC AUC by the rank-sum formula with tied scores sharing their average rank; NaN if one class."""
    labels = labels.flatten().double()
    scores = scores.flatten().double()
    n_pos = float(labels.sum())
    n_neg = float(labels.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.double)
    # average the ranks of ties
    _, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.double).index_add_(
        0, inverse, torch.arange(1, scores.numel() + 1, dtype=torch.double)
    )
    ranks[order] = (sums / counts.double())[inverse]
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(labels: torch.Tensor, probs: torch.Tensor) -> float:
    """Share of predictions on the right side of 0.5."""
    return float(((probs >= 0.5).long() == labels.long()).double().mean())


def mrr(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """MIND's MRR of one impression: sum over clicked of 1/rank, divided by the number clicked."""
    order = torch.argsort(scores, descending=True, stable=True)
    y = labels[order].double()
    rr = y / torch.arange(1, len(y) + 1, dtype=torch.double)
    return float(rr.sum() / y.sum())


def dcg(labels: torch.Tensor, scores: torch.Tensor, k: int) -> float:
    """DCG@k with gains 2^y - 1 and log2(rank + 1) discounts (MIND's definition)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    y = labels[order].double()
    gains = 2**y - 1
    discounts = torch.log2(torch.arange(len(y), dtype=torch.double) + 2)
    return float((gains / discounts).sum())


def ndcg(labels: torch.Tensor, scores: torch.Tensor, k: int) -> float:
    """nDCG@k of one impression."""
    best = dcg(labels, labels.double(), k)
    return dcg(labels, scores, k) / best if best > 0 else float("nan")


_IMPRESSION_METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")


def impression_rows(impressions: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """AUC, MRR, nDCG@5, nDCG@10 of each impression with both classes, one row each."""
    rows = []
    for labels, scores in impressions:
        labels = labels.long()
        if labels.sum() == 0 or labels.sum() == len(labels):
            continue  # AUC undefined; MIND's scorer skips these as well
        rows.append(
            [
                auc(labels, scores),
                mrr(labels, scores),
                ndcg(labels, scores, 5),
                ndcg(labels, scores, 10),
            ]
        )
    return torch.tensor(rows, dtype=torch.double).reshape(-1, len(_IMPRESSION_METRICS))


def mean_rows(rows: torch.Tensor) -> dict[str, float]:
    """The per-impression rows averaged, with the number of impressions."""
    n = len(rows)
    means = rows.sum(0) / n if n else torch.full((len(_IMPRESSION_METRICS),), math.nan)
    return {k: float(v) for k, v in zip(_IMPRESSION_METRICS, means)} | {"impressions": n}


def impression_metrics(impressions: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """AUC, MRR, nDCG@5, nDCG@10 per impression, averaged over impressions with both classes."""
    return mean_rows(impression_rows(impressions))
