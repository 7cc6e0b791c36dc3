"""Embed an evaluation set once and keep its features on disk, so a sweep never re-embeds.

A cache entry is a folder named by a digest of everything the features depend on (dataset,
root, the image ids, model, weights identity, model arguments, grid, patch-weight kind). It
is written in a staging folder and renamed into place when complete, so an interrupted run
leaves nothing that a later run would read. The entry's ``meta.json`` repeats the full key
and is compared on every load, so a cache made with another model is never used.

Images that fail to load are listed in the entry and flagged in ``ok``; the protocols leave
them out entirely (as queries and as gallery items).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexer.atomic import fsync_path, write_json, write_npy
from indexer.embedding import embed_records
from indexer.sources import ImageRecord
from reranker.backbones import Backbone
from reranker.defaults import FLOAT32_RUNTIMES
from reranker.features import StoredFeatures

FORMAT_VERSION = 2  # 2: a weights file per kind
META = "meta.json"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vit-rerank" / "eval"


@dataclass(kw_only=True)
class FeatureStore(StoredFeatures):
    """A cache entry: the stored features of ``ids`` in order (global ``(N, D)`` float32, patches
    ``(N, G*G, D)`` float16, memory-mapped, patch weights of every kind asked for, from one forward)
    and where they came from; ``ok[i]`` is False for a failed image."""

    folder: Path
    key: dict[str, Any]
    ids: list[str]
    ok: np.ndarray
    failures: list[dict[str, str]] = field(default_factory=list)
    cached: bool = False
    images_embedded: int = 0
    seconds: float = 0.0


def cache_key(
    dataset: str, root: str, records: Sequence[ImageRecord], backbone: Backbone, model_kwargs: dict[str, Any],
    patch_weights: Sequence[str], head: str | None = None,
) -> dict[str, Any]:
    """Everything the features depend on (``head``: the projection head's identity, if any)."""
    ids = hashlib.sha256("\n".join(f"{r.id}\t{r.path}" for r in records).encode()).hexdigest()
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "root": str(Path(root).resolve()),
        "images": len(records),
        "ids_sha256": ids,
        "model": backbone.name,
        "weights": backbone.weights_id,
        "head": head,
        "model_kwargs": json.loads(json.dumps(model_kwargs, sort_keys=True)),
        "grid": backbone.grid,
        "patch_layer": backbone.patch_layer,
        "patch_weights": list(patch_weights),
        "preprocessing": backbone.preprocessing,
        # only when not float32 torch: the keys of caches made before runtimes existed stay valid
        **({"runtime": backbone.runtime} if backbone.runtime not in FLOAT32_RUNTIMES else {}),  # float32 alike
    }


def entry_folder(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", key["model"])
    return Path(cache_dir) / f"{key['dataset']}-{model}-{digest}"


def load_entry(folder: Path, key: dict[str, Any]) -> FeatureStore | None:
    """The cached features in ``folder`` if they are complete and were made with ``key``."""
    meta_path = folder / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        return None
    return FeatureStore(
        folder=folder,
        key=key,
        ids=meta["ids"],
        ok=np.load(folder / "ok.npy"),
        global_features=np.load(folder / "global.npy"),
        patch_features=np.load(folder / "patches.npy", mmap_mode="c"),
        patch_weights={kind: np.load(folder / f"weights-{kind}.npy") for kind in key["patch_weights"]},
        failures=meta["failures"],
        cached=True,
    )


def compute_features(
    backbone: Backbone,
    records: Sequence[ImageRecord],
    key: dict[str, Any],
    cache_dir: Path,
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> FeatureStore:
    """The features of ``records`` from the cache, or embedded now and cached."""
    folder = entry_folder(cache_dir, key)
    if (store := load_entry(folder, key)) is not None:
        return store
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        failures, seconds = _embed_into(staging, backbone, records, key["patch_weights"], batch_size, workers, progress)
        write_json(staging / META, {"key": key, "ids": [r.id for r in records], "failures": failures,
                                    "seconds": seconds})
        fsync_path(staging)
        _publish_entry(staging, folder, key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    store = load_entry(folder, key)
    if store is None:
        raise RuntimeError(f"the feature cache {folder} could not be read back")
    store.cached, store.images_embedded, store.seconds = False, len(records) - len(failures), seconds
    return store


def _embed_into(
    folder: Path, backbone: Backbone, records: Sequence[ImageRecord], kinds: Sequence[str], batch_size: int, workers: int,
    progress: bool,
) -> tuple[list[dict[str, str]], float]:
    n, dim = backbone.grid ** 2, backbone.output_dim
    count = len(records)
    patches = np.lib.format.open_memmap(folder / "patches.npy", mode="w+", dtype=np.float16, shape=(count, n, dim))
    global_features = np.zeros((count, dim), np.float32)
    weights = {kind: np.full((count, n), 1.0 / n, np.float32) for kind in kinds}
    ok = np.zeros(count, bool)
    failures: list[dict[str, str]] = []
    start = time.perf_counter()
    for batch in embed_records(backbone, records, kinds=kinds, batch_size=batch_size, workers=workers,
                               progress=progress, description="embedding"):
        if batch.positions:
            rows = np.asarray(batch.positions)
            global_features[rows] = batch.features.global_features
            patches[rows] = batch.features.patch_features.astype(np.float16)
            for kind, values in batch.features.patch_weights.items():
                weights[kind][rows] = values
            ok[rows] = True
        failures += [{"id": f.id, "path": f.path, "reason": f.reason, "message": f.message} for f in batch.failures]
    seconds = time.perf_counter() - start
    patches.flush()
    del patches
    fsync_path(folder / "patches.npy")
    write_npy(folder / "global.npy", global_features)
    for kind, values in weights.items():
        write_npy(folder / f"weights-{kind}.npy", values)
    write_npy(folder / "ok.npy", ok)
    return failures, seconds


def _publish_entry(staging: Path, folder: Path, key: dict[str, Any]) -> None:
    """Rename the complete ``staging`` folder to ``folder``. An entry already there that was
    made with another key (or is unreadable) is replaced; one made with ``key`` by a
    concurrent run is kept."""
    if folder.exists():
        if _matches(folder, key):
            shutil.rmtree(staging, ignore_errors=True)
            return
        stale = folder.with_name(f"{folder.name}.stale-{os.getpid()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError:
        if not _matches(folder, key):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    fsync_path(folder.parent)


def _matches(folder: Path, key: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / META).read_text()).get("key") == key
    except (OSError, ValueError):
        return False
