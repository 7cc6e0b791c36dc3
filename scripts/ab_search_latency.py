"""Search latency against the embedding alone, in process, for A/B runs of two checkouts.

The service's path (``keep_plans=True``), the real DINOv2 ViT-S/14 of ``../shared/weights``, a fresh
index of 36 shared photos built by the checkout's own recipe, top 10 of 100 reranked; one JSON line
with the p50 of the embedding alone, of the search, and their ratio. Run it from each checkout with
that checkout first on the path, alternating, a few times (the machine's noise is ~15 %)::

    (cd OLD && PYTHONPATH=$PWD python /path/to/ab_search_latency.py)
    (cd NEW && PYTHONPATH=$PWD python scripts/ab_search_latency.py)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = "vit_small_patch14_dinov2"
CLASSES = ("hat", "shoes", "pants", "dress", "skirt", "t-shirt")


def median_ms(fn: Callable[[Image.Image], object], queries: list[Image.Image], n: int = 24) -> float:
    fn(queries[0])  # warm-up
    times = []
    for k in range(n):
        start = time.perf_counter()
        fn(queries[k % len(queries)])
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    import indexer
    from indexer.build import IndexSpec, build_index
    from indexer.embedding import embed_pil_images
    from indexer.search import Searcher, SearchSettings
    from indexer.sources import ImageRecord
    from reranker.backbones import create_backbone
    from reranker.defaults import default_model_kwargs

    torch.manual_seed(0)
    photos = [p for cls in CLASSES for p in sorted((SHARED / "data" / "clothing-small" / "test" / cls).glob("*.jpg"))[:6]]
    records = [ImageRecord(str(p), str(p), p.parent.name, {}) for p in photos]
    kwargs = default_model_kwargs(MODEL)
    backbone = create_backbone(MODEL, str(SHARED / "weights" / "dinov2_vits14.safetensors"), model_kwargs=kwargs)
    folder = Path(tempfile.mkdtemp()) / "index"
    build_index(folder, backbone, records, IndexSpec(), model_kwargs=kwargs, workers=0, progress=False)
    searcher = Searcher(indexer.open_index(folder), backbone, "cpu")
    queries = [Image.open(p).convert("RGB") for p in photos[::3]]
    settings = SearchSettings(top_k=10, rerank_k=100)
    embed = median_ms(lambda q: embed_pil_images(backbone, [q], None), queries)
    search = median_ms(lambda q: searcher.search([q], settings, keep_plans=True), queries)
    print(json.dumps({"embed_p50_ms": embed, "search_p50_ms": search, "ratio": search / embed}))


if __name__ == "__main__":
    main()
