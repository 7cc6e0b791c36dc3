"""SQLite metadata: one row per indexed image, and the index state (the commit point).

Everything the index directory holds is made visible by one SQLite transaction that
inserts or deletes rows *and* records which FAISS file and which patch segments are
current. Files are written (atomically) before that transaction and are ignored until it
commits, so a crash at any moment leaves the last committed state intact.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .filters import Filter

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    row INTEGER PRIMARY KEY,            -- the FAISS id
    id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    label TEXT,
    content_hash TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    added_at TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    segment INTEGER NOT NULL,           -- patch-store segment
    offset INTEGER NOT NULL             -- row inside the segment
);
CREATE INDEX IF NOT EXISTS images_hash ON images(content_hash);
CREATE INDEX IF NOT EXISTS images_segment ON images(segment);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class ImageRow:
    """Metadata of one indexed image."""

    id: str
    path: str
    label: str | None
    content_hash: str
    width: int
    height: int
    bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    segment: int = -1
    offset: int = -1
    row: int | None = None
    added_at: str = ""

    @classmethod
    def from_record(cls, r: tuple) -> "ImageRow":
        """A row of ``SELECT * FROM images``."""
        row, id_, path, label, h, w, hgt, nbytes, added, meta, seg, off = r
        return cls(id_, path, label, h, w, hgt, nbytes, json.loads(meta), seg, off, row, added)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class MetadataDB:
    """Thin wrapper over the index's SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # --- state -----------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM state")}

    # --- reads -----------------------------------------------------------------
    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT id FROM images")}

    def hashes(self) -> dict[str, str]:
        """content hash -> id of the first image with it."""
        out: dict[str, str] = {}
        for h, i in self.conn.execute("SELECT content_hash, id FROM images ORDER BY row"):
            out.setdefault(h, i)
        return out

    def max_row(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(row), -1) FROM images").fetchone()[0])

    def rows_by_faiss_id(self, rows: Sequence[int]) -> dict[int, ImageRow]:
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        cur = self.conn.execute(f"SELECT * FROM images WHERE row IN ({marks})", [int(r) for r in rows])
        return {r.row: r for r in map(ImageRow.from_record, cur)}

    def rows_by_id(self, ids: Sequence[str]) -> dict[str, ImageRow]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        cur = self.conn.execute(f"SELECT * FROM images WHERE id IN ({marks})", list(ids))
        return {r.id: r for r in map(ImageRow.from_record, cur)}

    def rows_where(self, where: "Filter") -> np.ndarray:
        """The FAISS ids of the images that ``where`` allows, in id order."""
        clause, params = where.sql()
        found = self.conn.execute(f"SELECT row FROM images WHERE {clause} ORDER BY row", params).fetchall()
        return np.array([r for (r,) in found], np.int64)

    def all_rows(self) -> list[ImageRow]:
        return [ImageRow.from_record(r) for r in self.conn.execute("SELECT * FROM images ORDER BY row")]

    def live_locations(self) -> list[tuple[int, int, int]]:
        """(faiss row, segment, offset) of every image, in row order."""
        return list(self.conn.execute("SELECT row, segment, offset FROM images ORDER BY row"))

    def segment_counts(self) -> dict[int, int]:
        """segment -> number of images stored in it (segments without images are absent)."""
        return dict(self.conn.execute("SELECT segment, COUNT(*) FROM images GROUP BY segment"))

    def locations_in(self, segments: Sequence[int]) -> list[tuple[int, int, int]]:
        """(faiss row, segment, offset) of the images stored in ``segments``, in row order."""
        if not segments:
            return []
        marks = ",".join("?" * len(segments))
        return list(self.conn.execute(
            f"SELECT row, segment, offset FROM images WHERE segment IN ({marks}) ORDER BY row",
            [int(s) for s in segments],
        ))

    # --- the commit -----------------------------------------------------------
    def commit(
        self,
        *,
        insert: Iterable[ImageRow] = (),
        delete_ids: Iterable[str] = (),
        relocate: Iterable[tuple[int, int, int]] = (),
        state: dict[str, Any],
    ) -> None:
        """Insert / delete rows, move rows to new ``(row, segment, offset)`` locations (compaction)
        and replace the state, all in one transaction."""
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany(
                "INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (r.row, r.id, r.path, r.label, r.content_hash, r.width, r.height, r.bytes,
                     r.added_at or now_iso(), json.dumps(r.metadata, sort_keys=True), r.segment, r.offset)
                    for r in insert
                ],
            )
            cur.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in delete_ids])
            cur.executemany(
                "UPDATE images SET segment = ?, \"offset\" = ? WHERE row = ?",
                [(int(seg), int(off), int(row)) for row, seg, off in relocate],
            )
            cur.executemany(
                "INSERT OR REPLACE INTO state VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in state.items()],
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
