"""Metrics against values computed by hand on small fixed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from gram_scale.metrics import accuracy, auc, dcg, impression_metrics, mrr, ndcg

t = torch.tensor


def test_auc_by_hand():
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) 2 wins -> 3/4
    assert auc(t([0, 0, 1, 1]), t([0.1, 0.4, 0.35, 0.8])) == 0.75
    # a tie between a positive and a negative counts one half: (1 * 0.5 + 1 * 1) / 2
    assert auc(t([0, 1, 1]), t([0.5, 0.5, 0.9])) == 0.75
    assert auc(t([1, 0]), t([0.2, 0.9])) == 0.0
    assert math.isnan(auc(t([1, 1]), t([0.2, 0.9])))


def test_accuracy_by_hand():
    assert accuracy(t([1, 0, 1, 0]), t([0.7, 0.2, 0.4, 0.5])) == 0.5  # 0.5 counts as 1


def test_ranking_metrics_by_hand():
    labels, scores = t([0, 1, 0, 1]), t([0.9, 0.8, 0.1, 0.2])
    # ranking: n0 (0), n1 (1), n3 (1), n2 (0): clicked at ranks 2 and 3
    assert mrr(labels, scores) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert dcg(labels, scores, 5) == pytest.approx(1 / math.log2(3) + 1 / math.log2(4))
    ideal = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg(labels, scores, 5) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / ideal)
    assert ndcg(labels, scores, 2) == pytest.approx((1 / math.log2(3)) / ideal)


def test_impression_metrics_average_and_skip_single_class():
    imps = [
        (t([1, 0, 0]), t([0.9, 0.5, 0.1])),  # perfect: auc 1, mrr 1, ndcg 1
        (t([0, 1]), t([0.7, 0.3])),  # worst: auc 0, mrr 1/2, ndcg 1/log2(3)
        (t([1, 1]), t([0.1, 0.2])),  # no negative: skipped
    ]
    m = impression_metrics(imps)
    assert m["impressions"] == 2
    assert m["auc"] == 0.5
    assert m["mrr"] == pytest.approx(0.75)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert m["ndcg@10"] == m["ndcg@5"]
