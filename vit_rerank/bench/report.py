"""How every benchmark hands its result back: one JSON document, or the table made from it."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def print_report(doc: dict[str, Any], table: Callable[[dict[str, Any]], str], as_json: bool) -> int:
    """Print ``doc`` as indented JSON (``--json``) or as ``table(doc)``; the exit status 0."""
    print(json.dumps(doc, indent=2) if as_json else table(doc))
    return 0


def report_handler(measure: Callable[[argparse.Namespace], dict[str, Any]],
                   table: Callable[[dict[str, Any]], str]) -> Callable[[argparse.Namespace], int]:
    """A command handler: ``measure(args)``, then :func:`print_report` honouring ``args.json``."""
    return lambda args: print_report(measure(args), table, args.json)
