"""glibc's ``malloc`` kept from handing large buffers back to the kernel between queries.

A search allocates the same large buffers at every query: the candidates' stored patches (20 MB for 100
ViT-S/14 grids), their float32 blocks and cosines, the forward's activations. By default glibc serves
each with a fresh ``mmap`` and unmaps it when freed (or trims the heap top), so every query pays the
kernel to map and zero-fill them again. Raising the mmap threshold to its largest value (32 MiB on 64-bit)
and the trim threshold to 128 MiB keeps that memory in the heap for the next query.

Measured on this project's 2-core CPU, 12 searches per run (DINOv2 ViT-S/14, K = 100, MNN in blocks of
16), four alternated runs each: the gather stage 11.0-12.2 ms -> 5.6-6.4 ms, the structural scorer
76.6-90.5 -> 61.1-80.6 ms, the system time of the two 21-25 ms -> 0-3 ms per query.

``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment (glibc's own settings) are
left alone, and ``VIT_RERANK_MALLOC=default`` keeps glibc's defaults. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's ``mallopt`` parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 128 << 20


def keep_large_buffers() -> bool:
    """Set the two thresholds in this process (once is enough); whether they were set."""
    if os.environ.get("VIT_RERANK_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user's own glibc settings win
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
