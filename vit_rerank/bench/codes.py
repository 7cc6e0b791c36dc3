"""``vit-rerank bench codes``: bytes per image against reranking quality, with the real backbone.

On each shared set (clothing-small validation and test, corridor) the real DINOv2 ViT-S/14 features of a
preset's patch configuration (the evaluation's cache; default: the ``shipped`` preset's native 16 x 16
grid of block -3) are reranked with the gallery's patches stored as: float16 (what an index stores by
default), PCAs (float16), and product-quantizer codes of several sizes, each fitted on that set's own
patches as an index fits them on its gallery. Queries keep float patches (as a real query does; a PCA
index reduces the query's too); only the candidates' patches are compressed. The global ranking is the
same for every row, so the differences are the compression's alone. Each preset named with
``--presets`` is one column per set (presets must share their patch configuration).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from indexer.search_params import SHIPPED, preset, preset_patches

from .quality import DEFAULT_DATA, add_sets_argument, preset_structural, preset_variant, selected_sets
from .report import report_handler

#: The default variants: four evaluations per set, 5 min on a 2-core CPU (pq8, pq16 and PCA 32 as well took
#: 10.5 min; their figures are in docs/benchmarks.md).
SPECS = ("pq32",)
PCA_DIMS = (64,)


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("codes", help="bytes per image vs reranking quality: float16, PCA, PQ codes (real backbone)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--specs", default=",".join(SPECS), help=f"patch codes to measure (default {','.join(SPECS)})")
    p.add_argument("--weights", default=str(DEFAULT_DATA.parent / "weights" / "dinov2_vits14.safetensors"))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--presets", default=SHIPPED, help=f"comma list of presets sharing one patch configuration "
                   f"(default {SHIPPED}; e.g. ot-tuned,paper for the 7 x 7 final grid)")
    p.add_argument("--pca", default=",".join(map(str, PCA_DIMS)), help="PCA dimensions to measure, comma list")
    add_sets_argument(p)
    p.set_defaults(handler=report_handler(measure, table))


def _variants(patches: np.ndarray, specs: list[str],
              pca_dims: list[int]) -> dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]]:
    """name -> (patch vector bytes per image, compress(patches) -> float patches)."""
    from indexer.patch_codes import PatchCodec
    from indexer.pca import PatchPCA

    n, dim = patches.shape[1], patches.shape[2]
    out: dict[str, tuple[int, Callable]] = {"float16": (n * 2 * dim, lambda p: p)}
    for d in pca_dims:
        pca = PatchPCA.fit(patches, d)
        out[f"pca{d}"] = (n * 2 * d, lambda p, pca=pca: pca.transform(p).astype(np.float16))
    for spec in specs:
        codec = PatchCodec.fit(patches, spec)
        out[spec] = (n * codec.bytes_per_patch, lambda p, c=codec: c.decode(c.encode(p)).astype(np.float16))
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

    presets = [p for p in args.presets.split(",") if p]
    patches_of = {str(preset_patches(p)) for p in presets}
    if len(patches_of) != 1:
        raise ValueError(f"presets {', '.join(presets)} read different patch features: measure them in separate runs")
    patch_config = preset_patches(presets[0])
    kwargs = default_model_kwargs(DEFAULT_MODEL)
    backbone = create_backbone(DEFAULT_MODEL, args.weights, grid=patch_config["grid"], model_kwargs=kwargs,
                               patch_layer=patch_config["patch_layer"]).eval()
    specs = [s for s in args.specs.split(",") if s]
    pca_dims = [int(d) for d in args.pca.split(",") if d]
    settings = {p: (preset_structural(p), preset(p)["lam"], preset(p)["rerank_k"]) for p in presets}
    kinds = sorted({st.weight_kind for st, _, _ in settings.values() if st.weight_kind} or {"uniform"})
    K = max(k for _, _, k in settings.values())
    device = torch.device("cpu")
    out: dict[str, Any] = {"model": DEFAULT_MODEL, "weights_id": backbone.weights_id, "k": K, "sets": {},
                           "patches": patch_config, "grid": backbone.grid,
                           "settings": {p: preset_variant(p) for p in presets}}
    start = time.perf_counter()
    for name, loader, folder in selected_sets(args.sets):
        print(f"[bench codes] {name}...", file=sys.stderr)
        data = load_dataset(loader, str(args.data / folder))
        records = data.records if isinstance(data, ClassSet) else data.queries + data.database
        key = cache_key(data.name, data.root, records, backbone, kwargs, kinds)
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
        print(f"[bench codes] {name}: {len(ranking.query_rows)} queries", file=sys.stderr)
        for variant, (nbytes, compress) in _variants(patches[store.ok], specs, pca_dims).items():
            cand = torch.from_numpy(compress(patches).astype(np.float16))
            query = torch.from_numpy(patches.astype(np.float16))
            if variant.startswith("pca"):
                query = cand  # a PCA index reduces the query's patches too
            mixed = _MixedFeatures(feats, query, cand)
            row: dict[str, Any] = {"bytes": nbytes}
            for setting, (structural, lam, k) in settings.items():
                if variant.startswith("pca") and structural.marginals == "crosscorr" and structural.scorer == "ot":
                    structural = dataclasses.replace(structural, marginals="rollout")  # as a PCA index must
                batch = auto_rerank_batch(k, patches.shape[1], cand.shape[-1], device)
                sigma = structural_scores(ranking, mixed, k, structural, eps=0.05, batch=batch, progress=False)
                row[setting] = metrics(reranked_relevance(ranking, sigma, k, lam))[metric]
            rows[variant] = row
        out["sets"][name] = {"metric": metric, "queries": len(ranking.query_rows), "rows": rows}
    out["seconds"] = time.perf_counter() - start
    return out


def table(doc: dict[str, Any]) -> str:
    settings = list(doc["settings"])
    grid = doc["grid"]
    lines = [f"{doc['model']} {doc['weights_id']}, {grid} x {grid} patches of layer "
             f"{doc['patches']['patch_layer'] if doc['patches']['patch_layer'] is not None else 'final'}; "
             + "; ".join(f"{k} = {v}" for k, v in doc["settings"].items()),
             f"patch B/img: stored patch vectors per image ({grid * grid} patches; the index also keeps "
             f"{4 * grid * grid} B of float32 patch weights); metric x100; (delta vs float16)"]
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

