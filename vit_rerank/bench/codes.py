"""``vit-rerank bench codes``: bytes per image against reranking quality, with the real backbone.

On each shared set (clothing-small validation and test, corridor) the real DINOv2 ViT-S/14 features
(the evaluation's cache) are reranked with the gallery's patches stored as: float16 (today's index), a
PCA to 128 dimensions (float16), and product-quantizer codes of several sizes, each fitted on that set's
own patches as an index fits them on its gallery. Queries keep float patches (as a real query does);
only the candidates' patches are compressed. The global ranking is the same for every row, so the
differences are the compression's alone. Two settings: the shipped default (cross-correlation, s=0.5,
lambda=0.5, K=100; the PCA row uses rollout, as a PCA index must) and the method's (rollout, s=1,
lambda=1, K=100), which leans harder on the patches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .quality import DEFAULT_DATA, SETS
from .report import report_handler

SPECS = ("pq16", "pq24", "pq32", "pq48")
PCA_DIM = 128
SETTINGS = {"default": ("crosscorr", 0.5, 0.5), "method": ("rollout", 1.0, 1.0)}
K = 100


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("codes", help="bytes per image vs reranking quality: float16, PCA, PQ codes (real backbone)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--specs", default=",".join(SPECS), help=f"patch codes to measure (default {','.join(SPECS)})")
    p.add_argument("--weights", default=str(DEFAULT_DATA.parent / "weights" / "dinov2_vits14.safetensors"))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--settings", default="default,method", help="default, method or both")
    p.set_defaults(handler=report_handler(measure, table))


def _variants(patches: np.ndarray, specs: list[str]) -> dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]]:
    """name -> (patch bytes per image incl. float32 weights, compress(patches) -> float patches)."""
    from indexer.patch_codes import PatchCodec
    from indexer.pca import PatchPCA

    n, dim = patches.shape[1], patches.shape[2]
    out: dict[str, tuple[int, Callable]] = {"float16": (n * (2 * dim + 4), lambda p: p)}
    pca = PatchPCA.fit(patches, PCA_DIM)
    out[f"pca{PCA_DIM}"] = (n * (2 * PCA_DIM + 4), lambda p: pca.transform(p).astype(np.float16))
    for spec in specs:
        codec = PatchCodec.fit(patches, spec)
        out[spec] = (n * (codec.bytes_per_patch + 4), lambda p, c=codec: c.decode(c.encode(p)).astype(np.float16))
    return out


class _MixedFeatures:
    """The evaluation's device features with float query patches and compressed candidate patches."""

    def __init__(self, base, query_patches: torch.Tensor, cand_patches: torch.Tensor) -> None:
        self.base, self.qp, self.cp = base, query_patches, cand_patches
        self.device = base.device

    def features(self, rows: torch.Tensor, kind: str | None = None):
        from reranker.rerank import Features

        f = self.base.features(rows, kind)
        table = self.qp if rows.dim() == 1 else self.cp  # queries are (B,), candidates (B, K)
        return Features(f.global_features, table[rows].float(), f.patch_weights)


def measure(args) -> dict[str, Any]:
    from evaluation.calibrate import PRIMARY_METRIC
    from evaluation.datasets import ClassSet, load_dataset
    from evaluation.features import cache_key, compute_features, default_cache_dir
    from evaluation.metrics import class_metrics, recall_at
    from evaluation.protocol import (DeviceFeatures, Structural, auto_rerank_batch, class_ranking, place_ranking,
                                     reranked_relevance, structural_scores)
    from reranker.backbones import create_backbone
    from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

    kwargs = default_model_kwargs(DEFAULT_MODEL)
    backbone = create_backbone(DEFAULT_MODEL, args.weights, grid=7, model_kwargs=kwargs).eval()
    specs = [s for s in args.specs.split(",") if s]
    settings = [s for s in args.settings.split(",") if s]
    device = torch.device("cpu")
    out: dict[str, Any] = {"model": DEFAULT_MODEL, "weights_id": backbone.weights_id, "k": K, "sets": {},
                           "settings": {s: SETTINGS[s] for s in settings}}
    start = time.perf_counter()
    for name, loader, folder in SETS:
        print(f"[bench codes] {name}...", file=sys.stderr)
        data = load_dataset(loader, str(args.data / folder))
        records = data.records if isinstance(data, ClassSet) else data.queries + data.database
        key = cache_key(data.name, data.root, records, backbone, kwargs, ["rollout"])
        store = compute_features(backbone, records, key, default_cache_dir(), progress=False)
        feats = DeviceFeatures(store, device)
        if isinstance(data, ClassSet):
            ranking, _ = class_ranking(data, store, feats, K, False)
            metrics = lambda rel: class_metrics(rel, ranking.r)  # noqa: E731
        else:
            ranking, _ = place_ranking(data, store, feats, K)
            metrics = recall_at
        metric = PRIMARY_METRIC[data.protocol]
        patches = np.asarray(store.patch_features, np.float32)
        rows: dict[str, Any] = {"baseline": {"bytes": 0, **{s: metrics(ranking.relevant)[metric] for s in settings}}}
        for variant, (nbytes, compress) in _variants(patches[store.ok], specs).items():
            cand = torch.from_numpy(compress(patches).astype(np.float16))
            query = torch.from_numpy(patches.astype(np.float16))
            if variant.startswith("pca"):
                query = cand  # a PCA index reduces the query's patches too
            mixed = _MixedFeatures(feats, query, cand)
            row: dict[str, Any] = {"bytes": nbytes}
            for setting in settings:
                marginals, s, lam = SETTINGS[setting]
                if variant.startswith("pca") and marginals == "crosscorr":
                    marginals = "rollout"
                batch = auto_rerank_batch(K, patches.shape[1], cand.shape[-1], device)
                sigma = structural_scores(ranking, mixed, K, Structural("ot", marginals, s), eps=0.05, batch=batch,
                                          progress=False)
                row[setting] = metrics(reranked_relevance(ranking, sigma, K, lam))[metric]
            rows[variant] = row
        out["sets"][name] = {"metric": metric, "queries": len(ranking.query_rows), "rows": rows}
    out["seconds"] = time.perf_counter() - start
    return out


def table(doc: dict[str, Any]) -> str:
    settings = list(doc["settings"])
    lines = [f"{doc['model']} {doc['weights_id']}, K={doc['k']}; settings: "
             + "; ".join(f"{k} = {v[0]}, s={v[1]}, lambda={v[2]}" for k, v in doc["settings"].items()),
             "patch B/img: stored patch data per image (49 patches + float32 weights); metric x100; "
             "(delta vs float16)"]
    header = f"{'variant':<10} {'patch B/img':>11}"
    for name, st in doc["sets"].items():
        for setting in settings:
            header += f" {name[:13] + ' ' + setting[:3]:>22}"
    lines += [header, "-" * len(header)]
    variants = list(next(iter(doc["sets"].values()))["rows"])
    for v in variants:
        line = f"{v:<10} {next(iter(doc['sets'].values()))['rows'][v]['bytes']:>11}"
        for st in doc["sets"].values():
            for setting in settings:
                value, ref = st["rows"][v][setting], st["rows"]["float16"][setting]
                line += f" {100 * value:12.2f} ({100 * (value - ref):+6.2f})"
        lines.append(line)
    lines.append("metrics: " + ", ".join(f"{k}: {v['metric']} over {v['queries']} queries" for k, v in doc["sets"].items()))
    lines.append(f"total {doc['seconds']:.0f} s")
    return "\n".join(lines)

