"""An index directory: FAISS over the global vectors, the patch store and the metadata.

Layout of ``DIR``::

    manifest.json            model, weights identity, preprocessing, dimensions, G, format version
    meta.sqlite              one row per image + the committed state (the commit point)
    faiss-<generation>.index the FAISS index of the committed generation
    segments/                immutable feature segments (see patch_store)
    pca.npz                  the patch PCA, when the patches are reduced

Every change writes new files first (atomically), then commits one SQLite transaction
that makes them current; files of older generations and half-written ones are removed
afterwards or on the next open. ``kill -9`` at any moment leaves the last commit intact.

Segments are bounded in number by compaction: each commit (add or remove) ends by merging
the small segments (under ``COMPACT_SMALL_ROWS`` images) into one new segment once there are
more than ``COMPACT_MAX_SMALL`` of them, synchronously. The merged segment is written first,
then one transaction repoints the images' ``(segment, offset)`` and the segment list, then
the old files are deleted; a crash leaves the old or the new layout, and the next open
removes the files of the other. Segments left without images are dropped the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from .atomic import remove_temporaries
from .calibration import Calibration
from .manifest import Manifest
from .metadata import ImageRow, MetadataDB, now_iso
from .patch_store import Gathered, PatchStore
from .pca import PatchPCA
from .vector_index import add_vectors, build_index, load_index, remove_ids, save_index

DB_NAME = "meta.sqlite"

COMPACT_SMALL_ROWS = 256  # a segment holding fewer images than this is small
COMPACT_MAX_SMALL = 32  # more small segments than this are merged into one

log = logging.getLogger(__name__)


@dataclass
class NewImages:
    """Images ready to be committed: their metadata rows and features."""

    rows: list[ImageRow]
    global_features: np.ndarray
    patch_features: np.ndarray
    patch_weights: np.ndarray


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: int = 0


class Gallery:
    """Read and change an index directory (one writer at a time)."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.db = MetadataDB(self.folder / DB_NAME)
        self.store = PatchStore(self.folder)
        # The PCA is fitted on the first images a build commits; until then there is none.
        self.pca = PatchPCA.load(self.folder) if manifest.pca_dim and PatchPCA.exists(self.folder) else None
        self.calibration: Calibration | None = Calibration.load(self.folder)
        state = self.db.get_state()
        self.generation: int = state.get("generation", 0)
        self.segments: list[int] = state.get("segments", [])
        self.next_segment: int = state.get("next_segment", 1)
        self.trained: bool = state.get("trained", manifest.factory == "Flat")
        self._counts: dict[int, int] | None = None  # images per live segment, read when first needed
        faiss_file = state.get("faiss_file")
        if faiss_file:
            self.faiss = load_index(self.folder / faiss_file)
        else:
            self.faiss = build_index(np.zeros((0, manifest.global_dim), np.float32), np.zeros(0, np.int64))
        self._collect_garbage()

    # --- opening -------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, manifest: Manifest) -> "Gallery":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "manifest.json").exists():
            raise FileExistsError(f"{folder} already holds an index")
        if any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; choose a new folder for the index")
        manifest.created_at = now_iso()
        manifest.save(folder)
        return cls(folder, manifest)

    @classmethod
    def open(cls, folder: Path) -> "Gallery":
        return cls(folder, Manifest.load(folder))

    def close(self) -> None:
        self.store.close()
        self.db.close()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _faiss_file(self, generation: int) -> str:
        return f"faiss-{generation:08d}.index"

    def _collect_garbage(self) -> None:
        """Remove what no commit refers to: temporaries, old FAISS files, orphan segments."""
        remove_temporaries(self.folder)
        current = self._faiss_file(self.generation) if self.generation else None
        for path in self.folder.glob("faiss-*.index"):
            if path.name != current:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        live = set(self.segments)
        self.store.remove_segments(self.store.segment_ids_on_disk() - live)

    # --- reads ---------------------------------------------------------------
    def __len__(self) -> int:
        return self.db.count()

    def ids(self) -> set[str]:
        return self.db.ids()

    def features(self, faiss_ids: Sequence[int]) -> tuple[list[ImageRow], Gathered]:
        """Metadata and stored features of images by FAISS id, in that order."""
        rows = self.db.rows_by_faiss_id(list(faiss_ids))
        missing = [i for i in faiss_ids if i not in rows]
        if missing:
            raise KeyError(f"FAISS ids not in the metadata: {missing[:5]}")
        ordered = [rows[i] for i in faiss_ids]
        return ordered, self.store.gather([(r.segment, r.offset) for r in ordered])

    def all_global_features(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live image's global vector and FAISS id, in id order."""
        locations = self.db.live_locations()
        if not locations:
            return np.zeros((0, self.manifest.global_dim), np.float32), np.zeros(0, np.int64)
        gathered = self.store.gather([(seg, off) for _, seg, off in locations])
        return gathered.global_features, np.array([row for row, _, _ in locations], np.int64)

    # --- writes --------------------------------------------------------------
    def set_calibration(self, calibration: Calibration) -> None:
        """Store ``calibration`` (atomically, replacing any earlier one); searches use it from now on."""
        calibration.save(self.folder)
        self.calibration = calibration

    def reduce_patches(self, patches: np.ndarray) -> np.ndarray:
        """Apply the index's PCA (if any) and re-normalise."""
        return patches if self.pca is None else self.pca.transform(patches)

    def commit_new(self, new: NewImages) -> None:
        """Write a segment with the new images, add them to FAISS, and commit."""
        if not new.rows:
            return
        first = self.db.max_row() + 1
        segment = self.next_segment
        ids = np.arange(first, first + len(new.rows), dtype=np.int64)
        for k, row in enumerate(new.rows):
            row.row, row.segment, row.offset = int(ids[k]), segment, k
        self.store.write_segment(segment, new.global_features, new.patch_features, new.patch_weights)
        add_vectors(self.faiss, new.global_features, ids)
        try:
            self._commit_faiss(insert=new.rows, segments=[*self.segments, segment], next_segment=segment + 1)
        except BaseException:
            self._reload_faiss()
            self._counts = None
            raise
        if self._counts is not None:
            self._counts[segment] = len(new.rows)
        self._compact_after_commit()

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove images by id; returns the ids that were not in the index (nothing else changes)."""
        rows = self.db.rows_by_id(list(ids))
        unknown = [i for i in ids if i not in rows]
        if not rows:
            return unknown
        # Segments left without images leave the live list in the same transaction; their
        # files are deleted after it (or, after a crash, by the next open).
        counts = self._segment_counts()
        taken = Counter(r.segment for r in rows.values())
        emptied = {seg for seg, k in taken.items() if seg in counts and counts[seg] <= k}
        faiss_ids = np.array([r.row for r in rows.values()], np.int64)
        try:
            removed = remove_ids(self.faiss, faiss_ids)
        except RuntimeError:  # e.g. HNSW: rebuild from the stored vectors instead
            removed = self._rebuild_without(faiss_ids)
        if removed != len(faiss_ids):
            self._reload_faiss()
            raise RuntimeError(f"FAISS removed {removed} of {len(faiss_ids)} vectors; nothing was changed")
        try:
            self._commit_faiss(delete_ids=list(rows), segments=[s for s in self.segments if s not in emptied])
        except BaseException:
            self._reload_faiss()
            self._counts = None
            raise
        for seg, k in taken.items():
            if seg in counts:
                counts[seg] -= k
        for seg in emptied:
            counts.pop(seg, None)
        self.store.remove_segments(emptied)
        self._compact_after_commit()
        return unknown

    # --- compaction ----------------------------------------------------------
    def _segment_counts(self) -> dict[int, int]:
        """Images per live segment (0 for a segment whose images were all removed)."""
        if self._counts is None:
            stored = self.db.segment_counts()
            self._counts = {seg: stored.get(seg, 0) for seg in self.segments}
        return self._counts

    def compact(self, *, force: bool = False) -> int:
        """Merge the small segments into one new segment when there are more than
        ``COMPACT_MAX_SMALL`` of them (with ``force``: when there are two or more), and drop
        the segments without images. Every image keeps its FAISS id and exact features; the
        change is one transaction (see the module's docstring). Returns the segments removed."""
        counts = self._segment_counts()
        empty = [seg for seg in self.segments if counts.get(seg, 0) == 0]
        small = [seg for seg in self.segments if 0 < counts.get(seg, 0) < COMPACT_SMALL_ROWS]
        merge = small if len(small) > COMPACT_MAX_SMALL or (force and len(small) > 1) else []
        if not merge and not empty:
            return 0
        segments = [seg for seg in self.segments if seg not in set(merge) | set(empty)]
        next_segment = self.next_segment
        relocate: list[tuple[int, int, int]] = []
        if merge:
            target = next_segment
            next_segment += 1
            locations = self.db.locations_in(merge)
            try:
                self.store.write_merged(target, [(seg, off) for _, seg, off in locations])
            except BaseException:
                self.store.remove_segments([target])  # never committed: nothing refers to it
                raise
            relocate = [(row, target, k) for k, (row, _, _) in enumerate(locations)]
            segments.append(target)
        # On a failed commit the new segment is left to the next open's garbage collection:
        # whether it became live is then read from the database, not guessed here.
        self.db.commit(relocate=relocate, state={"segments": segments, "next_segment": next_segment})
        gone = [*merge, *empty]
        self.segments, self.next_segment = segments, next_segment
        for seg in gone:
            counts.pop(seg, None)
        if merge:
            counts[target] = len(relocate)
        self.store.remove_segments(gone)
        return len(gone)

    def _compact_after_commit(self) -> None:
        """Compact after a change that is already committed: a failure leaves the previous
        (valid) layout and is logged, not raised, since the change itself succeeded."""
        try:
            self.compact()
        except (OSError, sqlite3.Error) as err:
            self._counts = None
            log.warning("compacting the patch store of %s failed; the index is unchanged: %s", self.folder, err)

    def train(self) -> None:
        """Build the configured (non-flat) FAISS index from every stored vector and commit it."""
        vectors, ids = self.all_global_features()
        self.faiss = build_index(vectors, ids, self.manifest.factory)
        self.trained = True
        self._commit_faiss()

    def _rebuild_without(self, faiss_ids: np.ndarray) -> int:
        vectors, ids = self.all_global_features()
        keep = ~np.isin(ids, faiss_ids)
        factory = self.manifest.factory if self.trained else "Flat"
        self.faiss = build_index(vectors[keep], ids[keep], factory)
        return int((~keep).sum())

    def _reload_faiss(self) -> None:
        if self.generation:
            self.faiss = load_index(self.folder / self._faiss_file(self.generation))
        else:
            self.faiss = build_index(np.zeros((0, self.manifest.global_dim), np.float32), np.zeros(0, np.int64))

    def _commit_faiss(self, *, insert=(), delete_ids=(), segments=None, next_segment=None) -> None:
        generation = self.generation + 1
        name = self._faiss_file(generation)
        save_index(self.faiss, self.folder / name)
        state = {
            "generation": generation,
            "faiss_file": name,
            "segments": self.segments if segments is None else segments,
            "next_segment": self.next_segment if next_segment is None else next_segment,
            "trained": self.trained,
        }
        try:
            self.db.commit(insert=insert, delete_ids=delete_ids, state=state)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / name)
            raise
        old = self._faiss_file(self.generation)
        self.generation, self.segments, self.next_segment = generation, state["segments"], state["next_segment"]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / old)

    # --- checks --------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        n = len(self)
        store_bytes = self.store.bytes_on_disk()
        return {
            "images": n,
            "model": self.manifest.model,
            "weights": self.manifest.weights,
            "grid": self.manifest.grid,
            "global_dim": self.manifest.global_dim,
            "patch_dim": self.manifest.patch_dim,
            "patch_weights": self.manifest.patch_weights,
            "factory": self.manifest.factory,
            "trained": self.trained,
            "faiss_vectors": int(self.faiss.ntotal),
            "segments": len(self.segments),
            "patch_store_bytes": store_bytes,
            "bytes_per_image": (store_bytes / n) if n else 0.0,
            "format_version": self.manifest.format_version,
            "weights_source": self.manifest.weights_source,
            "preprocessing": self.manifest.preprocessing,
            "calibration": self.calibration.summary() if self.calibration is not None else None,
        }

    def verify(self) -> VerifyReport:
        """Check that FAISS, the patch store and the metadata agree."""
        problems: list[str] = []
        locations = self.db.live_locations()
        faiss_ids = set(faiss.vector_to_array(self.faiss.id_map).tolist()) if hasattr(self.faiss, "id_map") else set()
        meta_ids = {row for row, _, _ in locations}
        if self.faiss.ntotal != len(locations):
            problems.append(f"FAISS holds {self.faiss.ntotal} vectors, the metadata {len(locations)} images")
        if faiss_ids != meta_ids:
            problems.append(
                f"{len(meta_ids - faiss_ids)} images missing from FAISS, {len(faiss_ids - meta_ids)} stale FAISS ids"
            )
        for seg in {s for _, s, _ in locations}:
            if seg not in self.segments:
                problems.append(f"segment {seg} is referenced by images but not live")
                continue
            try:
                arrays = self.store.segment(seg)
            except (OSError, ValueError) as err:
                problems.append(f"segment {seg} unreadable: {err}")
                continue
            n = len(arrays["global"])
            if len(arrays["patches"]) != n or len(arrays["weights"]) != n:
                problems.append(f"segment {seg} has parts of different lengths")
            bad = [off for _, s, off in locations if s == seg and off >= n]
            if bad:
                problems.append(f"segment {seg}: {len(bad)} offsets out of range")
        if not problems and locations:
            stored, ids = self.all_global_features()
            sample = slice(0, min(256, len(ids)))
            if self.manifest.factory == "Flat":
                recon = np.stack([self.faiss.reconstruct(int(i)) for i in ids[sample]])
                if not np.allclose(recon, stored[sample], atol=1e-5):
                    problems.append("FAISS vectors differ from the stored global vectors")
        return VerifyReport(ok=not problems, problems=problems, checked=len(locations))
