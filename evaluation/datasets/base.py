"""What a loader returns: a class-level set or a place-recognition set, and its errors."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.sources import ImageRecord


class DatasetError(ValueError):
    """A root that is not the dataset's official layout; the message names what is wrong."""


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file; otherwise a :class:`DatasetError` naming it."""
    if not path.is_file():
        raise DatasetError(f"{what}: missing file {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: missing folder {path}")
    return path


def require_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "dataset root does not exist", str(path))
    if not path.is_dir():
        raise DatasetError(f"dataset root is not a folder: {path}")
    return path


@dataclass
class ClassSet:
    """A class-level (deep metric learning) test split: leave-one-out over ``records``.

    ``labels[i]`` is the integer class of ``records[i]`` (``records[i].label`` holds it as text).
    """

    name: str
    root: str
    records: list[ImageRecord]
    labels: np.ndarray  # (N,) int64
    protocol: str = field(default="class", init=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.records) != len(self.labels):
            raise ValueError("one label per record")
        if not self.records:
            raise DatasetError(f"{self.name} at {self.root}: no images in the test split")

    @property
    def num_classes(self) -> int:
        return int(len(np.unique(self.labels)))

    def subset(self, limit: int) -> ClassSet:
        """The first ``limit`` images (classes are contiguous in every loader's order)."""
        return ClassSet(self.name, self.root, self.records[:limit], self.labels[:limit])

    def summary(self) -> dict:
        return {"images": len(self.records), "classes": self.num_classes}


@dataclass
class PlaceSet:
    """A place-recognition split: queries search the database of their own group (city).

    ``positives[q]`` holds the database positions that count as correct for query ``q``.
    """

    name: str
    root: str
    queries: list[ImageRecord]
    database: list[ImageRecord]
    positives: list[np.ndarray]
    query_groups: np.ndarray  # (Q,) group index per query
    database_groups: np.ndarray  # (M,) group index per database image
    group_names: list[str]
    protocol: str = field(default="place", init=False)

    def __post_init__(self) -> None:
        self.query_groups = np.asarray(self.query_groups, dtype=np.int64)
        self.database_groups = np.asarray(self.database_groups, dtype=np.int64)
        self.positives = [np.asarray(p, dtype=np.int64) for p in self.positives]
        if len(self.queries) != len(self.positives) or len(self.queries) != len(self.query_groups):
            raise ValueError("one positive set and one group per query")
        if len(self.database) != len(self.database_groups):
            raise ValueError("one group per database image")
        if not self.queries or not self.database:
            raise DatasetError(f"{self.name} at {self.root}: no queries or no database images")
        for q, pos in enumerate(self.positives):
            if len(pos) and np.any(self.database_groups[pos] != self.query_groups[q]):
                raise ValueError(f"query {self.queries[q].id}: a positive lies outside its group")

    def subset(self, limit: int) -> PlaceSet:
        """The first ``limit`` queries and the first ``limit`` database images (positives outside
        the kept database are dropped)."""
        keep_db = min(limit, len(self.database))
        positives = [p[p < keep_db] for p in self.positives[:limit]]
        return PlaceSet(self.name, self.root, self.queries[:limit], self.database[:keep_db], positives,
                        self.query_groups[:limit], self.database_groups[:keep_db], self.group_names)

    def summary(self) -> dict:
        return {
            "queries": len(self.queries),
            "database": len(self.database),
            "groups": list(self.group_names),
            "queries_with_positives": int(sum(len(p) > 0 for p in self.positives)),
        }


EvalSet = ClassSet | PlaceSet
