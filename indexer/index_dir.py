"""An index directory: FAISS over the global vectors, the patch store and the metadata.

Layout of ``DIR``::

    manifest.json            model, weights identity, preprocessing, dimensions, G, format version
    meta.sqlite              one row per image + the committed state (the commit point)
    faiss-<generation>.index the FAISS index of the committed generation
    segments/                immutable feature segments (see patch_store)
    pca.npz                  the patch PCA, when the patches are reduced
    codes.npz                the patch product quantizer, when patches are stored as codes
    images/                  a copy of each distinct image, by content hash (indexer.image_copies)

Every change writes new files first (atomically), then commits one SQLite transaction
that makes them current; files of older generations and half-written ones are removed
afterwards or on the next open. ``kill -9`` at any moment leaves the last commit intact.

Segments are kept few by compaction (:mod:`indexer.compaction`). The FAISS index is trained,
tuned and retrained by :mod:`indexer.global_index`; a non-flat one holds no FAISS file until its
first training. The commit records a digest of every segment file (and of ``codes.npz``), which
``verify`` checks. The FAISS file is memory-mapped on open where FAISS can (reloaded into memory
before a change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reranker.features import StoredFeatures

from .atomic import remove_temporaries
from .calibration import Calibration
from .filters import Filter
from .catalog import DB_NAME
from .compaction import SegmentCompaction
from .global_index import GlobalIndexUpkeep
from .manifest import Manifest
from .metadata import ImageRow, MetadataDB, now_iso
from .patch_store import PatchStore
from .image_copies import bytes_on_disk as copies_bytes, find as find_copy
from .image_copies import remove_unreferenced as remove_unreferenced_copies, write as write_copies
from .index_plan import IndexPlan
from .patch_codes import PatchCodec
from .pca import PatchPCA
from .verify import VerifyReport, verify_index
from .vector_index import VectorSearcher, add_vectors, build_index, load_index, remove_ids, save_index

STREAM_CHUNK = 65_536  # global vectors read at a time when training, filling or checking FAISS

log = logging.getLogger(__name__)


@dataclass
class NewImages:
    """Images ready to be committed: their metadata rows and their features, row for row
    (patches float32 or float16, already reduced by the index's PCA when it has one)."""

    rows: list[ImageRow]
    features: StoredFeatures
    #: content hash -> (bytes, suffix) of the images' copies to keep (indexer.image_copies), written before the commit
    copies: dict[str, tuple[bytes, str]] = dataclasses.field(default_factory=dict)


class IndexDir:
    """Read and change an index directory (one writer at a time); a :class:`indexer.gallery.Gallery`.

    Two components work on it: ``compaction`` (:mod:`indexer.compaction`) keeps the segments few and
    ``upkeep`` (:mod:`indexer.global_index`) trains, tunes and retrains the FAISS index.
    """

    read_only: str | None = None  # a local index takes changes

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.db = MetadataDB(self.folder / DB_NAME)
        self.store = PatchStore(self.folder, patch_part="codes" if manifest.patch_codes else "patches",
                                weights_kind=manifest.patch_weights)
        # The PCA and the patch codes are fitted on the first images a build commits; until then there are none.
        self.pca = PatchPCA.load(self.folder) if manifest.pca_dim and PatchPCA.exists(self.folder) else None
        self.codec = PatchCodec.load(self.folder) if manifest.patch_codes and PatchCodec.exists(self.folder) else None
        self.calibration: Calibration | None = Calibration.load(self.folder)
        state = self.db.get_state()
        self.generation: int = state.get("generation", 0)
        self.segments: list[int] = state.get("segments", [])
        self.next_segment: int = state.get("next_segment", 1)
        self.trained: bool = state.get("trained", manifest.factory == "Flat")
        self.checksums: dict[str, dict[str, str]] = state.get("checksums", {})
        self.codec_digest: str | None = state.get("codec_digest")
        self.trained_at: int = state.get("trained_at", 0)
        plan = state.get("index_plan")
        self.plan: IndexPlan | None = IndexPlan.from_dict(plan) if plan else None
        self.notices: list[str] = []  # what changes did beyond what was asked (retraining), for reports
        self.faiss_mapped = False  # the FAISS file is memory-mapped (reloaded into memory before a change)
        faiss_file = state.get("faiss_file")
        if faiss_file:
            self.faiss, self.faiss_mapped = load_index(self.folder / faiss_file, mmap=True)
        else:
            self.faiss = build_index(np.zeros((0, manifest.global_dim), np.float32), np.zeros(0, np.int64))
        self.compaction = SegmentCompaction(self)
        self.upkeep = GlobalIndexUpkeep(self)
        self._collect_garbage()

    # --- opening -------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, manifest: Manifest) -> "IndexDir":
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
    def open(cls, folder: Path) -> "IndexDir":
        return cls(folder, Manifest.load(folder))

    def close(self) -> None:
        self.store.close()
        self.db.close()

    def __enter__(self) -> "IndexDir":
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
        if self.manifest.image_copies:
            remove_unreferenced_copies(self.folder, self.db.hashes())

    # --- reads ---------------------------------------------------------------
    def __len__(self) -> int:
        return self.db.count()

    def ids(self) -> set[str]:
        return self.db.ids()

    def row(self, image_id: str) -> ImageRow | None:
        """The committed metadata of one image, or None."""
        return self.db.rows_by_id([image_id]).get(image_id)

    def rows(self) -> list[ImageRow]:
        """Every image's metadata, in FAISS id order."""
        return self.db.all_rows()

    def rows_by_faiss_id(self, faiss_ids: Sequence[int]) -> dict[int, ImageRow]:
        """Metadata of the images among ``faiss_ids`` that are indexed."""
        return self.db.rows_by_faiss_id(list(faiss_ids))

    def content_hashes(self) -> dict[str, str]:
        """Content hash -> id of the first image indexed with it."""
        return self.db.hashes()

    def features(self, faiss_ids: Sequence[int], decode: bool = True) -> tuple[list[ImageRow], StoredFeatures]:
        """Metadata and stored features of images by FAISS id, in that order. In an index of patch
        codes the patches are decoded (float16, on the CPU) unless ``decode`` is False (then they are
        the uint8 codes: :meth:`decode_patches` decodes them on a device)."""
        rows = self.db.rows_by_faiss_id(list(faiss_ids))
        missing = [i for i in faiss_ids if i not in rows]
        if missing:
            raise KeyError(f"FAISS ids not in the metadata: {missing[:5]}")
        ordered = [rows[i] for i in faiss_ids]
        gathered = self.store.gather([(r.segment, r.offset) for r in ordered])
        if decode and self.codec is not None:
            gathered.patch_features = self.codec.decode(gathered.patch_features).astype(np.float16)
        return ordered, gathered

    def ids_where(self, where: Filter) -> np.ndarray:
        """The FAISS ids of the images ``where`` allows (:mod:`indexer.filters`)."""
        return self.db.rows_where(where)

    def global_vectors(self, faiss_ids: np.ndarray) -> np.ndarray:
        """The stored global vectors ``(len(faiss_ids), D)`` of these images, in that order."""
        if len(faiss_ids) == 0:
            return np.zeros((0, self.manifest.global_dim), np.float32)
        located = self.db.rows_by_faiss_id(faiss_ids.tolist())
        return self.store.gather([(located[int(i)].segment, located[int(i)].offset) for i in faiss_ids]).global_features

    def image_file(self, row: ImageRow) -> str:
        """The file that shows ``row``'s image: the index's own copy when it keeps one, else the original."""
        if self.manifest.image_copies:
            copy = find_copy(self.folder, row.content_hash)
            if copy is not None:
                return str(copy)
        return row.path

    def vector_search(self, device: Any = "cpu", backend: str = "auto") -> VectorSearcher:
        """The global search over the FAISS index as it is now (a new one after each add or remove)."""
        return VectorSearcher(self.faiss, device, backend)

    def decode_patches(self, codes: np.ndarray, device: Any = "cpu"):
        """Patch vectors (a float32 tensor on ``device``) of stored codes (an index with patch codes)."""
        if self.codec is None:
            raise ValueError("this index stores patch vectors, not codes")
        return self.codec.decode_torch(codes, device)

    def global_chunks(self, chunk: int = STREAM_CHUNK):
        """``(faiss ids, global vectors)`` of every image, ``chunk`` at a time, segment by segment
        (the whole gallery is never in memory)."""
        cur = self.db.conn.execute("SELECT row, segment, offset FROM images ORDER BY segment, offset")
        while rows := cur.fetchmany(chunk):
            ids = np.fromiter((r for r, _, _ in rows), np.int64, len(rows))
            yield ids, self.store.gather([(s, o) for _, s, o in rows]).global_features

    def sample_global(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``count`` images' global vectors and FAISS ids, chosen at random (all when fewer)."""
        rows = np.array(self.db.conn.execute("SELECT row FROM images").fetchall(), np.int64).ravel()
        if len(rows) > count:
            rows = np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))
        if len(rows) == 0:
            return np.zeros((0, self.manifest.global_dim), np.float32), rows
        located = self.db.rows_by_faiss_id(rows.tolist())
        return self.store.gather([(located[int(r)].segment, located[int(r)].offset) for r in rows]).global_features, rows

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

    def fit_pca(self, patches: np.ndarray) -> None:
        """Fit and save the patch PCA on ``patches`` when the index reduces patches and has none yet."""
        if not self.manifest.pca_dim or self.pca is not None:
            return
        pca = PatchPCA.fit(patches, self.manifest.pca_dim)
        pca.save(self.folder)
        self.pca = pca

    def fit_codes(self, patches: np.ndarray) -> None:
        """Train the patch codes on ``patches`` (already reduced) and save them; the first commit records them."""
        if not self.manifest.patch_codes or self.codec is not None:
            return
        codec = PatchCodec.fit(patches, self.manifest.patch_codes)
        codec.save(self.folder)
        self.codec = codec

    def commit_new(self, new: NewImages) -> None:
        """Write a segment with the new images, add them to FAISS, and commit."""
        if not new.rows:
            return
        first = self.db.max_row() + 1
        segment = self.next_segment
        ids = np.arange(first, first + len(new.rows), dtype=np.int64)
        for k, row in enumerate(new.rows):
            row.row, row.segment, row.offset = int(ids[k]), segment, k
        if new.copies and self.manifest.image_copies:
            write_copies(self.folder, new.copies)  # before the commit; an orphan is removed by the next open
        features = new.features
        if self.manifest.patch_codes and np.asarray(features.patch_features).dtype != np.uint8:
            if self.codec is None:
                self.fit_codes(features.patch_features)
            features = dataclasses.replace(features, patch_features=self.codec.encode(features.patch_features))
        digests = self.store.write_segment(segment, features)
        self._make_writable()
        if self.holds_faiss():
            add_vectors(self.faiss, new.features.global_features, ids)
        checksums = {**self.checksums, str(segment): digests}
        try:
            self.commit_faiss(insert=new.rows, segments=[*self.segments, segment], next_segment=segment + 1,
                               checksums=checksums)
        except BaseException:
            self._reload_faiss()
            self.compaction.forget_counts()
            raise
        self.compaction.record_added(segment, len(new.rows))
        self.compaction.after_commit()

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove images by id; returns the ids that were not in the index (nothing else changes)."""
        rows = self.db.rows_by_id(list(ids))
        unknown = [i for i in ids if i not in rows]
        if not rows:
            return unknown
        # Segments left without images leave the live list in the same transaction; their
        # files are deleted after it (or, after a crash, by the next open).
        counts = self.compaction.segment_counts()
        taken = Counter(r.segment for r in rows.values())
        emptied = {seg for seg, k in taken.items() if seg in counts and counts[seg] <= k}
        faiss_ids = np.array([r.row for r in rows.values()], np.int64)
        self._make_writable()
        if not self.holds_faiss():  # an untrained non-flat index: nothing in FAISS yet
            removed = len(faiss_ids)
        else:
            try:
                removed = remove_ids(self.faiss, faiss_ids)
            except RuntimeError:  # e.g. HNSW: rebuild from the stored vectors instead
                removed = self.upkeep.rebuild_without(faiss_ids)
        if removed != len(faiss_ids):
            self._reload_faiss()
            raise RuntimeError(f"FAISS removed {removed} of {len(faiss_ids)} vectors; nothing was changed")
        try:
            self.commit_faiss(delete_ids=list(rows), segments=[s for s in self.segments if s not in emptied],
                               checksums={k: v for k, v in self.checksums.items() if int(k) not in emptied})
        except BaseException:
            self._reload_faiss()
            self.compaction.forget_counts()
            raise
        for seg, k in taken.items():
            if seg in counts:
                counts[seg] -= k
        for seg in emptied:
            counts.pop(seg, None)
        self.store.remove_segments(emptied)
        if self.manifest.image_copies:
            remove_unreferenced_copies(self.folder, self.db.hashes())
        self.compaction.after_commit()
        return unknown

    def _make_writable(self) -> None:
        """Reload a memory-mapped FAISS index into memory before changing it."""
        if self.faiss_mapped:
            self.faiss = load_index(self.folder / self._faiss_file(self.generation))[0]
            self.faiss_mapped = False

    def _reload_faiss(self) -> None:
        if self.generation:
            self.faiss, self.faiss_mapped = load_index(self.folder / self._faiss_file(self.generation), mmap=True)
        else:
            self.faiss = build_index(np.zeros((0, self.manifest.global_dim), np.float32), np.zeros(0, np.int64))

    def commit_faiss(self, *, insert=(), delete_ids=(), segments=None, next_segment=None, checksums=None) -> None:
        generation = self.generation + 1
        name = self._faiss_file(generation) if self.holds_faiss() else None
        if name is not None:
            save_index(self.faiss, self.folder / name)
        if self.codec is not None and self.codec_digest is None:
            self.codec_digest = PatchCodec.digest(self.folder)
        state = {
            "generation": generation,
            "faiss_file": name,
            "segments": self.segments if segments is None else segments,
            "next_segment": self.next_segment if next_segment is None else next_segment,
            "trained": self.trained,
            "checksums": self.checksums if checksums is None else checksums,
            "trained_at": self.trained_at,
            "index_plan": self.plan.to_dict() if self.plan is not None else None,
            "codec_digest": self.codec_digest,
        }
        try:
            self.db.commit(insert=insert, delete_ids=delete_ids, state=state)
        except BaseException:
            if name is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.folder / name)
            raise
        old = self._faiss_file(self.generation)
        self.generation, self.segments, self.next_segment = generation, state["segments"], state["next_segment"]
        self.checksums = state["checksums"]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / old)

    # --- the components' operations ------------------------------------------
    def compact(self, *, force: bool = False) -> int:
        """:meth:`indexer.compaction.SegmentCompaction.compact`."""
        return self.compaction.compact(force=force)

    def train(self) -> None:
        """:meth:`indexer.global_index.GlobalIndexUpkeep.train`."""
        self.upkeep.train()

    def retrain_if_outgrown(self) -> str | None:
        """:meth:`indexer.global_index.GlobalIndexUpkeep.retrain_if_outgrown`."""
        return self.upkeep.retrain_if_outgrown()

    def needs_retraining(self) -> str | None:
        return self.upkeep.needs_retraining()

    def codes_notice(self) -> str | None:
        return self.upkeep.codes_notice()

    def recall(self, queries: int = 100, k: int = 100, seed: int = 2) -> dict[str, Any]:
        return self.upkeep.recall(queries, k, seed)

    def holds_faiss(self) -> bool:
        return self.upkeep.holds_faiss()

    # --- checks --------------------------------------------------------------
    def patch_bytes_per_image(self) -> int:
        """Bytes per image of the stored patch data (vectors or codes, and weights)."""
        m = self.manifest
        per_patch = self.codec.bytes_per_patch if self.codec is not None else 2 * m.patch_dim
        return m.grid * m.grid * (per_patch + 4)

    def info(self) -> dict[str, Any]:
        n = len(self)
        store_bytes = self.store.bytes_on_disk()
        return {
            "images": n,
            "model": self.manifest.model,
            "weights": self.manifest.weights,
            "grid": self.manifest.grid,
            "patch_layer": self.manifest.patch_layer,
            "global_dim": self.manifest.global_dim,
            "patch_dim": self.manifest.patch_dim,
            "patch_weights": self.manifest.patch_weights,
            "factory": self.manifest.factory,
            "faiss_index": self.upkeep.faiss_description(),
            "index_plan": self.plan.to_dict() if self.plan is not None else None,
            "patch_codes": self.manifest.patch_codes,
            "patch_bytes_per_image": self.patch_bytes_per_image(),
            "retraining_due": self.needs_retraining(),
            "codes_notice": self.codes_notice(),
            "trained": self.trained,
            "faiss_vectors": int(self.faiss.ntotal),
            "segments": len(self.segments),
            "patch_store_bytes": store_bytes,
            "image_copies": self.manifest.image_copies,
            "image_copies_bytes": copies_bytes(self.folder),
            "bytes_per_image": (store_bytes / n) if n else 0.0,
            "format_version": self.manifest.format_version,
            "weights_source": self.manifest.weights_source,
            "preprocessing": self.manifest.preprocessing,
            "calibration": self.calibration.summary() if self.calibration is not None else None,
        }

    def verify(self, checksums: bool = True) -> VerifyReport:
        """Check that FAISS, the patch store and the metadata agree (:func:`indexer.verify.verify_index`)."""
        return verify_index(self, checksums)


def open_index(folder: str | Path) -> IndexDir:
    """Open the index directory ``folder`` (use it as a context manager to close it)."""
    return IndexDir.open(Path(folder))
