"""Shared fixtures. Nothing here reaches the network: the hub is put offline first."""

from __future__ import annotations

import os

import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere
# The onnx runtime's exported graphs go to a folder of this run, never the user's cache.
os.environ["VIT_RERANK_CACHE"] = tempfile.mkdtemp(prefix="vit-rerank-test-cache-")

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_WEIGHTS = SHARED_DATA.parent / "weights" / "dinov2_vits14.safetensors"
REQUIRE_SHARED = os.environ.get("VIT_RERANK_REQUIRE_SHARED") == "1"


def _shared(path: Path) -> Path:
    """``path`` under ``../shared``: skipped in a user's clone, a failure in CI (``.ci/run``)."""
    if not path.exists():
        if REQUIRE_SHARED:
            pytest.fail(f"{path} is missing, and VIT_RERANK_REQUIRE_SHARED=1 forbids skipping")
        pytest.skip(f"{path} is not present in this checkout")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``, the real photos."""
    return _shared(SHARED_DATA)


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """The real pretrained DINOv2 ViT-S/14 of ``../shared/weights``."""
    return _shared(REAL_WEIGHTS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_vit_kwargs() -> dict:
    """A 14x14-patch random ViT that runs in milliseconds: 112 px input, 8 px patches."""
    return dict(img_size=112, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def tiny_swin_kwargs() -> dict:
    return dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
