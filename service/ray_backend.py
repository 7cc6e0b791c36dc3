"""The service over shard index directories on a Ray cluster (``vit-rerank serve --ray``).

The engine gets a searcher with the interface of :class:`indexer.search.Searcher` whose global
search fans out to one actor per shard (:mod:`indexer.sharded_search`); the HTTP API is the same.
A shard that fails makes its query answer 503 (:mod:`service.errors`; never a result from the other
shards alone).
Adding or removing images is not supported on a sharded service: 501 (rebuild with
``vit-rerank index build DIR --from SOURCE --ray``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from indexer.build import backbone_for
from indexer.metadata import ImageRow
from indexer.search import Searcher
from indexer.sharded_search import ShardedIndex
from indexer.shards import shard_folders


class ShardCatalog:
    """The engine's catalog (lookups by id) over the shard actors."""

    def __init__(self, index: ShardedIndex) -> None:
        self._index = index

    def row(self, image_id: str) -> ImageRow | None:
        return self._index.row(image_id)

    def referenced_paths(self) -> set[str]:
        return self._index.referenced_paths()

    def close(self) -> None:
        """The shards close with the gallery."""


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``""``: ``RAY_ADDRESS``, else the local ``ray start`` one,
    else a new local instance)."""
    from indexer.distributed_build import connect as join

    join(address or None)


def open_shards(folders: Sequence[Path], address: str, device, weights: str | None, runtime: str | None = None
                ) -> tuple[ShardedIndex, Searcher, ShardCatalog]:
    """The gallery, searcher and catalog of an engine over ``folders`` (a sharded index's directory
    stands for its shards); the query is embedded here with ``runtime`` (default: the shards')."""
    connect(address)
    index = ShardedIndex(shard_folders([Path(f).resolve() for f in folders]))
    try:
        searcher = Searcher(index, backbone_for(index.manifest, device, weights, runtime), device)
    except BaseException:
        index.close()
        raise
    return index, searcher, ShardCatalog(index)
