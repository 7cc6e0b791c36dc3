"""The evaluation protocols: global top-L search, then structural reranking of the top K.

Both protocols reduce to a :class:`Ranking`: for each query, its candidates in global order
with their cosines and whether each is correct. Reranking only permutes a row's first ``K``
entries, so a variant's metrics come from the same relevance matrix, reordered.

* Class level (CUB, Cars, SOP, a folder per class): leave-one-out, every image queries all
  the others; P@1, R-Precision, MAP@R.
* Place recognition (MSLS, query/database pairs): each query searches the database of its
  own group (city); Recall@N. Queries with no positive are left out (and counted).

Images that failed to load take no part at all. The structural score of a pair does not
depend on K or lambda, so each :class:`Structural` (a scorer with its parameters) is computed
once for the largest K through the reranker's own entry point, and every (lambda, K) of the sweep
reorders with the reranker's own final score and order (:func:`reranker.rerank.final_scores`,
:func:`reranker.rerank.ranked`): what is evaluated is what a search serves.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from indexer.search_params import rerank_options, sweep_values
from reranker.features import Features, StoredFeatures
from reranker.mnn import scores_at_thresholds
from reranker.rerank import final_scores, ranked, rerank_batch

from .datasets import ClassSet, EvalSet, PlaceSet

from .features import FeatureStore
from .metrics import CLASS_METRICS, RECALL_AT, class_metrics, class_r, recall_at

PAD = -1


@dataclass(frozen=True)
class Structural:
    """One structural score of a sweep: the scorer and its parameters (all but lambda and K).

    ``marginals`` and ``s`` apply to ``ot``, ``threshold`` to ``mnn``; ``patches`` names the patch
    features when an evaluation compares several (``G=16,L=10``), else it is empty.
    """

    scorer: str = "ot"
    marginals: str = "uniform"
    s: float = 1.0
    threshold: float = 0.5
    patches: str = ""

    def label(self) -> str:
        """``s=..,marginals=..`` (ot) or ``scorer=mnn,threshold=..``, after ``patches,`` when set."""
        core = (f"s={self.s:g},marginals={self.marginals}" if self.scorer == "ot"
                else f"scorer={self.scorer},threshold={self.threshold:g}")
        return f"{self.patches},{core}" if self.patches else core

    def options(self, lam: float, eps: float) -> dict:
        """``rerank_batch``'s keyword arguments (a per-image kind is the reranker's ``rollout``)."""
        marginals, _ = rerank_marginals(self.marginals)
        return rerank_options({"scorer": self.scorer, "marginals": marginals, "s": self.s, "lam": lam, "eps": eps,
                               "threshold": self.threshold})

    @property
    def weight_kind(self) -> str | None:
        """The stored per-image weights it reads (None: none)."""
        return rerank_marginals(self.marginals)[1] if self.scorer == "ot" else None


@dataclass
class Sweep:
    """The structural variants to evaluate: every (ot: marginals x s; mnn: threshold) x lambda x K."""

    marginals: list[str]  # per-image kinds (rollout, rollout_mean, ..., uniform) and crosscorr
    s_values: list[float]
    k_values: list[int]
    lam_values: list[float] = field(default_factory=lambda: [1.0])
    eps: float = 0.05
    count_query_in_r: bool = False
    scorers: list[str] = field(default_factory=lambda: ["ot"])
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    patches: str = ""  # the patch features' label when an evaluation compares several (Structural.patches)

    def structurals(self) -> list[Structural]:
        """Every structural score of the sweep, in order."""
        out = []
        for scorer in self.scorers:
            if scorer == "ot":
                out += [Structural("ot", m, s, patches=self.patches) for m in self.marginals for s in self.s_values]
            else:
                out += [Structural(scorer, threshold=t, patches=self.patches) for t in self.thresholds]
        return out

    def __post_init__(self) -> None:
        sweep_values("scorer", self.scorers)  # the search parameters' own choices and bounds
        sweep_values("threshold", self.thresholds)
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


def variant_name(structural: Structural, k: int, lam: float | None = None) -> str:
    """``<structural label>,k=..`` (``,lambda=..`` when the sweep has several lambdas)."""
    name = f"{structural.label()},k={k}"
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
    sigma: dict[Structural, np.ndarray] = field(default_factory=dict)  # -> (Q, K) sigma


class DeviceFeatures:
    """Where an evaluation reads its rows from (not a third carrier): a :class:`StoredFeatures`' arrays
    as tensors, global vectors and weights on ``device``, patches there too when they fit
    comfortably, else gathered from the memory-mapped file per batch; :meth:`features` gathers rows
    into the torch carrier."""

    def __init__(self, store: StoredFeatures, device: torch.device) -> None:
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
    ranking: Ranking, feats: DeviceFeatures, k: int, structural: Structural, *, eps: float,
    batch: int, progress: bool = True, description: str = "reranking",
) -> np.ndarray:
    """``sigma (Q, k)`` of each query's first ``k`` candidates (padding gets a finite dummy)."""
    return structural_scores_many(ranking, feats, k, [structural], eps=eps, batch=batch, progress=progress,
                                  description=description)[structural]


def structural_scores_many(
    ranking: Ranking, feats: DeviceFeatures, k: int, structurals: Sequence[Structural], *, eps: float,
    batch: int, progress: bool = True, description: str = "reranking",
) -> dict[Structural, np.ndarray]:
    """:func:`structural_scores` of several structurals that differ only by their mnn threshold, from one
    matching at the lowest threshold (:func:`reranker.mnn.scores_at_thresholds`); one alone otherwise."""
    first = structurals[0]
    if len(structurals) > 1 and any(dataclasses.replace(st, threshold=0.0) != dataclasses.replace(first, threshold=0.0)
                                    or st.scorer != "mnn" for st in structurals):
        raise ValueError("only mnn structurals that differ by their threshold are scored together")
    run = dataclasses.replace(first, threshold=min(st.threshold for st in structurals))
    k = min(k, ranking.rows.shape[1])
    outs = {st: np.empty((len(ranking.query_rows), k), np.float32) for st in structurals}
    total = len(ranking.query_rows)
    bar = tqdm(total=total, unit="query", desc=description, disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, total, batch):
            q = torch.from_numpy(ranking.query_rows[start:start + batch])
            rows = torch.from_numpy(ranking.rows[start:start + batch, :k])
            rows = torch.where(rows == PAD, q[:, None], rows)  # a stand-in; its score stays -inf
            scores = torch.from_numpy(ranking.scores[start:start + batch, :k])
            scores = torch.where(torch.isfinite(scores), scores, torch.zeros(()))
            kind = run.weight_kind
            result = rerank_batch(feats.features(q, kind), feats.features(rows, kind), scores.to(feats.device),
                                  **run.options(1.0, eps))
            if len(structurals) == 1:
                outs[first][start:start + len(q)] = result.structural_scores.float().cpu().numpy()
            else:
                sigmas = scores_at_thresholds(result.matches, [st.threshold for st in structurals]).cpu().numpy()
                for st, sigma in zip(structurals, sigmas):
                    outs[st][start:start + len(q)] = sigma
            bar.update(len(q))
    finally:
        bar.close()
    return outs


def _scored_together(structurals: list[Structural]) -> list[list[Structural]]:
    """The structurals in groups one computation serves: the mnn thresholds of the same patches together."""
    groups: dict[Any, list[Structural]] = {}
    for st in structurals:
        key = (st.scorer, st.patches) if st.scorer == "mnn" else st
        groups.setdefault(key, []).append(st)
    return list(groups.values())


def reranked_order(ranking: Ranking, sigma: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Positions ``(Q, k)`` of each row's first ``k`` candidates by the served final order: the
    reranker's own final score (``cos + lam * sigma``) and order (stable, descending)."""
    k = min(k, sigma.shape[1])
    final = final_scores(torch.from_numpy(ranking.scores[:, :k]), torch.from_numpy(sigma[:, :k]), lam)
    return ranked(final).numpy()


def reranked_relevance(ranking: Ranking, sigma: np.ndarray, k: int, lam: float) -> np.ndarray:
    """The relevance matrix after reordering each row's first ``k`` (:func:`reranked_order`); the rest
    keeps its global order."""
    order = reranked_order(ranking, sigma, k, lam)
    head = np.take_along_axis(ranking.relevant[:, :order.shape[1]], order, axis=1)
    return np.concatenate([head, ranking.relevant[:, order.shape[1]:]], axis=1)


def evaluate(
    data: EvalSet, store: FeatureStore, sweep: Sweep, device: torch.device, *, rerank_batch_size: int | None = None,
    progress: bool = True, max_queries: int | None = None, seed: int = 0,
) -> Outcome:
    """Baseline and every variant of ``sweep`` on ``data``, from the features in ``store``; with
    ``max_queries``, on a seeded sample of that many queries (baseline and variants alike)."""
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
    if max_queries is not None and len(ranking.query_rows) > max_queries:
        keep = np.sort(np.random.default_rng(seed).choice(len(ranking.query_rows), max_queries, replace=False))
        counts["queries_sampled"] = max_queries
        ranking = Ranking(ranking.query_rows[keep], ranking.rows[keep], ranking.scores[keep], ranking.relevant[keep],
                          None if ranking.r is None else ranking.r[keep])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    search_seconds = time.perf_counter() - t0

    outcome = Outcome(data.protocol, names, metrics(ranking.relevant), {}, [], counts, ranking=ranking)
    n, dim = store.patch_features.shape[1:]
    k_eff = min(sweep.k_max, ranking.rows.shape[1])
    batch = rerank_batch_size or auto_rerank_batch(k_eff, n, dim, device)
    if k_eff < sweep.k_max:
        outcome.notes.append(f"the largest gallery has {k_eff} candidates: K above that reranks all of them")
    rerank_total, computations = 0.0, 0
    for group in _scored_together(sweep.structurals()):
        t = time.perf_counter()
        sigmas = structural_scores_many(ranking, feats, k_eff, group, eps=sweep.eps, batch=batch, progress=progress,
                                        description=f"rerank {group[0].label()}" + (" ..." if len(group) > 1 else ""))
        seconds = time.perf_counter() - t
        for structural in group:  # what any one of them costs alone: the one computation they share
            outcome.rerank_timings[structural.label()] = seconds
        rerank_total += seconds
        computations += 1
        outcome.sigma.update(sigmas)
    several = len(sweep.lam_values) > 1
    for structural, sigma in outcome.sigma.items():
        for lam in sweep.lam_values:
            for k in sweep.k_values:
                name = variant_name(structural, k, lam if several else None)
                outcome.variants[name] = metrics(reranked_relevance(ranking, sigma, k, lam))
                outcome.sweep.append({"name": name, "scorer": structural.scorer, "s": structural.s,
                                      "marginals": structural.marginals, "threshold": structural.threshold,
                                      "k": k, "lambda": lam})
    queries = len(ranking.query_rows)
    outcome.timings = {
        "search_s": search_seconds,
        "rerank_s": rerank_total,
        "rerank_queries_per_s": queries * computations / rerank_total if rerank_total > 0 else 0.0,
        "rerank_batch": batch,
    }
    return outcome
