"""Synthetic galleries committed straight through the library (no backbone), for the scale tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from indexer.index_dir import IndexDir, NewImages
from indexer.manifest import Manifest
from indexer.metadata import ImageRow
from reranker.features import StoredFeatures

DIM, GRID = 32, 7


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int = DIM, clusters: int = 20, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` centres (what IVF and PQ are for)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return unit(centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)))


def manifest(**kwargs) -> Manifest:
    base = dict(model="synthetic", weights="random", weights_source="random", grid=GRID, global_dim=DIM,
                patch_dim=DIM, patch_weights="uniform")
    return Manifest(**{**base, **kwargs})


def new_images(start: int, n: int, seed: int = 0) -> NewImages:
    g = clustered(n, seed=seed)
    patches = clustered(n * GRID * GRID, seed=seed + 1000).reshape(n, GRID * GRID, DIM)
    rows = [ImageRow(id=f"img{start + i}", path=f"/nowhere/{start + i}.jpg", label=str(i % 5),
                     content_hash=f"h{start + i}", width=8, height=8, bytes=1) for i in range(n)]
    weights = np.full((n, GRID * GRID), 1.0 / (GRID * GRID), np.float32)
    return NewImages(rows, StoredFeatures(g, patches, {"uniform": weights}))


def make_gallery(folder: Path, n: int, chunk: int = 200, train: bool = True, **manifest_kwargs) -> IndexDir:
    """A gallery of ``n`` synthetic images committed ``chunk`` at a time (trained at the end, as a build does)."""
    gallery = IndexDir.create(folder, manifest(**manifest_kwargs))
    for start in range(0, n, chunk):
        gallery.commit_new(new_images(start, min(chunk, n - start), seed=start))
    if train and not gallery.trained:
        gallery.train()
    return gallery
