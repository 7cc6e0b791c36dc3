"""``create_app(settings)``: the FastAPI application (routes in ``routes``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .engine import Engine
from .errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, error_response, install_error_handlers
from .metrics import MetricsMiddleware, ServiceMetrics
from .routes import check_api_key, require_api_key, router
from .settings import ServiceSettings
from .state import ServiceState
from .uploads import BodyStalled, BodyTooLarge

log = logging.getLogger("vit_rerank.service")

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small form fields around the file
BODY_READ_TIMEOUT_S = 30.0  # a request body that stops arriving for this long is answered 408


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


class ApiKeyMiddleware:
    """The API key check of the routes that depend on ``require_api_key``, made before the body is read.

    FastAPI parses a form before it runs the route's dependencies: without this, a request without the
    key would have its whole upload read (up to the body limit) only to be answered 401. The refusal
    closes the connection, so the unread body is not drained either. The routes keep their own check.
    """

    def __init__(self, app: Any, routes: list[APIRoute], expected: SecretStr | None) -> None:
        self.app = app
        self.routes = routes
        self.expected = expected

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self._protected(scope)
        if route is not None:
            try:
                check_api_key(self.expected, Headers(scope=scope).get("x-api-key"))
            except (ServiceError, StarletteHTTPException) as err:
                scope["route"] = route  # counted under its route in the metrics
                await error_response(err, headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _protected(self, scope: dict) -> APIRoute | None:
        if scope["type"] != "http" or self.expected is None:
            return None
        return next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)


def _key_routes() -> list[APIRoute]:
    """The routes that need the API key: ``require_api_key`` among their dependencies.

    Taken from ``routes.router``, included without a prefix, so its paths are the app's.
    """
    return [r for r in router.routes
            if isinstance(r, APIRoute) and any(d.dependency is require_api_key for d in r.dependencies)]


def create_app(settings: ServiceSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service over ``settings.index``; pass a loaded ``engine`` to skip loading it here."""
    settings = settings or ServiceSettings()
    state = ServiceState(settings, engine.metrics if engine and engine.metrics else ServiceMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if engine is not None:
            state.attach(engine)
        elif settings.load_in_background:
            loader = threading.Thread(target=state.load, name="vit-rerank-loader", daemon=True)
            loader.start()
        else:
            state.load()
        try:
            yield
        finally:
            if loader is not None:
                loader.join()
            state.close()

    app = FastAPI(
        title="vit-rerank",
        version="0.1.0",
        summary="Image search: ViT global vectors, reranked by partial optimal transport over patch tokens.",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.include_router(router)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = STATIC / "index.html"
        if not index.is_file():
            raise NotFound("the web page is not installed")
        return FileResponse(index, media_type="text/html")

    # The first added runs innermost: the metrics see every request, the key is checked before the body.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
                       read_timeout_s=BODY_READ_TIMEOUT_S)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(ApiKeyMiddleware, routes=_key_routes(), expected=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
