"""``--factory auto``: choose the global index from the number of vectors and a memory budget, and
tune its search parameter for a target recall against exact search.

The rule (per vector of ``d`` float32 dimensions, ids 8 bytes):

* up to ``EXACT_MAX`` vectors, and when they fit: ``Flat`` (exact);
* up to ``HNSW_MAX`` vectors, when the graph fits too (``HNSW32``: ~``4d + 8 + 280`` bytes): HNSW;
* when the raw vectors fit: ``IVF<nlist>,Flat``;
* else ``IVF<nlist>,PQ<m>`` with the largest ``m`` bytes per vector that fits (``OVER BUDGET`` noted
  when even the smallest does not).

``nlist`` is about ``sqrt(n)`` (a power of two, 16 to 65536); the coarse quantizer is trained on a
sample of ``TRAIN_PER_LIST`` vectors per list (at most ``TRAIN_MAX``). ``nprobe`` (IVF) or ``efSearch``
(HNSW) is the smallest of a doubling ladder whose recall@K, measured on a sample of gallery vectors as
queries (each one's own id left out), reaches the target.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import faiss
import numpy as np

from .vector_index import base_index

EXACT_MAX = 50_000
HNSW_MAX = 500_000
HNSW_M = 32
TRAIN_PER_LIST = 50
TRAIN_MAX = 200_000
PQ_SIZES = (96, 64, 48, 32, 24, 16, 12, 8)
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_MAX_MEMORY = 4 << 30
RECALL_K = 100
TUNE_QUERIES = 200

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"512M"``, ``"4G"``, ``"1.5G"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"a memory size looks like 512M or 4G, not {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class IndexPlan:
    """What ``auto`` chose, why, and what it measured."""

    factory: str
    vectors: int
    dim: int
    max_memory: int
    estimated_bytes: int
    reason: str
    training_sample: int = 0
    search_param: str | None = None  # nprobe | efSearch
    search_value: int | None = None
    target_recall: float = DEFAULT_TARGET_RECALL
    recall_at_k: float | None = None
    recall_k: int = RECALL_K
    recall_queries: int = 0
    tuning: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexPlan":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def nlist_for(n: int) -> int:
    return int(min(65536, max(16, 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1))))))


def flat_bytes(n: int, d: int) -> int:
    return n * (4 * d + 8)


def hnsw_bytes(n: int, d: int) -> int:
    return n * (4 * d + 8 + int(HNSW_M * 2 * 4 * 1.1))


def ivf_bytes(n: int, d: int, nlist: int, code_bytes: int) -> int:
    return n * (code_bytes + 8) + nlist * d * 4


def choose(n: int, d: int, max_memory: int = DEFAULT_MAX_MEMORY, target_recall: float = DEFAULT_TARGET_RECALL,
           ) -> IndexPlan:
    """The index for ``n`` vectors of ``d`` dimensions within ``max_memory`` bytes."""
    budget = f"{max_memory / 2**30:.2f} GiB"
    if n <= EXACT_MAX and flat_bytes(n, d) <= max_memory:
        return IndexPlan("Flat", n, d, max_memory, flat_bytes(n, d),
                         f"{n} vectors <= {EXACT_MAX}: exact search is fast enough", target_recall=target_recall)
    if n <= HNSW_MAX and hnsw_bytes(n, d) <= max_memory:
        return IndexPlan(f"HNSW{HNSW_M}", n, d, max_memory, hnsw_bytes(n, d),
                         f"{n} vectors <= {HNSW_MAX} and the graph fits in {budget}", target_recall=target_recall)
    nlist = nlist_for(n)
    sample = min(n, TRAIN_MAX, TRAIN_PER_LIST * nlist)
    if ivf_bytes(n, d, nlist, 4 * d) <= max_memory:
        return IndexPlan(f"IVF{nlist},Flat", n, d, max_memory, ivf_bytes(n, d, nlist, 4 * d),
                         f"{n} vectors: the raw vectors fit in {budget}", sample, target_recall=target_recall)
    sizes = [m for m in PQ_SIZES if d % m == 0 and m < 4 * d] or [1]
    for m in sizes:
        if ivf_bytes(n, d, nlist, m) <= max_memory:
            return IndexPlan(f"IVF{nlist},PQ{m}", n, d, max_memory, ivf_bytes(n, d, nlist, m),
                             f"{n} raw vectors exceed {budget}: {m}-byte PQ codes fit", sample,
                             target_recall=target_recall)
    m = sizes[-1]
    return IndexPlan(f"IVF{nlist},PQ{m}", n, d, max_memory, ivf_bytes(n, d, nlist, m),
                     f"OVER BUDGET: even {m}-byte PQ codes of {n} vectors exceed {budget}", sample,
                     target_recall=target_recall)


def set_search_param(index: faiss.Index, name: str | None, value: int | None) -> None:
    """Set ``nprobe`` / ``efSearch`` on the index under its ID map (saved with the index)."""
    if not name or value is None:
        return
    base = base_index(index)
    if name == "nprobe":
        faiss.extract_index_ivf(base).nprobe = int(value)
    elif name == "efSearch":
        faiss.downcast_index(base).hnsw.efSearch = int(value)


def search_param_of(index: faiss.Index) -> tuple[str | None, list[int]]:
    """The parameter that trades recall for speed in ``index``, and the ladder of values to try."""
    base = base_index(index)
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None:
        return "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= ivf.nlist] or [ivf.nlist]
    if isinstance(base, faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512]
    return None, []


def exact_top_k(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Ids ``(Q, k)`` of the exact inner-product top ``k``, streaming over ``(ids, vectors)`` chunks."""
    return exact_search(queries, chunks, k)[1]


def exact_search(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids ``(Q, k)`` of the exact inner-product top ``k``, best first, streaming over
    ``(ids, vectors)`` chunks; id -1 where fewer than ``k`` exist."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in chunks:
        kk = min(k, len(ids))
        if kk == 0:
            continue
        scores, pos = faiss.knn(np.ascontiguousarray(queries), np.ascontiguousarray(vectors, np.float32), kk,
                                metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(approx: np.ndarray, exact: np.ndarray, query_ids: np.ndarray, k: int) -> float:
    """Mean overlap of the two top-``k`` lists, each query's own id left out of both."""
    total = 0.0
    for a, e, own in zip(approx, exact, query_ids):
        a = [i for i in a.tolist() if i != own and i >= 0][:k]
        e = [i for i in e.tolist() if i != own and i >= 0][:k]
        total += len(set(a) & set(e)) / max(len(e), 1)
    return total / max(len(exact), 1)


def tune(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray,
         chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], plan: IndexPlan, k: int = RECALL_K) -> None:
    """Set the smallest ``nprobe``/``efSearch`` whose recall@k reaches ``plan.target_recall`` (else the
    largest tried) and record the ladder in ``plan``."""
    name, ladder = search_param_of(index)
    exact = exact_top_k(queries, chunks(), k + 1)
    plan.recall_k, plan.recall_queries, plan.tuning = k, len(queries), []
    if name is None:
        approx = index.search(np.ascontiguousarray(queries), k + 1)[1]
        plan.recall_at_k = recall_at_k(approx, exact, query_ids, k)
        return
    for value in ladder:
        set_search_param(index, name, value)
        approx = index.search(np.ascontiguousarray(queries), k + 1)[1]
        recall = recall_at_k(approx, exact, query_ids, k)
        plan.tuning.append({"value": value, "recall": recall})
        plan.search_param, plan.search_value, plan.recall_at_k = name, value, recall
        if recall >= plan.target_recall:
            return
