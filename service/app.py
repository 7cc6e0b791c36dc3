"""``create_app(settings)``: the FastAPI application (routes in ``routes``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from .engine import Engine
from .errors import NotFound, install_error_handlers
from .metrics import MetricsMiddleware, ServiceMetrics
from .openapi import install as install_openapi
from .middlewares import (ApiKeyMiddleware, BodyLimitMiddleware, HeadMiddleware, HeaderLimitMiddleware,
                          InFlightLimitMiddleware)
from .routes import require_api_key, router
from .settings import ServiceSettings
from .state import ServiceState

log = logging.getLogger("vit_rerank.service")

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small form fields around the file
BODY_READ_TIMEOUT_S = 30.0  # a request body that stops arriving for this long is answered 408
MAX_HEADER_BYTES = 16 * 1024  # a request line + headers larger than this: 431


#: what ``protect_search`` also puts behind the key (health, metrics and the page stay open)
READ_ROUTES = ("/search", "/explanations", "/images", "/index")


def _key_routes(protect_search: bool = False) -> list[APIRoute]:
    """The routes that need the API key: ``require_api_key`` among their dependencies (index changes), and
    with ``protect_search`` the reading ones too (:data:`READ_ROUTES`).

    Taken from ``routes.router``, included without a prefix, so its paths are the app's.
    """
    def needs_key(route: APIRoute) -> bool:
        if any(d.dependency is require_api_key for d in route.dependencies):
            return True
        return protect_search and any(route.path == p or route.path.startswith(p + "/") for p in READ_ROUTES)

    return [r for r in router.routes if isinstance(r, APIRoute) and needs_key(r)]


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
    install_openapi(app)
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
    app.add_middleware(ApiKeyMiddleware, routes=_key_routes(settings.protect_search), expected=settings.api_key,
                       allowed_origins=tuple(settings.allowed_origins))
    app.add_middleware(InFlightLimitMiddleware, limit=settings.max_in_flight)
    app.add_middleware(HeaderLimitMiddleware, limit=MAX_HEADER_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
