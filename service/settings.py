"""Service configuration: environment variables ``VIT_RERANK_*``, overridden by ``serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Marginals = Literal["auto", "rollout", "crosscorr", "uniform"]


class ServiceSettings(BaseSettings):
    """Everything the service reads at start. Each field ``x`` is the env var ``VIT_RERANK_X``."""

    model_config = SettingsConfigDict(env_prefix="VIT_RERANK_", extra="ignore", populate_by_name=True)

    index: Path | None = Field(None, description="index directory to serve")
    model: str = Field("vit_small_patch16_224.dino", description="backbone of the demo index (--demo)")
    weights: str | None = Field(None, description="pretrained | random | PATH; default: the index's own")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    top_k: int = Field(10, ge=1, le=100, description="results per query, unless the query says")
    rerank_k: int = Field(100, ge=0, le=1000, description="candidates reranked by partial OT")
    s: float = Field(1.0, gt=0, le=1, description="fraction of patch mass matched")
    lam: float = Field(
        1.0, ge=0, validation_alias=AliasChoices("lam", "VIT_RERANK_LAMBDA"),
        description="weight of the structural score (env VIT_RERANK_LAMBDA)",
    )
    marginals: Marginals = "auto"

    max_upload_bytes: int = Field(16 * 2**20, ge=1024, description="largest accepted upload")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted image (width x height)")
    queue_size: int = Field(64, ge=1, description="queries waiting for inference; beyond: 503")
    max_batch: int = Field(16, ge=1, description="queries embedded and reranked together")
    batch_wait_ms: float | None = Field(
        None, ge=0, le=1000,
        description="how long the first query of a batch waits for others (default: 5 on a GPU, 0 on a CPU)",
    )
    explanation_cache_mb: int = Field(128, ge=1, description="memory for cached query features and pictures")
    explanation_ttl_s: float = Field(600.0, gt=0, description="how long a query's explanations stay available")

    api_key: SecretStr | None = Field(None, description="required in X-API-Key for index changes when set")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    load_in_background: bool = Field(
        True, description="load the model after the server starts (readyz answers 503 until then)"
    )

    def wait_ms(self, device_type: str) -> float:
        if self.batch_wait_ms is not None:
            return self.batch_wait_ms
        return 5.0 if device_type == "cuda" else 0.0
