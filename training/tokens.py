"""The frozen first blocks: run once over every image, their output tokens cached (in memory and on
disk, so a resumed run does not pay for them again); or, with augmentation, run per batch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from indexer.loading import load_image
from indexer.sources import ImageRecord


class ImageFiles(Dataset):
    """``records[i]`` decoded and transformed: a ``(3, H, W)`` tensor."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable) -> None:
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.records[i].path))


def frozen_tokens(model: nn.Module, images: torch.Tensor, freeze: int) -> torch.Tensor:
    """The input of block ``freeze`` of a timm ViT: ``(B, 3, H, W)`` -> ``(B, T, C)`` (prefix + patch tokens)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[:freeze]:
        x = block(x)
    return x


def load_images(records: Sequence[ImageRecord], transform: Callable, batch_size: int, workers: int,
                shuffle: bool = False) -> DataLoader:
    return DataLoader(ImageFiles(records, transform), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, persistent_workers=False)


@torch.no_grad()
def compute_token_cache(model: nn.Module, transform: Callable, records: Sequence[ImageRecord], freeze: int,
                        device: torch.device, batch_size: int = 32, workers: int = 2,
                        progress: bool = True) -> torch.Tensor:
    """``(N, T, C)`` float16 tokens on the CPU: the frozen blocks' output for every image."""
    from tqdm import tqdm

    model.eval()
    chunks: list[torch.Tensor] = []
    batches = load_images(records, transform, batch_size, workers)
    for images in tqdm(batches, desc=f"frozen blocks 0-{freeze - 1} (once)", disable=not progress, unit="batch"):
        chunks.append(frozen_tokens(model, images.to(device), freeze).to("cpu", torch.float16))
    return torch.cat(chunks)


def cached_tokens(cache_dir: Path, key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tokens made under ``key`` (model, weights, freeze, images...) from ``cache_dir``; else
    ``compute()``, stored there (runs and resumes on the same images and frozen blocks share them)."""
    text = json.dumps(key, sort_keys=True)
    path = cache_dir / f"tokens-{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == text:
            return saved["tokens"]
    tokens = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    torch.save({"key": text, "tokens": tokens}, partial)
    partial.replace(path)
    return tokens
