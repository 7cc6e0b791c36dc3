"""Query an index: embed, top K by FAISS, rerank the K by partial OT, return scored results."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from reranker.backbones import Backbone
from reranker.rerank import Features, rerank_batch

from .embedding import embed_pil_images
from .gallery import Gallery
from .vector_index import VectorSearcher


@dataclass
class SearchSettings:
    """Query-time knobs (the method's defaults)."""

    top_k: int = 10
    rerank_k: int = 100
    s: float = 1.0
    lam: float = 1.0
    marginals: str = "auto"  # auto | rollout | crosscorr | uniform
    eps: float = 0.05

    def validate(self) -> None:
        if self.top_k < 1 or self.rerank_k < 0:
            raise ValueError("top_k must be at least 1 and rerank_k at least 0")
        if not (0.0 < self.s <= 1.0):
            raise ValueError(f"s must be in (0, 1], got {self.s}")


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
    query_global: torch.Tensor | None = None
    query_patches: torch.Tensor | None = None
    query_weights: torch.Tensor | None = None
    plans: dict[str, torch.Tensor] = field(default_factory=dict)  # gallery id -> (n, m) plan


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

    def resolve_marginals(self, marginals: str) -> str:
        """The marginals a search uses: ``auto`` is rollout where stored, else cross-correlation."""
        manifest = self.gallery.manifest
        if marginals == "crosscorr" and manifest.pca_dim:
            raise ValueError("this index's patches are reduced by a PCA: cross-correlation needs full-size "
                             "patches; use rollout or uniform")
        if marginals == "auto" and manifest.pca_dim and manifest.patch_weights == "uniform":
            return "uniform"
        if marginals != "auto":
            if marginals == "rollout" and self.gallery.manifest.patch_weights == "uniform":
                raise ValueError("this index stores no rollout weights: use crosscorr or uniform")
            return marginals
        return "rollout" if self.gallery.manifest.patch_weights in ("rollout", "cls_rollout") else "crosscorr"

    def search(
        self, images: Sequence[Image.Image], settings: SearchSettings = SearchSettings(), keep_plans: bool = False
    ) -> list[QueryResult]:
        """Search every image; results are sorted best first."""
        settings.validate()
        marginals = self.resolve_marginals(settings.marginals)
        t0 = time.perf_counter()
        g, p, w = embed_pil_images(self.backbone, images, self.gallery.manifest.patch_weights)
        if self.gallery.pca is not None:
            p = torch.from_numpy(self.gallery.pca.transform(p.cpu().numpy())).to(self.device)
        t1 = time.perf_counter()
        k = max(settings.top_k, settings.rerank_k)
        scores, ids = self.vectors.search(g, k)
        t2 = time.perf_counter()
        results = []
        for q in range(len(images)):
            results.append(self._rerank_one(g[q], p[q], w[q], scores[q], ids[q], settings, marginals, keep_plans))
        t3 = time.perf_counter()
        shared = {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3}
        for r in results:
            r.timings_ms = {**shared, "rerank": (t3 - t2) * 1e3 / len(results), "total": (t3 - t0) * 1e3}
        return results

    def _rerank_one(self, g, p, w, scores, ids, settings, marginals, keep_plans) -> QueryResult:
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        rows, feats = self.gallery.features([int(i) for i in ids]) if len(ids) else ([], None)
        K = min(settings.rerank_k, len(ids))
        order = list(range(len(ids)))
        structural: list[float | None] = [None] * len(ids)
        final = [float(s) for s in scores]
        plans: dict[str, torch.Tensor] = {}
        if K > 0:
            dev = self.device
            cands = Features(
                torch.from_numpy(feats.global_features[:K]).to(dev).unsqueeze(0),
                torch.from_numpy(feats.patch_features[:K]).to(dev).unsqueeze(0),
                torch.from_numpy(feats.patch_weights[:K]).to(dev).unsqueeze(0),
            )
            query = Features(g.unsqueeze(0), p.unsqueeze(0), w.unsqueeze(0))
            res = rerank_batch(
                query, cands, torch.from_numpy(scores[:K]).unsqueeze(0).to(dev),
                marginals=marginals, s=settings.s, lam=settings.lam, eps=settings.eps,
            )
            order = res.order[0].tolist() + list(range(K, len(ids)))  # beyond K: global order, below
            for i in range(K):
                structural[i] = float(res.structural_scores[0, i])
                final[i] = float(res.final_scores[0, i])
            if keep_plans:
                plans = {rows[i].id: res.plans[0, i].cpu() for i in range(K)}
        hits = []
        for after, i in enumerate(order[: settings.top_k]):
            r = rows[i]
            hits.append(Hit(r.id, r.label, r.path, r.metadata, float(scores[i]), structural[i], final[i], i, after, int(ids[i])))
        return QueryResult(
            hits=hits, timings_ms={}, random_weights=self.backbone.random_weights, marginals=marginals,
            query_global=g.cpu(), query_patches=p.cpu(), query_weights=w.cpu(), plans=plans,
        )
