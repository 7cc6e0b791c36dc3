"""The HTTP service: a thin FastAPI layer over the indexer and the reranker (``create_app``)."""

from .settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]


def create_app(*args, **kwargs):  # imported lazily: FastAPI is only needed when serving
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
