"""``vit-rerank``: one command with subcommands for every user-facing job."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


#: The modules whose ``register(commands)`` adds their commands, in help order.
COMMAND_MODULES = ("indexer.cli", "evaluation.cli", "training.cli", "vit_rerank.bench.cli", "service.cli")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vit-rerank",
        description="Image retrieval with ViT global vectors, reranked by partial OT over patch tokens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
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
