"""One evaluation run: load the set, embed (or reuse the cache), search, rerank, report."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reranker.backbones import Backbone, create_backbone, set_runtime, weights_identity
from reranker.defaults import DEFAULT_RUNTIME
from reranker.rollout import PER_IMAGE_KINDS

from .calibrate import calibrate
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
    runtime: str = DEFAULT_RUNTIME  # how the backbone's forward runs (reranker.backbones.runtimes)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    head: str | None = None  # a fine-tuned linear projection head applied to global and patch vectors
    grids: list[int] = field(default_factory=lambda: [7])  # patch grid sides G (0: the native token grid)
    patch_layers: list[int | None] = field(default_factory=lambda: [None])  # blocks the grid is read from (None: final)
    scorers: list[str] = field(default_factory=lambda: ["ot"])
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    marginals: list[str] | None = None  # None: every kind the backbone supports
    s_values: list[float] = field(default_factory=lambda: [1.0])
    k_values: list[int] = field(default_factory=lambda: [100])
    lam_values: list[float] = field(default_factory=lambda: [1.0])
    eps: float = 0.05
    count_query_in_r: bool = False
    limit: int | None = None
    cache_dir: Path | None = None  # None: a temporary folder, removed afterwards
    batch_size: int = 32
    workers: int = 2
    rerank_batch: int | None = None
    progress: bool = True
    calibrate: bool = False  # also choose a setting on half the queries and report it on the other half
    seed: int = 0


#: What an evaluation sweeps unless told: the method's three kinds (every other per-image kind on request).
DEFAULT_EVAL_MARGINALS = ("rollout", "crosscorr", "uniform")


def eval_marginals(backbone: Backbone) -> list[str]:
    """Every marginal the backbone supports: its per-image kinds and DIML's cross-correlation."""
    kinds = [k for k in backbone.per_image_kinds if k != "uniform"]
    return kinds + ["crosscorr", "uniform"]


def resolve_marginals(backbone: Backbone, requested: list[str] | None) -> list[str]:
    """The marginals to sweep; rollout kinds need a backbone with global attention."""
    supported = eval_marginals(backbone)
    if requested is None:
        return [m for m in DEFAULT_EVAL_MARGINALS if m in supported]
    known = set(PER_IMAGE_KINDS) | {"crosscorr"}
    if unknown := [m for m in requested if m not in known]:
        raise EvaluationError(f"unknown marginals {unknown[0]!r}: use {', '.join(sorted(known))}")
    if missing := [m for m in requested if m not in supported]:
        raise EvaluationError(
            f"{missing[0]} marginals need global self-attention, which {backbone.name!r} does not have "
            f"in that form (it supports {', '.join(supported)}; the paper used cross-correlation for Swin)"
        )
    return list(dict.fromkeys(requested))


def _records(data: EvalSet):
    return data.records if isinstance(data, ClassSet) else data.queries + data.database


def run_evaluation(settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """Evaluate and return the report document (see :mod:`evaluation.report`).

    Features are embedded (or read from the cache) once per patch configuration (grid G x patch
    layer); every structural score, lambda and K of the sweep reuses them. With several
    configurations, variant names start with ``G=..,L=..,``.
    """
    start = time.perf_counter()
    data = load_dataset(settings.dataset, settings.root)
    if settings.limit is not None:
        if settings.limit < 2:
            raise EvaluationError("--limit must be at least 2")
        data = data.subset(settings.limit)
    if not settings.grids or any(g < 0 for g in settings.grids):
        raise EvaluationError("--grid takes sides G >= 1, or 0 for the backbone's native token grid")
    backbone = create_backbone(settings.model, settings.weights, grid=max(settings.grids[0], 1),
                               model_kwargs=settings.model_kwargs)
    head_id = None
    if settings.head is not None:
        backbone.set_projection(load_linear_head(settings.head, backbone.embed_dim))
        head_id = weights_identity(settings.head)
    marginals = resolve_marginals(backbone, settings.marginals)
    sweep = Sweep(marginals, list(settings.s_values), list(settings.k_values), list(settings.lam_values),
                  settings.eps, settings.count_query_in_r, list(settings.scorers), list(settings.thresholds))
    if not settings.patch_layers:
        raise EvaluationError("--patch-layer needs at least one block (or 'final')")
    for layer in settings.patch_layers:
        try:
            backbone.set_patch_layer(layer)
        except ValueError as err:
            raise EvaluationError(str(err)) from None
    # Only the per-image kinds the sweep reads are computed (the CLS-row rollout alone costs more than the forward).
    kinds = [m for m in marginals if m in PER_IMAGE_KINDS and m != "uniform"] or ["uniform"]
    if "ot" not in sweep.scorers:
        kinds = ["uniform"]  # mnn weighs every patch alike: no attention to capture
    backbone = set_runtime(backbone.to(device).eval(), settings.runtime)
    grids = list(dict.fromkeys(backbone.grid_side(g) for g in settings.grids))
    configs = [(g, layer) for g in grids for layer in dict.fromkeys(settings.patch_layers)]
    records = _records(data)
    runs = []
    with tempfile.TemporaryDirectory(prefix="vit-rerank-eval-") as scratch:
        cache_dir = Path(settings.cache_dir) if settings.cache_dir is not None else Path(scratch)
        for grid, layer in configs:
            backbone.grid = grid
            backbone.set_patch_layer(layer)
            key = cache_key(data.name, data.root, records, backbone, settings.model_kwargs, kinds, head_id)
            store = compute_features(backbone, records, key, cache_dir, batch_size=settings.batch_size,
                                     workers=settings.workers, progress=settings.progress)
            label = patches_label(grid, backbone.patch_layer) if len(configs) > 1 else ""
            outcome = evaluate(data, store, dataclasses.replace(sweep, patches=label), device,
                               rerank_batch_size=settings.rerank_batch, progress=settings.progress)
            runs.append((grid, backbone.patch_layer, store, outcome))
        doc = _document(settings, data, backbone, kinds, sweep, runs, device)
    doc["settings"]["head"] = head_id
    doc["timings"]["total_s"] = time.perf_counter() - start
    return doc


def weight_entropy(weights: np.ndarray) -> float:
    """Mean normalised entropy of patch weights ``(N, n)``: 1 for uniform, 0 for one patch."""
    w = np.clip(weights.astype(np.float64), 1e-30, None)
    w = w / w.sum(axis=1, keepdims=True)
    return float(np.mean(-(w * np.log(w)).sum(axis=1) / np.log(w.shape[1]))) if len(w) else float("nan")


def patches_label(grid: int, layer: int | None) -> str:
    """``G=16,L=10`` (``L=final``: the final output after the norm)."""
    return f"G={grid},L={'final' if layer is None else layer}"


def _merge(runs: list) -> tuple[Any, dict[str, Any]]:
    """One outcome from the per-configuration runs (their variants are already named ``G=..,L=..,``)."""
    first = runs[0][3]
    if len(runs) == 1:
        return first, {"embedding_s": runs[0][2].seconds}
    merged = dataclasses.replace(first, variants={}, sweep=[], rerank_timings={}, sigma={}, notes=[])
    for grid, layer, _store, outcome in runs:
        merged.variants.update(outcome.variants)
        merged.sweep += [{**row, "grid": grid, "patch_layer": layer} for row in outcome.sweep]
        merged.rerank_timings.update(outcome.rerank_timings)
        merged.sigma.update(outcome.sigma)
        merged.notes += [n for n in outcome.notes if n not in merged.notes]
    merged.timings = {
        "search_s": first.timings["search_s"],
        "rerank_s": sum(o.timings["rerank_s"] for *_, o in runs),
        "rerank_batch": first.timings["rerank_batch"],
    }
    total = merged.timings["rerank_s"]
    passes = sum(o.timings["rerank_queries_per_s"] * o.timings["rerank_s"] for *_, o in runs)  # queries scored
    merged.timings["rerank_queries_per_s"] = passes / total if total > 0 else 0.0
    return merged, {"embedding_s": sum(st.seconds for _, _, st, _ in runs)}


def _document(settings, data, backbone, kinds, sweep, runs, device) -> dict[str, Any]:
    outcome, embed_timing = _merge(runs)
    store: FeatureStore = runs[0][2]
    notes = list(outcome.notes)
    if backbone.random_weights:
        notes.append("random weights: the figures are meaningless except for testing")
    if settings.count_query_in_r:
        notes.append("R counts the query itself (the reference code's R); this deflates RP and MAP@R")
    if settings.limit is not None:
        notes.append(f"subset: --limit {settings.limit}")
    embedded = sum(st.images_embedded for _, _, st, _ in runs)
    seconds = embed_timing["embedding_s"]
    embedding = {
        "cached": all(st.cached for _, _, st, _ in runs),
        "images_embedded": embedded,
        "seconds": seconds,
        "images_per_second": embedded / seconds if seconds > 0 else 0.0,
        "cache_folder": str(store.folder) if settings.cache_dir is not None else None,
    }
    grids = list(dict.fromkeys(grid for grid, *_ in runs))
    layers = list(dict.fromkeys(layer for _, layer, *_ in runs))
    calibration = None
    if settings.calibrate:
        cal = calibrate(outcome.ranking, outcome.sigma, outcome.protocol, lambdas=sweep.lam_values,
                        ks=sweep.k_values, seed=settings.seed, source=f"{data.name} at {data.root}")
        calibration = cal.summary()
    entropy = {patches_label(grid, layer): {kind: weight_entropy(st.patch_weights[kind][st.ok]) for kind in kinds}
               for grid, layer, st, _ in runs}
    return {
        "dataset": data.name,
        "root": data.root,
        "protocol": outcome.protocol,
        "settings": {
            "model": backbone.name, "weights": settings.weights, "weights_id": backbone.weights_id,
            "random_weights": backbone.random_weights, "model_kwargs": settings.model_kwargs,
            "preprocessing": backbone.preprocessing,
            "grid": grids[0] if len(grids) == 1 else grids,
            "patch_layer": layers[0] if len(layers) == 1 else layers, "patch_weights": list(kinds),
            "scorers": sweep.scorers, "thresholds": sweep.thresholds,
            "marginals": sweep.marginals, "s": sweep.s_values, "k": sweep.k_values,
            "lambda": sweep.lam_values[0] if len(sweep.lam_values) == 1 else sweep.lam_values,
            "eps": sweep.eps, "count_query_in_r": sweep.count_query_in_r,
            "limit": settings.limit, "device": str(device), "batch_size": settings.batch_size,
        },
        "dataset_summary": data.summary(),
        "counts": outcome.counts,
        "embedding": embedding,
        "timings": {**embed_timing, **outcome.timings},
        "rerank_timings_s": outcome.rerank_timings,
        "metric_names": outcome.metric_names,
        "baseline": outcome.baseline,
        "variants": outcome.variants,
        "sweep": outcome.sweep,
        "patch_weight_entropy": entropy,
        "calibration": calibration,
        "failures": store.failures,
        "notes": notes,
    }
