"""What the running app holds: settings, metrics, the engine once loaded, and the caches."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from cachetools import LRUCache
from .engine import Engine
from .errors import Unavailable
from .explanations import ExplanationCache
from .metrics import ServiceMetrics
from .settings import ServiceSettings

log = logging.getLogger("vit_rerank.service")

THUMBNAIL_CACHE_BYTES = 32 * 2**20


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics
    engine: Engine | None = None
    explanations: ExplanationCache | None = None
    load_error: str | None = None
    thumbnails: LRUCache = field(default_factory=lambda: LRUCache(THUMBNAIL_CACHE_BYTES, getsizeof=len))
    thumbnail_lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, engine: Engine) -> None:
        """Make a loaded engine live (starts its inference thread)."""
        self.explanations = ExplanationCache(
            self.settings.explanation_cache_mb * 2**20, self.settings.explanation_ttl_s, engine.transform
        )
        self.engine = engine.start()

    def load(self) -> None:
        """Open the index and the model; on failure keep the reason (readyz shows it)."""
        try:
            self.attach(Engine.open(self.settings, self.metrics))
            log.info("ready: %s", self.settings.index)
        except BaseException as err:  # noqa: BLE001 - reported through /readyz, never fatal to the server
            self.load_error = f"{type(err).__name__}: {err}"
            log.error("could not load the index: %s", self.load_error)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            detail = f"not ready: {self.load_error}" if self.load_error else "not ready: the index and model are loading"
            raise Unavailable(detail, retry_after=5)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
