"""``index verify``: that FAISS, the patch store, the codebook and the metadata of an index directory
agree, and that every committed file is byte for byte what its commit recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .patch_codes import PatchCodec
from .vector_index import index_ids

if TYPE_CHECKING:
    from .index_dir import IndexDir


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: int = 0


def verify_index(index: "IndexDir", checksums: bool = True) -> VerifyReport:
    """Check that FAISS, the patch store and the metadata agree, and (with ``checksums``) that every
    segment file and the patch codebook are byte for byte what the commits recorded."""
    problems: list[str] = []
    conn = index.db.conn
    meta_ids = np.fromiter((r for (r,) in conn.execute("SELECT row FROM images ORDER BY row")), np.int64)
    n = len(meta_ids)
    held = int(index.faiss.ntotal)
    if index.holds_faiss():
        faiss_ids = np.sort(index_ids(index.faiss))
        if held != n:
            problems.append(f"FAISS holds {held} vectors, the metadata {n} images")
        if not np.array_equal(faiss_ids, meta_ids):
            missing = len(np.setdiff1d(meta_ids, faiss_ids))
            stale = len(np.setdiff1d(faiss_ids, meta_ids))
            problems.append(f"{missing} images missing from FAISS, {stale} stale FAISS ids")
    elif held:
        problems.append(f"the index is not trained yet, but FAISS holds {held} vectors")
    per_segment = conn.execute("SELECT segment, COUNT(*), MAX(offset) FROM images GROUP BY segment").fetchall()
    for seg, count, last in per_segment:
        if seg not in index.segments:
            problems.append(f"segment {seg} is referenced by images but not live")
            continue
        recorded = index.checksums.get(str(seg))
        if checksums and recorded:
            try:
                actual = index.store.digests(seg)
            except OSError as err:
                problems.append(f"segment {seg} unreadable: {err}")
                continue
            bad = sorted(part for part in recorded if actual.get(part) != recorded[part])
            if bad:
                problems.append(f"segment {seg}: {', '.join(bad)} file(s) differ from what was committed "
                                "(corrupt or half-written)")
                continue
        try:
            arrays = index.store.segment(seg)
        except (OSError, ValueError) as err:
            problems.append(f"segment {seg} unreadable: {err}")
            continue
        rows = len(arrays["global"])
        patch = arrays[index.store.patch_part]
        if len(patch) != rows or len(arrays["weights"]) != rows:
            problems.append(f"segment {seg} has parts of different lengths")
        if index.codec is not None and patch.shape[-1] != index.codec.subquantizers:
            problems.append(f"segment {seg}: codes of {patch.shape[-1]} bytes, the codebook has "
                            f"{index.codec.subquantizers} sub-quantizers")
        if last >= rows:
            problems.append(f"segment {seg}: offsets out of range ({last} >= {rows})")
    problems += _verify_codec(index)
    if not problems and n and index.manifest.factory == "Flat":
        sample = [(r, s, o) for r, s, o in conn.execute("SELECT row, segment, offset FROM images ORDER BY row "
                                                        "LIMIT 256")]
        stored = index.store.gather([(s, o) for _, s, o in sample]).global_features
        recon = np.stack([index.faiss.reconstruct(int(r)) for r, _, _ in sample])
        if not np.allclose(recon, stored, atol=1e-5):
            problems.append("FAISS vectors differ from the stored global vectors")
    return VerifyReport(ok=not problems, problems=problems, checked=n)

def _verify_codec(index: "IndexDir") -> list[str]:
    if not index.manifest.patch_codes or not len(index):
        return []
    if not PatchCodec.exists(index.folder):
        return ["the index stores patch codes but codes.npz is missing"]
    if index.codec_digest and PatchCodec.digest(index.folder) != index.codec_digest:
        return ["codes.npz differs from the codebook that was committed (corrupt or half-written)"]
    try:
        PatchCodec.load(index.folder)
    except (OSError, ValueError, KeyError) as err:
        return [f"codes.npz unreadable: {err}"]
    return []
