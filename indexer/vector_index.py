"""The global-vector index: FAISS (CPU, or GPU when the installed faiss has it), or an
exact torch top-k on a GPU when faiss has no GPU support. Inner product on unit vectors = cosine."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from .atomic import write_with

DEFAULT_FACTORY = "Flat"
AUTO = "auto"  # choose by size and memory budget (indexer.index_plan)


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str = DEFAULT_FACTORY) -> faiss.Index:
    """An ID-mapped inner-product index over ``vectors`` (trained on them when the factory needs it).

    ``factory`` is a FAISS factory string: ``Flat`` (exact, the default), ``IVF1024,Flat``,
    ``IVF1024,PQ32``, ``HNSW32`` ...
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    try:
        base = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {err}") from err
    if not base.is_trained:
        if len(vectors) == 0:
            raise ValueError(f"{factory!r} needs training vectors, and there are none")
        try:
            base.train(vectors)
        except RuntimeError as err:
            raise ValueError(f"could not train {factory!r} on {len(vectors)} vectors: {err}") from err
    _set_search_defaults(base)
    # An IVF index keeps the ids itself (and removes by id correctly); an ID map over it would not:
    # IndexIDMap2's removal assumes the base renumbers what follows, which IVF does not.
    index = base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap2(base)
    if len(vectors) and len(ids):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def _set_search_defaults(base: faiss.Index) -> None:
    """Search parameters that FAISS saves with the index: probe 1/8 of an IVF's lists (at least 8)."""
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, max(8, ivf.nlist // 8))


def new_trained_index(factory: str, dim: int, sample: np.ndarray) -> faiss.Index:
    """An empty ID-mapped index of ``factory``, trained on ``sample`` (vectors are added afterwards,
    in chunks, so a large gallery is never one array)."""
    index = build_index(sample, np.zeros(0, np.int64), factory) if len(sample) else build_index(
        np.zeros((0, dim), np.float32), np.zeros(0, np.int64), factory)
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


def save_index(index: faiss.Index, path: Path) -> None:
    write_with(path, lambda tmp: faiss.write_index(index, tmp))


def load_index(path: Path, mmap: bool = False) -> tuple[faiss.Index, bool]:
    """The index in ``path`` and whether it is memory-mapped. With ``mmap`` the vectors or inverted
    lists stay in the file (the page cache shares them, and opening takes no time) where FAISS can
    map this kind of index; such an index is read-only: reload it without ``mmap`` to change it."""
    if mmap:
        for flags in (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_MMAP, faiss.IO_FLAG_MMAP):  # flat codes; IVF lists
            try:
                return faiss.read_index(str(path), flags), True
            except RuntimeError:
                continue
    return faiss.read_index(str(path)), False


class VectorSearcher:
    """Top-k search over an index, on the device the caller wants.

    ``backend="auto"``: on a GPU, FAISS's GPU index when faiss has one, else an exact torch
    top-k over the same vectors (identical results to a flat FAISS index; approximate
    indexes stay on FAISS's CPU search); on the CPU, FAISS itself. ``"torch"`` forces the
    torch top-k (flat indexes only) and ``"faiss"`` FAISS on the CPU.
    """

    def __init__(self, index: faiss.Index, device: torch.device, backend: str = "auto") -> None:
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be auto, faiss or torch, not {backend!r}")
        self.index = index
        self.device = torch.device(device)
        self.backend = "faiss-cpu"
        self._gpu_index = None
        self._vectors: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        on_gpu = self.device.type == "cuda"
        if backend == "auto" and on_gpu and faiss_has_gpu():
            self._gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            self.backend = "faiss-gpu"
        elif backend == "torch" or (backend == "auto" and on_gpu and is_flat(index)):
            vectors, ids = exported_vectors(index)
            self._vectors = torch.from_numpy(vectors).to(self.device)
            self._ids = torch.from_numpy(ids).to(self.device)
            self.backend = f"torch-{self.device.type}"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids ``(Q, k)``, best first; fewer than ``k`` when the index is smaller."""
        k = min(k, self.ntotal)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self._vectors is not None:
            scores = queries.to(self.device, torch.float32) @ self._vectors.T
            top = torch.topk(scores, k, dim=1)
            return top.values.cpu().numpy(), self._ids[top.indices].cpu().numpy()
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        index = self._gpu_index if self._gpu_index is not None else self.index
        scores, ids = index.search(q, k)
        return scores, ids


def base_index(index: faiss.Index) -> faiss.Index:
    """The index under its ID map (an IVF index has none: it is its own base)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else faiss.downcast_index(index)


_base_index = base_index


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id the index holds (from its ID map, or from an IVF index's inverted lists)."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return np.arange(index.ntotal, dtype=np.int64)
    lists = ivf.invlists
    parts = []
    for l in range(ivf.nlist):
        size = lists.list_size(l)
        if size:
            ids = lists.get_ids(l)
            parts.append(faiss.rev_swig_ptr(ids, size).astype(np.int64).copy())
            lists.release_ids(l, ids)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def is_flat(index: faiss.Index) -> bool:
    """Whether the index (under its ID map) is exact flat search."""
    return isinstance(_base_index(index), faiss.IndexFlat)


def exported_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """The vectors and ids of a flat ID-mapped index (for the torch GPU path)."""
    base = _base_index(index)
    if not isinstance(base, faiss.IndexFlat):
        raise ValueError(f"exact torch search needs a Flat index, not {type(base).__name__}")
    vectors = faiss.rev_swig_ptr(base.get_xb(), base.ntotal * base.d).reshape(base.ntotal, base.d).copy()
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return vectors, ids
