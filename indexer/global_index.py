"""The FAISS index of an index directory: trained, filled, tuned, checked and retrained.

A flat index holds every vector from the first commit. A non-flat one (or ``--factory auto``,
which chooses by size and memory budget: :mod:`indexer.index_plan`) holds no FAISS file until it
is trained: on a sample, then filled segment by segment (no whole-gallery array), its search
parameter tuned for the target recall. It is retrained, and the report says so, once the gallery
has grown ``RETRAIN_GROWTH`` times past the size it was trained at.

:class:`GlobalIndexUpkeep` is a component of :class:`indexer.index_dir.IndexDir` (its ``upkeep``): it
works on the index it is given, whose FAISS state it changes (``faiss``, ``plan``, ``trained``,
``trained_at``) through the index's vector reads (``sample_global``, ``global_chunks``) and commit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from .index_plan import DEFAULT_MAX_MEMORY, IndexPlan, choose, tune
from .vector_index import AUTO, add_vectors, new_trained_index

if TYPE_CHECKING:
    from .index_dir import IndexDir

RETRAIN_GROWTH = 4  # a non-flat (or auto) index is retrained when the gallery reaches this many times its training size
RETRAIN_MIN = 1000  # ... and has at least this many images

log = logging.getLogger(__name__)


class GlobalIndexUpkeep:
    """Training, tuning, recall and retraining of the FAISS index of ``index``."""

    def __init__(self, index: "IndexDir") -> None:
        self.index = index

    def train(self) -> None:
        """Build the configured (non-flat, or ``auto``) FAISS index and commit it: trained on a sample,
        filled segment by segment, its search parameter tuned for the target recall (see
        :mod:`indexer.index_plan`)."""
        self.index.faiss = self._build_faiss()
        self.index.trained = True
        self.index.trained_at = len(self.index)
        self.index.faiss_mapped = False
        self.index.commit_faiss()
        self._record_plan()

    def plan_for(self, n: int) -> IndexPlan:
        """The index plan for ``n`` vectors: ``auto``'s choice, or the fixed factory."""
        m = self.index.manifest
        if m.factory == AUTO:
            return choose(n, m.global_dim, m.max_index_memory or DEFAULT_MAX_MEMORY, m.target_recall)
        plan = IndexPlan(m.factory, n, m.global_dim, m.max_index_memory or 0, 0, "the factory asked for",
                         target_recall=m.target_recall)
        plan.training_sample = n
        return plan

    def _build_faiss(self, without: np.ndarray | None = None) -> faiss.Index:
        n = len(self.index) - (0 if without is None else len(without))
        plan = self.plan_for(n)
        sample, _ = self.index.sample_global(plan.training_sample or 0)
        if without is not None and len(sample):
            sample, sample_ids = self.index.sample_global(plan.training_sample + len(without))
            sample = sample[~np.isin(sample_ids, without)][: plan.training_sample]
        index = new_trained_index(plan.factory, self.index.manifest.global_dim, sample)
        plan.training_sample = len(sample)
        for ids, vectors in self.index.global_chunks():
            if without is not None:
                keep = ~np.isin(ids, without)
                ids, vectors = ids[keep], vectors[keep]
            if len(ids):
                add_vectors(index, vectors, ids)
        if self.index.manifest.factory == AUTO or plan.factory != "Flat":
            self._tune(index, plan, without)
        self.index.plan = plan
        return index

    def _tune(self, index: faiss.Index, plan: IndexPlan, without: np.ndarray | None) -> None:
        queries, qids = self.index.sample_global(200, seed=1)
        if without is not None:
            keep = ~np.isin(qids, without)
            queries, qids = queries[keep], qids[keep]
        if len(queries) == 0:
            return

        def chunks():
            for ids, vectors in self.index.global_chunks():
                if without is not None:
                    keep = ~np.isin(ids, without)
                    ids, vectors = ids[keep], vectors[keep]
                yield ids, vectors

        tune(index, queries, qids, chunks, plan)

    def recall(self, queries: int = 100, k: int = 100, seed: int = 2) -> dict[str, Any]:
        """Recall@k of the FAISS index against exact search, on ``queries`` gallery vectors as queries."""
        from .index_plan import exact_top_k, recall_at_k

        vectors, qids = self.index.sample_global(queries, seed=seed)
        if len(qids) == 0 or not self.holds_faiss():
            return {"recall_at_k": None, "k": k, "queries": 0}
        approx = self.index.faiss.search(np.ascontiguousarray(vectors), k + 1)[1]
        exact = exact_top_k(vectors, self.index.global_chunks(), k + 1)
        return {"recall_at_k": recall_at_k(approx, exact, qids, k), "k": k, "queries": len(qids)}

    def needs_retraining(self) -> str | None:
        """Why the FAISS index should be retrained now (the gallery outgrew its training), or None."""
        if self.index.manifest.factory == "Flat" or not self.index.trained:
            return None
        n = len(self.index)
        if n >= RETRAIN_MIN and n >= RETRAIN_GROWTH * max(self.index.trained_at, 1):
            return (f"the gallery has {n} images, {n / max(self.index.trained_at, 1):.1f}x the {self.index.trained_at} "
                    f"its {self.index.manifest.factory} index was trained at")
        return None

    def codes_notice(self) -> str | None:
        """A note when the patch codes were trained on far fewer images than the gallery now holds."""
        if self.index.codec is None:
            return None
        n, grid = len(self.index), max(self.index.manifest.grid, 1) ** 2
        trained_images = self.index.codec.trained_on / grid
        if n >= RETRAIN_MIN and n >= 100 * trained_images:
            return (f"patch codes were trained on {self.index.codec.trained_on} patches (~{trained_images:.0f} images); the "
                    f"gallery has {n}: rebuild the index to retrain them if its content has changed")
        return None

    def retrain_if_outgrown(self) -> str | None:
        """Retrain FAISS when :meth:`needs_retraining` says so; returns the notice (also logged)."""
        reason = self.needs_retraining()
        if reason is None:
            return None
        before = self.index.plan.factory if self.index.plan else self.index.manifest.factory
        self.train()
        notice = f"retrained the FAISS index: {reason}; now {self.index.plan.factory if self.index.plan else before}"
        log.warning(notice)
        self.index.notices.append(notice)
        return notice

    def _record_plan(self) -> None:
        """Copy the committed plan into manifest.json (informational; the database is authoritative)."""
        if self.index.plan is None:
            return
        self.index.manifest.index_plan = self.index.plan.to_dict()
        try:
            self.index.manifest.save(self.index.folder)
        except OSError as err:
            log.warning("could not copy the index plan into the manifest: %s", err)

    def rebuild_without(self, faiss_ids: np.ndarray) -> int:
        self.index.faiss = self._build_faiss(without=faiss_ids)
        return len(faiss_ids)

    def holds_faiss(self) -> bool:
        """Whether FAISS holds the gallery's vectors (a non-flat index does not until trained)."""
        return self.index.trained or self.index.manifest.factory == "Flat"

    def faiss_description(self) -> str:
        """The FAISS index in use, e.g. ``IVF1024,Flat nprobe=16`` (``untrained`` before the first training)."""
        if not self.holds_faiss():
            return "untrained (built at the end of the build)"
        desc = self.index.plan.factory if self.index.plan is not None else self.index.manifest.factory
        if self.index.plan is not None and self.index.plan.search_param:
            desc += f" {self.index.plan.search_param}={self.index.plan.search_value}"
        return desc + (" (memory-mapped)" if self.index.faiss_mapped else "")

