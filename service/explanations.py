"""Patch-matching pictures of recent queries, rendered on demand from cached query features.

A search leaves, per query id, the model's view of the query, its patch weights and the
transport plans of the returned reranked hits. The cache is bounded in memory (LRU) and in
time (TTL); an expired query's pictures are gone (the caller answers 404).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from cachetools import TTLCache
from PIL import Image

from indexer.loading import load_image
from reranker.views import model_view
from reranker.visualize import render_match


class ExplanationNotFound(KeyError):
    """No picture for this query / gallery id; ``str()`` says why."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Match:
    """One reranked hit of a query: what is needed to draw it."""

    path: str
    plan: np.ndarray  # (G*G, G*G) float32
    candidate_weights: np.ndarray  # (G*G,)
    title: str


@dataclass
class QueryExplanations:
    """The cached state of one query."""

    query_view: Image.Image
    query_weights: np.ndarray
    grid: int
    matches: dict[str, Match]
    pictures: dict[str, bytes] = field(default_factory=dict)

    def nbytes(self) -> int:
        view = self.query_view.width * self.query_view.height * 4  # Pillow keeps RGB in 4 bytes a pixel
        arrays = sum(m.plan.nbytes + m.candidate_weights.nbytes + 256 for m in self.matches.values())
        return view + arrays + self.query_weights.nbytes + sum(len(p) for p in self.pictures.values()) + 1024


class ExplanationCache:
    """Thread-safe LRU + TTL cache of :class:`QueryExplanations`, bounded in bytes."""

    def __init__(self, max_bytes: int, ttl_s: float, transform: Callable, timer: Callable[[], float] | None = None):
        kwargs = {"timer": timer} if timer is not None else {}
        self._cache: TTLCache = TTLCache(maxsize=max_bytes, ttl=ttl_s, getsizeof=lambda e: e.nbytes(), **kwargs)
        self._lock = threading.Lock()
        self.transform = transform
        self.ttl_s = ttl_s

    def put(self, query_id: str, entry: QueryExplanations) -> None:
        with self._lock:
            try:
                self._cache[query_id] = entry
            except ValueError:  # larger than the whole cache: not kept
                pass

    def picture(self, query_id: str, gallery_id: str) -> bytes:
        """The PNG for one hit of one query (rendered once, then kept with the query)."""
        with self._lock:
            entry = self._cache.get(query_id)
        if entry is None:
            raise ExplanationNotFound(
                f"no cached query {query_id!r}: explanations expire {self.ttl_s:.0f} s after the search "
                "(or sooner when many queries arrive); search again"
            )
        if gallery_id in entry.pictures:
            return entry.pictures[gallery_id]
        match = entry.matches.get(gallery_id)
        if match is None:
            raise ExplanationNotFound(f"{gallery_id!r} is not among the reranked results of query {query_id!r}")
        try:
            candidate = load_image(match.path)
        except (OSError, ValueError) as err:
            raise ExplanationNotFound(f"the gallery image {gallery_id!r} can no longer be read: {err}") from None
        png = render_match(
            entry.query_view, model_view(candidate, self.transform), match.plan, grid=entry.grid,
            query_weights=entry.query_weights, candidate_weights=match.candidate_weights, title=match.title,
        )
        with self._lock:
            entry.pictures[gallery_id] = png
            if query_id in self._cache:  # re-insert: the cache re-counts the entry's size
                try:
                    self._cache[query_id] = entry
                except ValueError:
                    del self._cache[query_id]
        return png

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
