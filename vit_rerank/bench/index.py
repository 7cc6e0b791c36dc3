"""``vit-rerank bench index``: indexing throughput beside the bare model forward, bytes per
image, and search latency split into embed / FAISS / rerank / total.

The gallery is synthetic (random shapes on gradients, JPEG), made once in a work folder, and
indexed with the model's index defaults (patch layer, grid, stored weights). The peer of indexing
is the model itself: the timm model's bare ``forward_features`` on the same images already decoded
and preprocessed in memory; the indexer's own forward (patch layer, pooling, attention capture
when rollout weights are stored) is shown beside it. The indexing pipeline decodes in worker
processes, stores the features and commits; the ratio says how much of that is hidden behind
the forward.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from indexer.build import IndexSpec, add_records, create_index, default_patch_weights
from indexer.embedding import forward_features
from indexer.loading import load_image
from indexer.search import Searcher, SearchSettings
from indexer.sources import from_folder
from reranker.backbones import create_index_backbone, default_model_kwargs, set_runtime
from reranker.defaults import DEFAULT_RUNTIME
from reranker.device import resolve_device

from .report import print_report
from .timing import bare_forward, percentiles, synchronize

DEFAULT_MODEL = "vit_tiny_patch16_224"


def synthetic_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A gradient with a dozen random ellipses and rectangles: varied, compressible like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + np.linspace(0, 1, h)[:, None, None] * (
        rng.uniform(0, 255, 3))
    image = Image.fromarray(np.clip(ramp / 2, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = (x0, y0, x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def _write_chunk(args: tuple[Path, range]) -> None:
    folder, seeds = args
    for seed in seeds:
        synthetic_image(seed).save(folder / f"{seed:06d}.jpg", quality=90)


def make_synthetic_gallery(folder: Path, n: int) -> Path:
    """``n`` JPEGs in ``folder`` (kept between runs: only missing ones are made)."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (folder / f"{i:06d}.jpg").exists()]
    if missing:
        print(f"making {len(missing)} synthetic images in {folder} ...", file=sys.stderr, flush=True)
        step = 250
        chunks = [(folder, missing[i : i + step]) for i in range(0, len(missing), step)]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write_chunk, chunks))
    return folder


@dataclass
class IndexBenchResult:
    model: str
    device: str
    images: int
    batch_size: int
    workers: int
    weights: str  # the weights' identity
    patch_weights: str  # what the index stores (uniform: no attention capture)
    grid: int
    patch_layer: int | None
    runtime: str  # how the indexer's forward ran (the peer is torch's)
    forward_plain_img_s: float  # the peer: the timm forward alone (fused attention, no capture)
    forward_img_s: float  # the indexer's forward: patch layer, pooling, attention capture for rollout
    indexing_img_s: float  # decode + forward + store + commit, end to end
    ratio_indexing_to_forward: float  # indexing over the bare forward (goal >= 0.9)
    bytes_per_image_patch_store: float
    bytes_per_image_directory: float
    search_queries: int
    rerank_k: int
    latency_ms: dict[str, dict[str, float]]  # stage -> {p50, p95}


def _forward_throughput(backbone, batches: list[torch.Tensor], weights: str, device: torch.device) -> float:
    """Images per second of the indexer's forward over preprocessed batches already in memory."""
    forward_features(backbone, batches[0], (weights,))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        forward_features(backbone, batch, (weights,))
    synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def _bare_throughput(backbone, batches: list[torch.Tensor], device: torch.device) -> float:
    """Images per second of the bare forward (:func:`vit_rerank.bench.timing.bare_forward`)."""
    forward = bare_forward(backbone)
    with torch.inference_mode():
        forward(batches[0])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            forward(batch)
        synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def _directory_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "reports" not in p.parts)


def run_index_bench(
    *,
    images: int = 10_000,
    model: str = DEFAULT_MODEL,
    device_name: str = "auto",
    batch_size: int = 32,
    workers: int = 2,
    forward_images: int = 512,
    queries: int = 20,
    rerank_k: int = 100,
    workdir: Path | None = None,
    progress: bool = True,
    weights: str = "random",
    runtime: str = DEFAULT_RUNTIME,
) -> IndexBenchResult:
    device = resolve_device(device_name)
    root = Path(workdir) if workdir else Path(tempfile.gettempdir()) / "vit-rerank-bench-index"
    gallery_dir = make_synthetic_gallery(root / "images", images + queries)
    records = from_folder(gallery_dir)
    gallery_records, query_records = records[:images], records[images : images + queries]

    # the backbone of a new index, with the index defaults of the model (patch layer, grid, stored weights)
    backbone = create_index_backbone(model, weights, model_kwargs=default_model_kwargs(model)).to(device)
    weights_id = backbone.weights_id
    weights = default_patch_weights(backbone)

    # The peer: the bare timm forward on decoded, preprocessed images held in memory; beside it, the
    # indexer's forward (patch layer, pooling, and the attention capture when the index stores rollout).
    sample = [backbone.transform(load_image(r.path)) for r in gallery_records[: min(forward_images, images)]]
    batches = [torch.stack(sample[i : i + batch_size]).to(device) for i in range(0, len(sample), batch_size)]
    forward_plain_img_s = _bare_throughput(backbone, batches, device)
    set_runtime(backbone, runtime)
    forward_img_s = _forward_throughput(backbone, batches, weights, device)
    del batches

    index_path = root / f"index-{model}"
    if index_path.exists():
        shutil.rmtree(index_path)
    with create_index(index_path, backbone, IndexSpec(patch_weights=weights)) as index_dir:
        report = add_records(index_dir, backbone, gallery_records, batch_size=batch_size, workers=workers,
                             progress=progress)
        if report.failures:
            raise RuntimeError(f"{len(report.failures)} synthetic images failed to load: {report.failures[:3]}")
        info = index_dir.info()
        searcher = Searcher(index_dir, backbone, device)
        settings = SearchSettings(top_k=10, rerank_k=rerank_k)
        query_images = [load_image(r.path) for r in query_records]
        searcher.search(query_images[:1], settings)  # warm-up
        stages: dict[str, list[float]] = {"embed": [], "search": [], "rerank": [], "total": []}
        for image in query_images:
            timings = searcher.search([image], settings)[0].timings_ms
            for stage in stages:
                stages[stage].append(timings[stage])
    return IndexBenchResult(
        model=model, device=str(device), images=images, batch_size=batch_size, workers=workers,
        weights=weights_id, patch_weights=weights, grid=backbone.grid, patch_layer=backbone.patch_layer,
        runtime=backbone.runtime, forward_plain_img_s=forward_plain_img_s, forward_img_s=forward_img_s,
        indexing_img_s=report.images_per_second,
        ratio_indexing_to_forward=report.images_per_second / forward_plain_img_s,
        bytes_per_image_patch_store=info["bytes_per_image"],
        bytes_per_image_directory=_directory_bytes(index_path) / images,
        search_queries=len(query_images), rerank_k=rerank_k,
        latency_ms={stage: percentiles(v) for stage, v in stages.items()},
    )


def format_index_table(r: IndexBenchResult) -> str:
    layer = "final" if r.patch_layer is None else f"block {r.patch_layer}"
    lines = [
        f"bench index: {r.images} synthetic images, {r.model} ({r.weights}), {r.device}, "
        f"batch {r.batch_size}, {r.workers} decoding workers; patches {r.grid}x{r.grid} of {layer}, "
        f"stored weights {r.patch_weights}; the indexer's runtime {r.runtime}",
        "",
        "| throughput | images/s | ratio to the bare forward |",
        "|---|---|---|",
        f"| bare forward: timm forward_features (peer) | {r.forward_plain_img_s:.1f} | 1.00 |",
        f"| the indexer's forward (patch layer, pooling, {r.patch_weights} weights) | {r.forward_img_s:.1f} | "
        f"{r.forward_img_s / r.forward_plain_img_s:.2f} |",
        f"| indexing: decode + forward + store + commit | {r.indexing_img_s:.1f} | "
        f"**{r.ratio_indexing_to_forward:.2f}** (goal >= 0.9) |",
        "",
        f"bytes per image: patch store {r.bytes_per_image_patch_store:,.0f}, "
        f"whole index directory {r.bytes_per_image_directory:,.0f}",
        "",
        f"search latency over {r.search_queries} queries, K = {r.rerank_k} reranked (ms)",
        "",
        "| stage | p50 | p95 |",
        "|---|---|---|",
    ]
    for stage, p in r.latency_ms.items():
        lines.append(f"| {stage} | {p['p50']:.1f} | {p['p95']:.1f} |")
    return "\n".join(lines)


def run(args) -> int:
    result = run_index_bench(
        images=args.images, model=args.model, device_name=args.device, batch_size=args.batch_size,
        workers=args.workers, queries=args.queries, rerank_k=args.rerank_k, workdir=args.workdir,
        progress=not args.json, weights=args.weights, runtime=args.runtime,
    )
    return print_report(asdict(result), lambda _: format_index_table(result), args.json)
