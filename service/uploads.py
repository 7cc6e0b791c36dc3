"""Uploaded images: bounded reading, decoding, and the HTTP status of each way it can fail."""

from __future__ import annotations

import io

from fastapi import HTTPException, UploadFile
from PIL import Image

from indexer.loading import ImageLoadError, LoadLimits, load_image

_CHUNK = 1 << 16

# Formats we recognise but do not decode: answered 415 (an unsupported type), unlike text or
# random bytes, which are 400 (not an image).
_KNOWN_UNSUPPORTED = {
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xml": "XML/SVG",
}
_READABLE_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is over the limit of {limit} bytes")


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, refusing (413) as soon as more than ``limit`` have been read."""
    chunks, size = [], 0
    while chunk := await upload.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _unsupported_kind(data: bytes, declared: str | None) -> str | None:
    head = data[:256].lstrip()
    for magic, name in _KNOWN_UNSUPPORTED.items():
        if head.startswith(magic):
            return name
    if data[4:8] == b"ftyp":  # ISO media: HEIC / AVIF
        return "HEIC/AVIF"
    if declared and declared.startswith("image/") and declared not in _READABLE_TYPES:
        return declared  # e.g. image/heic: an image, of a type we do not read
    return None


def decode_upload(data: bytes, declared_type: str | None, limits: LoadLimits) -> Image.Image:
    """Decode to RGB, mapping failures: 413 too big, 415 unsupported type, 400 not an image / corrupt."""
    try:
        return load_image(data, limits)
    except ImageLoadError as err:
        if err.reason in ("too_large_file", "decompression_bomb"):
            raise HTTPException(413, f"image too large: {err.message}") from None
        if err.reason == "unsupported":
            kind = _unsupported_kind(data, declared_type)
            if err.message.startswith("cannot convert mode"):
                raise HTTPException(415, f"unsupported image: {err.message}") from None
            if kind is not None:
                raise HTTPException(
                    415, f"unsupported image type ({kind}): send JPEG, PNG, WebP, GIF, BMP or TIFF"
                ) from None
            raise HTTPException(400, "not an image: the upload is no image format this service reads") from None
        raise HTTPException(400, f"bad image ({err.reason}): {err.message}") from None


def file_suffix(data: bytes) -> str:
    """The file name suffix of the (already decoded) image's format."""
    with Image.open(io.BytesIO(data)) as img:
        return _SUFFIX.get(img.format or "", ".img")
