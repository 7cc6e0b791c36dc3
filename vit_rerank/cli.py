"""``vit-rerank``: one command with subcommands for every user-facing job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks beside their named peers")
    which = bench.add_subparsers(dest="bench", required=True)
    ot_parser = which.add_parser("ot", help="batched Sinkhorn vs POT (solve_batch and per-pair sinkhorn)")
    ot_parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ot_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ot_parser.add_argument("--repeats", type=int, default=20, help="timed repeats per solver (median reported)")
    ot_parser.add_argument("--no-per-pair", action="store_true", help="skip the slow one-pair-at-a-time POT run")
    ot_parser.add_argument("--candidates", type=int, default=100, help="candidates per query")
    ot_parser.add_argument("--batch-queries", type=int, default=64, help="queries in the batched case")
    ot_parser.set_defaults(handler=_run_bench_ot)

    idx = which.add_parser("index", help="indexing throughput vs the bare model forward; search latency by stage")
    idx.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    idx.add_argument("--images", type=int, default=10_000, help="synthetic gallery size")
    idx.add_argument("--model", default="vit_tiny_patch16_224", help="timm model (random weights)")
    idx.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    idx.add_argument("--batch-size", type=int, default=32)
    idx.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    idx.add_argument("--queries", type=int, default=20, help="timed search queries")
    idx.add_argument("--rerank-k", type=int, default=100)
    idx.add_argument("--workdir", type=Path, default=None, help="where the synthetic images and the index go")
    idx.set_defaults(handler=_run_bench_index)
    from .bench.quality import add_parser as add_quality_bench
    from .bench.serve import add_parser as add_serve_bench

    add_serve_bench(which)
    add_quality_bench(which)


def _run_bench_ot(args: argparse.Namespace) -> int:
    from .bench.ot import run

    run(args.device, args.repeats, args.json, per_pair=not args.no_per_pair,
        candidates=args.candidates, batch_queries=args.batch_queries)
    return 0


def _run_bench_index(args: argparse.Namespace) -> int:
    from .bench.index import run

    return run(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from service.cli import add_serve_command

    add_serve_command(sub)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vit-rerank",
        description="Image retrieval with ViT global vectors, reranked by partial OT over patch tokens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from evaluation.cli import add_calibrate_command
    from evaluation.cli import add_commands as add_eval_commands
    from indexer.cli import add_commands as add_index_commands

    add_calibrate_command(add_index_commands(sub))
    add_eval_commands(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, not a bug: reported in one line, no traceback."""
    from reranker.backbones import WeightsUnavailableError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            WeightsUnavailableError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends with ``vit-rerank: error: ...`` and exit code 1
    (set ``VIT_RERANK_DEBUG=1`` for the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("vit-rerank: interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if os.environ.get("VIT_RERANK_DEBUG") == "1":
            raise
        print(f"vit-rerank: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
