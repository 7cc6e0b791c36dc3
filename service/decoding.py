"""Bounded decoding: every image the service decodes (queries, adds, served copies and thumbnails of
indexed images) goes through :func:`decode_sized`, once per request.

Uploads are decoded in the thread pool, so without a bound every concurrent request decodes its image
at once: eight 40 Mpx JPEGs took the server to 6.8 GB. Here a :class:`DecodeGate` admits at most
``max_decodes`` decodes at a time, over at most ``max_bytes`` bytes of decoded images together (the size
and mode are read from the header, before decoding, and costed with the copies the decode makes: a
16-bit RGBA PNG costs far more than an RGB JPEG of the same pixels); a request that cannot get in within
``wait_s`` seconds is answered 503 with Retry-After. A decoded image is reduced at once to what is needed
(JPEGs are decoded at 1/2, 1/4 or 1/8 scale when they are that much larger: the only format that can
shrink while decoding), so no full-size bitmap lives on while the query waits for inference, and memory
freed by a large decode is given back to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from indexer import loading

from .errors import DecodeBusyError

from .uploads import decode_upload

DEFAULT_MAX_DECODES = 2
DEFAULT_DECODE_BYTES = 1 << 30  # decoded bytes together: two 20 Mpx RGB photos, or one 40 Mpx RGBA image
DEFAULT_DECODE_WAIT_S = 2.0
#: A query is kept with its short side at most this many times the model's resize (and at most
#: ``KEEP_FACTOR ** 2`` times as many pixels as a square of that side): enough for the model's own
#: antialiased resize, and for the explanation view, to be the same to the eye.
KEEP_FACTOR = 4
DEFAULT_MODEL_SIDE = 256
#: After decoding an image of at least this many pixels, freed heap memory is returned to the OS.
TRIM_AFTER_PIXELS = 4_000_000


class DecodeGate:
    """At most ``max_decodes`` decodes at once, over at most ``max_bytes`` bytes of decoded images together
    (each costed from its header by :func:`decode_bytes`).

    Waiters are admitted first come, first served, except that a small one (at most ``max_bytes / 16``)
    may go ahead of a larger one that does not fit yet: small queries are not held up behind huge ones
    (which get 503 with Retry-After when the wait runs out). An image larger than the whole budget is
    admitted alone.
    """

    def __init__(self, max_decodes: int = DEFAULT_MAX_DECODES, max_bytes: int = DEFAULT_DECODE_BYTES,
                 wait_s: float = DEFAULT_DECODE_WAIT_S) -> None:
        if max_decodes < 1 or max_bytes < 1 or wait_s < 0:
            raise ValueError("max_decodes and max_bytes must be >= 1, wait_s >= 0")
        self.max_decodes, self.max_bytes, self.wait_s = max_decodes, max_bytes, wait_s
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._active = 0
        self._bytes = 0
        self._seconds_per_decode = 0.5  # running estimate, for Retry-After

    @property
    def active(self) -> int:
        return self._active

    @property
    def bytes(self) -> int:
        """Bytes of the decodes running now (as costed)."""
        return self._bytes

    def retry_after(self) -> int:
        with self._cond:
            return self._retry_after()

    def _retry_after(self) -> int:
        ahead = len(self._waiting) + self._active
        return max(1, math.ceil(ahead * self._seconds_per_decode / self.max_decodes))

    def _fits(self, cost: int) -> bool:
        return self._active < self.max_decodes and (self._active == 0 or self._bytes + cost <= self.max_bytes)

    def _may_start(self, ticket: object, cost: int) -> bool:
        if not self._fits(cost):
            return False
        return self._waiting[0] is ticket or cost <= self.max_bytes // 16

    @contextlib.contextmanager
    def admit(self, cost: int, wait_s: float | None = None) -> Iterator[None]:
        """Hold a place for a decode of ``cost`` bytes; raises :class:`DecodeBusyError` after the wait."""
        cost = max(1, min(int(cost), self.max_bytes))
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while not self._may_start(ticket, cost):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeBusyError(self._retry_after())
                    self._cond.wait(remaining)
                self._active += 1
                self._bytes += cost
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._bytes -= cost
                self._seconds_per_decode = 0.8 * self._seconds_per_decode + 0.2 * (time.monotonic() - start)
                self._cond.notify_all()


#: Bytes a pixel takes while an image of each mode is decoded and made 8-bit RGB, copies included: Pillow
#: keeps 3- and 4-channel images in 4 bytes a pixel; the decode, its upright copy and the RGB result are
#: three such; transparency adds a white RGBA layer and a composite; 16-bit and float greys pass through a
#: float64 array.
_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 10, "RGB": 12, "YCbCr": 12, "CMYK": 12, "LAB": 12, "HSV": 12,
                    "RGBA": 20, "RGBa": 20, "LA": 20, "La": 20, "PA": 20, "I": 24, "F": 24}


def decode_bytes(mode: str, width: int, height: int, transparency: bool = False) -> int:
    """The memory one decode of a ``width`` x ``height`` image of ``mode`` takes (see :data:`_BYTES_PER_PIXEL`;
    16-bit modes ``I;16*`` count as ``I``)."""
    per_pixel = _BYTES_PER_PIXEL.get("I" if mode.startswith("I;") else mode, 20)
    if transparency:
        per_pixel = max(per_pixel, _BYTES_PER_PIXEL["RGBA"])
    return width * height * per_pixel


def model_side(backbone: Any) -> int:
    """The side the backbone resizes an image to before cropping (``Resize(256)`` -> 256)."""
    try:
        resize = backbone.preprocessing["resize"]
        return int(max(resize) if isinstance(resize, (list, tuple)) else resize)
    except Exception:  # noqa: BLE001 - a backbone without the usual preprocessing description
        return DEFAULT_MODEL_SIDE


def kept_size(width: int, height: int, side: int) -> tuple[int, int]:
    """The size a ``width`` x ``height`` query is reduced to (itself when it is small enough)."""
    keep = KEEP_FACTOR * side
    scale = min(1.0, keep / min(width, height), math.sqrt(KEEP_FACTOR**2 * keep * keep / (width * height)))
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink(image: Image.Image, side: int) -> Image.Image:
    """``image`` reduced to :func:`kept_size` (antialiased), or ``image`` itself."""
    size = kept_size(*image.size, side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


_libc: Any = None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); best effort, a no-op elsewhere."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        _libc = False


def _decode_drafted(img: Image.Image) -> Image.Image:
    """Load a JPEG whose ``draft`` is set, upright, as RGB (a new image: ``img`` is closed after)."""
    img.load()
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF: the pixels are still fine
        upright = None
    if upright is None or upright is img:
        upright = img
    return upright.convert("RGB") if upright.mode != "RGB" or upright is img else upright


@dataclass
class Decoded:
    """An image decoded through the gate: reduced (``image``), with the original's ``size`` and ``format``."""

    image: Image.Image
    size: tuple[int, int]
    format: str | None


def decode_bounded(data: bytes, declared_type: str | None, engine: Any) -> Image.Image:
    """Decode a query through ``engine.decode_gate`` and reduce it to what ``engine``'s model needs.

    Errors are those of :func:`service.uploads.decode_upload` (413, 415, 400), and
    :class:`DecodeBusyError` when the gate stays full (503 with Retry-After: :mod:`service.errors`).
    """
    return decode_sized(data, declared_type, engine).image


def decode_sized(data: bytes, declared_type: str | None, engine: Any, side: int | None = None) -> Decoded:
    """:func:`decode_bounded`, with the original's size and format; ``side``: reduce for a model of that
    side instead (a thumbnail, a served copy). Every decode in the service goes through here."""
    return _decode(data, declared_type, engine.limits, engine.decode_gate, side or engine.query_side)


def decode_stored(path: str, engine: Any, side: int) -> Decoded:
    """An indexed image's file, read within the upload limits and decoded like an upload (reduced for ``side``).
    :class:`indexer.loading.ImageLoadError` when it cannot be read."""
    data = loading.read_bytes(path, engine.limits)
    return decode_sized(data, None, engine, side)


def _refused_from_header(width: int, height: int, limits: Any) -> bool:
    """Whether the indexer refuses a ``width`` x ``height`` image from its header alone."""
    try:
        loading.check_dimensions("<upload>", width, height, limits)  # pixels, empty, aspect ratio
    except loading.ImageLoadError:
        return True
    return False


def _decode(data: bytes, declared_type: str | None, limits: Any, gate: DecodeGate, side: int) -> Decoded:
    try:
        img = loading.open_image(data)  # lazy: only the header is read; only the accepted formats
    except Exception:  # noqa: BLE001 - not an image, or refused at the header: decode_upload says why, at once
        img = None
    if img is None:
        with gate.admit(gate.max_bytes):  # size unknown: assume the worst
            image = decode_upload(data, declared_type, limits)
            return Decoded(shrink(image, side), image.size, None)

    with img:
        width, height = img.size
        fmt = img.format
        if _refused_from_header(width, height, limits):
            decode_upload(data, declared_type, limits)  # says why (413 / 400) from the header: nothing decoded
        cost = decode_bytes(img.mode, width, height, "transparency" in img.info)
        target = kept_size(width, height, side)
        drafted = False
        if target != (width, height) and img.format in ("JPEG", "MPO"):
            with contextlib.suppress(Exception):
                drafted = img.draft("RGB", target) is not None  # decode at 1/2, 1/4 or 1/8 scale
        image = None
        if drafted:
            # any trouble: the reference decode below says what it is
            with gate.admit(decode_bytes("RGB", *img.size)), contextlib.suppress(Exception):
                image = shrink(_decode_drafted(img), side)
    if image is None:
        with gate.admit(cost):
            image = shrink(decode_upload(data, declared_type, limits), side)
    if width * height >= TRIM_AFTER_PIXELS:
        release_memory()
    return Decoded(image, (width, height), fmt)
