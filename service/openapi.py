"""The OpenAPI schema as the server really answers: every error is ``{"detail": "..."}``.

FastAPI documents request-validation failures as its ``HTTPValidationError`` (``detail``: an array of
objects), while :mod:`service.errors` answers them, like every other failure, with ``ErrorBody``
(``detail``: a string). Failures any request can meet before its route runs (a head over the limit: 431;
the service loading or busy: 503) are documented on every operation.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}

#: status -> why, for the refusals that come before any route (middlewares, readiness)
ANY_REQUEST = {
    "431": "the request line and headers are over the limit",
    "503": "the service is loading, or answering as many requests as it takes (Retry-After)",
}


def truthful_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema with every error response as ``ErrorBody`` (built once, then kept)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes)
    error = {"application/json": {"schema": ERROR_REF}}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": "a parameter or form field is invalid", "content": error}
            for status, why in ANY_REQUEST.items():
                responses.setdefault(status, {"description": why, "content": error})
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components.setdefault("ErrorBody", {"title": "ErrorBody", "type": "object", "required": ["detail"],
                                        "properties": {"detail": {"title": "Detail", "type": "string"}}})
    app.openapi_schema = schema
    return schema


def install(app: FastAPI) -> None:
    """Serve :func:`truthful_schema` at ``/openapi.json``."""
    app.openapi = lambda: truthful_schema(app)  # type: ignore[method-assign]
