"""``vit-rerank index calibrate``: measure which reranking setting pays on an index, and store the choice.

The labelled queries come from a class folder or a pairs set (embedded with the index's own backbone,
grid, patch layer, patch weights and PCA, and cached like an evaluation), or from the index's own labels
(leave-one-out over its stored features, nothing embedded). The candidates are the settings the index
can serve: mutual nearest neighbours over the thresholds, and, on grids small enough for it to be
affordable (:data:`evaluation.calibrate.OT_MAX_PATCHES`), OT with its stored patch weights,
cross-correlation (not with PCA-reduced patches) and uniform over s; each over lambda and K.
:func:`evaluation.calibrate.calibrate` chooses (or refuses) one. The work is bounded: at most
``max_queries`` labelled queries (a seeded sample), all mnn thresholds from one matching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from indexer.build import backbone_for
from indexer.calibration import Calibration
from indexer.index_dir import IndexDir
from indexer.sources import ImageRecord

from .calibrate import K_GRID, LAMBDA_GRID, OT_MAX_PATCHES, S_GRID, THRESHOLD_GRID, calibrate
from .datasets import ClassSet, EvalSet, load_dataset
from .features import FeatureStore, cache_key, compute_features
from indexer.search_params import default

from .protocol import Sweep, evaluate, rerank_marginals


def index_marginals(index_dir: IndexDir) -> list[str]:
    """The evaluation marginals an index can serve: its stored kind, crosscorr (full-size patches), uniform."""
    manifest = index_dir.manifest
    out = [] if manifest.patch_weights == "uniform" else [manifest.patch_weights]
    if not manifest.pca_dim:
        out.append("crosscorr")
    return out + ["uniform"]


def own_labels(index_dir: IndexDir) -> tuple[ClassSet, FeatureStore]:
    """The index's labelled images as a leave-one-out class set, with their stored features."""
    rows = [r for r in index_dir.rows() if r.label is not None]
    if not rows:
        raise ValueError(f"{index_dir.folder} has no labelled images: calibrate with --from LABELLED "
                         "(a folder per class, or a pairs set with ground_truth.csv)")
    gathered = index_dir.store.gather([(r.segment, r.offset) for r in rows])
    names = sorted({r.label for r in rows})
    labels = np.array([names.index(r.label) for r in rows], np.int64)
    data = ClassSet("index", str(index_dir.folder), [ImageRecord(r.path, r.id, r.label) for r in rows], labels)
    store = FeatureStore(
        folder=index_dir.folder, key={}, ids=[r.id for r in rows], ok=np.ones(len(rows), bool),
        global_features=gathered.global_features, patch_features=gathered.patch_features,
        patch_weights=gathered.patch_weights, cached=True,
    )
    return data, store


def labelled_set(source: str) -> EvalSet:
    """A pairs set when ``source`` has a ``ground_truth.csv``, else a folder per class."""
    return load_dataset("pairs" if (Path(source) / "ground_truth.csv").is_file() else "folder", source)


def embedded_set(index_dir: IndexDir, source: str, device: torch.device, cache_dir: Path, *, weights: str | None,
                 batch_size: int, workers: int, progress: bool) -> tuple[EvalSet, FeatureStore]:
    """``source`` embedded the way the index embeds its images (cached), patches reduced by its PCA."""
    data = labelled_set(source)
    records = data.records if isinstance(data, ClassSet) else data.queries + data.database
    backbone = backbone_for(index_dir.manifest, device, weights).eval()
    kinds = [index_dir.manifest.patch_weights]
    key = cache_key(data.name, data.root, records, backbone, index_dir.manifest.model_kwargs, kinds)
    store = compute_features(backbone, records, key, cache_dir, batch_size=batch_size, workers=workers,
                             progress=progress)
    if index_dir.pca is not None:
        store.patch_features = index_dir.reduce_patches(np.asarray(store.patch_features, np.float32)).astype(np.float16)
    return data, store


def calibrate_index(
    folder: Path, source: str | None, device: torch.device, *, cache_dir: Path, weights: str | None = None,
    seed: int = 0, s_values: Sequence[float] = S_GRID, lambdas: Sequence[float] = LAMBDA_GRID,
    ks: Sequence[int] = K_GRID, thresholds: Sequence[float] = THRESHOLD_GRID, batch_size: int = 32,
    workers: int = 2, progress: bool = True, max_queries: int | None = 600,
) -> Calibration:
    """Calibrate the index in ``folder`` on ``source`` (None: its own labels) and store the result."""
    with IndexDir.open(folder) as index_dir:
        if source is None:
            data, store = own_labels(index_dir)
            origin = "the index's own labels (leave-one-out)"
        else:
            data, store = embedded_set(index_dir, source, device, cache_dir, weights=weights, batch_size=batch_size,
                                       workers=workers, progress=progress)
            origin = f"{data.name} at {data.root}"
        scorers = ["mnn"] + (["ot"] if index_dir.manifest.grid ** 2 <= OT_MAX_PATCHES else [])
        sweep = Sweep(index_marginals(index_dir), list(s_values), list(ks), list(lambdas), eps=default("eps"),
                      scorers=scorers, thresholds=list(thresholds))
        outcome = evaluate(data, store, sweep, device, progress=progress, max_queries=max_queries, seed=seed)
        cal = calibrate(outcome.ranking, outcome.sigma, outcome.protocol, lambdas=lambdas, ks=ks, seed=seed,
                        source=origin)
        cal.marginals, _ = rerank_marginals(cal.marginals)  # a stored per-image kind is the search's "rollout"
        cal.details["baseline_all_queries"] = outcome.baseline
        index_dir.set_calibration(cal)
        return cal
