"""The mutual-nearest-neighbour scorer against a plain numpy oracle, and through the reranker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reranker.features import Features
from reranker.mnn import correspondence_plan, mutual_nearest_neighbours, scores_at_thresholds
from reranker.rerank import rerank_batch


def oracle(S: np.ndarray, threshold: float) -> tuple[list[tuple[int, int]], float, float]:
    """Matches by two loops: (i, j) with j query i's nearest, i candidate j's nearest, S > threshold;
    the count and the summed cosine over the query's n patches."""
    n, m = S.shape
    pairs = []
    for i in range(n):
        j = max(range(m), key=lambda jj: S[i, jj])
        back = max(range(n), key=lambda ii: S[ii, j])
        if back == i and S[i, j] > threshold:
            pairs.append((i, j))
    return pairs, len(pairs) / n, sum(S[i, j] for i, j in pairs) / n


@pytest.mark.parametrize("n,m,threshold", [(9, 9, 0.0), (16, 25, 0.2), (30, 12, -0.1), (5, 40, 0.5)])
def test_matches_and_scores_equal_the_oracle(n, m, threshold):
    rng = np.random.default_rng(n * m)
    S = rng.uniform(-1, 1, size=(3, 4, n, m)).astype(np.float32)
    count = mutual_nearest_neighbours(torch.from_numpy(S), threshold, "count")
    summed = mutual_nearest_neighbours(torch.from_numpy(S), threshold, "sum")
    for q in range(3):
        for k in range(4):
            pairs, c, s = oracle(S[q, k], threshold)
            got = [(i, int(j)) for i, j in enumerate(count.match[q, k].tolist()) if j >= 0]
            assert got == pairs
            assert float(count.score[q, k]) == pytest.approx(c, abs=1e-6)
            assert float(summed.score[q, k]) == pytest.approx(s, abs=1e-5)
            assert int(count.count[q, k]) == len(pairs)


def test_a_patch_set_matches_itself_one_to_one():
    f = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    res = mutual_nearest_neighbours(f @ f.T, threshold=0.5)
    assert res.match.tolist() == list(range(20))
    assert float(res.score) == 1.0


def test_thresholds_from_one_matching_equal_separate_matchings():
    S = torch.rand(2, 6, 16, 16) * 2 - 1
    low = mutual_nearest_neighbours(S, -1.0)
    thresholds = [-0.5, 0.0, 0.3, 0.6]
    for score in ("count", "sum"):
        many = scores_at_thresholds(low, thresholds, score)
        for t, got in zip(thresholds, many):
            torch.testing.assert_close(got, mutual_nearest_neighbours(S, t, score).score)


def test_correspondence_plan_puts_each_match_at_its_cell():
    S = torch.rand(1, 12, 10)
    res = mutual_nearest_neighbours(S, 0.3)
    plan = correspondence_plan(res.match, res.similarity, 10)[0]
    assert plan.shape == (12, 10)
    for i, j in enumerate(res.match[0].tolist()):
        row = plan[i]
        if j < 0:
            assert float(row.abs().sum()) == 0.0
        else:
            assert float(row[j]) == pytest.approx(float(S[0, i, j]) / 12)
            assert int((row > 0).sum()) == 1


def test_unknown_score_and_empty_grids_are_refused():
    with pytest.raises(ValueError, match="score must be one of"):
        mutual_nearest_neighbours(torch.rand(3, 3), 0.5, "median")
    with pytest.raises(ValueError, match="non-empty"):
        mutual_nearest_neighbours(torch.rand(0, 3), 0.5)


def _features(Q: int, K: int, n: int, d: int, seed: int = 0) -> tuple[Features, Features]:
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return Features(unit(Q, d), unit(Q, n, d)), Features(unit(Q, K, d), unit(Q, K, n, d))


def test_rerank_with_mnn_scores_counts_and_orders_by_the_final_score():
    query, cands = _features(2, 7, 16, 8)
    # candidate 3 of query 0 shares the query's patches (shuffled): every patch finds its twin
    cands.patch_features[0, 3] = query.patch_features[0][torch.randperm(16)]
    res = rerank_batch(query, cands, scorer="mnn", threshold=0.5, lam=2.0)
    assert float(res.structural_scores[0, 3]) == 1.0
    assert int(res.order[0, 0]) == 3
    S = torch.einsum("qnd,qkmd->qknm", query.patch_features, cands.patch_features)
    for q in range(2):
        for k in range(7):
            _, count, _ = oracle(S[q, k].numpy(), 0.5)
            assert float(res.structural_scores[q, k]) == pytest.approx(count, abs=1e-6)
    expected = res.global_scores + 2.0 * res.structural_scores
    torch.testing.assert_close(res.final_scores, expected)
    assert torch.equal(res.order, torch.sort(expected, dim=1, descending=True, stable=True).indices)
    plans = res.pair_plans(res.order[:, :2])
    assert plans.shape == (2, 2, 16, 16)
    mu_q, mu_x = res.pair_marginals(res.order[:, :2])
    torch.testing.assert_close(mu_q.sum(-1), torch.ones(2, 2))


def test_mnn_in_blocks_of_candidates_equals_the_oracle_on_every_pair():
    """More candidates than one CPU block (stored float16, as an index keeps them): each pair's matches are
    the oracle's, whichever block it fell in, and a NaN in a later block is still named."""
    from reranker.rerank import MNN_CPU_BLOCK

    K = 2 * MNN_CPU_BLOCK + 5
    query, cands = _features(2, K, 12, 8)
    cands.patch_features = cands.patch_features.half()
    for k in (1, MNN_CPU_BLOCK, K - 1):  # twins in the first, second and last block
        cands.patch_features[1, k] = query.patch_features[1][torch.randperm(12)].half()
    res = rerank_batch(query, cands, scorer="mnn", threshold=0.3)
    S = torch.einsum("qnd,qkmd->qknm", query.patch_features, cands.patch_features.float())
    for q in range(2):
        for k in range(K):
            pairs, count, _ = oracle(S[q, k].numpy(), 0.3)
            assert [(i, int(j)) for i, j in enumerate(res.matches.match[q, k].tolist()) if j >= 0] == pairs
            assert float(res.structural_scores[q, k]) == pytest.approx(count, abs=1e-6)
    assert [float(res.structural_scores[1, k]) for k in (1, MNN_CPU_BLOCK, K - 1)] == [1.0, 1.0, 1.0]
    cands.patch_features[0, K - 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="candidate patch features"):
        rerank_batch(query, cands, scorer="mnn", threshold=0.3)


def test_rerank_refuses_an_unknown_scorer_and_a_bad_threshold():
    query, cands = _features(1, 3, 4, 8)
    with pytest.raises(ValueError, match="scorer must be one of"):
        rerank_batch(query, cands, scorer="ransac")
    with pytest.raises(ValueError, match="threshold"):
        rerank_batch(query, cands, scorer="mnn", threshold=1.5)


def test_ot_results_carry_their_plans_and_marginals():
    query, cands = _features(1, 4, 9, 8)
    res = rerank_batch(query, cands, scorer="ot", marginals="crosscorr", s=0.7)
    top = res.order[:, :2]
    plans = res.pair_plans(top)
    torch.testing.assert_close(plans, res.plans[0, top[0]].unsqueeze(0))
    mu_q, mu_x = res.pair_marginals(top)
    # the plan moves about s of the mass, within the marginals
    assert torch.all(plans.sum(-1) <= mu_q + 1e-4) and torch.all(plans.sum(-2) <= mu_x + 1e-4)
    torch.testing.assert_close(plans.sum((-2, -1)), torch.full((1, 2), 0.7), atol=3e-3, rtol=0)
