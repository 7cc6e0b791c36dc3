"""Read-only lookups of indexed images by id, on a SQLite connection of their own.

A writer may be inside a transaction at any moment; this reader (SQLite WAL) only ever sees
committed rows and never waits for the writer, so a server can answer image requests while
the index is being searched or changed.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from .metadata import ImageRow

DB_NAME = "meta.sqlite"  # the index directory's metadata database (indexer.index_dir opens it read-write)


class Catalog:
    """``row(id)``: the committed metadata of one image, or None; ``referenced_paths()``."""

    def __init__(self, index_dir: Path) -> None:
        uri = (Path(index_dir) / DB_NAME).resolve().as_uri() + "?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def row(self, image_id: str) -> ImageRow | None:
        with self._lock:
            found = self._conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if found is None else ImageRow.from_record(found)

    def referenced_paths(self) -> set[str]:
        """The file paths of every committed image."""
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT path FROM images")}

    def close(self) -> None:
        with self._lock:
            self._conn.close()
