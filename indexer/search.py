"""Query an index: embed, top K by FAISS, rerank the K by partial OT, return scored results."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from reranker.backbones import Backbone
from reranker.features import Features, StoredFeatures
from reranker.rerank import rerank_batch

from .embedding import embed_pil_images
from .calibration import Calibration
from .filters import Filter
from .gallery import Gallery
from .index_plan import exact_search
from .search_params import DEFAULT_MARGINALS, PRESETS, SEARCH_PARAMS, features_preset, rerank_options, resolve


@dataclass(frozen=True)
class SearchSettings:
    """Query-time knobs. ``None`` (and ``marginals="auto"``) means: the index's calibration when it
    has one, else the project's defaults (:mod:`indexer.search_params`); :meth:`Searcher.effective`
    fills them in."""

    top_k: int | None = None
    rerank_k: int | None = None
    scorer: str | None = None
    threshold: float | None = None
    s: float | None = None
    lam: float | None = None
    marginals: str = "auto"
    eps: float | None = None

    def validate(self) -> None:
        """Raise ValueError for a value out of its bounds (unset values are fine)."""
        for name, param in SEARCH_PARAMS.items():
            value = getattr(self, name)
            if value is not None:
                param.check(value)

    def values(self) -> dict[str, Any]:
        """The parameters as a mapping (unset ones None or ``auto``): a layer for :func:`resolve`."""
        return {name: getattr(self, name) for name in SEARCH_PARAMS}

    def filled(self, *layers: Mapping[str, Any] | None) -> "SearchSettings":
        """A copy whose unset parameters come from ``layers`` in order, then the defaults (:func:`resolve`)."""
        return SearchSettings(**resolve(self.values(), *layers))


@dataclass
class Hit:
    """One result: the image, its scores, and where it ranked before and after reranking."""

    id: str
    label: str | None
    path: str
    metadata: dict[str, Any]
    global_score: float
    structural_score: float | None
    final_score: float
    rank_before: int
    rank_after: int
    faiss_id: int
    image_file: str = ""  # the file that shows the image: the index's own copy when it keeps one, else ``path``


@dataclass
class PairMatch:
    """How one returned candidate matched the query, as the reranker computed it (on the CPU)."""

    plan: torch.Tensor  # (n, m) the OT plan, or the MNN matches' cosine / n at each match
    query_mass: torch.Tensor  # (n,) the query's patch masses (OT marginal; uniform for mnn)
    candidate_mass: torch.Tensor  # (m,)


@dataclass
class QueryResult:
    """The results of one query, with the time of each stage in milliseconds."""

    hits: list[Hit]
    timings_ms: dict[str, float]
    random_weights: bool
    marginals: str
    settings: SearchSettings | None = None  # the effective settings (calibration and defaults filled in)
    #: the query's features as searched (patches reduced by the index's PCA when it has one; patch
    #: weights: its per-image weights for rollout, uniform ones for uniform, None for crosscorr)
    query: Features | None = None
    #: with plans kept, per returned reranked hit: its correspondences with the query (the OT plan or
    #: the MNN matches, ``(n, m)``) and the patch masses the scorer weighed it with
    pairs: dict[str, "PairMatch"] = field(default_factory=dict)
    #: with plans kept: what the reranker compared the query with, returned reranked hit by hit (``(k, ...)``,
    #: patches decoded, on the CPU), and their gallery ids in the same order
    candidates: Features | None = None
    candidate_ids: list[str] = field(default_factory=list)

    @property
    def plans(self) -> dict[str, torch.Tensor]:
        """Gallery id -> the ``(n, m)`` correspondences of each explained hit."""
        return {image_id: pair.plan for image_id, pair in self.pairs.items()}

    def candidates_of(self, image_ids: Sequence[str]) -> Features:
        """The features the reranked candidates ``image_ids`` were compared with, ``(len(image_ids), ...)``
        in that order (ValueError for one without kept features)."""
        position = {image_id: i for i, image_id in enumerate(self.candidate_ids)}
        missing = [i for i in image_ids if i not in position]
        if self.candidates is None or missing:
            raise ValueError(f"no kept features for {', '.join(map(repr, missing or image_ids))}")
        return self.candidates[torch.tensor([position[i] for i in image_ids], dtype=torch.long)]

    @property
    def candidate_weights(self) -> dict[str, np.ndarray]:
        """Gallery id -> the stored ``(m,)`` patch weights of each kept candidate."""
        if self.candidates is None:
            return {}
        return dict(zip(self.candidate_ids, self.candidates.patch_weights.numpy()))


class Searcher:
    """Searches one index with the backbone that built it, on one device."""

    def __init__(
        self, index_dir: Gallery, backbone: Backbone, device: torch.device | str = "cpu", vector_backend: str = "auto"
    ) -> None:
        self.index_dir = index_dir  # a local index directory or shards: any Gallery
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.vector_backend = vector_backend
        self.vectors = index_dir.vector_search(self.device, vector_backend)

    def refresh(self) -> None:
        """Pick up a FAISS index the gallery replaced (after an add or a remove)."""
        self.vectors = self.index_dir.vector_search(self.device, self.vector_backend)

    @property
    def calibration(self) -> Calibration | None:
        return self.index_dir.calibration

    def default_marginals(self) -> str:
        """``auto`` on an index without a calibration: the measured default where the index allows
        it (cross-correlation needs full-size patches), else its stored weights, else uniform."""
        manifest = self.index_dir.manifest
        if DEFAULT_MARGINALS == "crosscorr" and not manifest.pca_dim:
            return "crosscorr"
        return "rollout" if manifest.patch_weights != "uniform" else "uniform"

    def index_defaults(self) -> dict[str, Any]:
        """The last layer of a search's settings: the preset measured on this index's patch features
        (:func:`indexer.search_params.features_preset`), with the marginals the index allows."""
        m = self.index_dir.manifest
        name = features_preset(m.grid, m.patch_layer, self.backbone.native_grid, self.backbone.depth)
        return {**PRESETS[name], "marginals": self.default_marginals()}

    def effective(self, settings: SearchSettings, service: Mapping[str, Any] | None = None) -> SearchSettings:
        """The one resolution of a search's settings: each parameter from the request (``settings``), else
        the index's calibration, else the ``service``'s configured defaults, else the preset measured on the
        index's patch features (:meth:`index_defaults`); ``auto`` marginals resolved; validated (ValueError
        names the bad parameter)."""
        settings.validate()
        calibrated = self.calibration.setting() if self.calibration is not None else None
        if calibrated is not None and calibrated.get("marginals") == "rollout" \
                and self.index_dir.manifest.patch_weights == "uniform":
            calibrated["marginals"] = "uniform"
        filled = settings.filled(calibrated, service, self.index_defaults())
        filled = dataclasses.replace(filled, marginals=self.resolve_marginals(filled.marginals))
        filled.validate()
        return filled

    def resolve_marginals(self, marginals: str) -> str:
        """The marginals a search uses (``auto``: see :meth:`effective`); refuses what the index cannot do."""
        manifest = self.index_dir.manifest
        if marginals == "auto":
            return self.effective(SearchSettings()).marginals
        if marginals == "rollout" and manifest.patch_weights == "uniform":
            raise ValueError("this index stores no rollout weights: use crosscorr or uniform")
        if marginals == "crosscorr" and manifest.pca_dim:
            raise ValueError("this index's patches are reduced by a PCA: cross-correlation needs full-size "
                             "patches; use rollout or uniform")
        return marginals

    def query_weight_kind(self, marginals: str) -> str | None:
        """The per-image weights a query needs for ``marginals``: the index's stored kind for
        ``rollout`` (the only case that captures attention), ``uniform`` for uniform (no
        attention), None for ``crosscorr`` (per-pair weights from the features alone)."""
        if marginals == "rollout":
            return self.index_dir.manifest.patch_weights
        return "uniform" if marginals == "uniform" else None

    def search(
        self, images: Sequence[Image.Image], settings: SearchSettings = SearchSettings(), keep_plans: bool = False,
        where: Filter | None = None,
    ) -> list[QueryResult]:
        """Search every image; results are sorted best first. ``where``: only the images a filter allows
        (:mod:`indexer.filters`) are searched, exactly, before the structural stage.

        The batch is embedded in one forward, searched in one FAISS call and reranked in one
        batched OT solve (the candidates' stored features go to the device together). Each
        query's ``timings_ms`` are the batch's stage times: what every query of it waited.
        The query is embedded with attention capture only when its own weights are the OT
        marginal (``rollout``); ``query.patch_weights`` are then those weights, uniform ones
        for ``uniform`` and None for ``crosscorr`` (whose weights are per pair).
        Everything stays on the searcher's device except what the caller reads: the top
        hits' scores; with ``keep_plans`` also, per returned reranked hit, its correspondences (the
        transport plan or the MNN matches), the patch masses the scorer used and its features, and
        the query's features (what an explanation picture needs).
        Without it ``query`` stays on the device.
        """
        settings = self.effective(settings)
        marginals = settings.marginals
        t0 = time.perf_counter()
        query = embed_pil_images(self.backbone, images,
                                 self.query_weight_kind(marginals if settings.scorer == "ot" else "uniform"))
        if self.index_dir.pca is not None:  # on the device
            query.patch_features = self.index_dir.pca.transform_tensor(query.patch_features)
        t1 = time.perf_counter()
        k = max(settings.top_k, settings.rerank_k)
        if where is None:
            scores, ids = self.vectors.search(query.global_features, k)
        else:
            scores, ids = self._search_within(query.global_features, k, self.index_dir.ids_where(where))
        t2 = time.perf_counter()
        candidates = [self._candidates(scores[q], ids[q], settings.rerank_k) for q in range(len(images))]
        t_gathered = time.perf_counter()
        reranked = self._rerank(query, candidates, settings, marginals, keep_plans)
        t_structural = time.perf_counter()
        if keep_plans:  # one copy each for the whole batch
            query = query.to("cpu")
        results = [self._result(query[q], candidates[q], reranked[q], settings, marginals) for q in range(len(images))]
        t3 = time.perf_counter()
        # rerank = gather (the candidates' rows and stored features) + structural (the scorer, the fusion
        # and the sort, on the device) + final (the hits built on the CPU)
        timings = {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "rerank": (t3 - t2) * 1e3,
                   "gather": (t_gathered - t2) * 1e3, "structural": (t_structural - t_gathered) * 1e3,
                   "final": (t3 - t_structural) * 1e3, "total": (t3 - t0) * 1e3}
        for r in results:
            r.timings_ms = dict(timings)
            r.settings = settings
        return results

    def _search_within(self, queries: torch.Tensor, k: int, allowed: np.ndarray,
                       chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` by cosine among the ``allowed`` FAISS ids (their stored vectors, ``chunk`` at a time):
        scores and ids ``(Q, k)``, best first, id -1 where fewer exist (as FAISS pads)."""
        parts = (allowed[start:start + chunk] for start in range(0, len(allowed), chunk))
        chunks = ((ids, self.index_dir.global_vectors(ids)) for ids in parts)
        scores, ids = exact_search(queries.detach().float().cpu().numpy(), chunks, k)
        return scores.astype(np.float32), ids

    def _candidates(self, scores: np.ndarray, ids: np.ndarray, rerank_k: int) -> "_Candidates":
        valid = ids >= 0  # FAISS pads with -1 when it finds fewer than asked
        scores, ids = scores[valid], ids[valid]
        k = min(rerank_k, len(ids))
        rows, feats = self.index_dir.features([int(i) for i in ids], decode=False) if len(ids) else ([], None)
        return _Candidates(scores, ids, rows, feats, k)

    def _stacked_candidates(self, candidates: list["_Candidates"], qs: list[int], K: int) -> tuple[Features, torch.Tensor]:
        """The first ``K`` candidates of the queries ``qs`` as one batch on the device (one copy
        per part); in an index of patch codes the codes are decoded there, by a gather of
        centroids (rounded to float16, as stored patch vectors are)."""
        dev = self.device
        parts = [candidates[q].feats.take(slice(K)) for q in qs]
        feats = StoredFeatures.stack(parts).to_device(dev)  # (Q, K, ...)
        if self.index_dir.codec is not None:
            feats.patch_features = self.index_dir.decode_patches(feats.patch_features, dev).to(torch.float16)
        scores = torch.from_numpy(np.stack([candidates[q].scores[:K] for q in qs])).to(dev)
        return feats, scores

    def _rerank(self, query: Features, candidates: list["_Candidates"], settings: SearchSettings, marginals: str,
                keep_plans: bool) -> list["_Reranked | None"]:
        """One batched solve over every query with the same number of candidates to rerank; what
        comes back to the CPU is each query's top hits (order, sigma, final score) and, with
        ``keep_plans``, the plans."""
        out: list[_Reranked | None] = [None] * len(candidates)
        by_k: dict[int, list[int]] = {}
        for q, c in enumerate(candidates):
            if c.k > 0:
                by_k.setdefault(c.k, []).append(q)
        for K, qs in by_k.items():
            feats, scores = self._stacked_candidates(candidates, qs, K)
            res = rerank_batch(query[qs], feats, scores, **rerank_options(settings.values()))
            top = res.order[:, : settings.top_k]  # the reranked candidates that can be returned
            picked = torch.stack((top.to(torch.float64), res.structural_scores.gather(1, top).double(),
                                  res.final_scores.gather(1, top).double())).cpu()  # one copy: (3, Q, top)
            order = picked[0].long().tolist()
            sigma, final = picked[1].tolist(), picked[2].tolist()
            kept = None
            if keep_plans:  # only the hits that can be returned are explained: one gather each, one copy each
                mu_q, mu_x = res.pair_marginals(top)
                rows = torch.arange(len(qs), device=top.device)[:, None]
                kept = (res.pair_plans(top).cpu(), mu_q.cpu(), mu_x.cpu(), feats[rows, top].to("cpu"))
            for i, q in enumerate(qs):
                out[q] = _Reranked(order[i], sigma[i], final[i], None if kept is None else tuple(
                    part[i] for part in kept))
        return out

    def _result(self, query: Features, c: "_Candidates", reranked: "_Reranked | None", settings,
                marginals) -> QueryResult:
        order = list(range(len(c.ids)))
        structural: list[float | None] = [None] * len(c.ids)
        final = [float(x) for x in c.scores]
        pairs: dict[str, PairMatch] = {}
        candidates, candidate_ids = None, []
        if reranked is not None:
            # reranked.order holds min(top_k, K) positions; beyond K: global order, below the reranked
            order = reranked.order + order[c.k :]
            for i, sigma, fin in zip(reranked.order, reranked.sigma, reranked.final):
                structural[i], final[i] = sigma, fin
            if reranked.kept is not None:
                plans, mu_q, mu_x, candidates = reranked.kept  # in reranked.order
                candidate_ids = [c.rows[i].id for i in reranked.order]
                # clone: a view would keep the whole batch's copy alive wherever one result is kept
                pairs = {image_id: PairMatch(plans[j].clone(), mu_q[j].clone(), mu_x[j].clone())
                         for j, image_id in enumerate(candidate_ids)}
                candidates = candidates.clone()
        hits = []
        for after, i in enumerate(order[: settings.top_k]):
            r = c.rows[i]
            hits.append(Hit(r.id, r.label, r.path, r.metadata, float(c.scores[i]), structural[i], final[i], i, after,
                            int(c.ids[i]), self.index_dir.image_file(r)))
        return QueryResult(
            hits=hits, timings_ms={}, random_weights=self.backbone.random_weights, marginals=marginals,
            query=query,
            pairs=pairs, candidates=candidates, candidate_ids=candidate_ids,
        )


@dataclass
class _Reranked:
    """What comes back to the CPU of one query's rerank: the positions (among its K) of its first
    ``top_k`` by final score, their sigma and final scores, and, when plans are kept, for those
    same candidates in that order: plans ``(t, n, m)``, patch masses ``(t, n)``, ``(t, m)`` and features."""

    order: list[int]
    sigma: list[float]
    final: list[float]
    kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Features] | None = None


@dataclass
class _Candidates:
    """One query's FAISS candidates with their metadata and stored features."""

    scores: np.ndarray
    ids: np.ndarray
    rows: list
    feats: StoredFeatures | None
    k: int  # how many of them are reranked
