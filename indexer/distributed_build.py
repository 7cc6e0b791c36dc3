"""Index a gallery on a Ray cluster into N shards, each an ordinary index directory.

Ray Data reads the source (a folder or CSV / JSON-lines manifest, listed as
:mod:`indexer.sources` lists it, or a Parquet list with a ``path`` column), a pool of model
actors (one per GPU, or CPU actors) decodes and embeds with the same code as a local build
(:func:`indexer.embedding.embed_records`), and this process commits the features to the shard
of each image (:func:`indexer.shards.shard_of`) through :class:`indexer.index_dir.IndexDir`, every
``commit_every`` images per shard. Each commit is atomic; a rerun skips every committed id, so an
interrupted build (a dead worker, node or driver) recomputes only what was not committed.

The shard directories are written by this (driver) process: run it where the index directory
lives. Only the decoding and the model forward are spread over the cluster.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from reranker.device import resolve_device
from reranker.features import StoredFeatures

from .atomic import write_json
from .build import BuildReport, backbone_for
from .embedding import Failure, embed_records
from .index_dir import IndexDir, NewImages
from .loading import LoadLimits
from .manifest import Manifest
from .metadata import ImageRow, now_iso
from .shards import ShardLayout, shard_of
from .sources import ImageRecord, from_source


@dataclass
class ShardedBuildReport(BuildReport):
    """A :class:`BuildReport` with the images each shard holds at the end and the actors used."""

    shard_images: list[int] = field(default_factory=list)
    actors: int = 0


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: ``RAY_ADDRESS`` or the cluster ``ray start`` left on
    this machine, else a new local one); nothing when this process is already connected."""
    if ray.is_initialized():
        return
    if not address and not os.environ.get("RAY_ADDRESS"):
        _loopback_only()
    ray.init(address=address or None, include_dashboard=False if not address else None, log_to_driver=False)


def _loopback_only() -> None:
    """A Ray instance this process starts on its own listens on 127.0.0.1 only (Ray's single-machine
    mode, which it reads from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when imported): without this, a new
    local instance listens on every interface."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def default_actors(gpus_per_actor: float, cpus_per_actor: float) -> int:
    """One actor per GPU of the cluster, else as many CPU actors as its CPUs allow."""
    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // max(cpus_per_actor, 1e-3)))


class _Embedder:
    """A Ray Data model actor: one backbone, loaded once; each batch of records in, features out."""

    def __init__(self, manifest: dict, weights: str | None, device: str, limits: LoadLimits) -> None:
        self.manifest = Manifest(**manifest)
        self.backbone = backbone_for(self.manifest, resolve_device(device), weights)
        self.limits = limits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, m = len(batch["id"]), self.manifest
        records = []
        for rec_id, text in zip(batch["id"], batch["record"]):
            rec = json.loads(text)
            records.append(ImageRecord(rec["path"], str(rec_id), rec["label"], rec["metadata"]))
        out: dict[str, Any] = {
            "ok": np.zeros(n, bool), "hash": [""] * n, "width": np.zeros(n, np.int64),
            "height": np.zeros(n, np.int64), "nbytes": np.zeros(n, np.int64), "reason": [""] * n,
            "message": [""] * n, "global": np.zeros((n, m.global_dim), np.float32),
            "patches": np.zeros((n, m.grid * m.grid, m.global_dim), np.float32),
            "weights": np.zeros((n, m.grid * m.grid), np.float32),
            "copy": [b""] * n, "copy_suffix": [""] * n,  # the image's copy for the index (image_copies)
        }
        kind = m.patch_weights
        for eb in embed_records(self.backbone, records, kinds=(kind,), batch_size=max(n, 1), workers=0,
                                limits=self.limits, progress=False, copies=m.image_copies):
            for f in eb.failures:
                out["reason"][f.position], out["message"][f.position] = f.reason, f.message
            for k, pos in enumerate(eb.positions):
                out["ok"][pos] = True
                out["hash"][pos], out["nbytes"][pos] = eb.hashes[k], eb.nbytes[k]
                out["width"][pos], out["height"][pos] = eb.sizes[k]
                out["global"][pos] = eb.features.global_features[k]
                out["patches"][pos] = eb.features.patch_features[k]
                out["weights"][pos] = eb.features.weights(kind)[k]
                if eb.copies and eb.copies[k] is not None:
                    out["copy"][pos], out["copy_suffix"][pos] = eb.copies[k]
        for name in ("hash", "reason", "message", "copy", "copy_suffix"):
            out[name] = np.array(out[name], dtype=object)
        return {**batch, **out}


def _record_row(position: int, rec: ImageRecord, shards: int) -> dict[str, Any]:
    record = {"path": rec.path, "label": rec.label, "metadata": rec.metadata}
    return {"position": position, "id": rec.id, "shard": shard_of(rec.id, shards), "record": json.dumps(record)}


def _parquet_rows(shards: int, base: str):
    """A Ray Data batch function: Parquet rows (``path``, optional ``id``, ``label``, other columns as
    metadata) to the record columns the embedder reads. As in a CSV manifest, a relative path is relative
    to the Parquet file's folder and a missing id is the path as written."""

    def convert(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = [str(p) for p in batch["path"]]
        paths = [os.path.normpath(os.path.join(base, p)) for p in written]
        ids = [str(i) if i is not None else p for i, p in zip(batch.get("id", [None] * len(paths)), written)]
        labels = [None if x is None or x == "" else str(x) for x in batch.get("label", [None] * len(paths))]
        extra = [k for k in batch if k not in ("path", "id", "label")]
        records = [json.dumps({"path": p, "label": lab, "metadata": {k: _plain(batch[k][i]) for k in extra}})
                   for i, (p, lab) in enumerate(zip(paths, labels))]
        return {"position": np.full(len(paths), -1, np.int64), "id": np.array(ids, dtype=object),
                "shard": np.array([shard_of(i, shards) for i in ids], np.int64),
                "record": np.array(records, dtype=object)}

    return convert


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _source_dataset(source: Path, layout: ShardLayout, done: set[str], label_from_parent: bool, blocks: int):
    """The Ray dataset of the source's images not yet committed, and how many images the source lists."""
    if source.suffix.lower() == ".parquet" or (source.is_dir() and any(source.glob("*.parquet"))):
        raw = ray.data.read_parquet(str(source))
        base = str(source.resolve() if source.is_dir() else source.resolve().parent)
        ds = raw.map_batches(_parquet_rows(layout.shards, base), batch_format="numpy")
        if done:
            ds = ds.map_batches(_drop_ids(done), batch_format="numpy")
        return ds, raw.count()
    records = from_source(source, label_from_parent=label_from_parent)
    rows = [_record_row(k, r, layout.shards) for k, r in enumerate(records) if r.id not in done]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), blocks))), len(records)


def _drop_ids(done: set[str]):
    """A Ray Data batch function that drops the rows whose id is in ``done``."""

    def drop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([str(i) not in done for i in batch["id"]], bool)
        return {k: v[keep] for k, v in batch.items()}

    return drop


def open_shards(root: Path, layout: ShardLayout, manifest: Manifest | None) -> list[IndexDir]:
    """Open every shard of ``root``, creating the missing ones with ``manifest``; the layout file is
    written once all of them exist (so a crash while creating them leaves no half layout)."""
    galleries: list[IndexDir] = []
    try:
        for folder in layout.folders(root):
            if (folder / "manifest.json").exists():
                galleries.append(IndexDir.open(folder))
            elif manifest is None:
                raise FileNotFoundError(f"shard {folder} is missing from the sharded index {root}")
            else:
                galleries.append(IndexDir.create(folder, Manifest(**manifest.__dict__)))
    except BaseException:
        for g in galleries:
            g.close()
        raise
    if not ShardLayout.exists(root):
        layout.save(root)
    return galleries


class _ShardWriter:
    """Buffers one shard's embedded images and commits them ``commit_every`` at a time."""

    def __init__(self, index_dir: IndexDir, commit_every: int) -> None:
        self.index_dir, self.commit_every = index_dir, commit_every
        self.rows: list[ImageRow] = []
        self.features: list[StoredFeatures] = []  # the pending rows' features, one part per image
        self.copies: dict[str, tuple[bytes, str]] = {}  # their images' copies, by content hash
        self.added = 0

    def add(self, row: ImageRow, features: StoredFeatures, copy: tuple[bytes, str] | None = None) -> None:
        self.rows.append(row)
        self.features.append(features)
        if copy is not None:
            self.copies.setdefault(row.content_hash, copy)
        if len(self.rows) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        feats = StoredFeatures.concat(self.features)
        feats.patch_features = self.index_dir.reduce_patches(feats.patch_features)
        self.index_dir.commit_new(NewImages(rows=list(self.rows), features=feats, copies=dict(self.copies)))
        self.added += len(self.rows)
        self.rows.clear()
        self.features.clear()
        self.copies.clear()


def build_sharded(
    root: Path,
    source: str | Path,
    *,
    shards: int | None = None,
    manifest: Manifest | None = None,
    weights: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int = 32,
    commit_every: int = 1024,
    skip_duplicates: bool = False,
    label_from_parent: bool = False,
    limits: LoadLimits = LoadLimits(),
    progress: bool = True,
) -> ShardedBuildReport:
    """Build (or resume) the sharded index ``root`` from ``source`` on the connected Ray cluster.

    A new build needs ``manifest`` (the model's, see :func:`indexer.build.new_manifest`) and
    ``shards``; a resume reads both from ``root``. Bad images are reported in ``failures`` as a local
    build reports them; exact duplicates (same bytes as an indexed image) likewise.
    """
    root = Path(root)
    start = time.perf_counter()
    if ShardLayout.exists(root):
        layout = ShardLayout.load(root)
        if shards is not None and shards != layout.shards:
            raise ValueError(f"{root} is a sharded index of {layout.shards} shards, not {shards}")
    else:
        if manifest is None or shards is None:
            raise ValueError(f"{root} is not a sharded index yet: a new build needs a model and --shards")
        if root.exists() and any(p.name not in ShardLayout.new(shards).names for p in root.iterdir()):
            raise FileExistsError(f"{root} is not empty; choose a new folder for the sharded index")
        layout = ShardLayout.new(shards)
    if manifest is not None and manifest.pca_dim:
        raise ValueError("--pca-dim is not supported with --ray: each shard would fit its own PCA")
    if not ray.is_initialized():
        connect(None)
    ray.data.DataContext.get_current().enable_progress_bars = progress  # Ray's own progress, beside ours
    galleries = open_shards(root, layout, manifest)
    try:
        manifest = galleries[0].manifest
        if manifest.pca_dim:
            raise ValueError(f"{root}: shards with a patch PCA cannot be built with --ray")
        done: set[str] = set().union(*(g.ids() for g in galleries))
        seen: dict[str, str] = {}
        for g in galleries:
            seen.update(g.content_hashes())
        n_actors = actors or default_actors(gpus_per_actor, cpus_per_actor)
        ds, listed = _source_dataset(Path(source), layout, done, label_from_parent, blocks=4 * n_actors)
        report = ShardedBuildReport(duplicates_skipped=skip_duplicates, actors=n_actors)
        writers = [_ShardWriter(g, commit_every) for g in galleries]
        device = "cuda" if gpus_per_actor > 0 else "cpu"
        embedded = ds.map_batches(
            _Embedder, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
            fn_constructor_kwargs={"manifest": dict(manifest.__dict__), "weights": weights, "device": device,
                                   "limits": limits},
        )
        received = _consume(embedded, writers, seen, report, skip_duplicates, progress, listed - len(done))
        report.already_indexed = listed - received
        for g in galleries:
            if not g.trained and len(g):
                g.train()
        report.shard_images = [len(g) for g in galleries]
        report.failures.sort(key=lambda f: (f.position, f.id))
        report.seconds = time.perf_counter() - start
        reports = root / "reports"
        reports.mkdir(exist_ok=True)
        write_json(reports / f"build-{now_iso().replace(':', '')}.json", report.to_dict())
        return report
    finally:
        for g in galleries:
            g.close()


def _consume(embedded, writers: list[_ShardWriter], seen: dict[str, str], report: ShardedBuildReport,
             skip_duplicates: bool, progress: bool, total: int) -> int:
    """Commit the embedded stream shard by shard; returns how many images came through. What is
    embedded but not yet committed when the stream fails is committed before the error goes on (it is
    valid: nothing that was paid for is lost)."""
    bar = tqdm(total=max(total, 0), unit="img", desc="indexing (ray)", disable=not progress, dynamic_ncols=True)
    received = 0
    try:
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["id"])):
                _take(batch, i, writers, seen, report, skip_duplicates)
            received += len(batch["id"])
            bar.update(len(batch["id"]))
            bar.set_postfix(committed=sum(w.added for w in writers), failed=len(report.failures))
    finally:
        bar.close()
        for w in writers:
            w.flush()
        report.added = sum(w.added for w in writers)
    return received


def _take(batch: dict[str, np.ndarray], i: int, writers: list[_ShardWriter], seen: dict[str, str],
          report: ShardedBuildReport, skip_duplicates: bool) -> None:
    rec = json.loads(batch["record"][i])
    image_id, position = str(batch["id"][i]), int(batch["position"][i])
    if not batch["ok"][i]:
        report.failures.append(Failure(position, image_id, rec["path"], str(batch["reason"][i]),
                                       str(batch["message"][i])))
        return
    digest = str(batch["hash"][i])
    if digest in seen:
        report.duplicates.append((image_id, seen[digest]))
        if skip_duplicates:
            return
    else:
        seen[digest] = image_id
    row = ImageRow(id=image_id, path=rec["path"], label=rec["label"], content_hash=digest,
                   width=int(batch["width"][i]), height=int(batch["height"][i]), bytes=int(batch["nbytes"][i]),
                   metadata=rec["metadata"], added_at=now_iso())
    writer = writers[int(batch["shard"][i])]
    kind = writer.index_dir.manifest.patch_weights
    copy = (bytes(batch["copy"][i]), str(batch["copy_suffix"][i])) if "copy" in batch and batch["copy"][i] else None
    writer.add(row, StoredFeatures(batch["global"], batch["patches"], {kind: batch["weights"]}).take([i]), copy)

