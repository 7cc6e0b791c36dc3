"""Every way a request can fail, and the one place that turns each into an HTTP answer.

Modules raise :class:`ServiceError` subclasses (named by what went wrong, carrying their status)
or the engine's and the indexer's own exceptions; :func:`install_error_handlers` maps all of them to
``{"detail": ...}`` JSON with the status and headers below. ``HTTPException`` is raised only where
FastAPI's body parser demands it (``service.uploads.BodyTooLarge`` / ``BodyStalled``).
"""

from __future__ import annotations

import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vit_rerank.service")


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


class ImageRejectedError(BadRequest):
    """The indexer refused the image (``reason`` as in ``indexer.loading``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"the indexer refused the image ({reason}): {message}")
        self.reason = reason
        self.message = message


def as_service_error(err: BaseException) -> ServiceError | None:
    """The HTTP meaning of an exception, or None when it has none (a bug: answered 500). The one table
    of mappings for exceptions that are not :class:`ServiceError` themselves."""
    from .explanations import ExplanationNotFound

    if isinstance(err, ServiceError):
        return err
    if isinstance(err, ExplanationNotFound):
        return NotFound(str(err))
    return None


def _json(err: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": err.detail}, err.status, headers=err.headers)


def _validation_detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, extra: tuple[type[BaseException], ...] = ()) -> None:
    """Answer every failure as ``{"detail": ...}`` JSON: service errors and the mapped lower-layer
    exceptions (:func:`as_service_error`) with their status, Starlette's own 404/405, request
    validation as 422, and anything else as a logged 500."""
    from .explanations import ExplanationNotFound

    async def mapped(_: Request, err: Exception) -> JSONResponse:
        known = as_service_error(err)
        if known is None:
            return await internal(_, err)
        return _json(known)

    for kind in (ServiceError, ExplanationNotFound, *extra):
        app.add_exception_handler(kind, mapped)

    @app.exception_handler(StarletteHTTPException)  # routing's 404 / 405
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(err.detail)}, err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(err)}, 422)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server log"}, 500)

