"""``vit-rerank bench structural``: the structural stage of one query beside the global search, in one run.

One query against K candidates at the ``shipped`` patch configuration (DINOv2 ViT-S/14: 16 x 16 patches of
width 384), what a search pays after its global top K: the **gather** of the K candidates' stored
patches (float16 rows of a memory-mapped array, as the patch store serves them; or uint8 codes decoded on
the device) and the **score** (``rerank_batch`` with the preset's scorer, its final score and order).
The peer, timed in the same run, is the **global search**: FAISS exact inner-product top K over
``--gallery`` random 384-d vectors. Rows: float16 patches, a 64-d PCA, product-quantizer codes. The
values do not change the cost, so the features are random; quality per row is ``bench codes``' job.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reranker.device import add_device_argument

from .report import report_handler
from .timing import percentiles

GOAL_MS = 30.0


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("structural", help="gather + score of K candidates vs the global search (shipped preset)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_device_argument(p)
    p.add_argument("--candidates", type=int, default=100, help="K")
    p.add_argument("--gallery", type=int, default=100_000, help="vectors in the global index")
    p.add_argument("--stored", type=int, default=2_000, help="images in the memory-mapped patch array")
    p.add_argument("--repeats", type=int, default=30, help="timed queries per row")
    p.add_argument("--quick", action="store_true", help="a small gallery and few repeats (CI)")
    p.set_defaults(handler=report_handler(measure, table))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import time

    import faiss

    from indexer.patch_codes import PatchCodec
    from indexer.search_params import SHIPPED, preset
    from reranker.device import resolve_device
    from reranker.rerank import Features, rerank_batch

    if args.quick:
        args.gallery, args.stored, args.repeats = 10_000, 300, 5
    device = resolve_device(args.device)
    setting = preset(SHIPPED)
    K, n, dim = args.candidates, 256, 384
    rng = np.random.default_rng(0)
    gallery = _unit(rng.standard_normal((args.gallery, dim), dtype=np.float32))
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    query_g = _unit(rng.standard_normal((1, dim), dtype=np.float32))
    options = {k: setting[k] for k in ("scorer", "threshold", "lam")}

    def timed(fn) -> dict[str, float]:
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        return percentiles(times)

    out: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(), "k": K, "patches": n,
                           "gallery": args.gallery, "setting": options, "goal_ms": GOAL_MS}
    out["global_search"] = timed(lambda: index.search(query_g, K))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, d, codec_spec in (("float16", dim, None), ("pca64", 64, None), ("pq16", dim, "pq16")):
            base = _unit(rng.standard_normal((args.stored, n, d), dtype=np.float32))
            query = Features(torch.from_numpy(query_g[0]).to(device), torch.from_numpy(base[0]).to(device)).unsqueeze(0)
            if codec_spec is None:
                stored = np.lib.format.open_memmap(Path(tmp) / f"{name}.npy", "w+", np.float16, base.shape)
                stored[:] = base
                decode = None
            else:
                codec = PatchCodec.fit(base[: min(len(base), 200)].reshape(-1, d), codec_spec)
                codes = codec.encode(base)
                stored = np.lib.format.open_memmap(Path(tmp) / f"{name}.npy", "w+", codes.dtype, codes.shape)
                stored[:] = codes
                decode = codec
            picks = [np.sort(rng.choice(args.stored, K, replace=False)) for _ in range(args.repeats + 1)]
            state = {"i": 0}

            def gather() -> torch.Tensor:
                rows_ = picks[state["i"] % len(picks)]
                state["i"] += 1
                t = torch.from_numpy(np.ascontiguousarray(stored[rows_])).to(device)
                return t if decode is None else decode.decode_torch(t, device).to(torch.float16)

            feats = gather()
            cands = Features(torch.from_numpy(gallery[:K]).to(device), feats).unsqueeze(0)
            scores = torch.zeros(1, K, device=device)
            row = {"patches": name, "bytes_per_image": int(stored[0].nbytes),
                   "gather": timed(gather),
                   "score": timed(lambda: rerank_batch(query, cands, scores, **options))}
            row["total_p50"] = row["gather"]["p50"] + row["score"]["p50"]
            row["ratio_to_global_search"] = row["total_p50"] / out["global_search"]["p50"]
            rows.append(row)
    out["rows"] = rows
    return out


def table(doc: dict[str, Any]) -> str:
    g = doc["global_search"]
    lines = [f"structural stage of 1 query x {doc['k']} candidates x {doc['patches']} patches on {doc['device']} "
             f"(torch threads {doc['torch_threads']}), setting {doc['setting']}",
             f"peer: FAISS exact top-{doc['k']} over {doc['gallery']} vectors: p50 {g['p50']:.2f} ms, "
             f"p95 {g['p95']:.2f} ms",
             f"{'patches':<9} {'B/image':>8} {'gather p50':>11} {'score p50':>10} {'score p95':>10} {'total p50':>10} "
             f"{'/ global':>9} {'goal':>10}",
             "-" * 86]
    for r in doc["rows"]:
        met = "met" if r["total_p50"] <= doc["goal_ms"] else "NOT met"
        lines.append(f"{r['patches']:<9} {r['bytes_per_image']:>8} {r['gather']['p50']:>11.2f} "
                     f"{r['score']['p50']:>10.2f} {r['score']['p95']:>10.2f} {r['total_p50']:>10.2f} "
                     f"{r['ratio_to_global_search']:>8.1f}x "
                     f"{'<= ' + format(doc['goal_ms'], 'g') + ' ms ' + met:>10}")
    return "\n".join(lines)
