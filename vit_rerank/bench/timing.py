"""Wall-clock timing helpers shared by the benchmarks."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(backbone) -> Callable[[torch.Tensor], object]:
    """The peer the speed benchmarks put the pipeline beside: the timm model's own ``forward_features``
    (fused attention, nothing kept) when the backbone wraps one, else the backbone's forward without
    attention capture (e.g. the Hugging Face CvT). Call it under ``torch.inference_mode()``."""
    model = getattr(backbone, "model", None)
    if model is not None and hasattr(model, "forward_features"):
        return model.forward_features
    from indexer.embedding import forward_features

    return lambda batch: forward_features(backbone, batch, ())


def time_call(fn: Callable[[], T], device: torch.device, repeats: int, warmup: int = 1) -> tuple[T, float]:
    """``fn()``'s last result and its median wall time in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return result, statistics.median(times)


def percentiles(values: list[float]) -> dict[str, float]:
    """``{"p50", "p95"}`` of ``values``: the median, and the nearest-rank 95th percentile (the smallest
    value with at least 95 % of the values at or below it)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return {"p50": statistics.median(ordered), "p95": ordered[rank - 1]}
