"""Response bodies of the API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    detail: str


class AppliedSettings(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    top_k: int
    rerank_k: int
    s: float
    lam: float = Field(serialization_alias="lambda", validation_alias="lambda")
    marginals: str
    calibrated: bool = Field(False, description="True when unset parameters came from the index's calibration")


class Timings(BaseModel):
    queue: float
    embed: float
    search: float
    rerank: float
    total: float


class Result(BaseModel):
    id: str
    label: str | None
    metadata: dict[str, Any]
    global_score: float
    structural_score: float | None
    final_score: float
    rank_before: int
    rank_after: int
    image_url: str
    thumbnail_url: str
    explanation_url: str | None


class SearchResponse(BaseModel):
    query_id: str
    model: str
    random_weights: bool
    marginals: str
    settings: AppliedSettings
    timings_ms: Timings
    results: list[Result]


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    images: int
    model: str
    weights: str
    random_weights: bool
    patch_weights: str
    factory: str
    bytes_per_image: float


class Added(BaseModel):
    id: str
    added: bool


class Removed(BaseModel):
    id: str
    removed: bool


class Status(BaseModel):
    status: str
    detail: str | None = None


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 503)}
