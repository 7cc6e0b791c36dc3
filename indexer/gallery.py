"""An index directory: FAISS over the global vectors, the patch store and the metadata.

Layout of ``DIR``::

    manifest.json            model, weights identity, preprocessing, dimensions, G, format version
    meta.sqlite              one row per image + the committed state (the commit point)
    faiss-<generation>.index the FAISS index of the committed generation
    segments/                immutable feature segments (see patch_store)
    pca.npz                  the patch PCA, when the patches are reduced
    codes.npz                the patch product quantizer, when patches are stored as codes

Every change writes new files first (atomically), then commits one SQLite transaction
that makes them current; files of older generations and half-written ones are removed
afterwards or on the next open. ``kill -9`` at any moment leaves the last commit intact.

Segments are bounded in number by compaction: each commit (add or remove) ends by merging
the small segments (under ``COMPACT_SMALL_ROWS`` images) into one new segment once there are
more than ``COMPACT_MAX_SMALL`` of them, synchronously. The merged segment is written first,
then one transaction repoints the images' ``(segment, offset)`` and the segment list, then
the old files are deleted; a crash leaves the old or the new layout, and the next open
removes the files of the other. Segments left without images are dropped the same way.

At scale: the commit records a digest of every segment file (and of ``codes.npz``), which
``verify`` checks; a non-flat FAISS index is trained on a sample and filled segment by segment
(no whole-gallery array), with ``--factory auto`` choosing it (:mod:`indexer.index_plan`); it is
retrained, and the report says so, once the gallery has grown ``RETRAIN_GROWTH`` times past the
size it was trained at. Until the first training a non-flat index holds no FAISS file at all.
The FAISS file is memory-mapped on open where FAISS can (reloaded into memory before a change).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from .atomic import remove_temporaries
from .calibration import Calibration
from .catalog import DB_NAME
from .manifest import Manifest
from .metadata import ImageRow, MetadataDB, now_iso
from .patch_store import Gathered, PatchStore
from .index_plan import DEFAULT_MAX_MEMORY, IndexPlan, choose, tune
from .patch_codes import PatchCodec
from .pca import PatchPCA
from .verify import VerifyReport, verify_index
from .vector_index import (AUTO, add_vectors, build_index, load_index, new_trained_index, remove_ids,
                           save_index)

COMPACT_SMALL_ROWS = 256  # a segment holding fewer images than this is small
COMPACT_MAX_SMALL = 32  # more small segments than this are merged into one
RETRAIN_GROWTH = 4  # a non-flat (or auto) index is retrained when the gallery reaches this many times its training size
RETRAIN_MIN = 1000  # ... and has at least this many images
STREAM_CHUNK = 65_536  # global vectors read at a time when training, filling or checking FAISS

log = logging.getLogger(__name__)


@dataclass
class NewImages:
    """Images ready to be committed: their metadata rows and features."""

    rows: list[ImageRow]
    global_features: np.ndarray
    patch_features: np.ndarray
    patch_weights: np.ndarray


class Gallery:
    """Read and change an index directory (one writer at a time)."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.db = MetadataDB(self.folder / DB_NAME)
        self.store = PatchStore(self.folder, patch_part="codes" if manifest.patch_codes else "patches")
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
        self._counts: dict[int, int] | None = None  # images per live segment, read when first needed
        self._mapped = False
        faiss_file = state.get("faiss_file")
        if faiss_file:
            self.faiss, self._mapped = load_index(self.folder / faiss_file, mmap=True)
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

    def features(self, faiss_ids: Sequence[int], decode: bool = True) -> tuple[list[ImageRow], Gathered]:
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
        patches = new.patch_features
        if self.manifest.patch_codes and np.asarray(patches).dtype != np.uint8:
            if self.codec is None:
                self.fit_codes(patches)
            patches = self.codec.encode(patches)
        digests = self.store.write_segment(segment, new.global_features, patches, new.patch_weights)
        self._make_writable()
        if self.holds_faiss():
            add_vectors(self.faiss, new.global_features, ids)
        checksums = {**self.checksums, str(segment): digests}
        try:
            self._commit_faiss(insert=new.rows, segments=[*self.segments, segment], next_segment=segment + 1,
                               checksums=checksums)
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
        self._make_writable()
        if not self.holds_faiss():  # an untrained non-flat index: nothing in FAISS yet
            removed = len(faiss_ids)
        else:
            try:
                removed = remove_ids(self.faiss, faiss_ids)
            except RuntimeError:  # e.g. HNSW: rebuild from the stored vectors instead
                removed = self._rebuild_without(faiss_ids)
        if removed != len(faiss_ids):
            self._reload_faiss()
            raise RuntimeError(f"FAISS removed {removed} of {len(faiss_ids)} vectors; nothing was changed")
        try:
            self._commit_faiss(delete_ids=list(rows), segments=[s for s in self.segments if s not in emptied],
                               checksums={k: v for k, v in self.checksums.items() if int(k) not in emptied})
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
                merged = self.store.write_merged(target, [(seg, off) for _, seg, off in locations])
            except BaseException:
                self.store.remove_segments([target])  # never committed: nothing refers to it
                raise
            relocate = [(row, target, k) for k, (row, _, _) in enumerate(locations)]
            segments.append(target)
        # On a failed commit the new segment is left to the next open's garbage collection:
        # whether it became live is then read from the database, not guessed here.
        gone = [*merge, *empty]
        checksums = {k: v for k, v in self.checksums.items() if int(k) not in set(gone)}
        if merge:
            checksums[str(target)] = merged
        self.db.commit(relocate=relocate, state={"segments": segments, "next_segment": next_segment,
                                                 "checksums": checksums})
        self.segments, self.next_segment, self.checksums = segments, next_segment, checksums
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
        """Build the configured (non-flat, or ``auto``) FAISS index and commit it: trained on a sample,
        filled segment by segment, its search parameter tuned for the target recall (see
        :mod:`indexer.index_plan`)."""
        self.faiss = self._build_faiss()
        self.trained = True
        self.trained_at = len(self)
        self._mapped = False
        self._commit_faiss()
        self._record_plan()

    def plan_for(self, n: int) -> IndexPlan:
        """The index plan for ``n`` vectors: ``auto``'s choice, or the fixed factory."""
        m = self.manifest
        if m.factory == AUTO:
            return choose(n, m.global_dim, m.max_index_memory or DEFAULT_MAX_MEMORY, m.target_recall)
        plan = IndexPlan(m.factory, n, m.global_dim, m.max_index_memory or 0, 0, "the factory asked for",
                         target_recall=m.target_recall)
        plan.training_sample = n
        return plan

    def _build_faiss(self, without: np.ndarray | None = None) -> faiss.Index:
        n = len(self) - (0 if without is None else len(without))
        plan = self.plan_for(n)
        sample, _ = self.sample_global(plan.training_sample or 0)
        if without is not None and len(sample):
            sample, sample_ids = self.sample_global(plan.training_sample + len(without))
            sample = sample[~np.isin(sample_ids, without)][: plan.training_sample]
        index = new_trained_index(plan.factory, self.manifest.global_dim, sample)
        plan.training_sample = len(sample)
        for ids, vectors in self.global_chunks():
            if without is not None:
                keep = ~np.isin(ids, without)
                ids, vectors = ids[keep], vectors[keep]
            if len(ids):
                add_vectors(index, vectors, ids)
        if self.manifest.factory == AUTO or plan.factory != "Flat":
            self._tune(index, plan, without)
        self.plan = plan
        return index

    def _tune(self, index: faiss.Index, plan: IndexPlan, without: np.ndarray | None) -> None:
        queries, qids = self.sample_global(200, seed=1)
        if without is not None:
            keep = ~np.isin(qids, without)
            queries, qids = queries[keep], qids[keep]
        if len(queries) == 0:
            return

        def chunks():
            for ids, vectors in self.global_chunks():
                if without is not None:
                    keep = ~np.isin(ids, without)
                    ids, vectors = ids[keep], vectors[keep]
                yield ids, vectors

        tune(index, queries, qids, chunks, plan)

    def recall(self, queries: int = 100, k: int = 100, seed: int = 2) -> dict[str, Any]:
        """Recall@k of the FAISS index against exact search, on ``queries`` gallery vectors as queries."""
        from .index_plan import exact_top_k, recall_at_k

        vectors, qids = self.sample_global(queries, seed=seed)
        if len(qids) == 0 or not self.holds_faiss():
            return {"recall_at_k": None, "k": k, "queries": 0}
        approx = self.faiss.search(np.ascontiguousarray(vectors), k + 1)[1]
        exact = exact_top_k(vectors, self.global_chunks(), k + 1)
        return {"recall_at_k": recall_at_k(approx, exact, qids, k), "k": k, "queries": len(qids)}

    def needs_retraining(self) -> str | None:
        """Why the FAISS index should be retrained now (the gallery outgrew its training), or None."""
        if self.manifest.factory == "Flat" or not self.trained:
            return None
        n = len(self)
        if n >= RETRAIN_MIN and n >= RETRAIN_GROWTH * max(self.trained_at, 1):
            return (f"the gallery has {n} images, {n / max(self.trained_at, 1):.1f}x the {self.trained_at} "
                    f"its {self.manifest.factory} index was trained at")
        return None

    def codes_notice(self) -> str | None:
        """A note when the patch codes were trained on far fewer images than the gallery now holds."""
        if self.codec is None:
            return None
        n, grid = len(self), max(self.manifest.grid, 1) ** 2
        trained_images = self.codec.trained_on / grid
        if n >= RETRAIN_MIN and n >= 100 * trained_images:
            return (f"patch codes were trained on {self.codec.trained_on} patches (~{trained_images:.0f} images); the "
                    f"gallery has {n}: rebuild the index to retrain them if its content has changed")
        return None

    def retrain_if_outgrown(self) -> str | None:
        """Retrain FAISS when :meth:`needs_retraining` says so; returns the notice (also logged)."""
        reason = self.needs_retraining()
        if reason is None:
            return None
        before = self.plan.factory if self.plan else self.manifest.factory
        self.train()
        notice = f"retrained the FAISS index: {reason}; now {self.plan.factory if self.plan else before}"
        log.warning(notice)
        self.notices.append(notice)
        return notice

    def _record_plan(self) -> None:
        """Copy the committed plan into manifest.json (informational; the database is authoritative)."""
        if self.plan is None:
            return
        self.manifest.index_plan = self.plan.to_dict()
        try:
            self.manifest.save(self.folder)
        except OSError as err:
            log.warning("could not copy the index plan into the manifest: %s", err)

    def _rebuild_without(self, faiss_ids: np.ndarray) -> int:
        self.faiss = self._build_faiss(without=faiss_ids)
        return len(faiss_ids)

    def holds_faiss(self) -> bool:
        """Whether FAISS holds the gallery's vectors (a non-flat index does not until trained)."""
        return self.trained or self.manifest.factory == "Flat"

    def _make_writable(self) -> None:
        """Reload a memory-mapped FAISS index into memory before changing it."""
        if self._mapped:
            self.faiss = load_index(self.folder / self._faiss_file(self.generation))[0]
            self._mapped = False

    def _reload_faiss(self) -> None:
        if self.generation:
            self.faiss, self._mapped = load_index(self.folder / self._faiss_file(self.generation), mmap=True)
        else:
            self.faiss = build_index(np.zeros((0, self.manifest.global_dim), np.float32), np.zeros(0, np.int64))

    def _commit_faiss(self, *, insert=(), delete_ids=(), segments=None, next_segment=None, checksums=None) -> None:
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

    # --- checks --------------------------------------------------------------
    def faiss_description(self) -> str:
        """The FAISS index in use, e.g. ``IVF1024,Flat nprobe=16`` (``untrained`` before the first training)."""
        if not self.holds_faiss():
            return "untrained (built at the end of the build)"
        desc = self.plan.factory if self.plan is not None else self.manifest.factory
        if self.plan is not None and self.plan.search_param:
            desc += f" {self.plan.search_param}={self.plan.search_value}"
        return desc + (" (memory-mapped)" if self._mapped else "")

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
            "global_dim": self.manifest.global_dim,
            "patch_dim": self.manifest.patch_dim,
            "patch_weights": self.manifest.patch_weights,
            "factory": self.manifest.factory,
            "faiss_index": self.faiss_description(),
            "index_plan": self.plan.to_dict() if self.plan is not None else None,
            "patch_codes": self.manifest.patch_codes,
            "patch_bytes_per_image": self.patch_bytes_per_image(),
            "retraining_due": self.needs_retraining(),
            "codes_notice": self.codes_notice(),
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

    def verify(self, checksums: bool = True) -> VerifyReport:
        """Check that FAISS, the patch store and the metadata agree (:func:`indexer.verify.verify_index`)."""
        return verify_index(self, checksums)


def open_index(folder: str | Path) -> Gallery:
    """Open the index directory ``folder`` (use it as a context manager to close it)."""
    return Gallery.open(Path(folder))
