"""Uploads: bounded reading and decoding of the image, checks of the form fields around it, and the
HTTP status of each way they can fail."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterator

from fastapi import HTTPException, Request, UploadFile
from PIL import Image

from indexer.loading import FORMAT_NAMES, ImageLoadError, LoadLimits, load_image, other_format

from .errors import IMAGE_REFUSALS, BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

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

MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
MAX_LABEL_CHARS = 256


# These two are raised while FastAPI itself reads the body (inside its form parser), which turns any
# exception but an HTTPException into "400 error parsing the body": so they are HTTPExceptions.
class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is over the limit of {limit} bytes")


class BodyStalled(HTTPException):
    """The request body stopped arriving: nothing came for ``seconds``. The connection is closed after."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body stopped arriving (nothing for {seconds:g} s)",
                         headers={"Connection": "close"})


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
    other = other_format(data)
    if other is not None:
        return other
    if declared and declared.startswith("image/") and declared not in _READABLE_TYPES:
        return declared  # e.g. image/heic: an image, of a type we do not read
    return None


def decode_upload(data: bytes, declared_type: str | None, limits: LoadLimits) -> Image.Image:
    """Decode to RGB, mapping failures: 413 too big, 415 unsupported type, 400 not an image / corrupt."""
    try:
        return load_image(data, limits)
    except ImageLoadError as err:
        refusal = IMAGE_REFUSALS.get(err.reason, BadRequest)
        if refusal is PayloadTooLarge:
            raise PayloadTooLarge(f"image too large: {err.message}") from None
        if refusal is Unprocessable:
            raise Unprocessable(f"image aspect ratio too extreme: {err.message}") from None
        if refusal is UnsupportedMediaType:
            kind = _unsupported_kind(data, declared_type)
            if err.message.startswith("cannot convert mode"):
                raise UnsupportedMediaType(f"unsupported image: {err.message}") from None
            if kind is not None:
                raise UnsupportedMediaType(
                    f"unsupported image type ({kind}): send {FORMAT_NAMES}"
                ) from None
            raise BadRequest("not an image: the upload is no image format this service reads") from None
        raise BadRequest(f"bad image ({err.reason}): {err.message}") from None


def file_suffix(image_format: str | None) -> str:
    """The file name suffix of an image format (as Pillow names it)."""
    return _SUFFIX.get(image_format or "", ".img")


# --- the form fields ------------------------------------------------------------------------------
async def single_valued_form(request: Request) -> None:
    """Refuse (422) a form that gives any field more than once (two ``image`` parts, ``top_k`` twice...).

    A dependency: FastAPI has parsed the form before it runs, so this reads the parsed, cached form.
    """
    form = await request.form()
    for name in dict.fromkeys(form.keys()):
        if len(form.getlist(name)) > 1:
            raise Unprocessable(f"{name}: give this form field once, not {len(form.getlist(name))} times")


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON and UTF-8 can carry it): no lone surrogate such as
    ``\\ud800``, which ``json.loads`` and form decoding let through but no response can serialise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


CROP_PATTERN = r"^\s*[0-9.]+\s*,\s*[0-9.]+\s*,\s*[0-9.]+\s*,\s*[0-9.]+\s*$"
MIN_CROP_PX = 16


def parse_crop(text: str | None) -> tuple[float, float, float, float] | None:
    """``x0,y0,x1,y1`` as fractions of the width and height (0 <= x0 < x1 <= 1, the same for y); ValueError."""
    if text is None or text.strip() == "":
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError("crop: four numbers x0,y0,x1,y1 (fractions of the width and height)") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError("crop: 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the width and height)")
    return x0, y0, x1, y1


def crop_to(image: Image.Image, region: tuple[float, float, float, float]) -> Image.Image:
    """The region of ``image`` (at least 16 px a side; 422 for a smaller one)."""
    w, h = image.size
    box = (round(region[0] * w), round(region[1] * h), round(region[2] * w), round(region[3] * h))
    if box[2] - box[0] < MIN_CROP_PX or box[3] - box[1] < MIN_CROP_PX:
        raise Unprocessable(f"crop: the region is under {MIN_CROP_PX} px on a side of this {w}x{h} image")
    return image.crop(box)


def check_label(label: str | None) -> str | None:
    """A new image's label (None for none), or 422: at most ``MAX_LABEL_CHARS`` printable characters."""
    if label is None or label == "":
        return None
    if len(label) > MAX_LABEL_CHARS or not label.isprintable() or not is_unicode(label):
        raise Unprocessable(f"label: 1 to {MAX_LABEL_CHARS} printable characters")
    return label


def check_image_id(image_id: str | None) -> str | None:
    """A client's id for a new image (None: let the service name it), or 422.

    Ids become URL paths (``/images/<id>``, with ``/`` kept as a separator by many clients), so no
    path segment may be empty, ``.`` or ``..``: clients and proxies rewrite those.
    """
    if image_id is None or image_id == "":
        return None
    if (len(image_id) > MAX_ID_CHARS or image_id != image_id.strip() or not image_id.isprintable()
            or not is_unicode(image_id)):
        raise Unprocessable(f"id: 1 to {MAX_ID_CHARS} printable characters, no surrounding spaces")
    if any(segment in ("", ".", "..") for segment in image_id.split("/")):
        raise Unprocessable(
            "id: no empty, '.' or '..' segments between slashes (they change the URL of the image)"
        )
    return image_id


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise _NotFinite(text)
    return value


def _refuse_constant(text: str) -> Any:
    raise _NotFinite(text)  # NaN, Infinity, -Infinity: not JSON, though Python's json reads them


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in ``value`` (``{}`` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_metadata(text: str | None) -> dict[str, Any]:
    """The ``metadata`` form field: a JSON object of at most 64 KiB, nested at most 32 deep, with finite
    numbers only; else 422. Empty or absent: ``{}``."""
    if text is None or text == "":
        return {}
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise Unprocessable(f"metadata: over the limit of {MAX_METADATA_BYTES} bytes of JSON")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise Unprocessable(f"metadata: not valid JSON ({err.msg})") from None
    except _NotFinite as err:
        raise Unprocessable(f"metadata: numbers must be finite, not {err}") from None
    except RecursionError:
        raise Unprocessable(f"metadata: nested too deep (at most {MAX_METADATA_DEPTH} levels)") from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise Unprocessable(f"metadata: integers may have at most {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(value, dict):
        raise Unprocessable("metadata: must be a JSON object")
    if _depth(value) > MAX_METADATA_DEPTH:
        raise Unprocessable(f"metadata: nested too deep (at most {MAX_METADATA_DEPTH} levels)")
    if not all(is_unicode(text) for text in _texts(value)):
        raise Unprocessable("metadata: every key and string must be valid Unicode (no lone surrogates "
                            "such as \\ud800)")
    return value


def _texts(value: Any) -> Iterator[str]:
    """Every key and string in a parsed JSON value, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            yield from item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
