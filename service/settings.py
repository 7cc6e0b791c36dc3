"""Service configuration: environment variables ``VIT_RERANK_*``, overridden by ``serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from indexer.search_params import MARGINALS_CHOICES, SCORER_CHOICES, SEARCH_PARAMS
from reranker.defaults import DEFAULT_MODEL

Marginals = Literal[MARGINALS_CHOICES]  # type: ignore[valid-type]
Scorer = Literal[SCORER_CHOICES]  # type: ignore[valid-type]


def _bounds(name: str) -> dict:
    return SEARCH_PARAMS[name].bounds()


def _help(name: str) -> str:
    p = SEARCH_PARAMS[name]
    return f"{p.help}; unset: the index's calibration, else {p.default}"


class ServiceSettings(BaseSettings):
    """Everything the service reads at start. Each field ``x`` is the env var ``VIT_RERANK_X``."""

    model_config = SettingsConfigDict(env_prefix="VIT_RERANK_", extra="ignore", populate_by_name=True)

    index: Path | None = Field(None, description="index directory to serve")
    ray: str | None = Field(None, description="serve shards on this Ray cluster ('': RAY_ADDRESS or the local one)")
    shards: list[Path] = Field(default_factory=list, description="shard index directories to serve (with ray)")
    model: str = Field(DEFAULT_MODEL, description="backbone of the demo index (--demo)")
    weights: str | None = Field(None, description="pretrained | random | PATH; default: the index's own")
    runtime: Literal["auto", "torch", "onnx", "int8"] | None = Field(
        None, description="how the model runs: auto (onnx where it runs, else torch), torch (float32), onnx "
                          "(float32 in ONNX Runtime, CPU) or int8 (CPU only); default: auto for a float32 index, "
                          "else the index's own")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Search defaults: unset means the index's calibration, else the project's defaults (indexer.search_params).
    top_k: int | None = Field(None, **_bounds("top_k"), description=_help("top_k"))
    rerank_k: int | None = Field(None, **_bounds("rerank_k"), description=_help("rerank_k"))
    scorer: Scorer | None = Field(None, description=_help("scorer"))
    threshold: float | None = Field(None, **_bounds("threshold"), description=_help("threshold"))
    s: float | None = Field(None, **_bounds("s"), description=_help("s"))
    lam: float | None = Field(
        None, **_bounds("lam"), validation_alias=AliasChoices("lam", "VIT_RERANK_LAMBDA"),
        description=_help("lam") + " (env VIT_RERANK_LAMBDA)",
    )
    marginals: Marginals = "auto"
    eps: float | None = Field(None, **_bounds("eps"), description=_help("eps"))

    max_upload_bytes: int = Field(16 * 2**20, ge=1024, description="largest accepted upload")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted image (width x height)")
    queue_size: int = Field(64, ge=1, description="queries waiting for inference; beyond: 503")
    max_in_flight: int = Field(128, ge=1, description="requests answered at once (idle connections do not "
                               "count); beyond: 503 with Retry-After")
    max_batch: int = Field(16, ge=1, description="queries embedded and reranked together")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads of torch (default: torch's, one per core); 1 where other work "
        "shares the cores: busy-waiting threads then cost far more than they bring")
    batch_wait_ms: float | None = Field(
        None, ge=0, le=1000,
        description="how long the first query of a batch waits for others (default: 5 on a GPU, 0 on a CPU)",
    )
    explanation_cache_mb: int = Field(128, ge=1, description="memory for cached query features and pictures")
    explanation_ttl_s: float = Field(600.0, gt=0, description="how long a query's explanations stay available")

    api_key: SecretStr | None = Field(None, description="required in X-API-Key for index changes when set")
    protect_search: bool = Field(
        False, description="require the API key for searches, explanations, images and index facts too (not only for "
        "changes); the web page then cannot show images (a browser does not send the key): for API clients")
    allowed_origins: list[str] = Field(
        default_factory=list, description="web origins (scheme://host:port) besides the service's own whose "
        "pages may change the index (JSON list); any other Origin on an index change: 403")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    load_in_background: bool = Field(
        True, description="load the model after the server starts (readyz answers 503 until then)"
    )

    @model_validator(mode="after")
    def _key_for_protected_search(self) -> "ServiceSettings":
        if self.protect_search and self.api_key is None:
            raise ValueError("protect_search needs an api_key (VIT_RERANK_API_KEY)")
        return self

    def search_layer(self) -> dict[str, Any]:
        """The configured search defaults, as the layer after a request and the index's calibration
        (:func:`indexer.search_params.resolve`)."""
        return {name: getattr(self, name, None) for name in SEARCH_PARAMS}

    def wait_ms(self, device_type: str) -> float:
        if self.batch_wait_ms is not None:
            return self.batch_wait_ms
        return 5.0 if device_type == "cuda" else 0.0
