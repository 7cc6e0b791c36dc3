"""The service's ASGI middlewares: each bounds or shapes every request before a route sees it.

All refusals are the service's JSON answers (:func:`service.errors.error_response`).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from fastapi.routing import APIRoute
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .errors import (BadRequest, Forbidden, HeadersTooLarge, PayloadTooLarge, ServiceError, Unavailable,
                     error_response, shown)
from .routes import check_api_key
from .uploads import BodyStalled, BodyTooLarge


class HeaderLimitMiddleware:
    """Refuse (431) a request whose line and headers together pass ``limit`` bytes, however they arrived
    (uvicorn's own limit holds only for a head that is still incomplete)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
            size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers") or ())
            if size > self.limit:
                refusal = HeadersTooLarge(f"the request line and headers are over the limit of {self.limit} bytes")
                await error_response(refusal, headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InFlightLimitMiddleware:
    """At most ``limit`` requests answered at once; beyond, 503 with Retry-After at once. Only running
    requests count: open connections that send nothing take no place (uvicorn's ``limit_concurrency``
    counted them, so idle sockets could lock everyone out)."""

    def __init__(self, app: Any, limit: int, retry_after: int = 1) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = retry_after
        self.running = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.running >= self.limit:
            busy = Unavailable(f"the service is answering {self.limit} requests already", retry_after=self.retry_after)
            await error_response(busy)(scope, receive, send)
            return
        self.running += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes: by Content-Length up front, else while reading; and
    bodies that stop arriving (no data for ``read_timeout_s``: 408, and the connection is closed)."""

    def __init__(self, app: Any, limit: int, read_timeout_s: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            refusal = PayloadTooLarge(f"the request body is over the limit of {self.limit} bytes") \
                if length.isdigit() else BadRequest("invalid Content-Length")
            await error_response(refusal)(scope, receive, send)
            return
        seen, complete = 0, False

        async def limited_receive() -> dict:
            nonlocal seen, complete
            message = await self._receive(receive, complete)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _receive(self, receive: Any, complete: bool) -> dict:
        """The next message; while the body is incomplete, within ``read_timeout_s``.

        Once the body is complete, receive() only waits for the client to disconnect: no timeout then.
        """
        if complete or self.read_timeout_s is None:
            return await receive()
        try:
            return await asyncio.wait_for(receive(), self.read_timeout_s)
        except TimeoutError:
            raise BodyStalled(self.read_timeout_s) from None


class HeadMiddleware:
    """HEAD on every GET route: the route runs as GET and its body is dropped (its headers, Content-Length
    included, are kept). The scope's method is HEAD again afterwards, for the metrics."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        scope["method"] = "GET"
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"


def check_origin(headers: Headers, allowed: tuple[str, ...]) -> None:
    """Refuse (403) a browser's request from another site: an ``Origin`` that is neither this service's
    own (its ``Host``) nor among ``allowed``. A multipart POST needs no CORS preflight, so without this
    any web page could change an index that has no API key. Requests without ``Origin`` (not from a
    browser page) pass."""
    origin = headers.get("origin")
    if origin is None or origin in allowed:
        return
    if origin != "null" and urlsplit(origin).netloc == headers.get("host"):
        return
    raise Forbidden(f"index changes from another site ({shown(origin)}) are refused; allow its origin with "
                    "VIT_RERANK_ALLOWED_ORIGINS")


class ApiKeyMiddleware:
    """The checks of the routes that change the index (those that depend on ``require_api_key``), made
    before the body is read: the request's origin (:func:`check_origin`), then the API key when one is set.

    FastAPI parses a form before it runs the route's dependencies: without this, a request without the
    key would have its whole upload read (up to the body limit) only to be answered 401. The refusal
    closes the connection, so the unread body is not drained either. The routes keep their own key check.
    """

    def __init__(self, app: Any, routes: list[APIRoute], expected: SecretStr | None,
                 allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.routes = routes
        self.expected = expected
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self._protected(scope)
        if route is not None:
            headers = Headers(scope=scope)
            try:
                check_origin(headers, self.allowed_origins)
                if self.expected is not None:
                    check_api_key(self.expected, headers.get("x-api-key"))
            except (ServiceError, StarletteHTTPException) as err:
                scope["route"] = route  # counted under its route in the metrics
                await error_response(err, headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _protected(self, scope: dict) -> APIRoute | None:
        if scope["type"] != "http":
            return None
        return next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
