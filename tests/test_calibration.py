"""Calibration: per-query metrics against the aggregate metrics, the decision on planted and null
signals, and a stored calibration driving searches."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.calibrate import calibrate, per_query_metric, split_queries
from evaluation.metrics import class_metrics, recall_at
from evaluation.protocol import Ranking, Structural


def _ranking(rng: np.random.Generator, queries: int = 400, length: int = 20) -> Ranking:
    """A class-level ranking where the correct item is often at rank 2 (so reranking can fix it)."""
    relevant = rng.random((queries, length)) < 0.15
    scores = np.sort(rng.random((queries, length)).astype(np.float32), axis=1)[:, ::-1].copy()
    r = np.maximum(relevant.sum(1), 1) + rng.integers(0, 3, queries)
    return Ranking(np.arange(queries), np.tile(np.arange(length), (queries, 1)), scores, relevant, r)


def test_per_query_metrics_average_to_the_aggregate_metrics():
    rng = np.random.default_rng(0)
    ranking = _ranking(rng)
    agg = class_metrics(ranking.relevant, ranking.r)
    for metric in ("precision_at_1", "map_at_r"):
        assert per_query_metric(ranking.relevant, metric, ranking.r).mean() == pytest.approx(agg[metric], abs=1e-12)
    recall = recall_at(ranking.relevant)
    assert per_query_metric(ranking.relevant, "recall_at_5").mean() == pytest.approx(recall["recall_at_5"])


def test_split_is_seeded_disjoint_and_complete():
    tune, held = split_queries(101, seed=3)
    again, _ = split_queries(101, seed=3)
    other, _ = split_queries(101, seed=4)
    assert np.array_equal(tune, again) and not np.array_equal(tune, other)
    assert len(set(tune) & set(held)) == 0 and len(tune) + len(held) == 101
    with pytest.raises(ValueError, match="at least 4"):
        split_queries(3, seed=0)


def _planted_sigma(ranking: Ranking, strength: float) -> np.ndarray:
    """sigma that lifts the correct candidates by ``strength`` (0: pure noise)."""
    rng = np.random.default_rng(7)
    return (strength * ranking.relevant + 0.3 * rng.standard_normal(ranking.relevant.shape)).astype(np.float32)


def test_a_real_signal_is_chosen_and_gains_on_the_held_out_half():
    ranking = _ranking(np.random.default_rng(1))
    sigma = {Structural("ot", "crosscorr", 0.5): _planted_sigma(ranking, 2.0),
             Structural("ot", "uniform", 1.0): _planted_sigma(ranking, 0.0)}
    cal = calibrate(ranking, sigma, "class", lambdas=(0.1, 1.0), ks=(10, 20), seed=0)
    assert cal.rerank and (cal.marginals, cal.s) == ("crosscorr", 0.5)
    assert cal.metric == "precision_at_1"
    assert cal.gain_heldout > 0.1 and cal.gain_ci95[0] > 0
    assert cal.calibrated_heldout == pytest.approx(cal.baseline_heldout + cal.gain_heldout)
    assert cal.tuning_queries + cal.heldout_queries == 400


def test_noise_and_harm_give_no_rerank():
    ranking = _ranking(np.random.default_rng(2))
    harmful = (-2.0 * ranking.relevant).astype(np.float32)
    sigma = {Structural("ot", "crosscorr", 1.0): _planted_sigma(ranking, 0.0),
             Structural("ot", "rollout", 1.0): harmful}
    cal = calibrate(ranking, sigma, "class", lambdas=(0.05, 0.5), ks=(10, 20), seed=0)
    assert not cal.rerank
    assert cal.setting()["rerank_k"] == 0
    assert cal.gain_heldout == 0.0 and cal.calibrated_heldout == cal.baseline_heldout


def test_place_protocol_uses_recall_at_1():
    ranking = _ranking(np.random.default_rng(3))
    ranking.r = None
    cal = calibrate(ranking, {Structural("ot", "uniform", 1.0): _planted_sigma(ranking, 2.0)}, "place",
                    lambdas=(1.0,), ks=(20,))
    assert cal.metric == "recall_at_1" and cal.rerank


def test_an_mnn_setting_is_chosen_with_its_threshold():
    ranking = _ranking(np.random.default_rng(4))
    sigma = {Structural("ot", "uniform", 1.0): _planted_sigma(ranking, 0.0),
             Structural("mnn", threshold=0.4): _planted_sigma(ranking, 2.0)}
    cal = calibrate(ranking, sigma, "class", lambdas=(0.1, 1.0), ks=(10, 20), seed=0)
    assert cal.rerank and (cal.scorer, cal.threshold) == ("mnn", 0.4)
    assert cal.setting()["scorer"] == "mnn" and cal.setting()["threshold"] == 0.4
