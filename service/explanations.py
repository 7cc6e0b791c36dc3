"""Explanations of recent queries: the patch-matching picture and its numbers, from cached query state.

A search leaves, per query id, the decoded query photo, and for each returned reranked hit its
transport plan, patch similarities, OT marginals and scores. The crops of the query that a picture
shows are cut when a picture is first drawn, not on the search path. The cache is bounded in memory (LRU)
and in time (TTL); an expired query's explanations are gone (the caller answers 404).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from cachetools import TTLCache
from PIL import Image
from torchvision import transforms as T

from indexer.loading import load_image
from reranker.views import model_view
from reranker.visualize import DEFAULT_PANEL, render_match, strongest_links

from .errors import ExplanationNotFound, Unavailable, shown
from .schemas import renderable


@dataclass(frozen=True)
class PictureOptions:
    """How to draw one picture (the PNG route's query parameters)."""

    size: int = DEFAULT_PANEL  # px per photo panel
    links: int = 6  # numbered links
    faded: int = 0  # further links drawn faded
    heatmap: bool = False
    unmatched: bool = False


@dataclass
class Match:
    """One reranked hit of a query: what its picture and its numbers need."""

    path: str
    plan: np.ndarray  # (n, m) float32, dummy row and column dropped
    candidate_weights: np.ndarray  # (m,) stored per-image weights (the heat map)
    title: str
    label: str | None = None
    global_score: float = 0.0
    structural_score: float = 0.0
    final_score: float = 0.0
    rank_before: int = 0
    rank_after: int = 0
    candidate_patches: np.ndarray | None = None  # (m, d) float16: what the query was compared with
    query_marginal: np.ndarray | None = None  # (n,) the OT marginals actually used (unit mass)
    candidate_marginal: np.ndarray | None = None  # (m,)
    near_duplicate: bool | None = None

    def nbytes(self) -> int:
        arrays = (self.plan, self.candidate_weights, self.candidate_patches, self.query_marginal,
                  self.candidate_marginal)
        return sum(a.nbytes for a in arrays if a is not None) + 512


@dataclass
class QueryExplanations:
    """The cached state of one query."""

    query_image: Image.Image  # the decoded query (bounded as the service decodes it)
    query_weights: np.ndarray | None  # None: the search used per-pair marginals (crosscorr)
    grid: int
    matches: dict[str, Match]
    pictures: dict[tuple[str, PictureOptions], bytes] = field(default_factory=dict)
    model: str = ""
    marginals: str = ""
    s: float = 1.0
    lam: float = 1.0
    scorer: str = "ot"
    threshold: float = 0.5
    query_patches: np.ndarray | None = None  # (n, d) float16
    views: dict[int | None, Image.Image] = field(default_factory=dict)  # query crops made so far, by side

    def view(self, transform: Callable, side: int | None = None) -> Image.Image:
        """The centre crop of the query that the model saw (``side`` None), or the same crop at up to
        ``side`` px for a picture (:func:`sharp_view`); each is made once, when first asked for."""
        if side not in self.views:
            self.views[side] = model_view(self.query_image, transform) if side is None else sharp_view(
                self.query_image, transform, side)
        return self.views[side]

    def nbytes(self) -> int:
        images = [self.query_image, *self.views.values()]
        pixels = sum(v.width * v.height * 4 for v in images)  # Pillow keeps RGB in 4 bytes a pixel
        arrays = sum(m.nbytes() for m in self.matches.values())
        weights = sum(a.nbytes for a in (self.query_weights, self.query_patches) if a is not None)
        return pixels + arrays + weights + sum(len(p) for p in self.pictures.values()) + 1024


def sharp_view(image: Image.Image, transform: Callable, side: int = DEFAULT_PANEL) -> Image.Image:
    """The model's view of ``image`` (:func:`reranker.views.model_view`) at ``side`` px, cut from the
    full-resolution photo when the transform is the usual resize + centre crop (else the model view)."""
    view = model_view(image, transform)
    factor = side / max(view.size)
    if factor <= 1:
        return view
    scaled = []
    for step in getattr(transform, "transforms", ()):
        if not isinstance(step(Image.new("RGB", (8, 8))), Image.Image):
            break  # the PIL (geometric) steps are over, as in model_view
        if isinstance(step, T.Resize) and (isinstance(step.size, int) or len(step.size) == 1):
            size = step.size if isinstance(step.size, int) else step.size[0]
            scaled.append(T.Resize(round(size * factor), interpolation=step.interpolation, antialias=True))
        elif isinstance(step, T.CenterCrop):
            scaled.append(T.CenterCrop([round(x * factor) for x in step.size]))
        else:
            return view  # a step of unknown geometry: stay with the model's own view
    out = image.convert("RGB")
    for step in scaled:
        out = step(out)
    return out


def unmatched_mass(plan: np.ndarray, marginal: np.ndarray | None, axis: int) -> np.ndarray | None:
    """Per patch, the mass its marginal put in that the plan did not move: what went to the dummy."""
    if marginal is None:
        return None
    moved = plan.sum(axis=axis)
    return np.clip(np.asarray(marginal, dtype=np.float64) - moved, 0.0, None)


def unmatched_share(plan: np.ndarray, marginal: np.ndarray | None, axis: int) -> np.ndarray | None:
    """Per patch, the share of its own mass that went to the dummy (0 for a patch without mass)."""
    unmatched = unmatched_mass(plan, marginal, axis)
    if unmatched is None:
        return None
    marginal = np.asarray(marginal, dtype=np.float64)
    return np.divide(unmatched, marginal, out=np.zeros_like(unmatched), where=marginal > 0)


def numbers(entry: QueryExplanations, match: Match, top: int) -> dict[str, Any]:
    """The explanation's figures (see ``service.schemas.Explanation``); pair 1 is link 1 of the picture."""
    g = entry.grid
    pairs = []
    links = strongest_links(match.plan, top)
    for rank, link in enumerate(links, start=1):
        sim = None
        if entry.query_patches is not None and match.candidate_patches is not None:
            sim = float(entry.query_patches[link.i].astype(np.float32) @ match.candidate_patches[link.j].astype(np.float32))
        pairs.append({
            "rank": rank, "mass": link.mass, "similarity": sim,
            "query": {"index": link.i, "row": link.i // g, "col": link.i % g},
            "candidate": {"index": link.j, "row": link.j // g, "col": link.j % g},
        })
    q_un = unmatched_mass(match.plan, match.query_marginal, axis=1) if entry.scorer == "ot" else None
    c_un = unmatched_mass(match.plan, match.candidate_marginal, axis=0) if entry.scorer == "ot" else None
    # ot: the mass the plan moved; mnn: the share of query patches with a match
    matched = float(match.plan.sum()) if entry.scorer == "ot" else float((match.plan > 0).any(axis=1).mean())

    def as_list(a: np.ndarray | None) -> list[float] | None:
        return None if a is None else [float(x) for x in a]

    return {
        "label": match.label, "model": entry.model, "scorer": entry.scorer, "threshold": entry.threshold,
        "marginals": entry.marginals, "s": entry.s, "lam": entry.lam,
        "grid": g, "global_score": match.global_score, "structural_score": match.structural_score,
        "structural_contribution": entry.lam * match.structural_score, "final_score": match.final_score,
        "rank_before": match.rank_before, "rank_after": match.rank_after,
        "matched_mass": matched, "near_duplicate": match.near_duplicate, "pairs": pairs,
        "query_unmatched": as_list(q_un), "candidate_unmatched": as_list(c_un),
        "query_weights": as_list(match.query_marginal), "candidate_weights": as_list(match.candidate_marginal),
    }


MAX_RENDERS = 2  # pictures drawn at once (each holds two photos at up to 1024 px and a figure)
RENDER_WAIT_S = 10.0  # a picture that cannot start drawing within this: 503 with Retry-After
EXPLAIN_PICTURES = 10  # a search with explain=true draws at most this many (the best reranked hits)


class ExplanationCache:
    """Thread-safe LRU + TTL cache of :class:`QueryExplanations`, bounded in bytes; at most
    ``max_renders`` pictures are drawn at once."""

    def __init__(self, max_bytes: int, ttl_s: float, transform: Callable, timer: Callable[[], float] | None = None,
                 max_renders: int = MAX_RENDERS, render_wait_s: float = RENDER_WAIT_S):
        kwargs = {"timer": timer} if timer is not None else {}
        self._cache: TTLCache = TTLCache(maxsize=max_bytes, ttl=ttl_s, getsizeof=lambda e: e.nbytes(), **kwargs)
        self._lock = threading.Lock()
        self._renders = threading.BoundedSemaphore(max_renders)
        self.render_wait_s = render_wait_s
        self.transform = transform
        self.ttl_s = ttl_s

    def put(self, query_id: str, entry: QueryExplanations) -> None:
        with self._lock:
            try:
                self._cache[query_id] = entry
            except ValueError:  # larger than the whole cache: not kept
                pass

    def _lookup(self, query_id: str, gallery_id: str) -> tuple[QueryExplanations, Match]:
        with self._lock:
            entry = self._cache.get(query_id)
        if entry is None:
            raise ExplanationNotFound(
                f"no cached query {shown(query_id)}: explanations expire {self.ttl_s:.0f} s after the search "
                "(or sooner when many queries arrive); search again"
            )
        match = entry.matches.get(gallery_id)
        if match is None:
            raise ExplanationNotFound(f"{shown(gallery_id)} is not among the reranked results of query {shown(query_id)}")
        return entry, match

    def numbers(self, query_id: str, gallery_id: str, top: int = 10) -> dict[str, Any]:
        """The figures of one hit of one query (global cosine, sigma, ranks, top pairs, ...)."""
        entry, match = self._lookup(query_id, gallery_id)
        return numbers(entry, match, top)

    def picture(self, query_id: str, gallery_id: str, options: PictureOptions = PictureOptions()) -> bytes:
        """The PNG for one hit of one query (rendered once per options, then kept with the query)."""
        entry, match = self._lookup(query_id, gallery_id)
        return self._picture(query_id, entry, gallery_id, match, options)

    def render_all(self, query_id: str, entry: QueryExplanations, limit: int = EXPLAIN_PICTURES) -> None:
        """Draw the default picture of the first ``limit`` explained hits of ``entry`` (best first) from the
        entry itself: a cache that evicts the query meanwhile takes nothing from this request."""
        hits = sorted(entry.matches.items(), key=lambda item: item[1].rank_after)[:limit]
        for gallery_id, match in hits:
            self._picture(query_id, entry, gallery_id, match, PictureOptions())

    def _picture(self, query_id: str, entry: QueryExplanations, gallery_id: str, match: Match,
                 options: PictureOptions) -> bytes:
        key = (gallery_id, options)
        if key in entry.pictures:
            return entry.pictures[key]
        if not self._renders.acquire(timeout=self.render_wait_s):
            raise Unavailable(f"{MAX_RENDERS} explanation pictures are being drawn already; retry shortly",
                              retry_after=max(1, round(self.render_wait_s / 2)))
        try:
            png = self._render(entry, gallery_id, match, options)
        finally:
            self._renders.release()
        with self._lock:
            entry.pictures[key] = png
            if query_id in self._cache:  # re-insert: the cache re-counts the entry's size
                try:
                    self._cache[query_id] = entry
                except ValueError:
                    del self._cache[query_id]
        return png

    def _render(self, entry: QueryExplanations, gallery_id: str, match: Match, options: PictureOptions) -> bytes:
        unmatched = options.unmatched and entry.scorer == "ot"  # the dummy's share exists for partial OT only
        try:
            candidate = sharp_view(load_image(match.path), self.transform, options.size)
        except (OSError, ValueError) as err:
            raise ExplanationNotFound(f"the gallery image {shown(gallery_id)} can no longer be read: {err}") from None
        png = render_match(
            entry.view(self.transform, options.size), candidate, match.plan, grid=entry.grid,
            # the heat map shows the OT marginals this pair used (else the stored per-image weights)
            query_weights=entry.query_weights if match.query_marginal is None else match.query_marginal,
            candidate_weights=match.candidate_weights if match.candidate_marginal is None else match.candidate_marginal,
            heatmap=options.heatmap,
            top_matches=options.links, faded_matches=options.faded, panel_size=options.size, title=match.title,
            query_unmatched=unmatched_share(match.plan, match.query_marginal, 1) if unmatched else None,
            candidate_unmatched=unmatched_share(match.plan, match.candidate_marginal, 0) if unmatched else None,
        )
        return png

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


def build_entry(query: Image.Image, outcome: Any, engine: Any,
                near: dict[str, bool | None]) -> QueryExplanations | None:
    """What the cache keeps of one search (``service.engine.SearchOutcome``); None without reranked hits."""
    result = outcome.result
    hits = [h for h in result.hits if h.id in result.plans]
    if not hits:
        return None
    settings = result.settings
    # what the reranker computed and compared (the searcher keeps it for the returned hits): nothing is recomputed
    cands = result.candidates_of([h.id for h in hits])
    query_patches = np.asarray(result.query.patch_features, dtype=np.float16)
    w_q = None if result.query.patch_weights is None else np.asarray(result.query.patch_weights, dtype=np.float32)
    weights = cands.patch_weights.float().numpy()
    matches = {}
    for i, h in enumerate(hits):
        pair = result.pairs[h.id]
        matches[h.id] = Match(
            path=h.image_file or h.path, plan=pair.plan.float().numpy(), candidate_weights=weights[i],
            # ranks shown 1-based, as on the page
            title=renderable(f"#{h.rank_after + 1} (was #{h.rank_before + 1})  {h.id}  final {h.final_score:.3f}"),
            label=renderable(h.label), global_score=h.global_score, structural_score=float(h.structural_score),
            final_score=h.final_score, rank_before=h.rank_before, rank_after=h.rank_after,
            candidate_patches=cands.patch_features[i].to(torch.float16).numpy(),
            query_marginal=pair.query_mass.double().numpy(), candidate_marginal=pair.candidate_mass.double().numpy(),
            near_duplicate=near.get(h.id),
        )
    return QueryExplanations(query, w_q, engine.grid, matches, model=engine.model, marginals=result.marginals,
                             s=settings.s, lam=settings.lam, scorer=settings.scorer, threshold=settings.threshold,
                             query_patches=query_patches)
