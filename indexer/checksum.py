"""Content digests of index files: computed while writing, recorded by the commit, checked by verify."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def new_hash() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


class HashingWriter:
    """A binary file wrapper that hashes everything written through it (for ``np.save``)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.hash = new_hash()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        return self.fh.write(view)

    def flush(self) -> None:
        self.fh.flush()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def file_digest(path: Path) -> str:
    """The digest of a whole file (the same as :class:`HashingWriter` computes while writing it)."""
    h = new_hash()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
