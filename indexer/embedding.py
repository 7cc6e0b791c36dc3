"""Embed images: decode in DataLoader workers, one forward per batch, features out.

One call computes each image's global vector, patch grid and patch weights (rollout
when configured) together, so the backbone runs once per image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reranker.backbones import Backbone, BackboneOutput
from reranker.features import Features, StoredFeatures
from reranker.marginals import PerImageWeights

from .image_copies import copy_of
from .loading import ImageLoadError, LoadLimits, content_hash, load_image, read_bytes
from .sources import ImageRecord


@dataclass
class Failure:
    """An image that was skipped, and why."""

    position: int
    id: str
    path: str
    reason: str
    message: str


@dataclass
class EmbeddedBatch:
    """One batch of records: the rows that loaded with their features, row for row, and the ones
    that did not."""

    positions: list[int]  # indices into the records given
    hashes: list[str]
    sizes: list[tuple[int, int]]
    nbytes: list[int]
    features: StoredFeatures | None  # float32, every kind asked for; None when no image loaded
    failures: list[Failure] = field(default_factory=list)
    copies: list[tuple[bytes, str] | None] = field(default_factory=list)  # the kept copy of each (image_copies)


#: A record's image decoded already by the caller (e.g. a service that decoded an upload within its own
#: bounds): the image, possibly reduced, and the original's size. Its file is then read, not decoded.
PreDecoded = tuple[Image.Image, tuple[int, int]]


class _GalleryDataset(Dataset):
    """Decodes one record in a worker: (position, tensor | None, hash, size, bytes, error, copy | None)."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable, limits: LoadLimits,
                 decoded: Mapping[str, PreDecoded] | None = None, copies: int | str | None = None) -> None:
        self.records, self.transform, self.limits = records, transform, limits
        self.decoded = decoded or {}
        self.copies = copies

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            data = read_bytes(rec.path, self.limits)
            if rec.path in self.decoded:
                image, size = self.decoded[rec.path]
            else:
                image = load_image(data, self.limits)
                size = image.size
            kept = None if self.copies is None else copy_of(data, image, self.copies, Path(rec.path).suffix, size)
            return i, self.transform(image), content_hash(data), size, len(data), None, kept
        except ImageLoadError as err:
            return i, None, None, None, None, (err.reason, err.message), None
        except Exception as err:  # noqa: BLE001 - a transform failure must not abort a build
            return i, None, None, None, None, ("corrupt", f"{type(err).__name__}: {err}"), None


def _collate(items: list) -> list:
    return items


def autocast_for(device: torch.device):
    """bf16 (or fp16 where bf16 is unsupported) autocast on a GPU; nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.inference_mode()
def forward_features(backbone: Backbone, images: torch.Tensor, kinds: Sequence[str]) -> BackboneOutput:
    """The backbone's output for a preprocessed batch (on its device, float32), with each kind of
    patch weights, all from one forward; rollout is folded block by block as the forward runs."""
    device = backbone.device
    with autocast_for(device):
        return backbone(images.to(device, non_blocking=True), patch_weights=tuple(kinds)).float()


def embed_pil_images(
    backbone: Backbone, images: Sequence[Image.Image], kind: PerImageWeights | None
) -> Features:
    """Features of in-memory images (e.g. a query) on the backbone's device: ``(B, D)``,
    ``(B, G*G, D)`` and one kind of patch weights ``(B, G*G)``, or None with ``kind=None``.
    Attention is captured only for kinds read from it (not for uniform or None): the forward
    otherwise keeps its fused attention."""
    batch = torch.stack([backbone.transform(im.convert("RGB")) for im in images])
    return forward_features(backbone, batch, () if kind is None else (kind,)).features(kind)


def embed_records(
    backbone: Backbone,
    records: Sequence[ImageRecord],
    *,
    kinds: Sequence[str] = ("rollout",),
    batch_size: int = 32,
    workers: int = 2,
    limits: LoadLimits = LoadLimits(),
    progress: bool = True,
    description: str = "embedding",
    decoded: Mapping[str, PreDecoded] | None = None,
    copies: int | str | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed ``records`` in order, yielding one :class:`EmbeddedBatch` per batch (``decoded``: images of
    some records' paths that are decoded already, see :data:`PreDecoded`; ``copies``: make each image's
    copy for the index, see :mod:`indexer.image_copies`, in the decode workers).

    Bad files never stop the iteration: they come back in ``failures`` with a reason.
    """
    dataset = _GalleryDataset(records, backbone.transform, limits, decoded, copies)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=backbone.device.type == "cuda",
        persistent_workers=False,
    )
    bar = tqdm(total=len(records), unit="img", desc=description, disable=not progress, dynamic_ncols=True)
    skipped = 0
    try:
        for items in loader:
            good = [it for it in items if it[5] is None]
            failures = [
                Failure(i, records[i].id, records[i].path, err[0], err[1]) for i, *_, err, _ in items if err is not None
            ]
            skipped += len(failures)
            features = forward_features(backbone, torch.stack([it[1] for it in good]), kinds).stored() if good else None
            yield EmbeddedBatch(
                positions=[it[0] for it in good],
                hashes=[it[2] for it in good],
                sizes=[it[3] for it in good],
                nbytes=[it[4] for it in good],
                features=features,
                failures=failures,
                copies=[it[6] for it in good],
            )
            bar.update(len(items))
            if skipped:
                bar.set_postfix(skipped=skipped)
    finally:
        bar.close()
