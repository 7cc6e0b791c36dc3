"""One evaluation run: load the set, embed (or reuse the cache), search, rerank, report."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reranker.backbones import Backbone, create_backbone, weights_identity
from reranker.marginals import MARGINALS

from .datasets import ClassSet, EvalSet, load_dataset
from .features import FeatureStore, cache_key, compute_features
from .head import load_linear_head
from .protocol import Sweep, evaluate


class EvaluationError(ValueError):
    """A request that cannot be evaluated as asked (the message says why and what to do)."""


@dataclass
class EvalSettings:
    dataset: str
    root: str
    model: str
    weights: str = "pretrained"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    head: str | None = None  # a fine-tuned linear projection head applied to global and patch vectors
    grid: int = 7
    marginals: list[str] | None = None  # None: every kind the backbone supports
    s_values: list[float] = field(default_factory=lambda: [1.0])
    k_values: list[int] = field(default_factory=lambda: [100])
    lam: float = 1.0
    eps: float = 0.05
    count_query_in_r: bool = False
    limit: int | None = None
    cache_dir: Path | None = None  # None: a temporary folder, removed afterwards
    batch_size: int = 32
    workers: int = 2
    rerank_batch: int | None = None
    progress: bool = True


def resolve_marginals(backbone: Backbone, requested: list[str] | None) -> list[str]:
    """The marginals to sweep; rollout needs a backbone with global attention."""
    if requested is None:
        return [m for m in MARGINALS if m != "rollout" or backbone.supports_rollout]
    if unknown := [m for m in requested if m not in MARGINALS]:
        raise EvaluationError(f"unknown marginals {unknown[0]!r}: use {', '.join(MARGINALS)}")
    if "rollout" in requested and not backbone.supports_rollout:
        raise EvaluationError(
            f"rollout marginals need global self-attention, which {backbone.name!r} does not have "
            "(windowed attention): use --marginals crosscorr,uniform (the paper used cross-correlation "
            "for Swin)"
        )
    return list(dict.fromkeys(requested))


def _records(data: EvalSet):
    return data.records if isinstance(data, ClassSet) else data.queries + data.database


def run_evaluation(settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """Evaluate and return the report document (see :mod:`evaluation.report`)."""
    start = time.perf_counter()
    data = load_dataset(settings.dataset, settings.root)
    if settings.limit is not None:
        if settings.limit < 2:
            raise EvaluationError("--limit must be at least 2")
        data = data.subset(settings.limit)
    backbone = create_backbone(settings.model, settings.weights, grid=settings.grid,
                               model_kwargs=settings.model_kwargs)
    head_id = None
    if settings.head is not None:
        backbone.set_projection(load_linear_head(settings.head, backbone.embed_dim))
        head_id = weights_identity(settings.head)
    marginals = resolve_marginals(backbone, settings.marginals)
    sweep = Sweep(marginals, list(settings.s_values), list(settings.k_values), settings.lam, settings.eps,
                  settings.count_query_in_r)
    kind = "rollout" if backbone.supports_rollout else "uniform"
    backbone = backbone.to(device).eval()
    records = _records(data)
    key = cache_key(data.name, data.root, records, backbone, settings.model_kwargs, kind, head_id)
    with tempfile.TemporaryDirectory(prefix="vit-rerank-eval-") as scratch:
        cache_dir = Path(settings.cache_dir) if settings.cache_dir is not None else Path(scratch)
        store = compute_features(backbone, records, key, cache_dir, batch_size=settings.batch_size,
                                 workers=settings.workers, progress=settings.progress)
        outcome = evaluate(data, store, sweep, device, rerank_batch_size=settings.rerank_batch,
                           progress=settings.progress)
        doc = _document(settings, data, backbone, kind, sweep, store, outcome, device)
    doc["settings"]["head"] = head_id
    doc["timings"]["total_s"] = time.perf_counter() - start
    return doc


def _document(settings, data, backbone, kind, sweep, store: FeatureStore, outcome, device) -> dict[str, Any]:
    notes = list(outcome.notes)
    if backbone.random_weights:
        notes.append("random weights: the figures are meaningless except for testing")
    if settings.count_query_in_r:
        notes.append("R counts the query itself (the reference code's R); this deflates RP and MAP@R")
    if settings.limit is not None:
        notes.append(f"subset: --limit {settings.limit}")
    embedding = {
        "cached": store.cached,
        "images_embedded": store.images_embedded,
        "seconds": store.seconds,
        "images_per_second": store.images_embedded / store.seconds if store.seconds > 0 else 0.0,
        "cache_folder": str(store.folder) if settings.cache_dir is not None else None,
    }
    return {
        "dataset": data.name,
        "root": data.root,
        "protocol": outcome.protocol,
        "settings": {
            "model": backbone.name, "weights": settings.weights, "weights_id": backbone.weights_id,
            "random_weights": backbone.random_weights, "model_kwargs": settings.model_kwargs,
            "grid": backbone.grid, "patch_weights": kind, "marginals": sweep.marginals, "s": sweep.s_values,
            "k": sweep.k_values, "lambda": sweep.lam, "eps": sweep.eps, "count_query_in_r": sweep.count_query_in_r,
            "limit": settings.limit, "device": str(device), "batch_size": settings.batch_size,
        },
        "dataset_summary": data.summary(),
        "counts": outcome.counts,
        "embedding": embedding,
        "timings": {"embedding_s": store.seconds, **outcome.timings},
        "rerank_timings_s": outcome.rerank_timings,
        "metric_names": outcome.metric_names,
        "baseline": outcome.baseline,
        "variants": outcome.variants,
        "sweep": outcome.sweep,
        "failures": store.failures,
        "notes": notes,
    }
