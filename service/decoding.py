"""Bounded decoding of query images, before they reach the (bounded) inference queue.

Uploads are decoded in the thread pool, so without a bound every concurrent request decodes its image
at once: eight 40 Mpx JPEGs took the server to 6.8 GB. Here a :class:`DecodeGate` admits at most
``max_decodes`` decodes at a time, over at most ``max_pixels`` pixels together (the size is read from
the header, before decoding); a request that cannot get in within ``wait_s`` seconds is answered 503
with Retry-After. A decoded image is reduced at once to what the model needs (JPEGs are decoded at
1/2, 1/4 or 1/8 scale when they are that much larger), so no full-size bitmap lives on while the query
waits for inference, and memory freed by a large decode is given back to the OS.
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
from typing import Any

from PIL import Image, ImageOps

from indexer import loading

from .errors import DecodeBusyError

from .uploads import decode_upload

DEFAULT_MAX_DECODES = 2
DEFAULT_DECODE_PIXELS = 80_000_000
DEFAULT_DECODE_WAIT_S = 2.0
#: A query is kept with its short side at most this many times the model's resize (and at most
#: ``KEEP_FACTOR ** 2`` times as many pixels as a square of that side): enough for the model's own
#: antialiased resize, and for the explanation view, to be the same to the eye.
KEEP_FACTOR = 4
DEFAULT_MODEL_SIDE = 256
#: After decoding an image of at least this many pixels, freed heap memory is returned to the OS.
TRIM_AFTER_PIXELS = 4_000_000


class DecodeGate:
    """At most ``max_decodes`` decodes at once, over at most ``max_pixels`` pixels together.

    Waiters are admitted first come, first served (a large image is not starved by small ones). An
    image larger than the whole budget is admitted alone.
    """

    def __init__(self, max_decodes: int = DEFAULT_MAX_DECODES, max_pixels: int = DEFAULT_DECODE_PIXELS,
                 wait_s: float = DEFAULT_DECODE_WAIT_S) -> None:
        if max_decodes < 1 or max_pixels < 1 or wait_s < 0:
            raise ValueError("max_decodes and max_pixels must be >= 1, wait_s >= 0")
        self.max_decodes, self.max_pixels, self.wait_s = max_decodes, max_pixels, wait_s
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._active = 0
        self._pixels = 0
        self._seconds_per_decode = 0.5  # running estimate, for Retry-After

    @property
    def active(self) -> int:
        return self._active

    @property
    def pixels(self) -> int:
        return self._pixels

    def retry_after(self) -> int:
        with self._cond:
            return self._retry_after()

    def _retry_after(self) -> int:
        ahead = len(self._waiting) + self._active
        return max(1, math.ceil(ahead * self._seconds_per_decode / self.max_decodes))

    def _fits(self, cost: int) -> bool:
        return self._active < self.max_decodes and (self._active == 0 or self._pixels + cost <= self.max_pixels)

    @contextlib.contextmanager
    def admit(self, pixels: int, wait_s: float | None = None) -> Iterator[None]:
        """Hold a place for decoding ``pixels`` pixels; raises :class:`DecodeBusyError` after the wait."""
        cost = max(1, min(int(pixels), self.max_pixels))
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] is ticket and self._fits(cost)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeBusyError(self._retry_after())
                    self._cond.wait(remaining)
                self._active += 1
                self._pixels += cost
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._pixels -= cost
                self._seconds_per_decode = 0.8 * self._seconds_per_decode + 0.2 * (time.monotonic() - start)
                self._cond.notify_all()


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


def decode_bounded(data: bytes, declared_type: str | None, engine: Any) -> Image.Image:
    """Decode a query through ``engine.decode_gate`` and reduce it to what ``engine``'s model needs.

    Errors are those of :func:`service.uploads.decode_upload` (413, 415, 400), and
    :class:`DecodeBusyError` when the gate stays full (503 with Retry-After: :mod:`service.errors`).
    """
    return _decode(data, declared_type, engine.limits, engine.decode_gate, engine.query_side)


def _refused_from_header(width: int, height: int, limits: Any) -> bool:
    """Whether the indexer refuses a ``width`` x ``height`` image from its header alone."""
    try:
        loading.check_dimensions("<upload>", width, height, limits)  # pixels, empty, aspect ratio
    except loading.ImageLoadError:
        return True
    return False


def _decode(data: bytes, declared_type: str | None, limits: Any, gate: DecodeGate, side: int) -> Image.Image:
    try:
        img = loading.open_image(data)  # lazy: only the header is read; only the accepted formats
    except Exception:  # noqa: BLE001 - not an image, or refused at the header: decode_upload says why, at once
        img = None
    if img is None:
        with gate.admit(gate.max_pixels):  # size unknown: assume the worst
            return shrink(decode_upload(data, declared_type, limits), side)

    with img:
        width, height = img.size
        pixels = width * height
        if _refused_from_header(width, height, limits):
            decode_upload(data, declared_type, limits)  # says why (413 / 400) from the header: nothing decoded
        target = kept_size(width, height, side)
        drafted = False
        if target != (width, height) and img.format in ("JPEG", "MPO"):
            with contextlib.suppress(Exception):
                drafted = img.draft("RGB", target) is not None  # decode at 1/2, 1/4 or 1/8 scale
        image = None
        if drafted:
            # any trouble: the reference decode below says what it is
            with gate.admit(img.size[0] * img.size[1]), contextlib.suppress(Exception):
                image = shrink(_decode_drafted(img), side)
    if image is None:
        with gate.admit(pixels):
            image = shrink(decode_upload(data, declared_type, limits), side)
    if pixels >= TRIM_AFTER_PIXELS:
        release_memory()
    return image
