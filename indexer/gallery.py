"""What a search reads of an index: the :class:`Gallery` protocol.

A local index directory (:class:`indexer.index_dir.IndexDir`) and a sharded index on a Ray cluster
(:class:`indexer.sharded_search.ShardedIndex`) both implement it, so that one
:class:`indexer.search.Searcher` and one service engine work over either. Changing a gallery
(adding, removing images) is the local index's alone: ``read_only`` says why a gallery takes no
changes (None: it does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from reranker.features import StoredFeatures

    from .calibration import Calibration
    from .filters import Filter
    from .manifest import Manifest
    from .metadata import ImageRow
    from .patch_codes import PatchCodec
    from .pca import PatchPCA


@runtime_checkable
class VectorSearch(Protocol):
    """Top-``k`` search of the global vectors."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and FAISS ids ``(Q, k)``, best first (id -1 where fewer than ``k`` exist)."""
        ...


@runtime_checkable
class Gallery(Protocol):
    """An index as a search reads it: how it was built, its calibration, its vectors, its stored
    features and its rows."""

    folder: Path
    manifest: "Manifest"
    calibration: "Calibration | None"
    pca: "PatchPCA | None"  # patches reduced by a PCA: the query's are reduced the same way
    codec: "PatchCodec | None"  # patches stored as codes: decoded on the search's device
    read_only: str | None  # why the gallery takes no changes; None: it does

    def vector_search(self, device: torch.device, backend: str = "auto") -> VectorSearch:
        """The global search over the gallery's vectors as they are now (see :class:`VectorSearch`)."""
        ...

    def features(self, faiss_ids: Sequence[int], decode: bool = True) -> "tuple[list[ImageRow], StoredFeatures]":
        """Rows and stored features by FAISS id, in that order (codes undecoded with ``decode=False``)."""
        ...

    def decode_patches(self, codes: np.ndarray, device: Any = "cpu") -> torch.Tensor:
        """Patch vectors of stored codes on ``device`` (a gallery with a ``codec``)."""
        ...

    def row(self, image_id: str) -> "ImageRow | None":
        ...

    def ids_where(self, where: "Filter") -> np.ndarray:
        """The FAISS ids of the images a filter allows (ValueError where filters are not supported)."""
        ...

    def global_vectors(self, faiss_ids: np.ndarray) -> np.ndarray:
        """The stored global vectors of these images, in that order."""
        ...

    def image_file(self, row: "ImageRow") -> str:
        """The file that shows ``row``'s image (the index's own copy, or the original's path)."""
        ...

    def info(self) -> dict[str, Any]:
        ...

    def __len__(self) -> int:
        ...

    def close(self) -> None:
        ...
