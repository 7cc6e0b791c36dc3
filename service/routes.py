"""The endpoints. Each one is thin: decode and check the request, call the engine, shape the answer."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Annotated, Any, Callable, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from indexer.filters import parse as parse_filter
from indexer.near_duplicates import near_duplicate_flags
from indexer.search import SearchSettings
from indexer.search_params import SEARCH_PARAMS
from reranker.threads import single_threaded

from .engine import Engine, SearchOutcome
from .errors import Forbidden, NotFound, Unauthorized, Unavailable, Unprocessable, error_response, shown
from .explanations import PictureOptions, QueryExplanations, build_entry
from .gallery_images import STORED_THUMBNAIL_PIXELS, gallery_image, thumbnail, thumbnail_of
from .settings import Marginals, Scorer
from .schemas import (ERRORS, Added, AppliedSettings, Explanation, IndexInfo, NearDuplicate, Removed, Result, SearchResponse, Status,
                      renderable)
from .state import ServiceState
from .decoding import decode_bounded, decode_sized  # 503 + Retry-After when too many images are being decoded
from .uploads import CROP_PATTERN, MAX_ID_CHARS, MAX_LABEL_CHARS, check_image_id, check_label, crop_to, parse_crop, file_suffix, parse_metadata, read_upload, single_valued_form

T = TypeVar("T")


def _single_threaded_call(fn: Callable[..., T], *args: Any) -> T:
    single_threaded()
    return fn(*args)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the request thread pool, with torch on that thread alone: the engine's inference
    thread keeps the only OpenMP pool (reranker.threads)."""
    return await run_in_threadpool(_single_threaded_call, fn, *args)


MAX_PAGE = 100  # results per answer
MAX_OFFSET = 900  # results skipped: pages reach the 1,000th result
NON_EMPTY = {"minLength": 1}  # an upload of no bytes is refused (400): the schema says so
#: a JSON object as text: the server parses it (and refuses anything else with 422)
JSON_OBJECT = {"pattern": r"^\s*\{[\s\S]*\}\s*$", "contentMediaType": "application/json",
               "contentSchema": {"type": "object"}}

router = APIRouter()
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the service has a key")


def service(request: Request) -> ServiceState:
    """What the app holds (a dependency)."""
    return request.app.state.service


def ready_engine(request: Request) -> Engine:
    """The loaded engine (a dependency); 503 with Retry-After while it loads or when it failed to."""
    return service(request).ready_engine()


State = Annotated[ServiceState, Depends(service)]
ReadyEngine = Annotated[Engine, Depends(ready_engine)]


def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    """The routes' check; ``app.ApiKeyMiddleware`` makes the same one before the body is read."""
    check_api_key(service(request).settings.api_key, key)


def check_api_key(expected: SecretStr | None, key: str | None) -> None:
    """401 without a key, 403 with a wrong one; nothing when the service has no key."""
    if expected is None:
        return
    if not key:
        raise Unauthorized("this endpoint needs an API key in the X-API-Key header",
                           headers={"WWW-Authenticate": "X-API-Key"})
    if not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Forbidden("wrong API key")


def _url_id(image_id: str) -> str:
    return quote(renderable(image_id), safe="")


# --- health -------------------------------------------------------------------------------
@router.get("/healthz", response_model=Status, response_model_exclude_none=True, tags=["health"])
async def healthz() -> Status:
    """The process is alive."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, response_model_exclude_none=True, responses={503: {"model": Status}},
            tags=["health"])
async def readyz(request: Request) -> Any:
    """200 once the index and the model are loaded, else 503 (with the reason)."""
    state = service(request)
    if state.engine is None:
        detail = state.load_error or "loading the index and the model"
        return error_response(Unavailable(detail, retry_after=5), body={"status": "unavailable"})
    return Status(status="ready")


@router.get("/metrics", tags=["health"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}})
async def metrics(request: Request) -> Response:
    """Prometheus text: requests, latencies per route, time per search stage, queue depth."""
    state = service(request)
    m = state.metrics
    if state.engine is not None:
        m.queue_depth.set(state.engine.queue_depth())
    return Response(m.render(), media_type=m.content_type)


# --- search -------------------------------------------------------------------------------
def _param(name: str) -> dict[str, Any]:
    """A search parameter's bounds and help for its form field (indexer.search_params)."""
    p = SEARCH_PARAMS[name]
    return {**p.bounds(), "description": f"{p.help}; unset: the index's calibration, else {p.default}"}


@router.post("/search", response_model=SearchResponse, responses=ERRORS, tags=["search"],
             dependencies=[Depends(single_valued_form)])
async def search(
    state: State,
    engine: ReadyEngine,
    image: Annotated[UploadFile, File(description="the query image (JPEG, PNG, WebP, GIF, BMP or TIFF)",
                                      json_schema_extra=NON_EMPTY)],
    top_k: Annotated[int | None, Form(**{**_param("top_k"), "le": MAX_PAGE})] = None,
    offset: Annotated[int, Form(ge=0, le=MAX_OFFSET, description="results to skip: the page after the first "
                                                                 f"(offset + top_k at most {MAX_OFFSET + MAX_PAGE})")] = 0,
    rerank_k: Annotated[int | None, Form(**_param("rerank_k"))] = None,
    scorer: Annotated[Scorer | None, Form(description=SEARCH_PARAMS["scorer"].help)] = None,
    threshold: Annotated[float | None, Form(**_param("threshold"), allow_inf_nan=False)] = None,
    s: Annotated[float | None, Form(**_param("s"), allow_inf_nan=False)] = None,
    marginals: Annotated[Marginals | None, Form(description=SEARCH_PARAMS["marginals"].help)] = None,
    eps: Annotated[float | None, Form(**_param("eps"), allow_inf_nan=False)] = None,
    lam: Annotated[float | None, Form(alias=SEARCH_PARAMS["lam"].public_name, **_param("lam"),
                                      allow_inf_nan=False)] = None,
    explain: Annotated[bool, Form(description="draw the explanation pictures now (the best 10 reranked hits; the "
                                              "others are drawn when first fetched)")] = False,
    where: Annotated[str | None, Form(description="only images that match, a JSON object: {\"label\": \"hat\"}, "
                                                  "{\"label\": [\"hat\", \"shoes\"], \"color\": \"red\"} (other keys: "
                                                  "metadata fields)", max_length=16_384,
                                      json_schema_extra=JSON_OBJECT)] = None,
    crop: Annotated[str | None, Form(description="search with a region of the photo: x0,y0,x1,y1 as fractions of "
                                                 "its width and height, e.g. 0.25,0.1,0.75,0.9",
                                     pattern=CROP_PATTERN)] = None,
) -> Any:
    """Search the index with one image (or a region of it, ``crop``), among the images ``where`` allows: top K
    by global cosine, reranked by their patch structure."""
    cfg = state.settings
    try:
        allowed, region = parse_filter(where), parse_crop(crop)
    except ValueError as err:
        raise Unprocessable(str(err)) from None
    asked = SearchSettings(top_k=top_k, rerank_k=rerank_k, scorer=scorer, threshold=threshold, s=s, lam=lam,
                           marginals=marginals or "auto", eps=eps)
    try:
        settings = engine.effective(asked, cfg.search_layer())
    except ValueError as err:
        raise Unprocessable(str(err)) from None
    resolved = settings.marginals
    data = await read_upload(image, cfg.max_upload_bytes)
    query = await off_loop(decode_bounded, data, image.content_type, engine)
    if region is not None:
        query = crop_to(query, region)
    # the first offset + top_k results are searched; the page is the last top_k of them
    fetch = dataclasses.replace(settings, top_k=settings.top_k + offset)
    # 503 when the queue is full; 422 where filters are not supported (a sharded index)
    try:
        outcome: SearchOutcome = await asyncio.wrap_future(engine.submit(query, fetch, allowed))
    except ValueError as err:
        raise Unprocessable(str(err)) from None
    query_id = secrets.token_hex(12)
    near = await off_loop(_near_flags, engine, outcome.result)
    entry = await off_loop(_remember, state, query_id, query, outcome, near)
    if explain and entry is not None:  # drawn from this request's own entry, at most EXPLAIN_PICTURES of them
        await off_loop(state.explanations.render_all, query_id, entry)
    answer = _response(state, query_id, settings, resolved, outcome, offset, near)
    answer.crop = None if region is None else list(region)
    return answer


def _near_flags(engine: Engine, result: Any) -> dict[str, bool | None]:
    return near_duplicate_flags(engine.index_dir.manifest, engine.random_weights, result)


def _remember(state: ServiceState, query_id: str, query: Any, outcome: SearchOutcome,
              near: dict[str, bool | None]) -> QueryExplanations | None:
    entry = build_entry(query, outcome, state.engine, near)
    if entry is not None:
        state.explanations.put(query_id, entry)
    return entry


def _response(state: ServiceState, query_id: str, settings: SearchSettings, marginals: str,
              outcome: SearchOutcome, offset: int = 0, near: dict[str, bool | None] | None = None) -> SearchResponse:
    result = outcome.result
    results = []
    near = near or {}
    page = result.hits[offset:offset + settings.top_k]
    full = len(page) == settings.top_k and offset + settings.top_k < MAX_OFFSET + MAX_PAGE
    for h in page:
        uid = _url_id(h.id)
        explained = h.id in result.plans
        results.append(Result(
            id=renderable(h.id), label=renderable(h.label), metadata=renderable(h.metadata), global_score=h.global_score,
            structural_score=h.structural_score, final_score=h.final_score, rank_before=h.rank_before,
            rank_after=h.rank_after, image_url=f"/images/{uid}", thumbnail_url=f"/images/{uid}?size=thumb",
            explanation_url=f"/explanations/{query_id}/{uid}.png" if explained else None,
            explanation_json_url=f"/explanations/{query_id}/{uid}.json" if explained else None,
            structural_contribution=None if h.structural_score is None else settings.lam * h.structural_score,
            near_duplicate=near.get(h.id),
        ))
    return SearchResponse(
        query_id=query_id, model=state.engine.model, random_weights=result.random_weights, marginals=marginals,
        settings=AppliedSettings(**settings.values(), calibrated=state.engine.calibration is not None),
        timings_ms=outcome.timings_ms, results=results, offset=offset,
        next_offset=offset + settings.top_k if full else None,
    )


@router.get("/explanations/{query_id}/{gallery_id:path}.json", response_model=Explanation, tags=["search"],
            response_model_by_alias=True, responses={404: ERRORS[404], 422: ERRORS[422]},
            dependencies=[Depends(ready_engine)])
async def explanation_numbers(
    state: State, query_id: str, gallery_id: str,
    top: Annotated[int, Query(ge=1, le=100, description="how many of the strongest matched pairs")] = 10,
) -> Any:
    """The numbers of one reranked result: global cosine, sigma, final score, ranks, matched mass and the
    strongest patch pairs (grid cells, similarity, mass), so that a client can draw its own overlay."""
    body = await off_loop(state.explanations.numbers, query_id, gallery_id, top)
    return Explanation(query_id=query_id, id=gallery_id, picture_url=f"/explanations/{query_id}/{_url_id(gallery_id)}.png",
                       **body)


@router.get("/explanations/{query_id}/{picture:path}", response_class=Response, tags=["search"],
            responses={200: {"content": {"image/png": {}}}, 404: ERRORS[404], 422: ERRORS[422]},
            dependencies=[Depends(ready_engine)])
async def explanation(
    state: State, query_id: str, picture: Annotated[str, Path(description="<gallery id>.png")],
    size: Annotated[int, Query(ge=224, le=1024, description="px per photo: the picture is 2 x size + 16 wide")] = 448,
    links: Annotated[int, Query(ge=1, le=12, description="strongest matches drawn as numbered links")] = 6,
    faded: Annotated[int, Query(ge=0, le=100, description="further matches drawn thin and faded")] = 0,
    heatmap: Annotated[bool, Query(description="tint the photos with the patch weights (with a legend)")] = False,
    unmatched: Annotated[bool, Query(description="ot: per patch, the mass sent to the dummy (red bars)")] = False,
) -> Response:
    """The patch-matching picture of one reranked result (rendered on demand, cached a while)."""
    if not picture.endswith(".png"):
        raise NotFound("explanation pictures are named <gallery id>.png (numbers: <gallery id>.json)")
    options = PictureOptions(size=size, links=links, faded=faded, heatmap=heatmap, unmatched=unmatched)
    png = await off_loop(state.explanations.picture, query_id, picture.removesuffix(".png"), options)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


# --- gallery images -----------------------------------------------------------------------
@router.get("/images/{image_id:path}", response_class=Response, tags=["index"],
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, 404: ERRORS[404], 503: ERRORS[503]})
async def image(state: State, engine: ReadyEngine, image_id: str,
                size: Annotated[Literal["full", "thumb"], Query(description="thumb: at most 256 px")] = "full") -> Response:
    """A gallery image by id (only images the index knows; no client path reaches the disk)."""
    row = await off_loop(engine.catalog.row, image_id)
    if row is None:
        raise NotFound(f"no image with id {shown(image_id)} in the index")
    if size == "thumb":
        return await off_loop(thumbnail, state, row)
    return await off_loop(gallery_image, engine, row)


# --- the index ----------------------------------------------------------------------------
@router.get("/index", response_model=IndexInfo, responses={503: ERRORS[503]}, tags=["index"])
async def index_info(engine: ReadyEngine) -> Any:
    """Statistics of the served index."""
    return engine.info()


@router.post("/index/images", status_code=201, response_model=Added, responses=ERRORS, tags=["index"],
             dependencies=[Depends(require_api_key), Depends(single_valued_form)])
async def add_image(
    state: State,
    engine: ReadyEngine,
    image: Annotated[UploadFile, File(description="the image to index", json_schema_extra=NON_EMPTY)],
    id: Annotated[str | None, Form(description="its id (default: upload-<content hash>)",
                                   max_length=MAX_ID_CHARS)] = None,
    label: Annotated[str | None, Form(max_length=MAX_LABEL_CHARS)] = None,
    metadata: Annotated[str | None, Form(description="a JSON object (at most 64 KiB, 32 levels deep)",
                                         json_schema_extra=JSON_OBJECT)] = None,
) -> Added:
    """Index one more image; it is stored in the index directory and survives restarts."""
    image_id, label, meta = check_image_id(id), check_label(label), parse_metadata(metadata)
    data = await read_upload(image, state.settings.max_upload_bytes)
    # decoded once, through the decode gate; the indexer embeds this decode (no second one under the lock)
    decoded = await off_loop(decode_sized, data, image.content_type, engine)
    width, height = decoded.size
    thumb = thumbnail_of(decoded.image) if width * height >= STORED_THUMBNAIL_PIXELS else None
    # 409 for a known id, 400 when the indexer refuses the image (service.errors)
    added, near = await off_loop(engine.add_image, data, file_suffix(decoded.format), image_id, label, meta,
                                 (decoded.image, decoded.size), thumb)
    return Added(id=added, added=True, near_duplicates=[NearDuplicate(id=other, cosine=c) for other, c in near])


@router.delete("/index/images/{image_id:path}", response_model=Removed, responses=ERRORS, tags=["index"],
               dependencies=[Depends(require_api_key)])
async def remove_image(engine: ReadyEngine, image_id: str) -> Removed:
    """Remove one image from the index."""
    if not await off_loop(engine.remove_image, image_id):
        raise NotFound(f"no image with id {shown(image_id)} in the index")
    return Removed(id=image_id, removed=True)
