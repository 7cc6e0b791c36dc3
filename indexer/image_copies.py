"""Copies of the gallery's images kept inside the index, so that an index shows its images on its own.

An index built from a folder used to point at that folder: once it moved, search still worked but every
thumbnail, served image and explanation picture was gone. A build now keeps, per distinct image content,
``DIR/images/<content hash>.jpg``: the image reduced to at most ``side`` px on its longer side (JPEG,
quality 85; the default 1024 px is the largest panel an explanation picture draws), or with ``original``
the file's own bytes (``DIR/images/<content hash><suffix>``). Copies are written before the commit that
adds their rows; a copy no committed row refers to is removed by the next open (and at once when its last
image is removed), so a crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable

from PIL import Image

from .atomic import write_bytes

FOLDER = "images"
DEFAULT_SIDE = 1024
ORIGINAL = "original"
JPEG_QUALITY = 85


def parse(value: str | int | None) -> int | str | None:
    """A ``--image-copies`` value: a side in px, ``original``, or None/0/``none`` for no copies."""
    if value is None or value in ("none", "0", 0):
        return None
    if value == ORIGINAL:
        return ORIGINAL
    try:
        side = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--image-copies takes a side in px, 'original' or 'none', not {value!r}") from None
    if side < 64:
        raise ValueError(f"image copies need a side of at least 64 px (or 'original' / 'none'), not {value!r}")
    return side


_AS_IS = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png"}  # formats every browser shows, kept as they are


def copy_of(data: bytes, image: Image.Image, mode: int | str, suffix: str,
            size: tuple[int, int] | None = None) -> tuple[bytes, str]:
    """The bytes and file suffix of the copy of one image: ``data`` itself (``original``, or a JPEG or PNG
    whose original ``size`` is within ``mode`` px already: smaller and exact), else ``image`` (the decoded
    RGB image) reduced to ``mode`` px, as JPEG."""
    if mode == ORIGINAL:
        return data, suffix.lower() or ".img"
    if max(size or image.size) <= int(mode):
        for magic, as_is in _AS_IS.items():
            if data.startswith(magic):
                return data, as_is
    small = image.copy()
    small.thumbnail((int(mode), int(mode)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), ".jpg"


def folder_of(index_folder: Path) -> Path:
    return Path(index_folder) / FOLDER


def find(index_folder: Path, content_hash: str) -> Path | None:
    """The copy of the image with ``content_hash``, or None."""
    folder = folder_of(index_folder)
    for suffix in (".jpg", ".png"):
        path = folder / f"{content_hash}{suffix}"
        if path.is_file():
            return path
    return next(iter(sorted(folder.glob(f"{content_hash}.*"))), None) if folder.is_dir() else None


def write(index_folder: Path, copies: dict[str, tuple[bytes, str]]) -> None:
    """Write ``{content hash: (bytes, suffix)}`` atomically, skipping the ones already there."""
    folder = folder_of(index_folder)
    folder.mkdir(exist_ok=True)
    for digest, (data, suffix) in copies.items():
        path = folder / f"{digest}{suffix}"
        if not path.exists():
            write_bytes(path, data)


def remove_unreferenced(index_folder: Path, live_hashes: Iterable[str]) -> int:
    """Delete the copies whose content hash no committed image has; returns how many."""
    folder = folder_of(index_folder)
    if not folder.is_dir():
        return 0
    live = set(live_hashes)
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and path.name.split(".", 1)[0] not in live:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def bytes_on_disk(index_folder: Path) -> int:
    folder = folder_of(index_folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
