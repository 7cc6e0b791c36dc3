"""Every way a request can fail, and the one place that turns each into an HTTP answer.

Routes, the engine, the decoder and the explanations raise :class:`ServiceError` subclasses (named by
what went wrong, carrying their status); the lower layers raise their own exceptions, which the table
:data:`DOMAIN_ERRORS` maps to service errors (and :data:`IMAGE_REFUSALS` maps an image's refusal
reason to a status). :func:`error_response` turns any of them into the ``{"detail": ...}`` JSON
answer: the exception handlers, the middlewares and ``/readyz`` all answer through it.
``HTTPException`` is raised only where FastAPI's body parser demands it
(``service.uploads.BodyTooLarge`` / ``BodyStalled``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.shards import ShardUnavailableError

log = logging.getLogger("vit_rerank.service")


SHOWN_CHARS = 80  # a client's value echoed in a message is cut to this many characters


def shown(value: str) -> str:
    """``repr(value)`` for a message, cut to :data:`SHOWN_CHARS` characters (an error never echoes a
    100 KB id back)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(value)} characters)"


class ServiceError(Exception):
    """A failed request: ``status`` is its HTTP status, ``detail`` the message the client reads."""

    status = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class RequestTimeout(ServiceError):
    status = 408


class Conflict(ServiceError):
    status = 409


class PayloadTooLarge(ServiceError):
    status = 413


class HeadersTooLarge(ServiceError):
    status = 431


class UnsupportedMediaType(ServiceError):
    status = 415


class Unprocessable(ServiceError):
    status = 422


class Forbidden(ServiceError):
    status = 403


class NotImplementedHere(ServiceError):
    """501: this service cannot do that (e.g. index changes on a sharded service)."""

    status = 501


class Unavailable(ServiceError):
    """503; with ``retry_after`` seconds, the ``Retry-After`` header says when to come back."""

    status = 503

    def __init__(self, detail: str, *, retry_after: int | None = None, headers: dict[str, str] | None = None) -> None:
        if retry_after is not None:
            headers = {**(headers or {}), "Retry-After": str(retry_after)}
        super().__init__(detail, headers=headers)


# --- what the engine raises ---------------------------------------------------------------------
class QueueFullError(Unavailable):
    """Too many queries are waiting; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the inference queue is full; retry in {retry_after} s", retry_after=retry_after)
        self.retry_after = retry_after


class DuplicateIdError(Conflict):
    """An image with this id is already indexed."""


class DecodeBusyError(Unavailable):
    """The decode gate (:mod:`service.decoding`) stayed full for the whole wait; ``retry_after`` is a
    hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many images are being decoded; retry in {retry_after} s", retry_after=retry_after)
        self.retry_after = retry_after


class ExplanationNotFound(NotFound):
    """No explanation for this query / gallery id (:mod:`service.explanations`); the message says why."""


class ImageRejectedError(BadRequest):
    """The indexer refused the image (``reason`` as in ``indexer.loading``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"the indexer refused the image ({reason}): {message}")
        self.reason = reason
        self.message = message


# --- the one table -------------------------------------------------------------------------------
SHARD_RETRY_AFTER_S = 5  # a failed shard: Retry-After of the 503

#: the lower layers' exceptions -> the service error each means
DOMAIN_ERRORS: dict[type[BaseException], Callable[[Any], ServiceError]] = {
    ShardUnavailableError: lambda err: Unavailable(str(err), retry_after=SHARD_RETRY_AFTER_S),
}

#: ``indexer.loading.ImageLoadError.reason`` -> the status of an upload refused for it (others: 400)
IMAGE_REFUSALS: dict[str, type[ServiceError]] = {
    "too_large_file": PayloadTooLarge,
    "decompression_bomb": PayloadTooLarge,
    "bad_aspect_ratio": Unprocessable,  # small and well-formed, but a shape the service refuses
    "unsupported": UnsupportedMediaType,
}


def as_service_error(err: BaseException) -> ServiceError | None:
    """The HTTP meaning of an exception, or None when it has none (a bug: answered 500)."""
    if isinstance(err, ServiceError):
        return err
    for kind, mapped in DOMAIN_ERRORS.items():
        if isinstance(err, kind):
            return mapped(err)
    if isinstance(err, StarletteHTTPException):  # routing's 404 / 405, and the body parser's 413 / 408
        mapped_err = ServiceError(str(err.detail), headers=getattr(err, "headers", None))
        mapped_err.status = err.status_code
        return mapped_err
    return None


def error_response(err: BaseException, *, headers: dict[str, str] | None = None,
                   body: dict[str, Any] | None = None) -> JSONResponse:
    """The one JSON answer of a failure: ``{"detail": ...}`` (plus ``body``) with the error's status and
    headers (plus ``headers``); an exception with no HTTP meaning is logged and answered 500. Used by the
    exception handlers, the middlewares and ``/readyz`` alike."""
    known = as_service_error(err)
    if known is None:
        log.exception("unhandled error", exc_info=err)
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server log"}, 500)
    return JSONResponse({**(body or {}), "detail": known.detail}, known.status,
                        headers={**(known.headers or {}), **(headers or {})} or None)


def _validation_detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with :func:`error_response`: service errors, the lower-layer exceptions of the
    table, Starlette's own 404/405, request validation as 422, and anything else as a logged 500."""

    async def handle(_: Request, err: Exception) -> JSONResponse:
        return error_response(err)

    for kind in (ServiceError, StarletteHTTPException, *DOMAIN_ERRORS, Exception):
        app.add_exception_handler(kind, handle)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(Unprocessable(_validation_detail(err)))
