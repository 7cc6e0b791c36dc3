"""The patch store: immutable segments of per-image features, memory-mapped for reading.

Each segment ``segments/<id>.{global,patches,weights}.npy`` holds, for the images added
together:

* ``global``  ``(n, D)`` float32: the global vectors (the FAISS index can be rebuilt from them);
* ``patches`` ``(n, G*G, d)`` float16: the L2-normalised patch grids (``d = D`` or the PCA size);
  or, in an index with patch codes, ``codes`` ``(n, G*G, M)`` uint8 (see :mod:`indexer.patch_codes`);
* ``weights`` ``(n, G*G)`` float32: the per-image patch weights (rollout or uniform).

Each write returns the digests of the files it wrote; the commit records them and ``verify``
compares them with the files, so a corrupt or half-written segment is found.

Segments are written atomically and never modified; which ones are live is recorded in
the metadata database, so a half-written segment is simply ignored (and removed later).

Open files are bounded: at most ``max_open`` segments are held open at a time (least recently
used first out). A memory-mapped segment holds three file descriptors (Python's ``mmap`` keeps
one per mapping); a segment whose files are small (``in_memory_bytes``, e.g. an image added
alone) is read into memory instead and holds none. A removed segment is dropped from the
cache, so its mapping is released once no caller holds its arrays.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from reranker.features import StoredFeatures

from .atomic import atomic_open
from .checksum import file_digest, HashingWriter

PARTS = ("global", "patches", "weights")
DTYPES = {"global": np.float32, "patches": np.float16, "codes": np.uint8, "weights": np.float32}

MAX_OPEN_SEGMENTS = 32  # segments held open at once: at most 3 * 32 file descriptors
IN_MEMORY_BYTES = 1 << 20  # a segment up to this size (all parts) is read, not memory-mapped


class PatchStore:
    """Reads and writes the segments of one index directory."""

    def __init__(self, folder: Path, *, max_open: int | None = None, in_memory_bytes: int | None = None,
                 patch_part: str = "patches", weights_kind: str = "rollout") -> None:
        max_open = MAX_OPEN_SEGMENTS if max_open is None else max_open
        in_memory_bytes = IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.folder = Path(folder) / "segments"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_open = max_open
        if patch_part not in ("patches", "codes"):
            raise ValueError(f"patch_part must be patches or codes, not {patch_part!r}")
        self.parts = ("global", patch_part, "weights")
        self.patch_part = patch_part
        #: the kind of patch weights the ``weights`` part holds (the manifest's)
        self.weights_kind = weights_kind
        self.in_memory_bytes = in_memory_bytes
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def _path(self, segment: int, part: str) -> Path:
        return self.folder / f"{segment:08d}.{part}.npy"

    def write_segment(self, segment: int, features: StoredFeatures) -> dict[str, str]:
        """Write one segment of ``features`` (float32 global, float16 patches or uint8 codes, float32
        weights of the store's kind); returns each part's digest."""
        global_features, patches = features.global_features, features.patch_features
        weights = features.weights(self.weights_kind)
        n = len(global_features)
        if len(patches) != n or len(weights) != n:
            raise ValueError("a segment's global vectors, patches and weights must have the same length")
        if self.patch_part == "codes" and np.asarray(patches).dtype != np.uint8:
            raise ValueError("a store of patch codes takes uint8 codes, not patch vectors")
        arrays = {part: np.ascontiguousarray(a, dtype=DTYPES[part])
                  for part, a in zip(self.parts, (global_features, patches, weights))}
        digests = {}
        for part, array in arrays.items():
            with atomic_open(self._path(segment, part)) as fh:
                writer = HashingWriter(fh)
                np.save(writer, array, allow_pickle=False)
            digests[part] = writer.hexdigest()
        return digests

    def write_merged(self, segment: int, locations: Sequence[tuple[int, int]], chunk: int = 256) -> dict[str, str]:
        """Write ``segment`` holding the features at ``locations``, in that order, copied exactly
        (a chunk of rows at a time, so a large merge never sits in memory). Returns its digests."""
        if not locations:
            raise ValueError("nothing to merge")
        first = self.segment(locations[0][0])
        n = len(locations)
        with contextlib.ExitStack() as stack:
            files = {}
            for part in self.parts:
                fh = HashingWriter(stack.enter_context(atomic_open(self._path(segment, part))))
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPES[part])),
                          "fortran_order": False, "shape": (n, *first[part].shape[1:])}
                np.lib.format.write_array_header_1_0(fh, header)
                files[part] = fh
            del first
            for start in range(0, n, chunk):
                got = self.gather(locations[start:start + chunk])
                for part, array in zip(self.parts, (got.global_features, got.patch_features,
                                                    got.weights(self.weights_kind))):
                    files[part].write(np.ascontiguousarray(array, dtype=DTYPES[part]).tobytes())
        return {part: fh.hexdigest() for part, fh in files.items()}

    def segment(self, segment: int) -> dict[str, np.ndarray]:
        """The arrays of a segment: memory-mapped (or, for a small one, read), kept among the
        ``max_open`` most recently used."""
        with self._lock:
            arrays = self._open.get(segment)
            if arrays is not None:
                self._open.move_to_end(segment)
                return arrays
        paths = {p: self._path(segment, p) for p in self.parts}
        small = sum(path.stat().st_size for path in paths.values()) <= self.in_memory_bytes
        arrays = {p: np.load(path, mmap_mode=None if small else "r", allow_pickle=False) for p, path in paths.items()}
        with self._lock:
            self._open[segment] = arrays
            self._open.move_to_end(segment)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)  # its mappings close when no gather holds them
        return arrays

    def open_segments(self) -> list[int]:
        """The segments held open now, least recently used first."""
        with self._lock:
            return list(self._open)

    def gather(self, locations: Sequence[tuple[int, int]]) -> StoredFeatures:
        """Features at ``(segment, offset)`` locations, in that order (one read per segment)."""
        if not locations:
            raise ValueError("nothing to gather")
        first = self.segment(locations[0][0])
        k = len(locations)
        patch = self.patch_part
        weights = np.empty((k, *first["weights"].shape[1:]), np.float32)
        out = StoredFeatures(
            np.empty((k, *first["global"].shape[1:]), np.float32),
            np.empty((k, *first[patch].shape[1:]), DTYPES[patch]),
            {self.weights_kind: weights},
        )
        del first
        by_segment: dict[int, list[tuple[int, int]]] = {}
        for i, (seg, off) in enumerate(locations):
            by_segment.setdefault(seg, []).append((i, off))
        for seg, items in by_segment.items():
            arrays = self.segment(seg)
            where = np.fromiter((i for i, _ in items), np.int64)
            rows = np.fromiter((o for _, o in items), np.int64)
            out.global_features[where] = arrays["global"][rows]
            out.patch_features[where] = arrays[patch][rows]
            weights[where] = arrays["weights"][rows]
            del arrays  # an evicted segment's mapping is released here, not after the loop
        return out

    def segment_ids_on_disk(self) -> set[int]:
        return {int(p.name.split(".")[0]) for p in self.folder.glob("*.npy")}

    def remove_segments(self, segments: Iterable[int]) -> None:
        """Delete segments that no committed state refers to (and release their mappings)."""
        for seg in segments:
            with self._lock:
                self._open.pop(seg, None)
            for part in (*PARTS, "codes"):
                with contextlib.suppress(FileNotFoundError):
                    self._path(seg, part).unlink()

    def close(self) -> None:
        """Release every open segment."""
        with self._lock:
            self._open.clear()

    def digests(self, segment: int) -> dict[str, str]:
        """The digest of each part file of ``segment`` as it is on disk now."""
        return {part: file_digest(self._path(segment, part)) for part in self.parts}

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npy"))
