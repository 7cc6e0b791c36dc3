"""Retrieval metrics from a ranked relevance matrix.

Every function takes ``relevant (Q, L)``: ``relevant[q, i]`` is True when the item ranked
``i``-th (0-based) for query ``q`` is correct. The query itself is never in the ranking
(leave-one-out). Metrics are fractions in ``[0, 1]``, averaged over queries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CLASS_METRICS = ("precision_at_1", "r_precision", "map_at_r")
RECALL_AT = (1, 5, 10, 20, 50, 100)


def class_r(labels: np.ndarray, count_query_in_r: bool = False) -> np.ndarray:
    """``R`` per image of a leave-one-out set: the number of *other* images of its class
    (standard), or that number plus one (``count_query_in_r``, the reference code's R)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    return r + 1 if count_query_in_r else r


def precision_at_1(relevant: np.ndarray) -> float:
    return float(np.mean(relevant[:, 0])) if len(relevant) else float("nan")


def r_precision(relevant: np.ndarray, r: np.ndarray) -> float:
    """Mean over queries of (correct among the top ``R``) / ``R``; needs ``L >= max(R)``."""
    _check_width(relevant, r)
    within = np.arange(relevant.shape[1])[None, :] < r[:, None]
    return float(np.mean((relevant & within).sum(1) / r)) if len(r) else float("nan")


def map_at_r(relevant: np.ndarray, r: np.ndarray) -> float:
    """Mean over queries of ``(1/R) * sum_{i<=R} P(i) * rel(i)``; needs ``L >= max(R)``."""
    _check_width(relevant, r)
    ranks = np.arange(1, relevant.shape[1] + 1)[None, :]
    precision = np.cumsum(relevant, axis=1) / ranks
    within = ranks <= r[:, None]
    return float(np.mean((precision * (relevant & within)).sum(1) / r)) if len(r) else float("nan")


def class_metrics(relevant: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """P@1, R-Precision and MAP@R over the queries with ``R >= 1``."""
    relevant = np.asarray(relevant, dtype=bool)
    r = np.asarray(r, dtype=np.int64)
    keep = r >= 1
    rel, r = relevant[keep], r[keep]
    return {"precision_at_1": precision_at_1(rel), "r_precision": r_precision(rel, r), "map_at_r": map_at_r(rel, r)}


def recall_at(relevant: np.ndarray, ns: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall@N: the fraction of queries with a correct item among their top ``N`` (rankings
    shorter than ``N`` count what they have)."""
    relevant = np.asarray(relevant, dtype=bool)
    hit_rank = np.where(relevant.any(1), relevant.argmax(1), np.iinfo(np.int64).max)
    return {f"recall_at_{n}": float(np.mean(hit_rank < n)) if len(relevant) else float("nan") for n in ns}


def _check_width(relevant: np.ndarray, r: np.ndarray) -> None:
    if len(r) and relevant.shape[1] < int(r.max()):
        raise ValueError(f"rankings of length {relevant.shape[1]} are shorter than the largest R ({int(r.max())})")
