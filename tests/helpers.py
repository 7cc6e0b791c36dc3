"""Problem generators shared by the tests (the benchmark's own, so both see the same problems)."""

from __future__ import annotations

from vit_rerank.bench.ot import synthetic_problem


def patch_problem(Q: int, K: int, n: int = 49, m: int = 49, dim: int = 32, spread: float = 0.8, seed: int = 0):
    """Similarities ``(Q, K, n, m)`` of clustered unit vectors and random marginals, in fp32."""
    return synthetic_problem(Q, K, n=n, m=m, dim=dim, spread=spread, seed=seed)
