"""Serving indexed images: the stored file when it is a JPEG or PNG, else a reduced re-encoded copy; and
thumbnails. Every decode goes through the service's decode gate (:mod:`service.decoding`)."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi.responses import Response
from PIL import Image

from indexer.loading import ImageLoadError, open_image, read_bytes
from indexer.metadata import ImageRow

from .decoding import KEEP_FACTOR, decode_stored
from .engine import Engine, stored_thumbnail
from .errors import NotFound, ServiceError, Unavailable
from .state import ServiceState

THUMBNAIL_PX = 256
SERVED_SHORT_SIDE = 2048  # a re-encoded copy (an original that is not JPEG or PNG) keeps at most this short side
STORED_THUMBNAIL_PIXELS = 4_000_000  # an added image this large keeps its thumbnail beside it
_DIRECT = {"JPEG": "image/jpeg", "PNG": "image/png"}
_CACHE = "private, max-age=3600"


def _decoded(engine: Engine, row: ImageRow, short_side: int) -> Image.Image:
    """The image of ``row``, decoded through the gate and reduced to at most about ``short_side``."""
    try:
        return decode_stored(engine.index_dir.image_file(row), engine, max(1, short_side // KEEP_FACTOR)).image
    except Unavailable:
        raise  # the gate is full: 503 with Retry-After
    except (ImageLoadError, ServiceError) as err:
        reason = getattr(err, "reason", None) or getattr(err, "detail", "unreadable")
        raise NotFound(f"the image {row.id!r} is indexed but its file cannot be read ({reason})") from None


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_of(image: Image.Image) -> bytes:
    """The JPEG thumbnail (at most :data:`THUMBNAIL_PX` on its longer side) of a decoded image."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return jpeg(small, 80)


def gallery_image(engine: Engine, row: ImageRow) -> Response:
    """The image file as stored (JPEG/PNG: never decoded), or a reduced copy converted to JPEG."""
    try:
        data = read_bytes(engine.index_dir.image_file(row), engine.limits)
        with open_image(data) as probe:
            media = _DIRECT.get(probe.format or "")
    except Exception:  # unreadable, too large or not JPEG/PNG: decoded (and refused clearly) below
        media = None
    if media is None:
        data, media = jpeg(_decoded(engine, row, SERVED_SHORT_SIDE)), "image/jpeg"
    return Response(data, media_type=media, headers={"Cache-Control": _CACHE})


def thumbnail(state: ServiceState, row: ImageRow) -> Response:
    """A JPEG at most 256 px on its longer side: the one stored at add time, else made once (through the
    decode gate) and cached by content."""
    key = (row.id, row.content_hash)
    with state.thumbnail_lock:
        data = state.thumbnails.get(key)
    if data is None:
        stored = stored_thumbnail(Path(row.path))
        data = stored.read_bytes() if stored.is_file() else thumbnail_of(_decoded(state.engine, row, THUMBNAIL_PX))
        with state.thumbnail_lock:
            state.thumbnails[key] = data
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": _CACHE})
