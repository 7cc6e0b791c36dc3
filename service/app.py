"""``create_app(settings)``: the FastAPI application (routes in ``routes``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine
from .metrics import MetricsMiddleware, ServiceMetrics
from .routes import router
from .settings import ServiceSettings
from .state import ServiceState
from .uploads import BodyTooLarge

log = logging.getLogger("vit_rerank.service")

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small form fields around the file


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes: by Content-Length up front, else while reading."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            too_big = length.isdigit()
            status, detail = (413, f"the request body is over the limit of {self.limit} bytes") if too_big else \
                (400, "invalid Content-Length")
            await JSONResponse({"detail": detail}, status)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


def _validation_detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    # FastAPI's HTTPException subclasses Starlette's, and handlers are looked up along the MRO:
    # this one handler answers both (the routes' errors and Starlette's own 404 / 405).
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(err.detail)}, err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(err)}, 422)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server log"}, 500)


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
    _install_error_handlers(app)
    app.include_router(router)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = STATIC / "index.html"
        if not index.is_file():
            raise HTTPException(404, "the web page is not installed")
        return FileResponse(index, media_type="text/html")

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
