"""Structural reranking: reorder global-retrieval candidates by how their patch grids match the query's.

Two scorers share one entry point, :func:`rerank_batch`, the same inputs and the same final score
``final = cos + lambda * sigma`` (:func:`final_scores`, the one place it is computed):

* ``ot``: partial optimal transport (:mod:`reranker.ot`) between the grids under patch-weight
  marginals; ``sigma`` is the transported cosine.
* ``mnn``: mutual nearest neighbours above a cosine threshold (:mod:`reranker.mnn`); ``sigma`` is
  their count (or summed cosine) over the query's patches.

The result carries what an explanation picture needs of each pair: the plan and its marginals (OT),
or the matches (MNN), through :meth:`RerankResult.pair_plans` and :meth:`RerankResult.pair_marginals`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .features import Features
from .marginals import MARGINALS, Marginals, diml_normalise, uniform_weights
from .mnn import MNN_SCORES, MnnResult, correspondence_plan, mutual_nearest_neighbours
from .ot import sinkhorn
from .rollout import normalise_weights


#: The structural scorers: partial optimal transport, mutual nearest neighbours.
SCORERS: tuple[str, ...] = ("ot", "mnn")
#: Candidates per block of the MNN scorer on the CPU. For all 100 of a search at once, the float32 copy of
#: their patches (39 MB) and their cosines (26 MB) are fresh allocations, mapped and zero-filled by the kernel
#: at every query: 35 ms of system time of an 88 ms stage (ViT-S/14, 256 x 256 patches, this project's
#: 2-core CPU). Blocks of 16 (6 + 4 MB) reuse the allocator's memory: 66 ms, 0.1 ms of it in the kernel.
MNN_CPU_BLOCK = 16


@dataclass
class RerankResult:
    """Scores of ``Q`` queries' ``K`` candidates, in the candidates' given order.

    ``order[q]`` lists candidate positions by decreasing final score (ties keep the given order).
    An ``ot`` result has ``plans`` and ``marginals``; an ``mnn`` result has ``matches``.
    """

    order: torch.Tensor  # (Q, K) int64
    global_scores: torch.Tensor  # (Q, K)
    structural_scores: torch.Tensor  # (Q, K): sigma
    final_scores: torch.Tensor  # (Q, K): global + lambda * sigma
    plans: torch.Tensor | None = None  # (Q, K, n, m) ot
    marginals: tuple[torch.Tensor, torch.Tensor] | None = None  # ot: mu_q (Q, K or 1, n), mu_x (Q, K, m), unit mass
    matches: MnnResult | None = None  # mnn: (Q, K, n) matched candidate patch per query patch
    marginal_error: torch.Tensor | None = None  # (Q, K) ot
    n_iter: int = 0
    grid_sizes: tuple[int, int] = (0, 0)  # (n, m)

    def pair_plans(self, positions: torch.Tensor) -> torch.Tensor:
        """The correspondence matrices ``(Q, t, n, m)`` of the candidates at ``positions (Q, t)``: the
        transport plans (ot), or the matches with their cosine / n (mnn)."""
        if self.plans is not None:
            n, m = self.plans.shape[-2:]
            return self.plans.gather(1, positions[:, :, None, None].expand(-1, -1, n, m))
        match = self.matches.match.gather(1, positions[:, :, None].expand(-1, -1, self.grid_sizes[0]))
        sim = self.matches.similarity.gather(1, positions[:, :, None].expand(-1, -1, self.grid_sizes[0]))
        return correspondence_plan(match, sim, self.grid_sizes[1])

    def pair_marginals(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch masses ``(Q, t, n)``, ``(Q, t, m)`` the scorer weighed the candidates at ``positions``
        with: the OT marginals, or (mnn, which weighs every patch alike) uniform ones."""
        Q, t = positions.shape
        n, m = self.grid_sizes
        if self.marginals is None:
            device = positions.device
            return uniform_weights((Q, t), n, device), uniform_weights((Q, t), m, device)
        mu_q, mu_x = self.marginals
        mu_q = mu_q.expand(-1, mu_x.shape[1], -1)
        return (mu_q.gather(1, positions[:, :, None].expand(-1, -1, n)),
                mu_x.gather(1, positions[:, :, None].expand(-1, -1, m)))


def final_scores(global_scores: torch.Tensor, sigma: torch.Tensor, lam: float) -> torch.Tensor:
    """``cos + lambda * sigma``: the one definition of a reranked candidate's final score."""
    return global_scores + lam * sigma


def ranked(final: torch.Tensor) -> torch.Tensor:
    """Positions by decreasing final score along the last axis; ties keep the given (global) order."""
    return torch.sort(final, dim=-1, descending=True, stable=True).indices


def _check_finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and not torch.isfinite(t.float().sum()):
        raise ValueError(f"{name} contains NaN or inf")


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    """Rescale to unit mass (all-zero becomes uniform), refusing negative weights."""
    weights = weights.float()
    if float(weights.min()) < 0:
        raise ValueError("patch weights must be non-negative")
    return normalise_weights(weights)


def _validate(query: Features, cands: Features, global_scores: torch.Tensor | None) -> None:
    gq, fq = query.global_features, query.patch_features
    gx, fx = cands.global_features, cands.patch_features
    if gq.dim() != 2 or fq.dim() != 3:
        raise ValueError(f"query features must be (Q, D) and (Q, n, D), got {tuple(gq.shape)}, {tuple(fq.shape)}")
    if gx.dim() != 3 or fx.dim() != 4:
        raise ValueError(
            f"candidate features must be (Q, K, D) and (Q, K, m, D), got {tuple(gx.shape)}, {tuple(fx.shape)}"
        )
    Q, K = gx.shape[:2]
    if K == 0:
        raise ValueError("the candidate list is empty")
    if gq.shape[0] != Q or fq.shape[0] != Q or fx.shape[:2] != (Q, K):
        raise ValueError("queries and candidates disagree on the number of queries or candidates")
    # Global and patch vectors may live in different spaces (patches reduced by a PCA), but
    # each must match its counterpart.
    if gq.shape[-1] != gx.shape[-1]:
        raise ValueError(f"global feature dimensions differ: query {gq.shape[-1]}, candidates {gx.shape[-1]}")
    if fq.shape[-1] != fx.shape[-1]:
        raise ValueError(f"patch feature dimensions differ: query {fq.shape[-1]}, candidates {fx.shape[-1]}")
    if global_scores is not None and tuple(global_scores.shape) != (Q, K):
        raise ValueError(f"global_scores must be ({Q}, {K}), got {tuple(global_scores.shape)}")
    if query.patch_weights is not None and query.patch_weights.shape != fq.shape[:-1]:
        raise ValueError(f"query patch weights must be {tuple(fq.shape[:-1])}")
    if cands.patch_weights is not None and cands.patch_weights.shape != fx.shape[:-1]:
        raise ValueError(f"candidate patch weights must be {tuple(fx.shape[:-1])}")
    # The patch grids (the bulk of the input) are checked through their cosines: see _check_similarity.
    for name, t in (
        ("query global features", gq), ("candidate global features", gx),
        ("query patch weights", query.patch_weights), ("candidate patch weights", cands.patch_weights),
        ("global scores", global_scores),
    ):
        _check_finite(name, t)


def similarity(fq: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """Cosines ``S[q, k, i, j] = fq[q, i] . fx[q, k, j]`` of ``(Q, n, D)`` and ``(Q, K, m, D)`` in one bmm.

    ``(Q, K*m, D) @ (Q, D, n)`` is one GEMM per query (the query's grid is shared by its K
    candidates) instead of K small ones; the result is ``S^T`` laid out ``(Q, K, m, n)`` and
    comes back as the ``(Q, K, n, m)`` view, which the solver turns into its kernel and transpose.
    """
    return _cosines(fq, fx)[0]


def _cosines(
    fq: torch.Tensor, fx: torch.Tensor, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`similarity`, and with ``extra (Q, D)`` also ``extra[q] . fx[q, k, j]`` ``(Q, K, m)``
    from the same GEMM (one more column: ``fx``, the bulk, is read once)."""
    Q, K, m, D = fx.shape
    n = fq.shape[1]
    rhs = fq if extra is None else torch.cat([fq, extra.unsqueeze(1)], dim=1)  # (Q, n [+1], D)
    st = torch.bmm(fx.reshape(Q, K * m, D), rhs.transpose(1, 2)).view(Q, K, m, -1)  # (Q, K, m, n [+1])
    S = st[..., :n].transpose(-1, -2)
    return S, None if extra is None else st[..., n]


def _crosscorr_marginals(query: Features, cands: Features, fq: torch.Tensor, fx: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosines and DIML's marginals together: ``S (Q, K, n, m)``, ``mu_q (Q, K, n)``, ``mu_x (Q, K, m)``.

    ``g_q . f_x`` rides along the cosine GEMM as one more query column and ``f_q . g_x`` is a
    small ``(Q, K, D) @ (Q, D, n)`` bmm: the same weights as
    :func:`reranker.marginals.cross_correlation_weights` without a second pass over ``fx``."""
    _check_crosscorr_dims(query)
    S, gq_fx = _cosines(fq, fx, query.global_features.float())
    fq_gx = torch.bmm(cands.global_features.float(), fq.transpose(1, 2))  # (Q, K, n)
    return S, diml_normalise(fq_gx), diml_normalise(gq_fx)


def _check_crosscorr_dims(query: Features) -> None:
    if query.global_features.shape[-1] != query.patch_features.shape[-1]:
        raise ValueError(
            "cross-correlation marginals compare global vectors with patch vectors, which need the same "
            f"dimension (here {query.global_features.shape[-1]} and {query.patch_features.shape[-1]}, "
            "e.g. patches reduced by a PCA): use rollout or uniform marginals"
        )


def _mnn_in_blocks(fq: torch.Tensor, fx: torch.Tensor, threshold: float, mnn_score: str) -> MnnResult:
    """Mutual nearest neighbours of ``fq (Q, n, D)`` against ``fx (Q, K, m, D)`` (any float dtype), a block of
    :data:`MNN_CPU_BLOCK` candidates at a time on the CPU (all at once elsewhere): each pair's matches are
    the same, since a pair's cosines never depend on the other candidates."""
    step = fx.shape[1] if fx.device.type != "cpu" else MNN_CPU_BLOCK
    parts = []
    for start in range(0, fx.shape[1], step):
        block = fx[:, start:start + step].float()  # (Q, k, m, D)
        S = similarity(fq, block)  # (Q, k, n, m)
        _check_similarity(S, fq, block)
        parts.append(mutual_nearest_neighbours(S, threshold, mnn_score))
    if len(parts) == 1:
        return parts[0]
    return MnnResult(*(torch.cat([getattr(part, name) for part in parts], dim=1)
                       for name in ("match", "similarity", "score")))


def _check_similarity(S: torch.Tensor, fq: torch.Tensor, fx: torch.Tensor) -> None:
    """A NaN or inf in either grid makes a row or column of ``S`` non-finite (``inf * 0`` is NaN),
    so the solver's one pass over ``S`` (``Q*K*n*m``, its range) stands for a pass over the grids
    (``Q*K*m*D``); when it refuses ``S``, this names the grid at fault."""
    if torch.isfinite(S.sum()):
        return
    _check_finite("query patch features", fq)
    _check_finite("candidate patch features", fx)
    raise ValueError("patch features give non-finite cosines (are they L2-normalised?)")


def _marginals(query: Features, cands: Features, kind: str, fx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu_q, mu_x)`` of the per-image kinds (``uniform``, ``rollout``); ``fx (Q, K, m, D)``."""
    Q, K, m = fx.shape[:3]
    n = query.patch_features.shape[1]
    device = fx.device
    if kind == "uniform":
        return uniform_weights((Q, 1), n, device), uniform_weights((Q, K), m, device)
    if query.patch_weights is None or cands.patch_weights is None:
        raise ValueError("rollout marginals need the patch weights of the query and of every candidate")
    return query.patch_weights.unsqueeze(1), cands.patch_weights


def rerank_batch(
    query: Features,
    candidates: Features,
    global_scores: torch.Tensor | None = None,
    *,
    scorer: str = "ot",
    marginals: Marginals = "rollout",
    s: float = 1.0,
    lam: float = 1.0,
    eps: float = 0.05,
    threshold: float = 0.5,
    mnn_score: str = "count",
    max_iter: int = 1000,
    tol: float = 2e-4,
) -> RerankResult:
    """Rerank ``K`` candidates for each of ``Q`` queries by ``global + lam * sigma``.

    Args:
        query: features with shapes ``(Q, D)``, ``(Q, n, D)``, ``(Q, n)``.
        candidates: features with shapes ``(Q, K, D)``, ``(Q, K, m, D)``, ``(Q, K, m)``.
        global_scores: ``(Q, K)`` first-stage cosines; computed from the global vectors if None.
        scorer: ``ot`` (partial optimal transport) or ``mnn`` (mutual nearest neighbours).
        marginals: ot: ``rollout`` (stored per-image weights), ``crosscorr`` (DIML, per pair) or ``uniform``.
        s: ot: fraction of mass matched by partial OT, in ``(0, 1]``.
        lam: weight of the structural score.
        eps, max_iter, tol: ot: Sinkhorn settings (see :func:`reranker.ot.sinkhorn`).
        threshold, mnn_score: mnn: the cosine a match must exceed, and ``count`` or ``sum``.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if marginals not in MARGINALS:
        raise ValueError(f"marginals must be one of {', '.join(MARGINALS)}, got {marginals!r}")
    if not (0.0 < s <= 1.0) or math.isnan(s):
        raise ValueError(f"s must be in (0, 1], got {s}")
    if not math.isfinite(lam):
        raise ValueError(f"lambda must be finite, got {lam}")
    if not (-1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
    if mnn_score not in MNN_SCORES:
        raise ValueError(f"mnn_score must be one of {', '.join(MNN_SCORES)}, got {mnn_score!r}")
    _validate(query, candidates, global_scores)

    gq = query.global_features.float()
    gx = candidates.global_features.float()
    if global_scores is None:
        global_scores = torch.einsum("qd,qkd->qk", gq, gx)
    global_scores = global_scores.float().to(gx.device)
    fq = query.patch_features.float()  # (Q, n, D)
    sizes = (fq.shape[1], candidates.patch_features.shape[2])
    if scorer == "mnn":
        matches = _mnn_in_blocks(fq, candidates.patch_features, threshold, mnn_score)
        final = final_scores(global_scores, matches.score, lam)
        return RerankResult(ranked(final), global_scores, matches.score, final, matches=matches, grid_sizes=sizes)
    fx = candidates.patch_features.float()  # (Q, K, m, D)
    if marginals == "crosscorr":
        S, mu_q, mu_x = _crosscorr_marginals(query, candidates, fq, fx)  # S (Q, K, n, m)
    else:
        S = similarity(fq, fx)
        mu_q, mu_x = _marginals(query, candidates, marginals, fx)
    mu_q, mu_x = _normalised(mu_q), _normalised(mu_x)
    try:  # the solver checks S in the pass that reads its range; only a refusal pays for naming the culprit
        result = sinkhorn(S, mu_q, mu_x, eps=eps, s=s, max_iter=max_iter, tol=tol)
    except ValueError:
        _check_similarity(S, fq, fx)
        raise
    final = final_scores(global_scores, result.sigma, lam)
    return RerankResult(
        order=ranked(final),
        global_scores=global_scores,
        structural_scores=result.sigma,
        final_scores=final,
        plans=result.plan,
        marginals=(mu_q, mu_x),
        marginal_error=result.marginal_error,
        n_iter=result.n_iter,
        grid_sizes=sizes,
    )


def rerank(
    query: Features,
    candidates: Features,
    global_scores: torch.Tensor | None = None,
    **kwargs,
) -> RerankResult:
    """Rerank one query's candidates: ``(D), (n, D), (n)`` against ``(K, D), (K, m, D), (K, m)``.

    Same keyword arguments as :func:`rerank_batch`; the result keeps a leading query axis of 1.
    """
    if query.global_features.dim() != 1:
        raise ValueError("rerank takes one query: global features (D,); use rerank_batch for several")
    scores = None if global_scores is None else global_scores.unsqueeze(0)
    return rerank_batch(query.unsqueeze(0), candidates.unsqueeze(0), scores, **kwargs)
