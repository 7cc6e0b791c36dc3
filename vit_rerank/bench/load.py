"""A loaded machine on demand: busy processes beside a benchmark, bounded in time."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Iterator

#: Each busy process ends by itself after this long, whatever happens to the benchmark.
BUSY_LIMIT_S = 900

# A busy loop that also ends as soon as the benchmark that started it is gone (killed, so never cleaned up).
_BUSY = """import os, time
parent, end = os.getppid(), time.monotonic() + {limit}
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def busy_processes(count: int, limit_s: float = BUSY_LIMIT_S) -> Iterator[None]:
    """Run ``count`` processes that each keep one core busy (a pure-Python loop, at normal priority,
    as another user's work would) while the block runs; they are killed when it ends."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY.format(limit=float(limit_s))]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
