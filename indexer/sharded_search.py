"""Search shard index directories held by Ray actors, with the single-index search code.

One :class:`ShardServer` actor per shard holds its :class:`~indexer.index_dir.IndexDir` (FAISS
index and patch store). The front is a plain :class:`~indexer.search.Searcher` over a
:class:`ShardedIndex` (a :class:`~indexer.gallery.Gallery`): it embeds the query batch once, fans the global search out to every shard, merges by score, gathers
the candidates' stored features from their shards in one call per shard, and reranks them in
one batch: the very code path of a local search, so over the same images the ranking is the
same as one local index's (exact, ``Flat`` factory).

A result's ``faiss_id`` is global: ``local_id * shards + shard``. A shard that fails or does not
answer in time raises :class:`ShardUnavailableError` naming it; no result is ever made from
the shards that did answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from reranker.backbones import Backbone
from reranker.features import StoredFeatures

from .build import backbone_for
from .calibration import Calibration
from .image_copies import find as find_copy
from .index_dir import IndexDir
from .manifest import IndexMismatchError, Manifest
from .metadata import ImageRow
from .search import Searcher
from .shards import ShardUnavailableError
from .vector_index import VectorSearcher

#: Manifest fields every shard must share (queries are embedded once for all of them).
SAME_FIELDS = ("model", "weights", "grid", "global_dim", "patch_dim", "patch_weights", "model_kwargs",
               "preprocessing", "pca_dim")


class ShardServer:
    """A Ray actor's state: one shard's gallery, searched on the CPU."""

    def __init__(self, folder: str) -> None:
        self.index_dir = IndexDir.open(Path(folder))
        self.vectors = VectorSearcher(self.index_dir.faiss, torch.device("cpu"))

    def describe(self) -> tuple[Manifest, dict[str, Any], Calibration | None]:
        return self.index_dir.manifest, self.index_dir.info(), self.index_dir.calibration

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.vectors.search(torch.from_numpy(queries), k)

    def features(self, faiss_ids: list[int]) -> tuple[list[ImageRow], StoredFeatures]:
        """Rows and decoded features (this shard's own PCA / codes applied) of its images."""
        return self.index_dir.features(faiss_ids)

    def row(self, image_id: str) -> ImageRow | None:
        return self.index_dir.row(image_id)

    def paths(self) -> set[str]:
        return {r.path for r in self.index_dir.rows()}

    def close(self) -> None:
        self.index_dir.close()


@dataclass
class _Shard:
    folder: str
    actor: Any


class ShardedIndex:
    """A :class:`indexer.gallery.Gallery` served by one actor per shard: the global search fans out to
    them, features and rows come from the shards that hold them. Read-only here."""

    pca = None  # features come back decoded by their own shard
    codec = None
    read_only = ("adding or removing images is not supported by a sharded (Ray) index: "
                 "rebuild the shards with `vit-rerank index build DIR --from SOURCE --ray`")

    def __init__(self, folders: Sequence[Path], *, timeout_s: float = 30.0, cpus_per_shard: float = 0.0,
                 start_timeout_s: float = 120.0) -> None:
        """Start one actor per folder, spread over the nodes. ``cpus_per_shard`` is what each reserves
        (default none: a shard mostly waits, and any number of shards fits any cluster)."""
        if not folders:
            raise ValueError("no shard directories given")
        self.timeout_s = timeout_s
        remote = ray.remote(num_cpus=cpus_per_shard, max_restarts=3, max_task_retries=0,
                            scheduling_strategy="SPREAD")(ShardServer)
        self.shards = [_Shard(str(Path(f).resolve()), remote.remote(str(Path(f).resolve()))) for f in folders]
        self.folder = Path(self.shards[0].folder).parent
        try:
            described = self._all("describe", timeout=start_timeout_s)
            self.manifest, self._infos = described[0][0], [d[1] for d in described]
            for k, (manifest, _, _) in enumerate(described):
                for name in SAME_FIELDS:
                    if getattr(manifest, name) != getattr(self.manifest, name):
                        raise IndexMismatchError(f"shard {k} ({self.shards[k].folder}) has {name} "
                                                 f"{getattr(manifest, name)!r}, shard 0 {getattr(self.manifest, name)!r}")
            self.calibration = _common_calibration([d[2] for d in described])
        except BaseException:
            self.close()
            raise

    def vector_search(self, device: Any = "cpu", backend: str = "auto") -> "ShardedIndex":
        """The global search: this index itself (:meth:`search` fans out to the shards)."""
        return self

    def decode_patches(self, codes: np.ndarray, device: Any = "cpu") -> torch.Tensor:
        raise ValueError("a sharded index returns decoded patches")

    def ids_where(self, where: Any) -> np.ndarray:
        raise ValueError("filters (where) are not supported on a sharded index yet")

    def global_vectors(self, faiss_ids: np.ndarray) -> np.ndarray:
        raise ValueError("filters (where) are not supported on a sharded index yet")

    def image_file(self, row: ImageRow) -> str:
        """The copy in the shard that holds ``row`` (each shard keeps its own), else the original."""
        if self.manifest.image_copies:
            for shard in self.shards:
                copy = find_copy(Path(shard.folder), row.content_hash)
                if copy is not None:
                    return str(copy)
        return row.path

    # --- fan-out ---------------------------------------------------------------------
    def _get(self, refs: dict[int, Any], timeout: float | None = None) -> dict[int, Any]:
        """Every shard's answer, or :class:`ShardUnavailableError` for the first that fails."""
        out = {}
        for k, ref in refs.items():
            try:
                out[k] = ray.get(ref, timeout=self.timeout_s if timeout is None else timeout)
            except GetTimeoutError:
                raise ShardUnavailableError(k, self.shards[k].folder, "no answer in time") from None
            except RayActorError as err:
                raise ShardUnavailableError(k, self.shards[k].folder, type(err).__name__) from err
            except RayTaskError as err:  # the shard is up; the call itself failed (e.g. KeyError): as it is
                raise err.as_instanceof_cause() from None
        return out

    def _all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        refs = {k: getattr(s.actor, method).remote(*args) for k, s in enumerate(self.shards)}
        answers = self._get(refs, timeout)
        return [answers[k] for k in range(len(self.shards))]

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The global top ``k`` over every shard: scores and global ids ``(Q, k)``, best first."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        n = len(self.shards)
        parts = self._all("search", q, k)
        scores = np.concatenate([s for s, _ in parts], axis=1)
        ids = np.concatenate([np.where(i >= 0, i * n + shard, -1) for shard, (_, i) in enumerate(parts)], axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def features(self, faiss_ids: Sequence[int], decode: bool = True) -> tuple[list[ImageRow], StoredFeatures]:
        """Rows and stored features by global id, in that order, with one call per shard holding any."""
        n = len(self.shards)
        wanted: dict[int, list[int]] = {}
        for pos, gid in enumerate(faiss_ids):
            wanted.setdefault(int(gid) % n, []).append(pos)
        refs = {shard: self.shards[shard].actor.features.remote([int(faiss_ids[p]) // n for p in pos])
                for shard, pos in wanted.items()}
        answers = self._get(refs)
        rows: list[ImageRow | None] = [None] * len(faiss_ids)
        for shard, pos in wanted.items():
            for p, row in zip(pos, answers[shard][0]):
                rows[p] = row
        assert all(r is not None for r in rows)  # every id went to the shard that holds it
        return rows, _merge([(wanted[s], answers[s][1]) for s in wanted], len(faiss_ids))

    # --- the rest of a gallery's reads -------------------------------------------------
    def row(self, image_id: str) -> ImageRow | None:
        return next((r for r in self._all("row", image_id) if r is not None), None)

    def referenced_paths(self) -> set[str]:
        return set().union(*self._all("paths"))

    def __len__(self) -> int:
        return sum(i["images"] for i in self._infos)

    def info(self) -> dict[str, Any]:
        """Shard 0's facts, with the counts and sizes summed over the shards."""
        info = dict(self._infos[0])
        for key in ("images", "faiss_vectors", "segments", "patch_store_bytes"):
            if all(key in i for i in self._infos):
                info[key] = sum(i[key] for i in self._infos)
        info["bytes_per_image"] = info.get("patch_store_bytes", 0) / info["images"] if info.get("images") else 0.0
        info["shards"] = len(self.shards)
        return info

    def close(self) -> None:
        for s in self.shards:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(s.actor)


def _merge(parts: list[tuple[list[int], StoredFeatures]], n: int) -> StoredFeatures:
    """One :class:`StoredFeatures` from each shard's, each part's rows going to its positions."""
    def merged(pick) -> np.ndarray:
        first = np.asarray(pick(parts[0][1]))
        out = np.empty((n, *first.shape[1:]), first.dtype)
        for positions, gathered in parts:
            out[positions] = pick(gathered)
        return out

    kinds = list(parts[0][1].patch_weights)
    return StoredFeatures(merged(lambda f: f.global_features), merged(lambda f: f.patch_features),
                          {kind: merged(lambda f, kind=kind: f.weights(kind)) for kind in kinds})


def _common_calibration(calibrations: list[Calibration | None]) -> Calibration | None:
    first = calibrations[0]
    key = None if first is None else first.setting()
    if any((c.setting() if c is not None else None) != key for c in calibrations):
        raise IndexMismatchError("the shards have different calibrations: calibrate the sharded index as a whole")
    return first


def open_sharded(folders: Sequence[Path], device: torch.device, weights: str | None = None,
                 runtime: str | None = None, **options: Any) -> Searcher:
    """Start one actor per shard on the connected cluster and a searcher over them (the query is
    embedded here, with the backbone that built the shards, running with ``runtime``: default the
    shards')."""
    index = ShardedIndex(folders, **options)
    try:
        return Searcher(index, backbone_for(index.manifest, device, weights, runtime), device)
    except BaseException:
        index.close()
        raise
