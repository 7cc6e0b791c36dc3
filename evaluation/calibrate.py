"""Calibration that never loses: choose a reranking setting on half the queries, check it on the other.

Given a global :class:`~evaluation.protocol.Ranking` and the structural scores ``sigma`` of each
:class:`~evaluation.protocol.Structural` (ot: marginals, s; mnn: threshold) over every query's first K
candidates, every (structural, lambda, K) is scored by the primary metric per query. The queries are split (seeded) into a tuning half and a held-out half:

1. on the tuning half, a setting is *above noise* when the one-sided 95 % paired-bootstrap lower bound
   of its mean gain over the baseline is above 0; the best such setting (by mean metric) is chosen;
2. on the held-out half, the chosen setting's gain and its 95 % interval are measured; should the
   held-out gain be negative, the choice falls back to "no rerank". No setting above noise: "no rerank".

So a calibrated index never does worse than the plain global search on the queries it was not tuned on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from indexer.calibration import Calibration
from indexer.metadata import now_iso

from indexer.search_params import sweep_values
from reranker.defaults import OT_MAX_PATCHES  # noqa: F401 (re-exported: OT is swept only on grids this small)

from .protocol import Ranking, Structural, reranked_relevance

#: The metric a calibration maximises, per protocol.
PRIMARY_METRIC = {"class": "precision_at_1", "place": "recall_at_1"}

#: The grids a calibration and ``bench quality`` search, checked against the parameters' declared bounds.
S_GRID = tuple(sweep_values("s", (1.0, 0.9, 0.7, 0.5, 0.3)))
LAMBDA_GRID = tuple(sweep_values("lam", (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)))
K_GRID = tuple(sweep_values("rerank_k", (10, 20, 50, 100)))
THRESHOLD_GRID = tuple(sweep_values("threshold", (0.3, 0.5, 0.6, 0.7, 0.8)))


def per_query_metric(relevant: np.ndarray, metric: str, r: np.ndarray | None = None) -> np.ndarray:
    """The metric of each query ``(Q,)`` from its ranked relevance ``(Q, L)`` (see :mod:`evaluation.metrics`)."""
    relevant = np.asarray(relevant, dtype=bool)
    if metric == "precision_at_1":
        return relevant[:, 0].astype(np.float64)
    if metric.startswith("recall_at_"):
        n = int(metric.removeprefix("recall_at_"))
        return relevant[:, :n].any(axis=1).astype(np.float64)
    if metric == "map_at_r":
        if r is None:
            raise ValueError("MAP@R needs R per query")
        ranks = np.arange(1, relevant.shape[1] + 1)[None, :]
        precision = np.cumsum(relevant, axis=1) / ranks
        within = ranks <= r[:, None]
        return (precision * (relevant & within)).sum(axis=1) / np.maximum(r, 1)
    raise ValueError(f"no per-query form for metric {metric!r}")


def bootstrap_means(diff: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the per-query differences ``diff``."""
    if len(diff) == 0:
        return np.zeros(n_boot)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    return diff[idx].mean(axis=1)


@dataclass(frozen=True)
class Setting:
    """One reranking setting a calibration may choose."""

    structural: Structural
    lam: float
    k: int


def split_queries(n: int, seed: int, tune_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of query positions into (tuning, held-out)."""
    if n < 4:
        raise ValueError(f"calibration needs at least 4 labelled queries with a match, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * tune_fraction))
    return np.sort(order[:cut]), np.sort(order[cut:])


def calibrate(
    ranking: Ranking,
    sigma: dict[Structural, np.ndarray],
    protocol: str,
    *,
    lambdas: Sequence[float] = LAMBDA_GRID,
    ks: Sequence[int] = K_GRID,
    seed: int = 0,
    n_boot: int = 2000,
    source: str = "",
) -> Calibration:
    """Choose the setting that beats the baseline above noise on the tuning half (see the module docstring).

    Args:
        ranking: the global ranking of every labelled query.
        sigma: ``structural -> (Q, K_max)`` scores of each query's first candidates.
        protocol: ``class`` or ``place`` (picks the primary metric).
    """
    metric = PRIMARY_METRIC[protocol]
    rng = np.random.default_rng(seed + 1)
    tune, held = split_queries(len(ranking.query_rows), seed)
    base = per_query_metric(ranking.relevant, metric, ranking.r)
    width = min(a.shape[1] for a in sigma.values())
    ks_eff = sorted({min(k, width) for k in ks})  # K past the candidates there are reranks them all
    settings = [Setting(st, lam, k) for st, lam, k in itertools.product(sigma, lambdas, ks_eff)]
    scores: dict[Setting, np.ndarray] = {}
    passing: list[Setting] = []
    for st in settings:
        relevant = reranked_relevance(ranking, sigma[st.structural], st.k, st.lam)
        scores[st] = per_query_metric(relevant, metric, ranking.r)
        gain = scores[st][tune] - base[tune]
        if gain.mean() > 0 and np.quantile(bootstrap_means(gain, n_boot, rng), 0.05) > 0:
            passing.append(st)
    chosen = max(passing, key=lambda st: (scores[st][tune].mean(), -st.lam), default=None)
    held_gain = (scores[chosen][held] - base[held]) if chosen is not None else np.zeros(len(held))
    rerank = bool(chosen is not None and held_gain.mean() >= 0)
    if not rerank:
        held_gain = np.zeros(len(held))
    boots = bootstrap_means(held_gain, n_boot, rng)
    details = {
        "baseline_tuning": float(base[tune].mean()),
        "calibrated_tuning": float(scores[chosen][tune].mean()) if chosen is not None else float(base[tune].mean()),
        "rejected_on_heldout": chosen is not None and not rerank,
    }
    if chosen is not None:
        details["considered"] = {"structural": chosen.structural.label(), "lam": chosen.lam, "k": chosen.k}
    pick = chosen if rerank else None
    return Calibration(
        rerank=rerank,
        scorer=pick.structural.scorer if pick else "ot",
        threshold=pick.structural.threshold if pick and pick.structural.scorer == "mnn" else None,
        marginals=pick.structural.marginals if pick else "uniform",
        s=pick.structural.s if pick else 1.0,
        lam=pick.lam if pick else 0.0,
        rerank_k=pick.k if pick else 0,
        metric=metric,
        baseline_heldout=float(base[held].mean()),
        calibrated_heldout=float(base[held].mean() + held_gain.mean()),
        gain_heldout=float(held_gain.mean()),
        gain_ci95=(float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))),
        tuning_queries=len(tune),
        heldout_queries=len(held),
        seed=seed,
        source=source,
        candidates_tried=len(settings),
        candidates_above_noise=len(passing),
        created_at=now_iso(),
        details=details,
    )
