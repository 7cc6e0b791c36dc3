"""Mutual nearest-neighbour matching of patch grids: the second structural scorer beside partial OT.

For a query grid ``f_q (n, D)`` and a candidate grid ``f_x (m, D)`` with cosines ``S = f_q f_x^T``:

* ``j*(i) = argmax_j S[i, j]`` is query patch ``i``'s nearest candidate patch, ``i*(j) = argmax_i S[i, j]``
  candidate patch ``j``'s nearest query patch;
* ``(i, j*(i))`` is a **match** when the two agree (``i*(j*(i)) = i``, a mutual nearest neighbour) and
  ``S[i, j*(i)] > threshold``;
* the structural score is the number of matches divided by ``n`` (``count``), or the sum of their cosines
  divided by ``n`` (``sum``): a number in ``[0, 1]`` whatever the grid.

Each query patch has at most one match and each candidate patch at most one (mutuality makes it a partial
one-to-one assignment), so the matches are the picture's correspondences as they are. Everything is
batched over ``(Q, K)`` pairs with two reductions and one gather on ``S``; no ``(n, m)`` mask is built.
Needs torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: How the matches become a score: their count, or their summed cosine, over the query's patches.
MNN_SCORES: tuple[str, ...] = ("count", "sum")


@dataclass
class MnnResult:
    """Matches of ``(..., n)`` query patches against ``(..., m)`` candidate patches.

    ``match[..., i]`` is the candidate patch matched to query patch ``i`` (-1: none) and
    ``similarity[..., i]`` its cosine (0 where there is none); ``score (...)`` the structural score.
    """

    match: torch.Tensor  # (..., n) int64
    similarity: torch.Tensor  # (..., n) float32
    score: torch.Tensor  # (...,) float32

    @property
    def count(self) -> torch.Tensor:
        """Number of matches per pair ``(...)``."""
        return (self.match >= 0).sum(-1)


def mutual_nearest_neighbours(S: torch.Tensor, threshold: float = 0.5, score: str = "count") -> MnnResult:
    """Mutual nearest neighbours of a batch of cosine matrices ``S (..., n, m)`` above ``threshold``.

    ``(i, j)`` is mutual exactly when ``S[i, j]`` is both the largest of row ``i`` and of column ``j``;
    the work is two reductions over ``S`` and gathers of length ``m``. When ``S`` is the transposed
    view :func:`reranker.rerank.similarity` returns (its memory laid out ``(..., m, n)``), both
    reductions read memory in order. Ties (equal cosines) may match a patch twice; real features
    have none. Raises ValueError for an unknown ``score`` or an empty grid.
    """
    if score not in MNN_SCORES:
        raise ValueError(f"score must be one of {', '.join(MNN_SCORES)}, got {score!r}")
    n, m = S.shape[-2:]
    if n == 0 or m == 0:
        raise ValueError("mutual nearest neighbours need non-empty patch grids")
    col_max, best_i = S.max(dim=-2)  # (..., m): each candidate patch's nearest query patch and its cosine
    row_max = S.amax(dim=-1)  # (..., n): each query patch's best cosine
    mutual = (col_max == row_max.gather(-1, best_i)) & (col_max > threshold)  # (..., m)
    # per query patch: the candidate patch it is matched to (a spare slot n collects the unmatched)
    slot = torch.where(mutual, best_i, torch.full_like(best_i, n))
    cols = torch.arange(m, device=S.device).expand_as(best_i)
    match = torch.full((*best_i.shape[:-1], n + 1), -1, dtype=torch.long, device=S.device)
    match.scatter_(-1, slot, cols)
    sim = torch.zeros((*best_i.shape[:-1], n + 1), dtype=torch.float32, device=S.device)
    sim.scatter_(-1, slot, torch.where(mutual, col_max.float(), torch.zeros((), device=S.device)))
    match, sim = match[..., :n], sim[..., :n]
    value = (match >= 0).sum(-1).float() if score == "count" else sim.sum(-1)
    return MnnResult(match, sim, value / n)


def correspondence_plan(match: torch.Tensor, similarity: torch.Tensor, m: int) -> torch.Tensor:
    """The matches as a dense ``(..., n, m)`` matrix (entry ``similarity / n`` at each match, 0 elsewhere),
    so that a picture drawn from a transport plan draws them (its strongest links are the best matches)."""
    n = match.shape[-1]
    plan = torch.zeros(*match.shape, m + 1, dtype=torch.float32, device=match.device)
    column = torch.where(match >= 0, match, torch.full_like(match, m))  # no match: a spare column, dropped
    plan.scatter_(-1, column.unsqueeze(-1), (similarity.float() / n).unsqueeze(-1))
    return plan[..., :m]


def scores_at_thresholds(result: MnnResult, thresholds: "list[float] | tuple[float, ...]",
                         score: str = "count") -> torch.Tensor:
    """The scores ``(T, ...)`` the same pairs get at each of ``thresholds``, from one matching made at a
    lower threshold: mutuality does not depend on the threshold, so a match survives a higher one exactly
    when its cosine exceeds it. (An evaluation sweeps thresholds for the price of one matching.)"""
    n = result.match.shape[-1]
    matched = result.match >= 0
    out = []
    for t in thresholds:
        keep = matched & (result.similarity > t)
        out.append((keep.sum(-1).float() if score == "count" else (result.similarity * keep).sum(-1)) / n)
    return torch.stack(out)

