"""The evaluation protocols: global top-L search, then structural reranking of the top K.

Both protocols reduce to a :class:`Ranking`: for each query, its candidates in global order
with their cosines and whether each is correct. Reranking only permutes a row's first ``K``
entries, so a variant's metrics come from the same relevance matrix, reordered.

* Class level (CUB, Cars, SOP, a folder per class): leave-one-out, every image queries all
  the others; P@1, R-Precision, MAP@R.
* Place recognition (MSLS, query/database pairs): each query searches the database of its
  own group (city); Recall@N. Queries with no positive are left out (and counted).

Images that failed to load take no part at all. The structural score of a pair does not
depend on K, so each (marginals, s) is solved once for the largest K and every K of the
sweep reuses it; candidates beyond K keep their global order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from reranker.rerank import Features, rerank_batch

from .datasets import ClassSet, EvalSet, PlaceSet
from .features import FeatureStore
from .metrics import CLASS_METRICS, RECALL_AT, class_metrics, class_r, recall_at

PAD = -1


@dataclass
class Sweep:
    """The structural variants to evaluate: every marginals x s x K."""

    marginals: list[str]  # per-image kinds (rollout, rollout_mean, ..., uniform) and crosscorr
    s_values: list[float]
    k_values: list[int]
    lam_values: list[float] = field(default_factory=lambda: [1.0])
    eps: float = 0.05
    count_query_in_r: bool = False

    def __post_init__(self) -> None:
        if not self.marginals or not self.s_values or not self.k_values:
            raise ValueError("the sweep needs at least one marginals kind, one s and one K")
        if bad := [s for s in self.s_values if not (0.0 < s <= 1.0)]:
            raise ValueError(f"s must be in (0, 1], got {bad[0]}")
        if bad := [k for k in self.k_values if k < 1]:
            raise ValueError(f"K must be at least 1, got {bad[0]}")
        if not self.lam_values:
            raise ValueError("the sweep needs at least one lambda")
        if bad := [lam for lam in self.lam_values if not math.isfinite(lam) or lam < 0]:
            raise ValueError(f"lambda must be finite and non-negative, got {bad[0]}")

    @property
    def k_max(self) -> int:
        return max(self.k_values)


def variant_name(s: float, marginals: str, k: int, lam: float | None = None) -> str:
    """``s=..,marginals=..,k=..`` (``,lambda=..`` when the sweep has several lambdas)."""
    name = f"s={s:g},marginals={marginals},k={k}"
    return name if lam is None else f"{name},lambda={lam:g}"


def rerank_marginals(marginals: str) -> tuple[str, str | None]:
    """An evaluation marginal as (the reranker's marginals, the per-image weight kind it reads)."""
    if marginals in ("crosscorr", "uniform"):
        return marginals, None
    return "rollout", marginals


@dataclass
class Ranking:
    """Candidates per query in global order: feature-store rows (``PAD`` past the end of a
    short gallery), cosines (``-inf`` at padding) and correctness."""

    query_rows: np.ndarray  # (Q,)
    rows: np.ndarray  # (Q, L)
    scores: np.ndarray  # (Q, L) float32
    relevant: np.ndarray  # (Q, L) bool
    r: np.ndarray | None = None  # (Q,) R per query (class level)


@dataclass
class Outcome:
    """Metrics of the baseline and of every variant, with counts and timings."""

    protocol: str
    metric_names: list[str]
    baseline: dict[str, float]
    variants: dict[str, dict[str, float]]
    sweep: list[dict]
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    rerank_timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ranking: Ranking | None = None  # the global ranking the variants reorder
    sigma: dict[tuple[str, float], np.ndarray] = field(default_factory=dict)  # (marginals, s) -> (Q, K) sigma


class DeviceFeatures:
    """The store's arrays as tensors: global vectors and weights on ``device``; patches there too
    when they fit comfortably, else gathered from the memory-mapped file per batch."""

    def __init__(self, store: FeatureStore, device: torch.device) -> None:
        self.device = device
        self.global_features = torch.from_numpy(store.global_features).to(device)
        self.patch_weights = {k: torch.from_numpy(w).to(device) for k, w in store.patch_weights.items()}
        patches = torch.from_numpy(store.patch_features)
        if device.type == "cuda" and patches.numel() * 2 < 0.4 * torch.cuda.mem_get_info(device)[0]:
            patches = patches.to(device)
        self.patch_features = patches

    def patches(self, rows: torch.Tensor) -> torch.Tensor:
        return self.patch_features[rows.to(self.patch_features.device)].to(self.device, torch.float32)

    def features(self, rows: torch.Tensor, kind: str | None = None) -> Features:
        """Global vectors, patches and ``kind`` weights (None: none) of the store rows ``rows``
        (any shape), on ``device``."""
        on_device = rows.to(self.device)
        weights = None if kind is None else self.patch_weights[kind][on_device]
        return Features(self.global_features[on_device], self.patches(rows), weights)


def top_candidates(
    queries: torch.Tensor, gallery: torch.Tensor, length: int, exclude: torch.Tensor | None = None, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``length`` gallery positions by cosine for each query, best first; ``exclude[q]``
    (a gallery position) is never returned (leave-one-out). Returns ``(scores, positions)``."""
    length = min(length, gallery.shape[0] - (exclude is not None))
    scores, positions = [], []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ gallery.T
        if exclude is not None:
            sim[torch.arange(sim.shape[0], device=sim.device), exclude[start:start + chunk]] = -math.inf
        top = torch.topk(sim, length, dim=1, largest=True, sorted=True)
        scores.append(top.values.cpu())
        positions.append(top.indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(positions).numpy()


def class_ranking(data: ClassSet, store: FeatureStore, feats: DeviceFeatures, k_max: int,
                  count_query_in_r: bool) -> tuple[Ranking, dict[str, int]]:
    """Leave-one-out rankings over the images that loaded, long enough for K and for every R."""
    good = np.flatnonzero(store.ok)
    labels = data.labels[good]
    r = class_r(labels, count_query_in_r)
    r_other = class_r(labels)
    queries = np.flatnonzero(r_other >= 1)  # an image alone in its class has nothing to find
    counts = {"images": len(data.records), "images_failed": int((~store.ok).sum()), "images_used": len(good),
              "queries": len(queries), "queries_without_match": int(len(good) - len(queries))}
    if len(queries) == 0:
        raise ValueError("no class has two images that loaded: nothing to evaluate")
    gallery = feats.global_features[torch.from_numpy(good).to(feats.device)]
    length = max(k_max, int(r[queries].max()))
    q_pos = torch.from_numpy(queries).to(feats.device)
    scores, positions = top_candidates(gallery[q_pos], gallery, length, exclude=q_pos)
    relevant = labels[positions] == labels[queries][:, None]
    if relevant.shape[1] < length:  # the ranking is the whole gallery: nothing else can match
        pad = length - relevant.shape[1]
        relevant = np.pad(relevant, ((0, 0), (0, pad)))
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=PAD)
    rows = np.where(positions == PAD, PAD, good[np.maximum(positions, 0)])
    return Ranking(good[queries], rows, scores.astype(np.float32), relevant, r[queries]), counts


def place_ranking(data: PlaceSet, store: FeatureStore, feats: DeviceFeatures, k_max: int,
                  recall_ns: Sequence[int] = RECALL_AT) -> tuple[Ranking, dict[str, int]]:
    """Per-group rankings of each query's database (query rows come first in the store)."""
    nq = len(data.queries)
    q_ok, db_ok = store.ok[:nq], store.ok[nq:]
    length = max(k_max, max(recall_ns))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    no_positive = 0
    for group in range(len(data.group_names)):
        db = np.flatnonzero((data.database_groups == group) & db_ok)
        candidates = np.flatnonzero((data.query_groups == group) & q_ok)
        usable = set(db.tolist())
        queries = np.array([q for q in candidates if any(int(p) in usable for p in data.positives[q])], dtype=np.int64)
        no_positive += len(candidates) - len(queries)
        if len(queries) == 0:
            continue
        gallery = feats.global_features[torch.from_numpy(db + nq).to(feats.device)]
        scores, positions = top_candidates(feats.global_features[torch.from_numpy(queries).to(feats.device)],
                                           gallery, length)
        found = db[positions]
        relevant = np.stack([np.isin(found[i], data.positives[q]) for i, q in enumerate(queries)])
        parts.append((queries, found + nq, scores, relevant))
    counts = {"queries": nq, "database": len(data.database), "queries_failed": int((~q_ok).sum()),
              "database_failed": int((~db_ok).sum()), "queries_without_positive": no_positive}
    if not parts:
        raise ValueError("no query has a positive among the database images that loaded: nothing to evaluate")
    width = max(p[1].shape[1] for p in parts)

    def pad(a: np.ndarray, value) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

    ranking = Ranking(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([pad(p[1], PAD) for p in parts]),
        np.concatenate([pad(p[2], -np.inf) for p in parts]).astype(np.float32),
        np.concatenate([pad(p[3], False) for p in parts]),
    )
    counts["queries_evaluated"] = len(ranking.query_rows)
    return ranking, counts


def auto_rerank_batch(k: int, n: int, dim: int, device: torch.device) -> int:
    """Queries per reranking batch: candidates' patches and the solver's ``(Q, K, n, n)``
    arrays within a budget of 256 MiB on a CPU, 4 GiB on a GPU."""
    budget = (4 << 30) if device.type == "cuda" else (256 << 20)
    per_query = k * (n * dim * 4 * 2 + n * n * 4 * 8)
    return max(1, budget // per_query)


def structural_scores(
    ranking: Ranking, feats: DeviceFeatures, k: int, marginals: str, s: float, *, lam: float, eps: float,
    batch: int, progress: bool = True, description: str = "reranking",
) -> np.ndarray:
    """``sigma (Q, k)`` of each query's first ``k`` candidates (padding gets a finite dummy)."""
    k = min(k, ranking.rows.shape[1])
    out = np.empty((len(ranking.query_rows), k), np.float32)
    bar = tqdm(total=len(out), unit="query", desc=description, disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(out), batch):
            q = torch.from_numpy(ranking.query_rows[start:start + batch])
            rows = torch.from_numpy(ranking.rows[start:start + batch, :k])
            rows = torch.where(rows == PAD, q[:, None], rows)  # a stand-in; its score stays -inf
            scores = torch.from_numpy(ranking.scores[start:start + batch, :k])
            scores = torch.where(torch.isfinite(scores), scores, torch.zeros(()))
            mode, kind = rerank_marginals(marginals)
            result = rerank_batch(feats.features(q, kind), feats.features(rows, kind), scores.to(feats.device),
                                  marginals=mode, s=s, lam=lam, eps=eps)
            out[start:start + len(q)] = result.structural_scores.float().cpu().numpy()
            bar.update(len(q))
    finally:
        bar.close()
    return out


def reranked_relevance(ranking: Ranking, sigma: np.ndarray, k: int, lam: float) -> np.ndarray:
    """The relevance matrix after reordering each row's first ``k`` by ``cos + lam * sigma``
    (stable, descending); the rest keeps its global order."""
    k = min(k, sigma.shape[1])
    final = ranking.scores[:, :k] + np.float32(lam) * sigma[:, :k]
    order = np.argsort(-final, axis=1, kind="stable")
    head = np.take_along_axis(ranking.relevant[:, :k], order, axis=1)
    return np.concatenate([head, ranking.relevant[:, k:]], axis=1)


def evaluate(
    data: EvalSet, store: FeatureStore, sweep: Sweep, device: torch.device, *, rerank_batch_size: int | None = None,
    progress: bool = True,
) -> Outcome:
    """Baseline and every variant of ``sweep`` on ``data``, from the features in ``store``."""
    feats = DeviceFeatures(store, device)
    t0 = time.perf_counter()
    if isinstance(data, ClassSet):
        ranking, counts = class_ranking(data, store, feats, sweep.k_max, sweep.count_query_in_r)
        names = list(CLASS_METRICS)

        def metrics(relevant: np.ndarray) -> dict[str, float]:
            return class_metrics(relevant, ranking.r)
    else:
        ranking, counts = place_ranking(data, store, feats, sweep.k_max)
        names = [f"recall_at_{n}" for n in RECALL_AT]

        def metrics(relevant: np.ndarray) -> dict[str, float]:
            return recall_at(relevant)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    search_seconds = time.perf_counter() - t0

    outcome = Outcome(data.protocol, names, metrics(ranking.relevant), {}, [], counts, ranking=ranking)
    n, dim = store.patch_features.shape[1:]
    k_eff = min(sweep.k_max, ranking.rows.shape[1])
    batch = rerank_batch_size or auto_rerank_batch(k_eff, n, dim, device)
    if k_eff < sweep.k_max:
        outcome.notes.append(f"the largest gallery has {k_eff} candidates: K above that reranks all of them")
    rerank_total = 0.0
    for marginals in sweep.marginals:
        for s in sweep.s_values:
            label = f"s={s:g},marginals={marginals}"
            t = time.perf_counter()
            sigma = structural_scores(ranking, feats, k_eff, marginals, s, lam=1.0, eps=sweep.eps, batch=batch,
                                      progress=progress, description=f"rerank {label}")
            seconds = time.perf_counter() - t
            outcome.rerank_timings[label] = seconds
            rerank_total += seconds
            outcome.sigma[(marginals, s)] = sigma
            several = len(sweep.lam_values) > 1
            for lam in sweep.lam_values:
                for k in sweep.k_values:
                    name = variant_name(s, marginals, k, lam if several else None)
                    outcome.variants[name] = metrics(reranked_relevance(ranking, sigma, k, lam))
                    outcome.sweep.append({"name": name, "s": s, "marginals": marginals, "k": k, "lambda": lam})
    queries = len(ranking.query_rows)
    outcome.timings = {
        "search_s": search_seconds,
        "rerank_s": rerank_total,
        "rerank_queries_per_s": queries * len(outcome.rerank_timings) / rerank_total if rerank_total > 0 else 0.0,
        "rerank_batch": batch,
    }
    return outcome
