"""evaluation.spatial_consistency: do the strongest links of a plan share one displacement?"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.spatial_consistency import (
    ConsistencySettings,
    agreement,
    link_agreement,
    measure_pairs,
    random_link_agreement,
)

G = 7
N = G * G


def test_agreement_counts_links_near_the_median():
    same = np.array([[0, 1]] * 5)
    assert agreement(same, 1) == 1.0
    one_off = np.array([[0, 1], [0, 1], [1, 2], [0, 1], [4, -3]])
    assert agreement(one_off, 1) == pytest.approx(0.8)  # (1, 2) is within one cell, (4, -3) is not
    assert agreement(one_off, 0) == pytest.approx(0.6)


def _shift_plan(dr: int, dc: int) -> torch.Tensor:
    """Each query patch sends its mass to the patch (dr, dc) cells away (where that exists)."""
    plan = torch.zeros(N, N)
    for p in range(N):
        r, c = divmod(p, G)
        if 0 <= r + dr < G and 0 <= c + dc < G:
            plan[p, (r + dr) * G + c + dc] = 1.0 + p / 100  # distinct masses: a definite top 5
    return plan


def test_a_shifted_plan_is_consistent_and_a_scrambled_one_is_not():
    settings = ConsistencySettings(top=5, tolerance=1)
    shifted = link_agreement(_shift_plan(1, -2)[None], G, settings)
    assert shifted.tolist() == [1.0]
    scrambled = torch.zeros(N, N)
    for k, (i, j) in enumerate([(0, 48), (48, 0), (6, 42), (42, 6), (24, 24)]):
        scrambled[i, j] = 5 - k
    assert link_agreement(scrambled[None], G, settings)[0] <= 0.4


def test_random_links_baseline_is_low_and_seeded():
    settings = ConsistencySettings(top=5, tolerance=1, random_draws=200)
    a, b = random_link_agreement(10, G, settings), random_link_agreement(10, G, settings)
    assert a == b and 0.1 < a < 0.6


def test_ot_plans_of_shifted_grids_are_consistent():
    """Candidates are their query's patch grid moved one column right: the plans' top links say so,
    far above the random-links baseline."""
    rng = np.random.default_rng(0)
    P, D = 6, 32
    patches = rng.normal(size=(P, G, G + 1, D)).astype(np.float32)
    query = patches[:, :, :G].reshape(P, N, D)
    cand = patches[:, :, 1:].reshape(P, N, D)  # cell (r, c) of the candidate is cell (r, c + 1) of the query
    f = np.concatenate([query, cand])
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    g = f.mean(1)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    pairs = [(k, P + k) for k in range(P)]
    out = measure_pairs(g, f, None, pairs, G, ["uniform", "crosscorr"], [1.0, 0.7])
    assert out["pairs"] == P and out["top_links"] == 5
    for kind in ("uniform", "crosscorr"):
        for s in ("1", "0.7"):
            assert out["kinds"][kind][s] >= 0.95, (kind, s, out)
    assert out["baselines"]["random_links"] < 0.6
    assert out["baselines"]["top_similarity"] >= 0.95


def test_bench_quality_prints_the_figures_beside_the_baseline():
    from vit_rerank.bench.quality import consistency_table

    sc = {"set": "corridor", "pairs": 10, "top_links": 5, "tolerance_cells": 1,
          "kinds": {"rollout": {"1": 0.8, "0.5": 0.6}, "uniform": {"1": 0.4, "0.5": 0.2}},
          "baselines": {"random_links": 0.4, "top_similarity": 0.5}}
    text = "\n".join(consistency_table(sc))
    assert "0.800 (2.00x)" in text and "0.200 (0.50x)" in text
    assert "random links 0.400" in text and "0.500 (1.25x)" in text
    assert text.index("s=1") < text.index("s=0.5")


@pytest.mark.real_backbone
@pytest.mark.shared
@pytest.mark.slow
def test_real_plans_on_corridor_are_far_more_consistent_than_random_links(shared_data, real_weights, tmp_path):
    from evaluation.spatial_consistency import corridor_consistency

    out = corridor_consistency(shared_data / "corridor", str(real_weights), torch.device("cpu"), tmp_path,
                               ["rollout", "uniform"], [1.0, 0.9], limit=30)
    assert out["set"] == "corridor" and out["pairs"] >= 30
    base = out["baselines"]["random_links"]
    assert 0.15 < base < 0.4
    for kind in ("rollout", "uniform"):
        for s in ("1", "0.9"):
            assert out["kinds"][kind][s] > 2 * base, out
