"""The layout of a sharded index: ``DIR/shards.json`` and one ordinary index directory per shard.

An image goes to shard ``int(sha256(id)[:8]) mod N``: the same image always lands in the same
shard, so an interrupted build resumes shard by shard. Every shard is an ordinary index
(``vit-rerank index info|verify|search`` work on it); ``shards.json`` only names them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import write_json

LAYOUT_NAME = "shards.json"
ASSIGNMENT = "sha256(id) mod shards"


class ShardUnavailableError(RuntimeError):
    """A shard failed or timed out; ``shard`` is its index and ``folder`` its directory."""

    def __init__(self, shard: int, folder: str, reason: str) -> None:
        super().__init__(f"shard {shard} ({folder}) is unavailable: {reason}; no partial result is returned")
        self.shard, self.folder, self.reason = shard, folder, reason


def shard_of(image_id: str, shards: int) -> int:
    """The shard of ``image_id`` among ``shards`` (stable across runs, machines and Python versions)."""
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") % shards


@dataclass
class ShardLayout:
    """How many shards a sharded index has, and their folder names (relative to its directory)."""

    shards: int
    names: list[str]
    assignment: str = ASSIGNMENT

    @classmethod
    def new(cls, shards: int) -> ShardLayout:
        if shards < 1:
            raise ValueError("--shards must be at least 1")
        return cls(shards, [f"shard-{k:05d}-of-{shards:05d}" for k in range(shards)])

    def folders(self, root: Path) -> list[Path]:
        return [Path(root) / name for name in self.names]

    def save(self, root: Path) -> None:
        write_json(Path(root) / LAYOUT_NAME, asdict(self))

    @classmethod
    def load(cls, root: Path) -> ShardLayout:
        data = json.loads((Path(root) / LAYOUT_NAME).read_text())
        if data.get("assignment") != ASSIGNMENT:
            raise ValueError(f"{root}: unknown shard assignment {data.get('assignment')!r}")
        return cls(int(data["shards"]), list(data["names"]), data["assignment"])

    @staticmethod
    def exists(root: Path) -> bool:
        return (Path(root) / LAYOUT_NAME).is_file()


def shard_folders(paths: list[Path]) -> list[Path]:
    """Index directories to serve: a sharded index's directory stands for its shards."""
    out: list[Path] = []
    for p in paths:
        out += ShardLayout.load(p).folders(p) if ShardLayout.exists(p) else [Path(p)]
    return out
