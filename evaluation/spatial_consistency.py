"""Do an explanation's strongest links agree? Spatial consistency of transport plans on a place set.

On a place-recognition set whose matching images show the same place with small shifts (the shared
``corridor`` set), a plan that explains a match well moves each patch to where it went: its strongest
links share one displacement. For every query and each of its ground-truth matches, take the ``top``
plan entries by mass (the numbered links of the picture), their displacements ``(row_x - row_q,
col_x - col_q)`` in grid cells, and count the fraction within ``tolerance`` cells (on both axes) of
the median displacement. Averaged over pairs, per patch-weight kind and ``s``.

Baselines, for the same pairs: **random links** (``top`` patch pairs drawn uniformly: what a plan
that carries no structure scores; seeded) and **top similarity** (the ``top`` most similar patch
pairs, without transport: what OT adds over nearest patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reranker.rerank import Features, rerank_batch

__all__ = ["ConsistencySettings", "agreement", "link_agreement", "measure_pairs", "random_link_agreement"]


@dataclass(frozen=True)
class ConsistencySettings:
    top: int = 5  # links per pair: the strongest by mass
    tolerance: int = 1  # cells, on each axis, from the median displacement
    random_draws: int = 50  # per pair, for the random-links baseline
    seed: int = 0
    eps: float = 0.05


def agreement(displacements: np.ndarray, tolerance: int) -> float:
    """Fraction of ``(k, 2)`` displacements within ``tolerance`` (each axis) of their median."""
    median = np.median(displacements, axis=0)
    return float((np.abs(displacements - median) <= tolerance + 1e-9).all(axis=1).mean())


def _displacements(flat_indices: np.ndarray, n: int, grid: int) -> np.ndarray:
    """``(..., k)`` indices into flattened ``(n, m)`` matrices -> ``(..., k, 2)`` (d_row, d_col)."""
    i, j = np.divmod(flat_indices, n)
    return np.stack([j // grid - i // grid, j % grid - i % grid], axis=-1)


def link_agreement(matrices: torch.Tensor, grid: int, settings: ConsistencySettings) -> np.ndarray:
    """Per ``(n, m)`` matrix of a ``(P, n, m)`` batch (plans, or similarities), the agreement of its
    ``top`` largest entries."""
    P, n, m = matrices.shape
    top = torch.topk(matrices.reshape(P, n * m).float(), settings.top, dim=1).indices.cpu().numpy()
    disp = _displacements(top, m, grid)
    return np.array([agreement(d, settings.tolerance) for d in disp])


def random_link_agreement(pairs: int, grid: int, settings: ConsistencySettings) -> float:
    """The mean agreement of ``top`` uniformly drawn patch pairs (seeded)."""
    rng = np.random.default_rng(settings.seed)
    n = grid * grid
    draws = rng.integers(0, n * n, size=(pairs * settings.random_draws, settings.top))
    disp = _displacements(draws, n, grid)
    return float(np.mean([agreement(d, settings.tolerance) for d in disp]))


def measure_pairs(
    global_features: np.ndarray, patch_features: np.ndarray, patch_weights: np.ndarray | None,
    pairs: Sequence[tuple[int, int]], grid: int, kinds: Sequence[str], s_values: Sequence[float],
    settings: ConsistencySettings = ConsistencySettings(), device: torch.device | str = "cpu",
) -> dict:
    """Agreement of each ``(kind, s)`` plan's strongest links over ``pairs`` of (query, match) rows of
    the feature arrays, beside the two baselines. Every pair is one query with one candidate."""
    if not pairs:
        raise ValueError("no (query, match) pairs to measure")
    q = torch.as_tensor(np.array([a for a, _ in pairs]))
    x = torch.as_tensor(np.array([b for _, b in pairs]))
    g = torch.as_tensor(np.asarray(global_features, dtype=np.float32), device=device)
    f = torch.as_tensor(np.asarray(patch_features, dtype=np.float32), device=device)
    w = None if patch_weights is None else torch.as_tensor(np.asarray(patch_weights, dtype=np.float32), device=device)
    query = Features(g[q], f[q], None if w is None else w[q])
    cands = Features(g[x][:, None], f[x][:, None], None if w is None else w[x][:, None])
    out: dict = {"pairs": len(pairs), "top_links": settings.top, "tolerance_cells": settings.tolerance,
                 "kinds": {}}
    for kind in kinds:
        out["kinds"][kind] = {}
        for s in s_values:
            res = rerank_batch(query, cands, marginals=kind, s=s, eps=settings.eps)
            out["kinds"][kind][f"{s:g}"] = float(link_agreement(res.plans[:, 0], grid, settings).mean())
    similarity = torch.matmul(query.patch_features, cands.patch_features[:, 0].transpose(-1, -2))
    out["baselines"] = {
        "random_links": random_link_agreement(len(pairs), grid, settings),
        "top_similarity": float(link_agreement(similarity, grid, settings).mean()),
    }
    return out


def corridor_consistency(root, weights: str, device: torch.device, cache_dir, kinds: Sequence[str],
                         s_values: Sequence[float], settings: ConsistencySettings = ConsistencySettings(),
                         limit: int | None = None) -> dict:
    """:func:`measure_pairs` on a place set (query, each ground-truth match) with the default backbone;
    the features come from the evaluation's cache (the same key as ``evaluation.runner``)."""
    from evaluation.datasets import load_dataset
    from evaluation.features import cache_key, compute_features
    from reranker.backbones import create_backbone
    from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

    data = load_dataset("pairs", root)
    if limit is not None:  # the first queries and database images (tests)
        data = data.subset(limit)
    kwargs = default_model_kwargs(DEFAULT_MODEL)
    backbone = create_backbone(DEFAULT_MODEL, weights, grid=7, model_kwargs=kwargs).to(device).eval()
    records = data.queries + data.database
    stored = ["rollout"] if "rollout" in kinds else ["uniform"]
    key = cache_key(data.name, data.root, records, backbone, kwargs, stored, None)
    store = compute_features(backbone, records, key, cache_dir, progress=False)
    nq = len(data.queries)
    pairs = [(a, nq + int(b)) for a, pos in enumerate(data.positives) for b in pos
             if store.ok[a] and store.ok[nq + int(b)]]
    out = measure_pairs(store.global_features, store.patch_features, store.patch_weights.get("rollout"), pairs,
                        backbone.grid, kinds, s_values, settings, device)
    out["set"] = Path(root).name
    return out
