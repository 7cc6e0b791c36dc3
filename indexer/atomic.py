"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

TMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (making a rename in it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path`` and make the rename durable."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_with(path: Path, writer: Callable[[str], None]) -> None:
    """Atomically write ``path`` with ``writer(temporary_name)`` (also for libraries, e.g. FAISS,
    that only write by name). On an exception the temporary is removed and ``path`` untouched;
    after a crash only a ``*.tmp`` file can be left, which readers never look at."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        writer(str(tmp))
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary beside ``path`` for writing; on success it replaces ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            yield fh
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as fh:
        np.save(fh, array, allow_pickle=False)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete ``*.tmp`` files left by a crash; returns what was removed."""
    removed = []
    for tmp in Path(folder).rglob(f"*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed
