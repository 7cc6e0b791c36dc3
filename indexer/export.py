"""Export an index's embeddings with their metadata as Parquet (one row an image), for analysis elsewhere.

Columns: ``faiss_id``, ``id``, ``path``, ``label``, ``content_hash``, ``width``, ``height``, ``metadata`` (JSON
text), ``global`` (the L2-normalised global vector, a fixed-size list of float32). The file is written a chunk of
rows at a time (the gallery is never in memory at once) and atomically: an interrupted export leaves nothing.
Needs ``pyarrow`` (the ``parquet`` extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic import fsync_path
from .index_dir import IndexDir

CHUNK = 8192


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("exporting Parquet needs pyarrow: pip install 'vit-rerank[parquet]'") from None
    return pa, pq


def export_parquet(index_dir: IndexDir, out: Path, chunk: int = CHUNK) -> int:
    """Write every image of ``index_dir`` to ``out``; returns how many rows were written."""
    pa, pq = _pyarrow()
    dim = index_dir.manifest.global_dim
    schema = pa.schema([
        ("faiss_id", pa.int64()), ("id", pa.string()), ("path", pa.string()), ("label", pa.string()),
        ("content_hash", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("metadata", pa.string()),
        ("global", pa.list_(pa.float32(), dim)),
    ])
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    rows = index_dir.rows()
    written = 0
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                vectors = index_dir.global_vectors(np.array([r.row for r in part], np.int64))
                writer.write_table(pa.table({
                    "faiss_id": [r.row for r in part], "id": [r.id for r in part], "path": [r.path for r in part],
                    "label": [r.label for r in part], "content_hash": [r.content_hash for r in part],
                    "width": [r.width for r in part], "height": [r.height for r in part],
                    "metadata": [json.dumps(r.metadata, sort_keys=True) for r in part],
                    "global": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
                }, schema=schema))
                written += len(part)
        fsync_path(partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written
