"""The indexer: ingest, storage, the FAISS index and search. Its front door:

>>> from indexer import IndexSpec, build_index, open_index, add_records, Searcher, SearchSettings
>>> report = build_index("gallery-index", backbone, from_source("photos/"), IndexSpec(patch_codes="pq32"))
>>> with open_index("gallery-index") as index:
...     add_records(index, backbone, more_records)         # embed, store, commit (resumable)
...     index.remove(["some-id"])                          # one transaction
...     hits = Searcher(index, backbone).search([image], SearchSettings(top_k=10))[0].hits

Names are resolved on first use, so ``import indexer.loading`` stays light (no torch, no FAISS).
"""

from __future__ import annotations

import importlib
from typing import Any

#: name -> the module that defines it
_EXPORTS = {
    "IndexSpec": "build", "plan_index": "build", "create_index": "build", "build_index": "build",
    "add_records": "build", "backbone_for": "build", "BuildReport": "build",
    "IndexDir": "index_dir", "open_index": "index_dir", "Gallery": "gallery",
    "Catalog": "catalog",
    "Searcher": "search", "SearchSettings": "search", "QueryResult": "search", "Hit": "search",
    "ImageRecord": "sources", "from_source": "sources",
    "Calibration": "calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
