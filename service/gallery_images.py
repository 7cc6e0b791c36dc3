"""Serving indexed images: the stored file when it is a JPEG or PNG, else a re-encoded copy."""

from __future__ import annotations

import io

from fastapi.responses import Response
from PIL import Image

from indexer.loading import ImageLoadError, load_image, open_image
from indexer.metadata import ImageRow

from .errors import NotFound
from .state import ServiceState

THUMBNAIL_PX = 256
_DIRECT = {"JPEG": "image/jpeg", "PNG": "image/png"}
_CACHE = "private, max-age=3600"


def _load(row: ImageRow) -> Image.Image:
    try:
        return load_image(row.path)
    except ImageLoadError as err:
        raise NotFound(f"the image {row.id!r} is indexed but its file cannot be read ({err.reason})") from None


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def gallery_image(row: ImageRow) -> Response:
    """The image file as stored (JPEG/PNG), or converted to JPEG."""
    try:
        with open(row.path, "rb") as fh:
            data = fh.read()
        with open_image(data) as probe:
            media = _DIRECT.get(probe.format or "")
    except Exception:  # unreadable or not JPEG/PNG: decoded (and refused clearly) below
        media = None
    if media is None:
        data, media = _jpeg(_load(row)), "image/jpeg"
    return Response(data, media_type=media, headers={"Cache-Control": _CACHE})


def thumbnail(state: ServiceState, row: ImageRow) -> Response:
    """A JPEG at most 256 px on its longer side, cached by content."""
    key = (row.id, row.content_hash)
    with state.thumbnail_lock:
        data = state.thumbnails.get(key)
    if data is None:
        image = _load(row)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        data = _jpeg(image, 80)
        with state.thumbnail_lock:
            state.thumbnails[key] = data
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": _CACHE})
