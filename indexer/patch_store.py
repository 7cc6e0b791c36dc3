"""The patch store: immutable segments of per-image features, memory-mapped for reading.

Each segment ``segments/<id>.{global,patches,weights}.npy`` holds, for the images added
together:

* ``global``  ``(n, D)`` float32: the global vectors (the FAISS index can be rebuilt from them);
* ``patches`` ``(n, G*G, d)`` float16: the L2-normalised patch grids (``d = D`` or the PCA size);
* ``weights`` ``(n, G*G)`` float32: the per-image patch weights (rollout or uniform).

Segments are written atomically and never modified; which ones are live is recorded in
the metadata database, so a half-written segment is simply ignored (and removed later).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .atomic import write_npy

PARTS = ("global", "patches", "weights")


@dataclass
class Gathered:
    """Features of a list of images, in the order asked for."""

    global_features: np.ndarray  # (k, D) float32
    patch_features: np.ndarray  # (k, G*G, d) float16
    patch_weights: np.ndarray  # (k, G*G) float32


class PatchStore:
    """Reads and writes the segments of one index directory."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder) / "segments"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def _path(self, segment: int, part: str) -> Path:
        return self.folder / f"{segment:08d}.{part}.npy"

    def write_segment(
        self, segment: int, global_features: np.ndarray, patches: np.ndarray, weights: np.ndarray
    ) -> int:
        """Write one segment (float32 global, float16 patches, float32 weights); returns its bytes."""
        n = len(global_features)
        if len(patches) != n or len(weights) != n:
            raise ValueError("a segment's global vectors, patches and weights must have the same length")
        arrays = {
            "global": np.ascontiguousarray(global_features, dtype=np.float32),
            "patches": np.ascontiguousarray(patches, dtype=np.float16),
            "weights": np.ascontiguousarray(weights, dtype=np.float32),
        }
        for part, array in arrays.items():
            write_npy(self._path(segment, part), array)
        return sum(a.nbytes for a in arrays.values())

    def segment(self, segment: int) -> dict[str, np.ndarray]:
        """The memory-mapped arrays of a segment (opened once, then cached)."""
        if segment not in self._open:
            self._open[segment] = {p: np.load(self._path(segment, p), mmap_mode="r") for p in PARTS}
        return self._open[segment]

    def gather(self, locations: Sequence[tuple[int, int]]) -> Gathered:
        """Features at ``(segment, offset)`` locations, in that order (one read per segment)."""
        if not locations:
            raise ValueError("nothing to gather")
        first = self.segment(locations[0][0])
        k = len(locations)
        out = Gathered(
            np.empty((k, *first["global"].shape[1:]), np.float32),
            np.empty((k, *first["patches"].shape[1:]), np.float16),
            np.empty((k, *first["weights"].shape[1:]), np.float32),
        )
        by_segment: dict[int, list[tuple[int, int]]] = {}
        for i, (seg, off) in enumerate(locations):
            by_segment.setdefault(seg, []).append((i, off))
        for seg, items in by_segment.items():
            arrays = self.segment(seg)
            where = np.fromiter((i for i, _ in items), np.int64)
            rows = np.fromiter((o for _, o in items), np.int64)
            out.global_features[where] = arrays["global"][rows]
            out.patch_features[where] = arrays["patches"][rows]
            out.patch_weights[where] = arrays["weights"][rows]
        return out

    def segment_ids_on_disk(self) -> set[int]:
        return {int(p.name.split(".")[0]) for p in self.folder.glob("*.npy")}

    def remove_segments(self, segments: Iterable[int]) -> None:
        """Delete segments that no committed state refers to."""
        for seg in segments:
            self._open.pop(seg, None)
            for part in PARTS:
                with contextlib.suppress(FileNotFoundError):
                    self._path(seg, part).unlink()

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npy"))
