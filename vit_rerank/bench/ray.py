"""``vit-rerank bench ray``: indexing throughput on Ray against the number of model actors, beside
the single-process local build (``vit-rerank index build``) of the same images as the baseline.

Every run indexes the same source into a fresh folder: the local build into one index, each Ray
run into ``--shards`` shards, on a local Ray instance with as many CPUs as the most actors asked
(one CPU per actor). Seconds are wall time of the whole build, model loading and actor start-up
included. The cost per million images is computed from the measured rate: machine-hours at that
rate, times ``--price-per-hour`` (an assumption the table states, not a measurement).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
#: The default images: clothing-small's test half (372 photos), so the three builds of a default run (local,
#: 1 and 2 actors) stay within 10 minutes on a 2-core CPU (all 713 photos took 9.5 min there).
SHARED_PHOTOS = SHARED_DATA / "clothing-small" / "test"
SHARED_WEIGHTS = SHARED_DATA.parent / "weights" / "dinov2_vits14.safetensors"


@dataclass
class Row:
    """One run: who indexed, how many images, how long, and what that rate costs."""

    run: str
    actors: int
    images: int
    seconds: float
    images_per_second: float
    vs_local: float
    hours_per_million: float
    usd_per_million: float


def _local(source: Path, folder: Path, model: str, weights: str, batch_size: int, workers: int) -> tuple[int, float]:
    from indexer.build import build_index
    from indexer.sources import from_source
    from reranker.backbones import create_backbone

    kwargs = default_model_kwargs(model)
    start = time.perf_counter()
    backbone = create_backbone(model, weights, model_kwargs=kwargs)
    report = build_index(folder, backbone, from_source(source), model_kwargs=kwargs, batch_size=batch_size,
                         workers=workers, progress=False, save_report=False)
    return report.added, time.perf_counter() - start


def _ray(source: Path, folder: Path, model: str, weights: str, batch_size: int, actors: int,
         shards: int) -> tuple[int, float]:
    from indexer.build import plan_index
    from indexer.distributed_build import build_sharded
    from reranker.backbones import create_backbone

    kwargs = default_model_kwargs(model)
    start = time.perf_counter()
    backbone = create_backbone(model, weights, model_kwargs=kwargs)
    manifest = plan_index(backbone, model_kwargs=kwargs)
    report = build_sharded(folder, source, shards=shards, manifest=manifest, weights=weights, actors=actors,
                           batch_size=batch_size, commit_every=256, progress=False)
    return report.added, time.perf_counter() - start


def run(args) -> int:
    # The local Ray instance listens on loopback only (Ray's single-machine mode); read when ray is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    actor_counts = sorted({int(x) for x in args.workers.split(",")})
    source = Path(args.source)
    weights = args.weights or (str(SHARED_WEIGHTS) if SHARED_WEIGHTS.exists() and args.model == DEFAULT_MODEL
                               else "random")
    work = Path(tempfile.mkdtemp(prefix="bench-ray-", dir=args.workdir))
    rows: list[Row] = []
    try:
        images, seconds = _local(source, work / "local", args.model, weights, args.batch_size, args.decode_workers)
        rows.append(_row("local (1 process)", 0, images, seconds, None, args.price_per_hour))
        base = rows[0].images_per_second
        import ray

        ray.init(address="local", num_cpus=max(actor_counts), include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_mb * 2**20)
        try:
            for n in actor_counts:
                images, seconds = _ray(source, work / f"ray-{n}", args.model, weights, args.batch_size, n,
                                       args.shards)
                rows.append(_row(f"ray, {n} actor{'s' * (n > 1)}", n, images, seconds, base, args.price_per_hour))
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts = {"source": str(source), "model": args.model, "weights": weights, "cpus": os.cpu_count(),
             "price_per_hour_usd_assumed": args.price_per_hour, "shards": args.shards}
    if args.json:
        print(json.dumps({**facts, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    print(f"{facts['source']}: {rows[0].images} images, {args.model} ({weights}), {os.cpu_count()} CPUs")
    print(f"{'run':<20} {'images':>6} {'s':>7} {'img/s':>7} {'vs local':>8} {'h/1M img':>9} {'$/1M img':>9}")
    for r in rows:
        print(f"{r.run:<20} {r.images:>6} {r.seconds:>7.1f} {r.images_per_second:>7.1f} {r.vs_local:>7.2f}x "
              f"{r.hours_per_million:>9.1f} {r.usd_per_million:>9.2f}")
    print(f"$/1M img: machine-hours per million images at the measured rate x an assumed "
          f"${args.price_per_hour:.2f} per machine-hour (not measured)")
    return 0


def _row(name: str, actors: int, images: int, seconds: float, base: float | None, price: float) -> Row:
    rate = images / seconds if seconds > 0 else 0.0
    hours = 1e6 / rate / 3600 if rate > 0 else float("inf")
    return Row(name, actors, images, seconds, rate, rate / base if base else 1.0, hours, hours * price)


def add_parser(which) -> None:
    """``bench ray`` under ``vit-rerank bench``."""
    p = which.add_parser("ray", help="indexing throughput on Ray by number of model actors, vs the local build")
    p.add_argument("--workers", default="1,2", help="model actor counts to measure, comma-separated (default 1,2)")
    p.add_argument("--from", dest="source", default=str(SHARED_PHOTOS), help="images to index (default: the shared "
                   "clothing-small test photos)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"backbone (default {DEFAULT_MODEL})")
    p.add_argument("--weights", default=None, help="pretrained | random | PATH (default: the shared DINOv2 weights "
                   "for the default model, else random)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-workers", type=int, default=2, help="decoding processes of the local build (default 2)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--object-store-mb", type=int, default=300, help="the local Ray object store (default 300 MB)")
    p.add_argument("--price-per-hour", type=float, default=0.10,
                   help="assumed USD per machine-hour for the cost column (default 0.10)")
    p.add_argument("--workdir", type=Path, default=None, help="where the indexes go (removed afterwards)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=run)
