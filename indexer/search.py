"""Query an index: embed, top K by FAISS, rerank the K by partial OT, return scored results."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from reranker.backbones import Backbone
from reranker.rerank import Features, RerankResult, rerank_batch

from .embedding import embed_pil_images
from .calibration import Calibration
from .gallery import Gallery
from .patch_store import Gathered
from .search_params import DEFAULT_MARGINALS, SEARCH_PARAMS, default
from .vector_index import VectorSearcher


@dataclass(frozen=True)
class SearchSettings:
    """Query-time knobs. ``None`` (and ``marginals="auto"``) means: the index's calibration when it
    has one, else the project's defaults (:mod:`indexer.search_params`); :meth:`Searcher.effective`
    fills them in."""

    top_k: int | None = None
    rerank_k: int | None = None
    s: float | None = None
    lam: float | None = None
    marginals: str = "auto"
    eps: float | None = None

    def validate(self) -> None:
        """Raise ValueError for a value out of its bounds (unset values are fine)."""
        for name, param in SEARCH_PARAMS.items():
            value = getattr(self, name)
            if value is not None:
                param.check(value)

    def filled(self, values: dict[str, Any]) -> "SearchSettings":
        """A copy whose unset parameters take ``values`` (then the defaults)."""
        updates = {}
        for name in SEARCH_PARAMS:
            current = getattr(self, name)
            if current is None or (name == "marginals" and current == "auto"):
                updates[name] = values.get(name, default(name) if current is None else current)
        return dataclasses.replace(self, **updates)


@dataclass
class Hit:
    """One result: the image, its scores, and where it ranked before and after reranking."""

    id: str
    label: str | None
    path: str
    metadata: dict[str, Any]
    global_score: float
    structural_score: float | None
    final_score: float
    rank_before: int
    rank_after: int
    faiss_id: int


@dataclass
class QueryResult:
    """The results of one query, with the time of each stage in milliseconds."""

    hits: list[Hit]
    timings_ms: dict[str, float]
    random_weights: bool
    marginals: str
    settings: SearchSettings | None = None  # the effective settings (calibration and defaults filled in)
    query_global: torch.Tensor | None = None
    query_patches: torch.Tensor | None = None
    query_weights: torch.Tensor | None = None
    plans: dict[str, torch.Tensor] = field(default_factory=dict)  # gallery id -> (n, m) plan
    candidate_weights: dict[str, np.ndarray] = field(default_factory=dict)  # gallery id -> stored (m,) weights


class Searcher:
    """Searches one index with the backbone that built it, on one device."""

    def __init__(
        self, gallery: Gallery, backbone: Backbone, device: torch.device | str = "cpu", vector_backend: str = "auto"
    ) -> None:
        self.gallery = gallery
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.vector_backend = vector_backend
        self.vectors = VectorSearcher(gallery.faiss, self.device, vector_backend)

    def refresh(self) -> None:
        """Pick up a FAISS index the gallery replaced (after an add or a remove)."""
        self.vectors = VectorSearcher(self.gallery.faiss, self.device, self.vector_backend)

    @property
    def calibration(self) -> Calibration | None:
        return self.gallery.calibration

    def default_marginals(self) -> str:
        """``auto`` on an index without a calibration: the measured default where the index allows
        it (cross-correlation needs full-size patches), else its stored weights, else uniform."""
        manifest = self.gallery.manifest
        if DEFAULT_MARGINALS == "crosscorr" and not manifest.pca_dim:
            return "crosscorr"
        return "rollout" if manifest.patch_weights != "uniform" else "uniform"

    def effective(self, settings: SearchSettings) -> SearchSettings:
        """``settings`` with what it leaves unset taken from the calibration, else the defaults, and
        ``auto`` marginals resolved; validated (ValueError names the bad parameter)."""
        settings.validate()
        values = self.calibration.setting() if self.calibration is not None else {"marginals": self.default_marginals()}
        if values.get("marginals") == "rollout" and self.gallery.manifest.patch_weights == "uniform":
            values["marginals"] = "uniform"
        filled = settings.filled(values)
        filled = dataclasses.replace(filled, marginals=self.resolve_marginals(filled.marginals))
        filled.validate()
        return filled

    def resolve_marginals(self, marginals: str) -> str:
        """The marginals a search uses (``auto``: see :meth:`effective`); refuses what the index cannot do."""
        manifest = self.gallery.manifest
        if marginals == "auto":
            return self.effective(SearchSettings()).marginals
        if marginals == "rollout" and manifest.patch_weights == "uniform":
            raise ValueError("this index stores no rollout weights: use crosscorr or uniform")
        if marginals == "crosscorr" and manifest.pca_dim:
            raise ValueError("this index's patches are reduced by a PCA: cross-correlation needs full-size "
                             "patches; use rollout or uniform")
        return marginals

    def search(
        self, images: Sequence[Image.Image], settings: SearchSettings = SearchSettings(), keep_plans: bool = False
    ) -> list[QueryResult]:
        """Search every image; results are sorted best first.

        The batch is embedded in one forward, searched in one FAISS call and reranked in one
        batched OT solve (the candidates' stored features go to the device together). Each
        query's ``timings_ms`` are the batch's stage times: what every query of it waited.
        With ``keep_plans`` each result also keeps, per reranked candidate, its transport plan
        and its stored patch weights (what an explanation picture needs).
        """
        settings = self.effective(settings)
        marginals = settings.marginals
        t0 = time.perf_counter()
        g, p, w = embed_pil_images(self.backbone, images, self.gallery.manifest.patch_weights)
        if self.gallery.pca is not None:
            p = torch.from_numpy(self.gallery.pca.transform(p.cpu().numpy())).to(self.device)
        t1 = time.perf_counter()
        scores, ids = self.vectors.search(g, max(settings.top_k, settings.rerank_k))
        t2 = time.perf_counter()
        candidates = [self._candidates(scores[q], ids[q], settings.rerank_k) for q in range(len(images))]
        reranked = self._rerank(g, p, w, candidates, settings, marginals)
        results = [
            self._result(g[q], p[q], w[q], candidates[q], reranked[q], settings, marginals, keep_plans)
            for q in range(len(images))
        ]
        t3 = time.perf_counter()
        timings = {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "rerank": (t3 - t2) * 1e3,
                   "total": (t3 - t0) * 1e3}
        for r in results:
            r.timings_ms = dict(timings)
            r.settings = settings
        return results

    def _candidates(self, scores: np.ndarray, ids: np.ndarray, rerank_k: int) -> "_Candidates":
        valid = ids >= 0  # FAISS pads with -1 when it finds fewer than asked
        scores, ids = scores[valid], ids[valid]
        rows, feats = self.gallery.features([int(i) for i in ids]) if len(ids) else ([], None)
        return _Candidates(scores, ids, rows, feats, min(rerank_k, len(ids)))

    def _rerank(self, g, p, w, candidates: list["_Candidates"], settings: SearchSettings, marginals: str):
        """One batched solve over every query with the same number of candidates to rerank."""
        out: list[tuple[RerankResult, int] | None] = [None] * len(candidates)  # (batch result, row)
        by_k: dict[int, list[int]] = {}
        for q, c in enumerate(candidates):
            if c.k > 0:
                by_k.setdefault(c.k, []).append(q)
        dev = self.device
        for K, qs in by_k.items():
            def stacked(part: str) -> torch.Tensor:
                return torch.from_numpy(np.stack([getattr(candidates[q].feats, part)[:K] for q in qs])).to(dev)

            res = rerank_batch(
                Features(g[qs], p[qs], w[qs]),
                Features(stacked("global_features"), stacked("patch_features"), stacked("patch_weights")),
                torch.from_numpy(np.stack([candidates[q].scores[:K] for q in qs])).to(dev),
                marginals=marginals, s=settings.s, lam=settings.lam, eps=settings.eps,
            )
            for i, q in enumerate(qs):
                out[q] = (res, i)
        return out

    def _result(self, g, p, w, c: "_Candidates", reranked: "tuple[RerankResult, int] | None", settings, marginals,
                keep_plans) -> QueryResult:
        order = list(range(len(c.ids)))
        structural: list[float | None] = [None] * len(c.ids)
        final = [float(x) for x in c.scores]
        plans: dict[str, torch.Tensor] = {}
        weights: dict[str, np.ndarray] = {}
        if reranked is not None:
            res, row = reranked
            order = res.order[row].tolist() + order[c.k :]  # beyond K: global order, below the reranked
            sigma, finals = res.structural_scores[row].tolist(), res.final_scores[row].tolist()
            for i in range(c.k):
                structural[i], final[i] = sigma[i], finals[i]
            if keep_plans:
                plan = res.plans[row].cpu()
                # clone: a view would keep the whole batch's plans alive wherever one result is kept
                plans = {c.rows[i].id: plan[i].clone() for i in range(c.k)}
                weights = {c.rows[i].id: c.feats.patch_weights[i].astype(np.float32) for i in range(c.k)}
        hits = []
        for after, i in enumerate(order[: settings.top_k]):
            r = c.rows[i]
            hits.append(Hit(r.id, r.label, r.path, r.metadata, float(c.scores[i]), structural[i], final[i], i, after,
                            int(c.ids[i])))
        return QueryResult(
            hits=hits, timings_ms={}, random_weights=self.backbone.random_weights, marginals=marginals,
            query_global=g.cpu(), query_patches=p.cpu(), query_weights=w.cpu(), plans=plans,
            candidate_weights=weights,
        )


@dataclass
class _Candidates:
    """One query's FAISS candidates with their metadata and stored features."""

    scores: np.ndarray
    ids: np.ndarray
    rows: list
    feats: Gathered | None
    k: int  # how many of them are reranked
