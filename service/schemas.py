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
    scorer: str = Field(description="ot (partial optimal transport) or mnn (mutual nearest neighbours)")
    threshold: float = Field(description="mnn: the cosine a match exceeds")
    s: float
    lam: float = Field(serialization_alias="lambda", validation_alias="lambda")
    marginals: str
    eps: float
    calibrated: bool = Field(False, description="True when unset parameters came from the index's calibration")


class Timings(BaseModel):
    queue: float
    embed: float
    search: float
    rerank: float = Field(description="gather + structural + final")
    gather: float | None = Field(None, description="reading the candidates' rows and stored patch features")
    structural: float | None = Field(None, description="the structural scorer, the fusion and the sort")
    final: float | None = Field(None, description="building the hits")
    total: float


def renderable(value: Any) -> Any:
    """``value`` (a string, or JSON of strings, numbers, lists and objects) with every lone surrogate
    replaced by U+FFFD: a stored id, label or metadata value that no response could serialise (e.g. an id
    from a file name with a non-UTF-8 byte) degrades that one field instead of failing the answer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, dict):
        return {renderable(k): renderable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [renderable(v) for v in value]
    return value


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
    explanation_json_url: str | None = Field(None, description="the numbers behind the picture (Explanation)")
    structural_contribution: float | None = Field(
        None, description="lambda * structural_score: what the reranking added to the global score")
    near_duplicate: bool | None = Field(
        None, description="a near copy of the query (indexer.near_duplicates: the global cosine at the backbone's "
                          "measured threshold, or a lower one with enough matched patches; null: nothing measured "
                          "for this backbone, or random weights)")


class SearchResponse(BaseModel):
    query_id: str
    model: str
    random_weights: bool
    marginals: str
    settings: AppliedSettings
    timings_ms: Timings
    results: list[Result]
    offset: int = Field(0, description="how many better results came before this page")
    crop: list[float] | None = Field(None, description="the region of the query searched (x0, y0, x1, y1 as "
                                                       "fractions), or null: all of it")
    next_offset: int | None = Field(None, description="the offset of the next page (null: no more results)")


class PatchCell(BaseModel):
    index: int = Field(description="row-major patch index")
    row: int
    col: int


class MatchedPair(BaseModel):
    rank: int = Field(description="1 = the most mass; the number of the link in the picture")
    query: PatchCell
    candidate: PatchCell
    similarity: float | None = Field(description="cosine of the two patch vectors (null if no longer stored)")
    mass: float = Field(description="ot: mass the plan moved from the query patch to the candidate patch; mnn: "
                                    "the match's cosine / number of query patches")


class Explanation(BaseModel):
    """Why a result is where it is: the numbers beside the patch-matching picture."""

    query_id: str
    id: str
    label: str | None
    model: str
    scorer: str = Field(description="ot (partial optimal transport) or mnn (mutual nearest neighbours)")
    threshold: float = Field(description="mnn: the cosine a match exceeds")
    marginals: str
    s: float = Field(description="ot: fraction of the mass partial OT matches")
    lam: float = Field(serialization_alias="lambda", validation_alias="lambda")
    grid: int
    global_score: float = Field(description="global cosine of the query and this image")
    structural_score: float = Field(description="sigma: ot, the plan's mass-weighted patch similarity; mnn, the "
                                                "share of query patches with a mutual nearest neighbour above "
                                                "the threshold")
    structural_contribution: float = Field(description="lambda * sigma")
    final_score: float = Field(description="global_score + lambda * sigma")
    rank_before: int = Field(description="0-based rank by global cosine")
    rank_after: int = Field(description="0-based rank after reranking")
    matched_mass: float = Field(description="ot: fraction of the mass the plan matched (the rest went to the "
                                            "dummy); mnn: share of the query patches with a match")
    near_duplicate: bool | None
    pairs: list[MatchedPair]
    query_unmatched: list[float] | None = Field(description="per query patch (row-major), mass sent to the dummy")
    candidate_unmatched: list[float] | None
    query_weights: list[float] | None = Field(description="the OT marginal of the query (unit mass)")
    candidate_weights: list[float] | None
    picture_url: str

    model_config = ConfigDict(populate_by_name=True)


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    images: int
    model: str
    weights: str
    random_weights: bool
    patch_weights: str
    factory: str
    bytes_per_image: float


class NearDuplicate(BaseModel):
    id: str
    cosine: float = Field(description="global cosine (1 for the same bytes)")


class Added(BaseModel):
    id: str
    added: bool
    near_duplicates: list[NearDuplicate] = Field(
        default_factory=list, description="indexed images this one copies: the same bytes, or a near-duplicate "
        "(indexer.near_duplicates; empty where no threshold is measured for the backbone)")


class Removed(BaseModel):
    id: str
    removed: bool


class Status(BaseModel):
    status: str
    detail: str | None = None


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 503)}
