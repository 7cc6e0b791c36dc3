"""The deduplication report of an index: exact duplicates (the same bytes) and near-duplicates (global cosine
at or above the backbone's measured threshold, :mod:`indexer.near_duplicates`), with pictures of the pairs.

Near pairs are found with the index's own global search: each image's ``NEIGHBOURS`` nearest, a chunk of
images at a time, so the whole gallery is never compared with itself at once.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .index_dir import IndexDir
from .loading import load_image
from .near_duplicates import threshold_for

NEIGHBOURS = 8
PANEL = 256


@dataclass
class DuplicateReport:
    threshold: float
    exact: list[list[str]] = field(default_factory=list)  # groups of ids with the same bytes
    near: list[tuple[str, str, float]] = field(default_factory=list)  # (id, other id, cosine), best first

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "exact": self.exact,
                "near": [{"id": a, "other": b, "cosine": round(c, 6)} for a, b, c in self.near]}

    def write_csv(self, out: Path) -> None:
        """One row a pair: ``kind`` (exact / near), ``id``, ``other``, ``cosine`` (1 for exact)."""
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["kind", "id", "other", "cosine"])
            for group in self.exact:
                for other in group[1:]:
                    writer.writerow(["exact", group[0], other, 1.0])
            for a, b, c in self.near:
                writer.writerow(["near", a, b, f"{c:.6f}"])


def find_duplicates(index_dir: IndexDir, threshold: float | None = None, chunk: int = 4096) -> DuplicateReport:
    """Every exact-duplicate group and near-duplicate pair of ``index_dir`` (ValueError when the backbone has
    no measured threshold and none is given)."""
    if threshold is None:
        threshold = threshold_for(index_dir.manifest.model, index_dir.manifest.weights == "random")
        if threshold is None:
            raise ValueError(f"no near-duplicate threshold is measured for {index_dir.manifest.model!r} (or its "
                             "weights are random): give --threshold")
    rows = index_dir.rows()
    by_hash: dict[str, list[str]] = {}
    for r in rows:
        by_hash.setdefault(r.content_hash, []).append(r.id)
    exact = [ids for ids in by_hash.values() if len(ids) > 1]
    same = {r.id: r.content_hash for r in rows}
    id_of = {r.row: r.id for r in rows}
    report = DuplicateReport(threshold, exact)
    searcher = index_dir.vector_search()
    seen: set[frozenset[str]] = set()
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        faiss_ids = np.array([r.row for r in part], np.int64)
        scores, found = searcher.search(torch.from_numpy(index_dir.global_vectors(faiss_ids)),
                                        min(NEIGHBOURS + 1, len(rows)))
        for r, row_scores, row_found in zip(part, scores, found):
            for s, f in zip(row_scores, row_found):
                other = id_of.get(int(f))
                if other is None or other == r.id or s < threshold or same[other] == same[r.id]:
                    continue
                key = frozenset((r.id, other))
                if key not in seen:
                    seen.add(key)
                    report.near.append((r.id, other, float(s)))
    report.near.sort(key=lambda p: -p[2])
    return report


def pair_picture(first: str, second: str, caption: str) -> bytes:
    """The two images side by side (each at most 256 px) with a caption, as PNG."""
    panels = []
    for path in (first, second):
        im = load_image(path)  # bounded, the accepted formats only
        im.thumbnail((PANEL, PANEL))
        panels.append(im)
    out = Image.new("RGB", (2 * PANEL + 8, PANEL + 24), "white")
    for k, im in enumerate(panels):
        out.paste(im, (k * (PANEL + 8), 24))
    ImageDraw.Draw(out).text((4, 4), caption, fill="black")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
