"""The built-in demo gallery (``serve --demo``): indexed once into a cache folder, then served."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from indexer.sources import ImageRecord

DEMO_GALLERY = Path(__file__).parent / "demo_gallery"


def cache_home() -> Path:
    """``$VIT_RERANK_HOME``, else ``~/.cache/vit-rerank``."""
    return Path(os.environ.get("VIT_RERANK_HOME") or Path.home() / ".cache" / "vit-rerank")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


def demo_index_dir(model: str, weights: str, model_kwargs: dict[str, Any] | None = None) -> Path:
    """One folder per model, weights identity and model arguments."""
    from reranker.backbones import weights_identity

    name = f"demo-{_slug(model)}-{_slug(weights_identity(weights))}"
    if model_kwargs:
        name += "-" + hashlib.sha256(json.dumps(model_kwargs, sort_keys=True).encode()).hexdigest()[:8]
    return cache_home() / name


def ensure_demo_index(
    model: str, weights: str, device: torch.device, model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """The demo index for this backbone, built (or completed) on first use.

    Raises ``WeightsUnavailableError`` when the weights cannot be had; nothing is written then.
    """
    from indexer.build import add_records, backbone_for
    from indexer.gallery import Gallery

    folder = demo_index_dir(model, weights, model_kwargs)
    if (folder / "manifest.json").exists():
        records = demo_records()
        with Gallery.open(folder) as gallery:
            if {r.id for r in records} <= gallery.ids():
                return folder
            backbone = backbone_for(gallery.manifest, device, weights)
            print(f"completing the demo index in {folder}", file=sys.stderr)
            add_records(gallery, backbone, records, workers=0, progress=progress)
        return folder
    return build_demo_index(folder, model, weights, device, model_kwargs, progress=progress)


def demo_records() -> list[ImageRecord]:
    """The demo gallery's photos as index records (label: their folder)."""
    from indexer.sources import from_folder

    records = from_folder(DEMO_GALLERY, label_from_parent=True)
    for r in records:
        r.metadata = {"source": "clothing-dataset-small (demo gallery)"}
    return records


def build_demo_index(
    folder: Path, model: str, weights: str, device: torch.device, model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """A new index of the demo gallery in ``folder`` (rollout weights where the backbone has them).

    The backbone is made first: when its weights cannot be had, nothing is written.
    """
    from indexer.build import add_records, new_manifest
    from indexer.gallery import Gallery
    from reranker.backbones import create_backbone

    records = demo_records()
    backbone = create_backbone(model, weights, model_kwargs=model_kwargs)  # may raise: nothing written yet
    kind = "rollout" if backbone.supports_rollout else "uniform"
    manifest = new_manifest(backbone, weights_source=weights, patch_weights=kind, model_kwargs=model_kwargs)
    print(f"indexing the demo gallery ({len(records)} photos) into {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with Gallery.create(folder, manifest) as gallery:
        add_records(gallery, backbone.to(device), records, workers=0, progress=progress)
    return folder
