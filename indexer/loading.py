"""Robust image decoding for galleries that contain bad files.

Every failure is an :class:`ImageLoadError` with a short ``reason`` code, so a
gallery build can skip and report bad files instead of aborting:

``missing``             the path does not exist
``unreadable``          not a regular file, or the OS refused to read it
``empty``               zero bytes
``too_large_file``      more than ``LoadLimits.max_file_bytes`` bytes
``decompression_bomb``  more than ``LoadLimits.max_pixels`` pixels (or over PIL's own limit)
``bad_aspect_ratio``    long side / short side over ``LoadLimits.max_aspect_ratio``: resizing the
                        short side to the model's input would blow a tiny file up to gigabytes
``unsupported``         not an image format PIL knows, or a pixel mode that cannot become RGB
``truncated``           the image data stops early
``corrupt``             any other decode error

Images are fully decoded (``load()``, not only ``verify()``), reduced to their
first frame, turned upright by their EXIF orientation and converted to 8-bit
RGB. PIL's global settings (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``) are read, never changed.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Reason = Literal[
    "missing",
    "unreadable",
    "empty",
    "too_large_file",
    "decompression_bomb",
    "bad_aspect_ratio",
    "unsupported",
    "truncated",
    "corrupt",
    "invalid_text",  # an id, path or label that is not valid Unicode (e.g. a file name with a non-UTF-8 byte)
]

# Signatures of the gallery formats: a file that starts like one of these but that
# PIL cannot identify is a broken image ("corrupt"), not an unknown format.
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG",
    b"GIF8",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}

#: The formats read, and the only Pillow plugins ever asked to open a file (JPEG's opens camera MPOs). Any
#: other (ICO, PPM, TGA, JPEG 2000, AVIF, EPS, whose plugin runs Ghostscript...) is refused from its
#: header, never parsed.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` of ``data`` restricted to :data:`FORMATS` (lazy: only the header is read).
    UnidentifiedImageError for anything else."""
    Image.init()  # every plugin registered (WebP and TIFF are not among the preloaded ones)
    return Image.open(io.BytesIO(data), formats=FORMATS)


def other_format(data: bytes) -> str | None:
    """The format a Pillow plugin outside :data:`FORMATS` would claim ``data`` is, from its first bytes
    alone (the plugins' header checks; nothing is parsed), or None."""
    Image.init()
    prefix = data[:64]
    for name in Image.ID:
        if name in FORMATS:
            continue
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's header check that cannot read this prefix
            continue
    return None


class ImageLoadError(ValueError):
    """An image that could not be loaded: ``path``, a ``reason`` code and a message."""

    def __init__(self, path: str, reason: Reason, message: str) -> None:
        super().__init__(path, reason, message)  # all three in args: the error pickles
        self.path = path
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class LoadLimits:
    """Limits on what :func:`load_image` accepts.

    ``max_pixels`` defaults to PIL's own ``Image.MAX_IMAGE_PIXELS`` default
    (89,478,485: about 0.25 GiB of RGBA, 1024 * 1024 * 1024 // 4 // 3), but is
    checked here, per call. PIL's global limit still applies on top of it: PIL
    refuses images over twice its limit when opening them (reported as
    ``decompression_bomb`` too), so a larger ``max_pixels`` has no effect past that.

    ``max_aspect_ratio`` bounds long side / short side (inclusive): a 40000 x 1 PNG is 118
    bytes and 40,000 pixels, but scaled to a 256-pixel short side it is 10 million x 256.
    Both limits are checked from the header, before any pixel is decoded. An image
    with a side of 0 pixels is refused too (``corrupt``; PIL itself refuses most of them).
    """

    max_pixels: int = 89_478_485
    max_file_bytes: int = 64 * 2**20
    max_aspect_ratio: float = 20.0


def content_hash(data: bytes) -> str:
    """SHA-256 of the file bytes, as hex."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str | os.PathLike, limits: LoadLimits = LoadLimits()) -> bytes:
    """The bytes of the file at ``path``, checked against ``limits.max_file_bytes``.

    The size is checked before anything is read, and the read stops one byte past
    the limit, so a huge (or growing) file is never read into memory.
    """
    name = os.fsdecode(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # directories, FIFOs (opening one blocks), devices
            raise ImageLoadError(name, "unreadable", "not a regular file")
        _check_size(name, st.st_size, limits)
        with open(path, "rb") as f:
            data = f.read(limits.max_file_bytes + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageLoadError(name, "missing", "no such file") from None
    except OSError as e:
        raise ImageLoadError(name, "unreadable", f"cannot read the file ({e.strerror or e})") from e
    _check_size(name, len(data), limits)  # the file may have changed since stat
    return data


def load_image(
    source: str | os.PathLike | bytes | BinaryIO, limits: LoadLimits = LoadLimits()
) -> Image.Image:
    """Decode ``source`` (a path, the file's bytes or a binary stream) to an 8-bit RGB image.

    The result is fully loaded and holds no file open. A stream is read from its
    current position (at most ``limits.max_file_bytes + 1`` bytes) and not closed.
    Raises :class:`ImageLoadError`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = "<bytes>", bytes(source)
        _check_size(name, len(data), limits)
    elif isinstance(source, (str, os.PathLike)):
        name, data = os.fsdecode(source), read_bytes(source, limits)
    else:
        name = str(getattr(source, "name", "<stream>"))
        data = source.read(limits.max_file_bytes + 1)
        _check_size(name, len(data), limits)
    return _decode(data, name, limits)


def load_image_and_hash(
    path: str | os.PathLike, limits: LoadLimits = LoadLimits()
) -> tuple[Image.Image, str]:
    """:func:`load_image` and :func:`content_hash` of the same bytes, read once."""
    data = read_bytes(path, limits)
    return _decode(data, os.fsdecode(path), limits), content_hash(data)


def _check_size(name: str, size: int, limits: LoadLimits) -> None:
    if size > limits.max_file_bytes:
        raise ImageLoadError(
            name, "too_large_file", f"file is over the limit of {limits.max_file_bytes} bytes"
        )
    if size == 0:
        raise ImageLoadError(name, "empty", "file is empty")


def check_dimensions(name: str, width: int, height: int, limits: LoadLimits) -> None:
    """Refuse a ``width`` x ``height`` image (from its header) over ``limits``' pixels or aspect ratio.

    For decoders that read the header themselves; :func:`load_image` calls it before decoding.
    """
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            name, "decompression_bomb", f"{width}x{height} is over the limit of {limits.max_pixels} pixels"
        )
    if width * height == 0:
        raise ImageLoadError(name, "corrupt", f"image has no pixels ({width}x{height})")
    long_side, short_side = max(width, height), min(width, height)
    if long_side > limits.max_aspect_ratio * short_side:
        raise ImageLoadError(
            name,
            "bad_aspect_ratio",
            f"{width}x{height} has an aspect ratio of {_ratio_text(long_side, short_side, limits.max_aspect_ratio)}:1, "
            f"over the limit of {limits.max_aspect_ratio:g}:1 (long side / short side)",
        )


def _ratio_text(long_side: int, short_side: int, limit: float) -> str:
    """``long_side / short_side`` with as many decimals as it takes to read as over ``limit``
    (2001 x 100 is 20.01:1, not 20.0:1)."""
    ratio = long_side / short_side
    for decimals in range(1, 7):
        text = f"{ratio:.{decimals}f}"
        if float(text) > limit:
            return text
    return f"{ratio:.7g}"


def _decode(data: bytes, name: str, limits: LoadLimits) -> Image.Image:
    try:
        with open_image(data) as img:
            check_dimensions(name, *img.size, limits)  # before load(): only the header is read
            img.seek(0)  # first frame of an animation
            img.load()
            mode = img.mode
            upright = _exif_transpose(img)
        try:
            return _to_rgb(upright)
        except ValueError as e:
            raise ImageLoadError(name, "unsupported", f"cannot convert mode {mode} to RGB") from e
    except ImageLoadError:
        raise
    # The warning only arrives as an exception where a warnings filter makes it one.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, "decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageLoadError(name, "corrupt", "image header is invalid") from e
        other = other_format(data)
        if other is not None:
            raise ImageLoadError(name, "unsupported", f"{other} images are not read: send {FORMAT_NAMES}") from e
        raise ImageLoadError(name, "unsupported", "not an image format PIL can read") from e
    except (OSError, EOFError) as e:
        text = str(e).lower()
        if isinstance(e, EOFError) or "truncated" in text or "broken data stream" in text:
            raise ImageLoadError(name, "truncated", f"image data is truncated ({e})") from e
        raise ImageLoadError(name, "corrupt", f"cannot decode the image ({e})") from e
    except Exception as e:  # PIL plugins also raise SyntaxError, ValueError, struct.error...
        raise ImageLoadError(name, "corrupt", f"cannot decode the image ({type(e).__name__}: {e})") from e


def _exif_transpose(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation, as a new image.

    Unreadable EXIF leaves the image as it is: broken metadata does not make the
    pixels unusable.
    """
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF blocks raise all sorts of errors
        upright = None
    return upright if upright is not None and upright is not img else img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels are composited onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        img = _to_8bit_grey(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """Mode ``L`` from 16-bit, 32-bit integer and float greyscale.

    ``I;16*`` is scaled by 255 / 65535, ``I`` too when its values fit in 16 bits
    (older Pillow opens 16-bit PNGs as ``I``), and ``F`` by 255 when its values lie
    in [0, 1]; anything else is stretched from its min..max to 0..255.
    """
    a = np.asarray(img).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        a = a * (255 / 65535)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    else:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
