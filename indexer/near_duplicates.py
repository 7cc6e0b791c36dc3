"""Near-duplicates: two images whose global vectors are closer than two distinct photos ever are.

An exact duplicate has the same bytes (``BuildReport.duplicates``); a near-duplicate is the same
photo resized, re-encoded or cropped a little. Both are told apart from distinct photos of the same
class or place by the cosine of their global vectors, above a threshold measured per backbone.

Measured threshold: see :data:`NEAR_DUPLICATE_COSINE`. Unmeasured backbones (and random weights)
get no flag and no build-time pairs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "NEAR_DUPLICATE_COSINE", "NearDuplicateFinder", "near_copies", "near_duplicate_pairs", "threshold_for",
]

#: Global-cosine threshold per backbone, measured on the shared photos with the real weights.
#:
#: ``vit_small_patch14_dinov2`` (shared ``dinov2_vits14.safetensors``, resize 256 + crop 224), measured
#: with :func:`near_copies` on 80 clothing-small/validation photos (8 per class) and 40 corridor
#: reference frames (every other one), global cosine of a photo with its copy:
#:
#: ===========  ==========================  =====================================================
#: copy         clothing: min / median      share >= 0.98: clothing / corridor (160x120 frames)
#: ===========  ==========================  =====================================================
#: resized 1/2  0.981 / 0.997               1.00 / 0.23
#: JPEG q30     0.981 / 0.996               1.00 / 0.20
#: crop 6 %     0.824 / 0.976 (all sets)    0.38 / 0.42
#: all three    0.672 / 0.944 (all sets)    0.21 / 0.00
#: ===========  ==========================  =====================================================
#:
#: and of distinct photos: the same clothing class (280 pairs) max 0.966, p99 0.948 (none >= 0.98);
#: a corridor query and its ground-truth frames of the same place (549 pairs) max 0.978, p99 0.972
#: (none >= 0.98; 2.9 % >= 0.97); consecutive corridor frames (110 pairs, nearly the same picture)
#: median 0.967, 24.5 % >= 0.98. 0.98 is the gap between the most similar distinct photos (0.978)
#: and the least similar resized or re-encoded photo (0.981): no false flag on 829 distinct pairs,
#: every resized or re-encoded photo caught; a 6 % crop is caught about 4 times in 10, and copies
#: of tiny (160x120) frames rarely.
NEAR_DUPLICATE_COSINE: dict[str, float] = {"vit_small_patch14_dinov2": 0.98}

#: With the patch matches (``scripts/near_duplicate_rule.py``): a pair is also a near-duplicate when its global
#: cosine is at least ``global`` and at least ``share`` of the query's patches have a mutual nearest neighbour
#: with a patch cosine above ``tau``, on the index's default patch features (block -3, the native 16 x 16 grid).
#: Measured with the shared DINOv2 on 680 copies (80 clothing photos and 56 corridor frames, each resized,
#: JPEG q30, cropped 6 %, rotated 5 degrees, and all three) and 829 distinct pairs (same clothing class, same
#: corridor place): the global cosine alone (0.98) flags 49.1 % of the copies; with this rule as well, 84.6 %
#: (cropped 35 -> 89 %, rotated 66 -> 99 %, resized + cropped + re-encoded 12 -> 38 %, corridor frames
#: included); neither flags a distinct pair. Of the 574 distinct pairs with a global cosine >= 0.85, the most
#: matched has a share of 0.285: ``share`` 0.4 keeps a margin (0.3 would catch 89.0 %, with none).
STRUCTURE_RULE: dict[str, dict[str, float]] = {
    # patch_layer as the manifest records it: block 9 of 12 (-3)
    "vit_small_patch14_dinov2": {"global": 0.85, "tau": 0.7, "share": 0.4, "patch_layer": 9, "grid": 16},
}

_NEIGHBOURS = 8  # nearest neighbours examined per new image at build time


def structure_rule(manifest) -> dict[str, float] | None:
    """The structural rule for an index's features, or None (another backbone or other patch features)."""
    rule = STRUCTURE_RULE.get(manifest.model)
    if rule is None or manifest.patch_layer != rule["patch_layer"] or manifest.grid != rule["grid"]:
        return None
    if manifest.pca_dim or manifest.patch_codes:  # measured on full patch vectors only
        return None
    return rule


def matched_share(query_patches, candidate_patches, tau: float) -> float:
    """The share of the query's patches with a mutual nearest neighbour among the candidate's above ``tau``."""
    import torch

    from reranker.mnn import mutual_nearest_neighbours

    q = torch.as_tensor(query_patches).float()
    c = torch.as_tensor(candidate_patches).float()
    return float(mutual_nearest_neighbours((q @ c.T)[None], tau).score[0])


def near_duplicate_flags(manifest, random_weights: bool, result) -> dict[str, bool | None]:
    """Each hit's flag in a search result (:class:`indexer.search.QueryResult`): :func:`is_near_duplicate`
    with the patches of the query and of each hit the search kept (``keep_plans``), else by the cosine.

    Where the search itself matched by mutual nearest neighbours at a threshold no higher than the rule's
    ``tau``, the share is read off its matches (:func:`share_of_matches`) instead of matching the pair again:
    the same number for ~1.6 ms less per hit (16 ms of a served search's 10 hits on this project's CPU)."""
    query_patches = None if result.query is None else result.query.patch_features
    candidates = set(result.candidate_ids) if query_patches is not None else set()
    kept = [h.id for h in result.hits if h.id in candidates]
    rule = structure_rule(manifest)
    settings = getattr(result, "settings", None)
    reuse = (rule is not None and settings is not None and settings.scorer == "mnn"
             and settings.threshold is not None and settings.threshold <= rule["tau"])
    if reuse:
        shares = {i: share_of_matches(result.pairs[i].plan, rule["tau"]) for i in kept if i in result.pairs}
        return {h.id: is_near_duplicate(manifest, random_weights, h.global_score, share=shares.get(h.id))
                for h in result.hits}
    patches = dict(zip(kept, result.candidates_of(kept).patch_features)) if kept else {}  # one gather
    return {h.id: is_near_duplicate(manifest, random_weights, h.global_score, query_patches, patches.get(h.id))
            for h in result.hits}


def share_of_matches(plan, tau: float) -> float:
    """:func:`matched_share` read off a search's mutual-nearest-neighbour matches ``plan (n, m)`` (each
    match's cosine / n, 0 elsewhere: :func:`reranker.mnn.correspondence_plan`) made at a threshold <= ``tau``:
    mutuality does not depend on the threshold, so the matches above ``tau`` are the ones it would find."""
    n = plan.shape[0]
    return float((plan > tau / n).sum()) / n


def is_near_duplicate(manifest, random_weights: bool, cosine: float, query_patches=None,
                      candidate_patches=None, share: float | None = None) -> bool | None:
    """Whether a pair is a near-duplicate: its global cosine at the measured threshold, or, where the
    structural rule applies and the patches (or their matched ``share``, already measured) are given, a lower
    cosine with enough matched patches. None when nothing is measured for this backbone (or the weights are
    random)."""
    threshold = threshold_for(manifest.model, random_weights)
    if threshold is None:
        return None
    if cosine >= threshold:
        return True
    rule = structure_rule(manifest)
    if rule is None or cosine < rule["global"]:
        return False
    if share is None:
        if query_patches is None or candidate_patches is None:
            return False
        share = matched_share(query_patches, candidate_patches, rule["tau"])
    return share >= rule["share"]


def threshold_for(model: str, random_weights: bool = False) -> float | None:
    """The measured threshold of ``model``; None when unmeasured or with random weights."""
    return None if random_weights else NEAR_DUPLICATE_COSINE.get(model)


def near_copies(image: Image.Image) -> dict[str, Image.Image]:
    """The near copies of one photo the threshold was measured on: resized to half, re-encoded as a
    JPEG of quality 30, cropped 6 % on every side, and all three at once."""
    rgb = image.convert("RGB")
    w, h = rgb.size

    def reencode(im: Image.Image, quality: int = 30) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        return out

    def crop(im: Image.Image, frac: float = 0.06) -> Image.Image:
        dx, dy = round(im.width * frac), round(im.height * frac)
        return im.crop((dx, dy, im.width - dx, im.height - dy))

    half = rgb.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR)
    return {"resized": half, "jpeg30": reencode(rgb), "cropped": crop(rgb), "all": reencode(crop(half))}


def near_duplicate_pairs(
    vectors: np.ndarray, ids: Sequence[str], threshold: float, exclude: set[frozenset[str]] = frozenset(),
) -> list[tuple[str, str, float]]:
    """Every pair among ``vectors`` (L2-normalised rows) with cosine >= ``threshold``, as
    ``(id, other id, cosine)`` by decreasing cosine; pairs in ``exclude`` (exact copies) are left out."""
    vectors = np.asarray(vectors, dtype=np.float32)
    sims = vectors @ vectors.T
    rows, cols = np.nonzero(np.triu(sims >= threshold, k=1))
    pairs = [(ids[i], ids[j], float(sims[i, j])) for i, j in zip(rows, cols)
             if ids[i] != ids[j] and frozenset((ids[i], ids[j])) not in exclude]
    return sorted(pairs, key=lambda p: -p[2])


@dataclass
class NearDuplicateFinder:
    """Finds, at build time, the indexed images closest to each newly added one (FAISS search).

    ``add`` is called with each committed chunk; the search waits until the gallery's index is
    trained (``finish`` after training). ``exact`` holds the build's exact duplicates, not repeated.
    """

    index_dir: object  # indexer.index_dir.IndexDir
    threshold: float
    exact: list[tuple[str, str]] = field(default_factory=list)
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    _waiting: list[tuple[list[str], np.ndarray]] = field(default_factory=list)
    _seen: set[frozenset[str]] = field(default_factory=set)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        self._waiting.append((list(ids), np.asarray(vectors, dtype=np.float32)))
        if self.index_dir.trained:
            self._flush()

    def finish(self) -> list[tuple[str, str, float]]:
        """Check what is still waiting; the pairs found, by decreasing cosine."""
        self._flush()
        return sorted(self.pairs, key=lambda p: -p[2])

    def _flush(self) -> None:
        index = self.index_dir.faiss
        exact = {frozenset(p) for p in self.exact}
        rule = structure_rule(self.index_dir.manifest)
        lowest = self.threshold if rule is None else min(self.threshold, rule["global"])
        while self._waiting and index.ntotal:
            ids, vectors = self._waiting.pop(0)
            scores, neighbours = index.search(np.ascontiguousarray(vectors), min(_NEIGHBOURS, index.ntotal))
            found = [(k, int(f), float(s)) for k, (row_s, row_f) in enumerate(zip(scores, neighbours))
                     for s, f in zip(row_s, row_f) if f >= 0 and s >= lowest]
            rows = self.index_dir.rows_by_faiss_id(sorted({f for _, f, _ in found}))
            for k, f, s in found:
                other = rows[f].id if f in rows else None
                key = frozenset((ids[k], other))
                if other is None or other == ids[k] or key in exact or key in self._seen:
                    continue
                if s < self.threshold and not self._structure_agrees(ids[k], f, rule):
                    continue
                self._seen.add(key)
                self.pairs.append((ids[k], other, s))

    def _structure_agrees(self, new_id: str, other_row: int, rule: dict[str, float]) -> bool:
        """The structural rule's patch check for a pair below the cosine threshold (both images committed)."""
        new = self.index_dir.db.rows_by_id([new_id]).get(new_id)
        if new is None:
            return False
        _, feats = self.index_dir.features([new.row, other_row])
        return matched_share(feats.patch_features[0], feats.patch_features[1], rule["tau"]) >= rule["share"]


def finder_for(index_dir, random_weights: bool, exact: list[tuple[str, str]]) -> NearDuplicateFinder | None:
    """The build's finder, or None when the gallery's backbone has no measured threshold."""
    threshold = threshold_for(index_dir.manifest.model, random_weights)
    return None if threshold is None else NearDuplicateFinder(index_dir, threshold, exact)
