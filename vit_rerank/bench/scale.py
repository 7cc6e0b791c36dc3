"""``vit-rerank bench scale``: galleries of 10^5 and 10^6 images on this machine, and what 10^7 would cost.

The gallery is synthesised from a pool of base images' features: with ``--features real`` the shared
clothing photos (test and validation) embedded by the real DINOv2 ViT-S/14 (the evaluation's feature
cache); with ``gaussian`` clustered random unit vectors (for tests). Each synthetic image copies a base
image: its global vector plus Gaussian noise (re-normalised), its patch codes with a quarter of its patches
swapped for other base images' patches, its weights; its label is the base image's class. The patch
codes are trained on the base pool's patches. Queries are other noisy copies of base images, with
float patches (as a real query has).

Reported per size: bytes per image on disk (everything in the index folder) and in memory (RSS growth
from opening the index and running the queries), build time (commits + FAISS training and filling; the
synthesis itself is excluded, the PQ encoding cost is measured on real patches and added separately),
time to open, search p50/p95 by stage (global top-K, gather + decode of the K candidates, OT), recall@100
of the global stage against exact search, and P@1 by inherited label. The 10^7 row is computed from
the largest measured size's per-image figures (and ``auto``'s plan for 10^7), and says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reranker.rerank import Features, rerank_batch

from .quality import DEFAULT_DATA
from .report import report_handler

PROJECTED = 10_000_000
CHUNK = 50_000


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("scale", help="10^5 / 10^6-image galleries: bytes, build time, latency by stage, recall; "
                                       "10^7 projected")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes (default 100000,1000000)")
    p.add_argument("--features", default="real", choices=["real", "gaussian"],
                   help="base features: the real backbone on the shared photos, or clustered Gaussians (tests)")
    p.add_argument("--patch-codes", default="pq32", help="patch codes of the synthetic galleries (default pq32)")
    p.add_argument("--max-index-memory", default="4G", help="budget for --factory auto (default 4G)")
    p.add_argument("--queries", type=int, default=50, help="timed queries per size")
    p.add_argument("--rerank-k", type=int, default=100)
    p.add_argument("--workdir", type=Path, default=None, help="where the galleries go (removed afterwards)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--weights", default=str(DEFAULT_DATA.parent / "weights" / "dinov2_vits14.safetensors"),
                   help="the DINOv2 ViT-S/14 checkpoint for --features real")
    p.set_defaults(handler=report_handler(measure, table))


# --- the base pool ------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def gaussian_pool(n: int = 600, dim: int = 64, grid: int = 7, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, dim))
    labels = rng.integers(0, 10, n)
    g = _unit(centres[labels] + 0.8 * rng.standard_normal((n, dim)))
    p = _unit(centres[labels][:, None, :] + rng.standard_normal((n, grid * grid, dim)))
    w = np.full((n, grid * grid), 1.0 / grid ** 2, np.float32)
    return {"global": g, "patches": p, "weights": w, "labels": labels.astype(str), "source": "gaussian"}


def real_pool(data: Path, weights: str) -> dict[str, Any]:
    """The shared clothing photos (test + validation) through the real backbone (cached like an evaluation)."""
    from evaluation.datasets import load_dataset
    from evaluation.features import cache_key, compute_features, default_cache_dir
    from reranker.backbones import create_backbone
    from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

    kwargs = default_model_kwargs(DEFAULT_MODEL)
    backbone = create_backbone(DEFAULT_MODEL, weights, grid=7, model_kwargs=kwargs).eval()
    parts = {"global": [], "patches": [], "weights": [], "labels": []}
    for folder in ("clothing-small/test", "clothing-small/validation"):
        data_set = load_dataset("folder", str(data / folder))
        key = cache_key(data_set.name, data_set.root, data_set.records, backbone, kwargs, ["rollout"])
        store = compute_features(backbone, data_set.records, key, default_cache_dir(), progress=False)
        ok = store.ok
        parts["global"].append(store.global_features[ok])
        parts["patches"].append(np.asarray(store.patch_features[ok], np.float32))
        parts["weights"].append(store.patch_weights["rollout"][ok])
        parts["labels"].append(np.array([r.label for r in data_set.records])[ok].astype(str))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["source"] = f"real: {backbone.name} {backbone.weights_id} on clothing-small test+validation"
    return out


# --- one size -----------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def synthetic_chunk(pool: dict[str, Any], codes: np.ndarray, start: int, n: int, seed: int):
    """Images ``start .. start+n``: noisy copies of base images (see the module's docstring)."""
    from indexer.index_dir import NewImages
    from indexer.metadata import ImageRow
    from reranker.features import StoredFeatures

    rng = np.random.default_rng(seed)
    base = len(pool["global"])
    src = (np.arange(start, start + n) * 7919) % base
    g = _unit(pool["global"][src] + 0.03 * rng.standard_normal((n, pool["global"].shape[1]), np.float32))
    c = codes[src].copy()
    patches = c.shape[1]
    swap = rng.random((n, patches)) < 0.25
    donors = rng.integers(0, base, (n, patches))
    which = rng.integers(0, patches, (n, patches))
    c[swap] = codes[donors[swap], which[swap]]
    rows = [ImageRow(id=f"s{start + i}", path="", label=str(pool["labels"][s]), content_hash=f"s{start + i}",
                     width=224, height=224, bytes=0) for i, s in enumerate(src)]
    return NewImages(rows, StoredFeatures(g, c, {"rollout": pool["weights"][src]})), src


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def measure_size(n: int, pool: dict[str, Any], codec, folder: Path, args) -> dict[str, Any]:
    from indexer.index_dir import IndexDir
    from indexer.index_plan import parse_bytes
    from indexer.manifest import Manifest
    from indexer.search_params import default

    dim = pool["global"].shape[1]
    grid = int(round(pool["patches"].shape[1] ** 0.5))
    manifest = Manifest(model="synthetic", weights="synthetic", weights_source="synthetic", grid=grid,
                        global_dim=dim, patch_dim=dim, patch_weights="rollout", factory="auto",
                        patch_codes=codec.spec, max_index_memory=parse_bytes(args.max_index_memory))
    codes = codec.encode(pool["patches"])
    index_dir = IndexDir.create(folder, manifest)
    codec.save(folder)
    index_dir.codec = codec
    commit_s = 0.0
    for start in range(0, n, CHUNK):
        new, _ = synthetic_chunk(pool, codes, start, min(CHUNK, n - start), seed=start)
        t = time.perf_counter()
        index_dir.commit_new(new)
        commit_s += time.perf_counter() - t
    t = time.perf_counter()
    index_dir.train()
    train_s = time.perf_counter() - t
    plan = index_dir.plan
    index_dir.close()
    disk = _folder_bytes(folder)

    rss0 = _rss()
    t = time.perf_counter()
    index_dir = IndexDir.open(folder)
    open_s = time.perf_counter() - t
    rng = np.random.default_rng(12345)
    qsrc = rng.integers(0, len(pool["global"]), args.queries)
    qg = _unit(pool["global"][qsrc] + 0.03 * rng.standard_normal((args.queries, dim), np.float32))
    qp = _unit(pool["patches"][qsrc] + 0.02 * rng.standard_normal(pool["patches"][qsrc].shape, np.float32))
    qw = pool["weights"][qsrc]
    stages: dict[str, list[float]] = {"global": [], "gather": [], "ot": []}
    hits_global, hits_rerank = 0, 0
    k = args.rerank_k
    for q in range(args.queries):
        t0 = time.perf_counter()
        scores, ids = index_dir.faiss.search(qg[q:q + 1], k)
        t1 = time.perf_counter()
        valid = ids[0] >= 0
        rows, feats = index_dir.features(ids[0][valid].tolist(), decode=False)
        cand_p = index_dir.decode_patches(feats.patch_features, "cpu")
        t2 = time.perf_counter()
        res = rerank_batch(
            Features(torch.from_numpy(qg[q:q + 1]), torch.from_numpy(qp[q:q + 1]), torch.from_numpy(qw[q:q + 1])),
            Features(torch.from_numpy(feats.global_features)[None], cand_p[None],
                     torch.from_numpy(feats.weights())[None]),
            torch.from_numpy(scores[:, valid]), marginals="crosscorr", s=default("s"), lam=default("lam"),
        )
        t3 = time.perf_counter()
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[name].append(dt)
        label = str(pool["labels"][qsrc[q]])
        hits_global += rows[0].label == label
        hits_rerank += rows[int(res.order[0, 0])].label == label
    rss = _rss() - rss0
    recall = index_dir.recall(queries=min(100, args.queries * 2), k=100)
    index_dir.close()
    return {
        "images": n, "measured": True, "factory": plan.factory,
        "search_param": f"{plan.search_param}={plan.search_value}" if plan.search_param else "",
        "disk_bytes_per_image": disk / n, "memory_bytes_per_image": max(rss, 0) / n,
        "index_memory_estimate_bytes": plan.estimated_bytes,
        "patch_bytes_per_image": grid * grid * (codec.bytes_per_patch + 4),
        "build_s": commit_s + train_s, "commit_s": commit_s, "train_s": train_s, "open_s": open_s,
        "latency_ms": {name: _percentiles(v) for name, v in stages.items()},
        "recall_at_100": recall["recall_at_k"],
        "p_at_1_global": hits_global / args.queries, "p_at_1_reranked": hits_rerank / args.queries,
    }


def projected_row(last: dict[str, Any], dim: int, max_memory: int, encode_s_per_image: float) -> dict[str, Any]:
    from indexer.index_plan import choose

    plan = choose(PROJECTED, dim, max_memory)
    per_image_index = last["index_memory_estimate_bytes"] / last["images"]
    return {
        "images": PROJECTED, "measured": False, "factory": plan.factory, "search_param": "(tuned at build)",
        "note": f"computed from the {last['images']}-image row's per-image figures and auto's plan for 10^7",
        "disk_bytes_per_image": last["disk_bytes_per_image"] - per_image_index + plan.estimated_bytes / PROJECTED,
        "memory_bytes_per_image": plan.estimated_bytes / PROJECTED,
        "index_memory_estimate_bytes": plan.estimated_bytes,
        "patch_bytes_per_image": last["patch_bytes_per_image"],
        "build_s": last["build_s"] / last["images"] * PROJECTED,
        "encode_s": encode_s_per_image * PROJECTED,
    }


def measure(args) -> dict[str, Any]:
    from indexer.index_plan import parse_bytes
    from indexer.patch_codes import PatchCodec

    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    pool = real_pool(args.data, args.weights) if args.features == "real" else gaussian_pool()
    codec = PatchCodec.fit(pool["patches"], args.patch_codes)
    t = time.perf_counter()
    codec.encode(pool["patches"])
    encode_s = (time.perf_counter() - t) / len(pool["patches"])
    work = Path(tempfile.mkdtemp(prefix="vit-rerank-scale-", dir=args.workdir))
    rows = []
    start = time.perf_counter()
    try:
        for n in sizes:
            print(f"[bench scale] {n} images...", file=sys.stderr)
            rows.append(measure_size(n, pool, codec, work / f"g{n}", args))
            shutil.rmtree(work / f"g{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    last = rows[-1]
    rows.append(projected_row(last, pool["global"].shape[1], parse_bytes(args.max_index_memory), encode_s))
    million = 1_000_000
    per_million = {
        "from_size": last["images"],
        "disk_gb": last["disk_bytes_per_image"] * million / 1e9,
        "ram_gb_index_estimate": last["index_memory_estimate_bytes"] / last["images"] * million / 1e9,
        "ram_gb_measured": last["memory_bytes_per_image"] * million / 1e9,
        "build_hours_index": last["build_s"] / last["images"] * million / 3600,
        "encode_hours_pq": encode_s * million / 3600,
    }
    return {"features": pool["source"], "base_images": len(pool["global"]), "patch_codes": codec.spec,
            "max_index_memory": args.max_index_memory, "queries": args.queries, "rerank_k": args.rerank_k,
            "cpu_threads": torch.get_num_threads(), "rows": rows, "per_million": per_million,
            "seconds": time.perf_counter() - start}


def table(doc: dict[str, Any]) -> str:
    lines = [f"features: {doc['features']} ({doc['base_images']} base images); patch codes {doc['patch_codes']}; "
             f"auto index within {doc['max_index_memory']}; {doc['queries']} queries, K={doc['rerank_k']}",
             f"{'images':>10} {'index':<18} {'disk B/img':>10} {'RAM B/img':>9} {'patch B':>7} {'build s':>8} "
             f"{'open s':>6} {'global p50/p95':>15} {'gather p50/p95':>15} {'OT p50/p95':>13} {'R@100':>6} "
             f"{'P@1 g/rr':>9}",
             "-" * 140]
    for r in doc["rows"]:
        index = f"{r['factory']} {r['search_param']}".strip()
        if r["measured"]:
            lat = r["latency_ms"]
            cells = (f"{r['open_s']:6.2f} " + " ".join(f"{lat[s]['p50']:6.1f}/{lat[s]['p95']:<7.1f}" for s in lat)
                     + f" {r['recall_at_100']:6.3f} {r['p_at_1_global']:.2f}/{r['p_at_1_reranked']:.2f}")
        else:
            cells = f"projected: {r['note']}; + {r['encode_s'] / 3600:.1f} h PQ encoding"
        lines.append(f"{r['images']:>10} {index[:18]:<18} {r['disk_bytes_per_image']:10.0f} "
                     f"{r['memory_bytes_per_image']:9.0f} {r['patch_bytes_per_image']:7d} {r['build_s']:8.1f} {cells}")
    pm = doc["per_million"]
    lines.append(f"per million images (from the {pm['from_size']} row): disk {pm['disk_gb']:.2f} GB, RAM "
                 f"{pm['ram_gb_index_estimate']:.2f} GB global index (+{pm['ram_gb_measured']:.2f} GB measured RSS "
                 f"growth), build {pm['build_hours_index']:.3f} h index + {pm['encode_hours_pq']:.3f} h PQ encoding "
                 f"on {doc['cpu_threads']} threads (embedding the images with the backbone not included)")
    lines.append(f"total {doc['seconds']:.0f} s")
    return "\n".join(lines)

