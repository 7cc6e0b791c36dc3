"""The class-level metrics against pytorch-metric-learning and by hand; Recall@N by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.metrics import class_metrics, class_r, map_at_r, r_precision, recall_at


def leave_one_out(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Relevance of the full cosine ranking, each image's own entry removed (brute force)."""
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]
    return labels[order] == labels[:, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_metrics_match_pytorch_metric_learning(seed):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(seed)
    n, dim = 300, 16
    centres = rng.normal(size=(12, dim))
    labels = rng.integers(0, 12, n)
    labels[:3] = [40, 41, 41]  # one image alone in its class (no query), one pair
    x = centres[labels % 12] + 1.5 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    ours = class_metrics(leave_one_out(x, labels), class_r(labels))
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count", device=torch.device("cpu"))
    theirs = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(x),
                               torch.from_numpy(labels), ref_includes_query=True)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
    assert 0.05 < ours["map_at_r"] < ours["r_precision"] < 1  # a non-trivial case


def test_hand_computed_cases():
    relevant = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    r = np.array([2, 2, 1])
    m = class_metrics(relevant, r)
    assert m["precision_at_1"] == pytest.approx(1 / 3)
    # RP: 1/2, 1/2, 0/1
    assert m["r_precision"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # MAP@R: (1/2)(1/1), (1/2)(1/2), (1/1)(0)
    assert m["map_at_r"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)


def test_reference_r_counts_the_query():
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert class_r(labels).tolist() == [2, 2, 2, 1, 1, 0]
    assert class_r(labels, count_query_in_r=True).tolist() == [3, 3, 3, 2, 2, 1]
    relevant = np.array([[1, 1, 0, 0]], dtype=bool)  # both other images of the class found first
    assert r_precision(relevant, np.array([2])) == 1.0 and map_at_r(relevant, np.array([2])) == 1.0
    # the reference code's R = 3 can never be filled: RP 2/3, MAP@R (1 + 1) / 3
    assert r_precision(relevant, np.array([3])) == pytest.approx(2 / 3)
    assert map_at_r(relevant, np.array([3])) == pytest.approx(2 / 3)


def test_queries_without_a_match_are_left_out_and_short_rankings_refused():
    relevant = np.array([[0, 0], [1, 0]], dtype=bool)
    assert class_metrics(relevant, np.array([0, 1]))["precision_at_1"] == 1.0
    with pytest.raises(ValueError, match="shorter than the largest R"):
        r_precision(relevant, np.array([3, 1]))


def test_recall_at_n():
    relevant = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=bool)
    got = recall_at(relevant, (1, 2, 3, 5))
    assert got == {"recall_at_1": 0.25, "recall_at_2": 0.5, "recall_at_3": 0.75, "recall_at_5": 0.75}
