"""The rerank function: scores, order and the errors it raises on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reranker.ot import sinkhorn
from reranker.rerank import Features, rerank, rerank_batch


def make_features(K: int = 6, n: int = 16, dim: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = Features(
        F.normalize(torch.randn(dim, generator=g), dim=-1),
        F.normalize(torch.randn(n, dim, generator=g), dim=-1),
        torch.softmax(torch.randn(n, generator=g), -1),
    )
    c = Features(
        F.normalize(torch.randn(K, dim, generator=g), dim=-1),
        F.normalize(torch.randn(K, n, dim, generator=g), dim=-1),
        torch.softmax(torch.randn(K, n, generator=g), -1),
    )
    return q, c


@pytest.mark.parametrize("marginals", ["rollout", "crosscorr", "uniform"])
@pytest.mark.parametrize("s", [1.0, 0.9])
def test_scores_and_order(marginals, s):
    q, c = make_features()
    res = rerank(q, c, marginals=marginals, s=s, lam=1.0)
    expected_global = c.global_features @ q.global_features
    torch.testing.assert_close(res.global_scores[0], expected_global, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.final_scores, res.global_scores + res.structural_scores, atol=1e-6, rtol=0)
    finals = res.final_scores[0, res.order[0]]
    assert bool((finals[:-1] >= finals[1:]).all())
    assert sorted(res.order[0].tolist()) == list(range(6))
    assert res.plans.shape == (1, 6, 16, 16)
    assert torch.allclose(res.plans.sum((-2, -1)), torch.full((1, 6), s), atol=2e-3)


def test_structural_score_is_sigma_of_the_direct_ot_problem():
    q, c = make_features()
    res = rerank(q, c, marginals="rollout", s=0.8, tol=1e-6, max_iter=3000)
    S = torch.einsum("nd,kmd->knm", q.patch_features, c.patch_features)
    direct = sinkhorn(S, q.patch_weights.expand(6, -1), c.patch_weights, s=0.8, tol=1e-6, max_iter=3000)
    torch.testing.assert_close(res.structural_scores[0], direct.sigma, atol=1e-6, rtol=0)


def test_given_global_scores_and_lambda_are_used():
    q, c = make_features()
    given = torch.linspace(1.0, 0.0, 6)
    res = rerank(q, c, given, lam=0.0)
    torch.testing.assert_close(res.final_scores[0], given)
    assert res.order[0].tolist() == list(range(6))


def test_candidate_order_does_not_change_scores():
    q, c = make_features(K=8)
    perm = torch.randperm(8)
    shuffled = Features(c.global_features[perm], c.patch_features[perm], c.patch_weights[perm])
    a = rerank(q, c, s=0.9)
    b = rerank(q, shuffled, s=0.9)
    torch.testing.assert_close(b.final_scores[0], a.final_scores[0, perm], atol=1e-6, rtol=0)
    assert perm[b.order[0]].tolist() == a.order[0].tolist()


def test_batch_of_queries_equals_one_at_a_time():
    pairs = [make_features(seed=s) for s in range(3)]
    Q = Features(*(torch.stack([getattr(p[0], f) for p in pairs]) for f in ("global_features", "patch_features", "patch_weights")))
    C = Features(*(torch.stack([getattr(p[1], f) for p in pairs]) for f in ("global_features", "patch_features", "patch_weights")))
    batch = rerank_batch(Q, C, s=0.9, tol=1e-6, max_iter=2000)
    for i, (q, c) in enumerate(pairs):
        one = rerank(q, c, s=0.9, tol=1e-6, max_iter=2000)
        torch.testing.assert_close(batch.final_scores[i], one.final_scores[0], atol=1e-5, rtol=0)


def test_half_precision_features():
    q, c = make_features()
    half = Features(c.global_features.half(), c.patch_features.half(), c.patch_weights.half())
    a = rerank(q, c)
    b = rerank(q, half)
    torch.testing.assert_close(b.final_scores, a.final_scores, atol=5e-3, rtol=0)


def test_bad_input_raises_value_error():
    q, c = make_features()
    with pytest.raises(ValueError, match=r"s must be in \(0, 1\]"):
        rerank(q, c, s=0.0)
    with pytest.raises(ValueError, match=r"s must be in \(0, 1\]"):
        rerank(q, c, s=1.01)
    with pytest.raises(ValueError, match="empty"):
        rerank(q, Features(c.global_features[:0], c.patch_features[:0], c.patch_weights[:0]))
    with pytest.raises(ValueError, match="global feature dimensions differ"):
        rerank(q, Features(c.global_features[:, :5], c.patch_features, c.patch_weights))
    with pytest.raises(ValueError, match="patch feature dimensions differ"):
        rerank(q, Features(c.global_features, c.patch_features[..., :5], c.patch_weights))
    # Patches in their own (smaller) space work with rollout marginals, not with cross-correlation.
    small_q = Features(q.global_features, q.patch_features[..., :5], q.patch_weights)
    small_c = Features(c.global_features, c.patch_features[..., :5], c.patch_weights)
    assert rerank(small_q, small_c, marginals="rollout").structural_scores.shape == (1, len(c.global_features))
    with pytest.raises(ValueError, match="need the same dimension"):
        rerank(small_q, small_c, marginals="crosscorr")
    nan = c.patch_features.clone()
    nan[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rerank(q, Features(c.global_features, nan, c.patch_weights))
    with pytest.raises(ValueError, match="marginals must be one of"):
        rerank(q, c, marginals="optimal")
    with pytest.raises(ValueError, match="need the patch weights"):
        rerank(Features(q.global_features, q.patch_features), c, marginals="rollout")
    with pytest.raises(ValueError, match="global_scores"):
        rerank(q, c, torch.zeros(5))
    with pytest.raises(ValueError, match="non-negative"):
        rerank(q, Features(c.global_features, c.patch_features, -c.patch_weights))


def test_similarity_is_the_cosines_of_every_pair():
    """The one-bmm cosines equal the per-pair products, for several queries at once."""
    from reranker.rerank import similarity

    g = torch.Generator().manual_seed(3)
    fq = F.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    fx = F.normalize(torch.randn(2, 4, 6, 8, generator=g), dim=-1)
    S = similarity(fq, fx)
    assert S.shape == (2, 4, 5, 6)
    torch.testing.assert_close(S, torch.einsum("qnd,qkmd->qknm", fq, fx), atol=1e-6, rtol=0)
    assert float(S[1, 2, 3, 4]) == pytest.approx(float(fq[1, 3] @ fx[1, 2, 4]), abs=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["query", "candidate"])
def test_non_finite_patch_features_are_named(bad, side):
    """The grids are checked through their cosines; the error still names the grid at fault."""
    q, c = make_features()
    if side == "query":
        fq = q.patch_features.clone()
        fq[4, 2] = bad
        q = Features(q.global_features, fq, q.patch_weights)
    else:
        fx = c.patch_features.clone()
        fx[1, 7, 0] = bad
        c = Features(c.global_features, fx, c.patch_weights)
    with pytest.raises(ValueError, match=f"{side} patch features contains NaN or inf"):
        rerank(q, c)
