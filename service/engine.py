"""Inference off the event loop: one worker thread, a bounded queue, batches of queries that
arrive together, and index changes serialised with the searches (one lock)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from PIL import Image

from indexer import (Catalog, Gallery, IndexDir, ImageRecord, QueryResult, Searcher, SearchSettings, add_records,
                     backbone_for)
from indexer.atomic import write_bytes
from indexer.filters import Filter
from indexer.loading import LoadLimits, content_hash
from reranker.device import resolve_device
from reranker.threads import run_on_own_thread, use_torch_threads

from .decoding import DecodeGate, model_side, release_memory
from .errors import DuplicateIdError, ImageRejectedError, NotImplementedHere, QueueFullError, shown
from .metrics import ServiceMetrics
from .settings import ServiceSettings

log = logging.getLogger("vit_rerank.service")

UPLOADS = "uploads"


@dataclass
class SearchOutcome:
    """One query's result (with the plans and features of its returned reranked hits) and its stage timings."""

    result: QueryResult
    timings_ms: dict[str, float]
    batch_size: int = 1


@dataclass
class _Job:
    image: Image.Image
    settings: SearchSettings
    future: Future
    enqueued: float
    where: Filter | None = None  # which gallery images may be returned (indexer.filters)



def stored_thumbnail(upload: Path) -> Path:
    """Where the thumbnail of a large upload is kept, beside it."""
    return upload.with_name(upload.name + ".thumb.jpg")

class Engine:
    """Owns the searcher of one index; ``start()`` runs its inference thread."""

    def __init__(
        self,
        index_dir: Gallery,
        searcher: Searcher,
        *,
        queue_size: int = 64,
        max_batch: int = 16,
        batch_wait_ms: float = 0.0,
        limits: LoadLimits = LoadLimits(),
        metrics: ServiceMetrics | None = None,
        decode_gate: DecodeGate | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.index_dir = index_dir
        self.searcher = searcher
        self.catalog = catalog if catalog is not None else Catalog(index_dir.folder)
        self.uploads = index_dir.folder.resolve() / UPLOADS
        self.limits = limits
        self.metrics = metrics
        self.decode_gate = decode_gate or DecodeGate()  # bounds the decoding of queries (service.decoding)
        self.query_side = model_side(searcher.backbone)  # queries are kept at a few times this side
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1e3
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._seconds_per_query = 0.1  # running estimate, for Retry-After
        self._thread: threading.Thread | None = None
        self.torch_threads: int | None = None  # the inference thread's intra-op threads (None: torch's default)
        self._info = index_dir.info()
        self._remove_orphan_uploads()

    @classmethod
    def open(cls, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> "Engine":
        """Open ``settings.index`` with the backbone that built it."""
        if settings.index is None:
            raise ValueError("no index directory given (--index DIR, VIT_RERANK_INDEX, or --demo)")
        device = resolve_device(settings.device)
        threads = settings.torch_threads or torch.get_num_threads()
        if settings.ray is not None:  # joined from the caller's thread: Ray sets its SIGTERM handler on the main one
            from .ray_backend import connect

            connect(settings.ray)
        # Loaded on a thread of its own, so that the caller's thread grows no OpenMP pool to slow the
        # inference thread down (reranker.threads); the engine's torch work all runs on that thread.
        engine = run_on_own_thread(lambda: cls._load(settings, device, metrics), threads, "vit-rerank-loader")
        engine.torch_threads = threads
        return engine

    @classmethod
    def _load(cls, settings: ServiceSettings, device: torch.device, metrics: ServiceMetrics | None) -> "Engine":
        catalog = None
        if settings.ray is not None:  # shards on a Ray cluster (service.ray_backend): read-only
            from .ray_backend import open_shards

            index_dir, searcher, catalog = open_shards(settings.shards or [settings.index], settings.ray, device,
                                                     settings.weights, settings.runtime)
        else:
            index_dir = IndexDir.open(Path(settings.index).resolve())
            try:
                backbone = backbone_for(index_dir.manifest, device, settings.weights, settings.runtime)
                searcher = Searcher(index_dir, backbone, device)
            except BaseException:
                index_dir.close()
                raise
        limits = LoadLimits(max_pixels=settings.max_image_pixels, max_file_bytes=settings.max_upload_bytes)
        return cls(
            index_dir, searcher, queue_size=settings.queue_size, max_batch=settings.max_batch,
            batch_wait_ms=settings.wait_ms(device.type), limits=limits, metrics=metrics, catalog=catalog,
        )

    # --- facts ---------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.index_dir.manifest.model

    @property
    def random_weights(self) -> bool:
        return self.searcher.backbone.random_weights

    @property
    def transform(self) -> Any:
        return self.searcher.backbone.transform

    @property
    def grid(self) -> int:
        return self.index_dir.manifest.grid

    def info(self) -> dict[str, Any]:
        """Index statistics as of the last change (no lock: never waits for inference)."""
        return {**self._info, "random_weights": self.random_weights, "device": str(self.searcher.device)}

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def resolve_marginals(self, marginals: str) -> str:
        return self.searcher.resolve_marginals(marginals)

    def effective(self, settings: SearchSettings, service: Mapping[str, Any] | None = None) -> SearchSettings:
        """``settings`` completed from the index's calibration, else the ``service``'s configured
        defaults, else the shipped ones (:meth:`indexer.search.Searcher.effective`; ValueError if bad)."""
        return self.searcher.effective(settings, service)

    @property
    def calibration(self):
        return self.searcher.calibration

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vit-rerank-inference", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker (queries still queued fail) and close the index."""
        if self._thread is not None:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.future.set_running_or_notify_cancel():
                    job.future.set_exception(RuntimeError("the service is shutting down"))
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None
        with self._lock:
            self.catalog.close()
            self.index_dir.close()

    # --- searching -----------------------------------------------------------------
    def submit(self, image: Image.Image, settings: SearchSettings, where: Filter | None = None) -> Future:
        """Queue one query; the future gives a :class:`SearchOutcome`. Raises :class:`QueueFullError`."""
        if self._thread is None:
            raise RuntimeError("the engine is not started")
        job = _Job(image, settings, Future(), time.perf_counter(), where)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if self.metrics:
                self.metrics.rejected.inc()
            raise QueueFullError(self.retry_after()) from None
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    def search(self, image: Image.Image, settings: SearchSettings, timeout: float | None = None) -> SearchOutcome:
        """Blocking :meth:`submit` (for in-process callers, e.g. the benchmark)."""
        return self.submit(image, settings).result(timeout)

    def retry_after(self) -> int:
        return max(1, math.ceil((self._queue.qsize() + 1) * self._seconds_per_query))

    def _run(self) -> None:
        use_torch_threads(self.torch_threads)
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, stop = [job], False
            deadline = time.perf_counter() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:  # a timeout of 0 still takes a query that is already waiting
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            if self.metrics:
                self.metrics.queue_depth.set(self._queue.qsize())
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop cancelled ones
        groups: dict[tuple, list[_Job]] = defaultdict(list)
        for job in live:
            groups[dataclasses.astuple(job.settings), job.where].append(job)
        for jobs in groups.values():
            start = time.perf_counter()
            try:
                with self._lock:
                    results = self.searcher.search([j.image for j in jobs], jobs[0].settings, keep_plans=True,
                                                   where=jobs[0].where)
            except BaseException as err:  # noqa: BLE001 - the worker must survive any query
                log.exception("search failed")
                for j in jobs:
                    j.future.set_exception(err)
                continue
            done = time.perf_counter()
            self._seconds_per_query = 0.8 * self._seconds_per_query + 0.2 * (done - start) / len(jobs)
            if self.metrics:
                self.metrics.batch_size.observe(len(jobs))
            for job, result in zip(jobs, results):
                timings = {
                    "queue": (start - job.enqueued) * 1e3,
                    "embed": result.timings_ms["embed"],
                    "search": result.timings_ms["search"],
                    "rerank": result.timings_ms["rerank"],
                    **{k: result.timings_ms[k] for k in ("gather", "structural", "final") if k in result.timings_ms},
                    "total": (done - job.enqueued) * 1e3,
                }
                if self.metrics:
                    self.metrics.observe_stages(timings)
                job.future.set_result(SearchOutcome(result, timings, len(jobs)))

    # --- changing the index ----------------------------------------------------------
    def add_image(
        self, data: bytes, suffix: str, image_id: str | None = None, label: str | None = None,
        metadata: dict[str, Any] | None = None, decoded: tuple[Any, tuple[int, int]] | None = None,
        thumbnail: bytes | None = None,
    ) -> tuple[str, list[tuple[str, float]]]:
        """Store the upload under ``<index>/uploads/`` and index it; all or nothing. Returns the id, and the
        indexed images it is a near-duplicate of (id, global cosine), best first.

        The file is written and indexed under the same lock as :meth:`remove_image` removes an image and
        then its file, so an indexed image always has its file. A failed add removes only a file it wrote.
        ``decoded``: the upload decoded already (the image, reduced, and the original's size), so the
        indexer does not decode it again under the lock; ``thumbnail``: a JPEG stored beside the upload
        (``<upload>.thumb.jpg``, for large originals), so that it is never decoded again for one.
        """
        digest = content_hash(data)
        image_id = image_id or f"upload-{digest[:16]}"
        name = f"{hashlib.sha256(image_id.encode()).hexdigest()[:16]}-{digest[:16]}{suffix}"
        path = self.uploads / name  # never a name from the client
        index_dir = self._writable()
        with self._lock:
            if index_dir.row(image_id) is not None:
                raise DuplicateIdError(f"an image with id {shown(image_id)} is already indexed")
            self.uploads.mkdir(exist_ok=True)
            created = not path.exists()  # else an orphan of a crash, with these very bytes: left as it is
            write_bytes(path, data)
            if thumbnail is not None:
                write_bytes(stored_thumbnail(path), thumbnail)
            try:
                report = add_records(
                    index_dir, self.searcher.backbone,
                    [ImageRecord(str(path), image_id, label, dict(metadata or {}))],
                    workers=0, limits=self.limits, progress=False, save_report=False,
                    decoded=None if decoded is None else {str(path): decoded},
                )
                if report.failures:
                    failure = report.failures[0]
                    raise ImageRejectedError(failure.reason, failure.message)
                if report.added != 1:
                    raise RuntimeError(f"the indexer added {report.added} images instead of 1")
                near = [(other, cosine) for new, other, cosine in report.near_duplicates if new == image_id]
                near += [(first, 1.0) for dup, first in report.duplicates if dup == image_id]
            except BaseException:
                if created and image_id not in index_dir.ids():
                    for file in (path, stored_thumbnail(path)):
                        with contextlib.suppress(FileNotFoundError):
                            file.unlink()
                raise
            finally:
                self.searcher.refresh()
                self._info = self.index_dir.info()
                release_memory()  # the indexer decoded the image at full size
        return image_id, sorted(near, key=lambda pair: -pair[1])

    def remove_image(self, image_id: str) -> bool:
        """Remove one image (and its upload, if it came through the service); False if unknown.

        The image leaves the index first, then its upload file, both under the lock: a re-add of the same
        id and bytes (same file name) waits for both, and a crash in between leaves only an orphan file,
        removed at the next start.
        """
        index_dir = self._writable()
        with self._lock:
            row = index_dir.row(image_id)
            if row is None:
                return False
            try:
                index_dir.remove([image_id])
            finally:
                self.searcher.refresh()
                self._info = self.index_dir.info()
            path = Path(row.path)
            if path.parent == self.uploads:
                for file in (path, stored_thumbnail(path)):
                    with contextlib.suppress(FileNotFoundError):
                        file.unlink()
        return True

    def _writable(self) -> IndexDir:
        """The gallery, to change; 501 where it takes no changes (its ``read_only`` says why)."""
        if self.index_dir.read_only or not isinstance(self.index_dir, IndexDir):
            raise NotImplementedHere(self.index_dir.read_only or "this gallery takes no changes")
        return self.index_dir

    def _remove_orphan_uploads(self) -> None:
        """Uploads that no committed image refers to (left by a crash between write and commit)."""
        if not self.uploads.is_dir():
            return
        live = self.catalog.referenced_paths()
        live |= {str(stored_thumbnail(Path(p))) for p in live}
        for path in self.uploads.iterdir():
            if path.is_file() and str(path) not in live:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
