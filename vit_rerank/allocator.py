"""glibc's ``malloc`` kept from handing large buffers back to the kernel between queries.

A search allocates the same large buffers at every query: the candidates' stored patches (20 MB for 100
ViT-S/14 grids), their float32 blocks and cosines, the forward's activations. By default glibc serves
each with a fresh ``mmap`` and unmaps it when freed (or trims the heap top), so every query pays the
kernel to map and zero-fill them again. Here the mmap threshold goes to its largest value (32 MiB on
64-bit), the trim threshold to 64 MiB, and the number of malloc arenas to 2 (glibc's default, 8 per
core, lets each of the service's many threads keep its own free memory).

Measured on this project's 2-core CPU, 12 searches per run (DINOv2 ViT-S/14, K = 100, MNN in blocks of
16), alternated runs: the gather stage 11.0-12.2 ms -> 5.5-6.9 ms, the structural scorer 76.6-90.5 ->
61-81 ms, the system time of the two 21-25 ms -> 0-2 ms per query. A trim threshold of 32 MiB kept
little of it (5.6 + 12.6 ms of system time). The soak test's server (64 clients, 30 s) grew -17, +21 and
+99 MB after its warm-up (bound 150; peaks 1.6-1.7 GB); with 8 arenas per core and a 64 or 128 MiB trim
threshold it grew up to 393 MB (peaks up to 2.2 GB), with glibc's defaults +71 and -333 MB.

``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_ARENA_MAX`` in the environment (glibc's
own settings) leave everything alone, and ``VIT_RERANK_MALLOC=default`` keeps glibc's defaults. Elsewhere
than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's ``mallopt`` parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 64 << 20
ARENA_MAX = 2


def keep_large_buffers() -> bool:
    """Set the arena limit and the two thresholds in this process (once, before threads allocate); whether
    they were set."""
    if os.environ.get("VIT_RERANK_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")):
        return False  # the user's own glibc settings win
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(M_ARENA_MAX, ARENA_MAX)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
