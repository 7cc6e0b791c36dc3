"""``vit-rerank bench search``: every stage of one query, with the shipped default, beside the bare
model forward of the same image.

The gallery is the shared clothing photos (or ``--index DIR``), indexed with the real backbone as a
user's would be; the queries are photos of it, sent one at a time. Stages, in order:

- decode: the uploaded JPEG's bytes to a bounded image (the service's decoder);
- queue: waiting for the engine's worker thread (the in-process side's only queueing);
- embed: resizing, normalising and the model's forward with the patch layer and weights the
  index reads (:func:`indexer.embedding.embed_pil_images`);
- global search: FAISS top K by cosine;
- gather: the candidates' rows and stored patch features;
- structural: the structural scorer, the fusion and the sort, for K candidates;
- final: the hits built;
- in process: all of the above, end to end in this process;
- HTTP: the same query through the service over loopback (multipart upload, JSON answer), taking
  turns with the in-process side query by query.

The peer is the bare forward: ``model.forward_features`` of the timm model on the preprocessed
tensor, on a thread with the engine's torch threads. Every stage is a ratio of it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from reranker.defaults import RUNTIMES, RUNTIMES_HELP
from reranker.device import add_device_argument

from .load import busy_processes
from .timing import percentiles

#: The issue's goals on this CPU (shipped default, K = 100).
GOAL_SEARCH_P50_MS = 60.0
GOAL_HTTP_VS_IN_PROCESS = 1.15
STAGES = ("decode", "queue", "embed", "search", "gather", "structural", "final")
LABELS = {"search": "global search"}


def _photos(data: Path, limit: int | None) -> list[Path]:
    photos = sorted((data / "clothing-small").glob("*/*/*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no photos under {data / 'clothing-small'}: bench search needs the shared photos "
                                "(--data) or an index (--index) and query photos (--queries-from)")
    if limit is not None and limit < len(photos):  # spread over the classes, not the first folder only
        step = len(photos) / limit
        photos = [photos[int(k * step)] for k in range(limit)]
    return photos


def _build_index(folder: Path, photos: list[Path], weights: str, device: str) -> Path:
    """An index of ``photos`` with the shipped defaults, built by the ``index build`` command."""
    from vit_rerank.cli import main

    listing = folder / "gallery.csv"
    with listing.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "label"])
        writer.writerows([f"{p.parent.parent.name}/{p.parent.name}/{p.name}", str(p.resolve()), p.parent.name]
                         for p in photos)
    code = main(["index", "build", str(folder / "index"), "--from", str(listing), "--weights", weights,
                 "--device", device, "--no-progress"])
    if code:
        raise RuntimeError(f"index build failed ({code})")
    return folder / "index"


def _bare_forward_ms(backbone: Any, images: list[Any], repeats: int) -> list[float]:
    """The bare forward (:func:`vit_rerank.bench.timing.bare_forward`) of single preprocessed images (ms each)."""
    from .timing import bare_forward, synchronize

    forward = bare_forward(backbone)
    tensors = [backbone.transform(im.convert("RGB")).unsqueeze(0).to(backbone.device) for im in images]
    out = []
    with torch.inference_mode():
        for _ in range(2):
            forward(tensors[0])
        for k in range(repeats):
            t = time.perf_counter()
            forward(tensors[k % len(tensors)])
            synchronize(backbone.device)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def _preprocess_ms(backbone: Any, images: list[Any]) -> list[float]:
    out = []
    for im in images:
        t = time.perf_counter()
        backbone.transform(im.convert("RGB"))
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _client(base: str | None) -> Any:
    """An HTTP client of the server at ``base`` (a context manager), or a null one when there is none."""
    if base is None:
        return contextlib.nullcontext()
    import httpx  # the test extra's; only the HTTP side needs it

    return httpx.Client(base_url=base, timeout=120)


def _http_post_ms(client: Any, payload: bytes, form: dict[str, str]) -> float:
    """One ``/search`` over loopback, in milliseconds (upload, answer and JSON read)."""
    t = time.perf_counter()
    answer = client.post("/search", files={"image": ("q.jpg", payload, "image/jpeg")}, data=form)
    if answer.status_code != 200:
        raise RuntimeError(f"/search answered {answer.status_code}: {answer.text[:300]}")
    answer.json()
    return (time.perf_counter() - t) * 1e3


def run(index: Path | None, data: Path, weights: str, device_name: str, queries: int, gallery: int | None,
        rerank_k: int, http: bool, as_json: bool, load: int = 0, runtime: str | None = None) -> dict:
    """Measure every stage of ``queries`` single-image searches; print the table (or JSON). ``load``: that
    many busy processes run beside the measurement (:func:`vit_rerank.bench.load.busy_processes`);
    ``runtime``: search with it (default: the index's)."""
    from reranker.device import resolve_device
    from reranker.threads import run_on_own_thread

    device = resolve_device(device_name)
    photos = _photos(data, None)
    query_photos = photos[:: max(1, len(photos) // queries)][:queries]
    payloads = [p.read_bytes() for p in query_photos]
    with tempfile.TemporaryDirectory(prefix="vit-rerank-bench-search-") as tmp:
        if index is None:
            chosen = _photos(data, gallery)
            print(f"[bench search] indexing {len(chosen)} shared photos with {weights} ...", file=sys.stderr)
            t = time.perf_counter()
            index = run_on_own_thread(lambda: _build_index(Path(tmp), chosen, weights, device.type))
            print(f"[bench search] indexed in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        with busy_processes(load):
            summary = _measure(index, device, payloads, rerank_k, http, Path(tmp), runtime)
    summary["busy_processes"] = load
    print(json.dumps(summary, indent=2) if as_json else format_table(summary))
    return summary


def _measure(index: Path, device: torch.device, payloads: list[bytes], rerank_k: int, http: bool, tmp: Path,
             runtime: str | None = None) -> dict:
    """The stages in process (the engine, as the service runs it), the bare forward and the HTTP side.

    The HTTP side is a ``vit-rerank serve`` of the same index started beside the engine, and the two
    sides take turns query by query (in process first on even queries, HTTP first on odd ones): the
    ratio of their medians then compares runs made within the same second, not two phases minutes
    apart on a host whose speed drifts (the bare forward moved from 121 to 146 ms within one run)."""
    from indexer.search import SearchSettings
    from reranker.threads import run_on_own_thread
    from service.decoding import decode_sized
    from service.engine import Engine
    from service.settings import ServiceSettings

    from .serve import server_process

    engine = Engine.open(ServiceSettings(index=index, device=device.type, queue_size=8, runtime=runtime)).start()
    settings = SearchSettings(top_k=10, rerank_k=rerank_k)
    form = {"top_k": "10", "rerank_k": str(rerank_k)}
    stages: dict[str, list[float]] = {name: [] for name in (*STAGES, "in process")}
    http_ms: list[float] = []

    def in_process(payload: bytes, keep: bool) -> None:
        t0 = time.perf_counter()
        decoded = decode_sized(payload, "image/jpeg", engine)
        t1 = time.perf_counter()
        outcome = engine.search(decoded.image, settings, timeout=120)
        t2 = time.perf_counter()
        if keep:
            stages["decode"].append((t1 - t0) * 1e3)
            for name in STAGES[1:]:
                stages[name].append(outcome.timings_ms.get(name, float("nan")))
            stages["in process"].append((t2 - t0) * 1e3)

    flags = () if runtime is None else ("--runtime", runtime)
    server = server_process(index, device.type, 8, tmp / "server.log", flags) if http else contextlib.nullcontext()
    try:
        with server as base, _client(base) as client:
            info = engine.info()
            for k in range(-2, len(payloads)):  # two warm-up queries on each side
                payload, keep = payloads[k % len(payloads)], k >= 0
                if client is None or k % 2 == 0:
                    in_process(payload, keep)
                if client is not None:
                    ms = _http_post_ms(client, payload, form)
                    if keep:
                        http_ms.append(ms)
                    if k % 2 != 0:
                        in_process(payload, keep)
        images = [decode_sized(p, "image/jpeg", engine).image for p in payloads]
        backbone = engine.searcher.backbone
        effective = engine.searcher.effective(settings)
    finally:
        engine.close()
    # the peer, in the engine's conditions: a thread of its own with the engine's torch threads
    bare = run_on_own_thread(lambda: _bare_forward_ms(backbone, images, len(images)), engine.torch_threads)
    preprocess = _preprocess_ms(backbone, images)
    summary = _summary(info, device, effective, stages, bare, preprocess, http_ms)
    summary["runtime"] = backbone.runtime
    return summary


def _summary(info, device, effective, stages, bare, preprocess, http_ms) -> dict:
    bare_p50 = statistics.median(bare)
    rows = {name: percentiles(values) for name, values in stages.items()}
    rows["(preprocess, in embed)"] = percentiles(preprocess)
    if http_ms:
        rows["HTTP"] = percentiles(http_ms)
    in_process = rows["in process"]["p50"]
    http_ratio = rows["HTTP"]["p50"] / in_process if http_ms else None
    return {
        "model": info["model"], "weights": info["weights"], "images": info["images"], "device": str(device),
        "settings": {k: v for k, v in effective.values().items() if v is not None},
        "queries": len(stages["decode"]), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp's default)"),
        "bare_forward": percentiles(bare),
        "stages": rows,
        "ratio_to_bare_forward_p50": {name: r["p50"] / bare_p50 for name, r in rows.items()},
        "goals": {
            "search_p50_ms": in_process, "search_p50_met": in_process <= GOAL_SEARCH_P50_MS,
            "http_vs_in_process_p50": http_ratio,
            "http_vs_in_process_met": None if http_ratio is None else http_ratio <= GOAL_HTTP_VS_IN_PROCESS,
        },
    }


def format_table(summary: dict) -> str:
    s, rows, ratio = summary, summary["stages"], summary["ratio_to_bare_forward_p50"]
    bare = s["bare_forward"]
    lines = [f"one query at a time: {s['model']} ({s['weights']}), {s['images']} images, {s['device']}, "
             f"{s['queries']} queries; settings {s['settings']}",
             f"runtime {s.get('runtime', 'torch')} (the peer: torch's bare forward), "
             f"torch threads {s['torch_threads']}, OMP_WAIT_POLICY {s['omp_wait_policy']}, "
             f"{s['busy_processes']} busy processes beside it",
             f"{'stage':<26} {'p50 ms':>8} {'p95 ms':>8} {'÷ bare forward':>15}",
             f"{'bare forward (the peer)':<26} {bare['p50']:>8.1f} {bare['p95']:>8.1f} {1.0:>14.2f}x"]
    for name, r in rows.items():
        lines.append(f"{LABELS.get(name, name):<26} {r['p50']:>8.1f} {r['p95']:>8.1f} {ratio[name]:>14.2f}x")
    g = s["goals"]
    yes = {True: "met", False: "NOT met", None: "not measured"}
    http = "-" if g["http_vs_in_process_p50"] is None else f"{g['http_vs_in_process_p50']:.2f}x"
    lines.append(f"goals: search p50 <= {GOAL_SEARCH_P50_MS:g} ms {yes[g['search_p50_met']]} "
                 f"({g['search_p50_ms']:.1f} ms); HTTP <= {GOAL_HTTP_VS_IN_PROCESS}x in process "
                 f"{yes[g['http_vs_in_process_met']]} ({http})")
    return "\n".join(lines)


def default_weights() -> str:
    """The shared real backbone when this checkout sits beside it, else timm's pretrained weights."""
    shared = Path("../shared/weights/dinov2_vits14.safetensors")
    return str(shared) if shared.is_file() else "pretrained"


def add_parser(which) -> None:
    p = which.add_parser("search", help="every stage of one query (shipped default) beside the bare model forward")
    p.add_argument("--index", type=Path, default=None, help="an index to search (default: index the shared photos)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared photos")
    p.add_argument("--weights", default=None, help="default: ../shared/weights/dinov2_vits14.safetensors if present")
    add_device_argument(p)
    p.add_argument("--queries", type=int, default=40, help="timed queries")
    p.add_argument("--rerank-k", type=int, default=100)
    p.add_argument("--no-http", action="store_true", help="skip the HTTP side")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="measure on a loaded machine: N busy processes run beside it")
    p.add_argument("--quick", action="store_true", help="CI: 150 gallery photos, 8 queries")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help=f"search with this runtime (default: the index's): {RUNTIMES_HELP}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=_run_from_args)


def _run_from_args(a) -> int:
    run(a.index, a.data, a.weights or default_weights(), a.device, 8 if a.quick else a.queries,
        150 if a.quick else None, a.rerank_k, not a.no_http, a.json, a.load, a.runtime)
    return 0
