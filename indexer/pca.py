"""Optional PCA of the patch tokens, fitted on the gallery, to shrink the patch store."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .atomic import write_bytes

if TYPE_CHECKING:
    import torch

PCA_NAME = "pca.npz"


class PatchPCA:
    """``x -> normalise((x - mean) @ components.T)`` with ``components`` ``(d, D)``."""

    def __init__(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.mean = mean.astype(np.float32)
        self.components = components.astype(np.float32)
        self._tensors: dict = {}  # device -> (mean, components.T) as torch tensors

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, patches: np.ndarray, dim: int, max_samples: int = 200_000, seed: int = 0) -> "PatchPCA":
        """Fit on patch vectors ``(..., D)`` (a random subset of at most ``max_samples``)."""
        x = patches.reshape(-1, patches.shape[-1]).astype(np.float32)
        if not 1 <= dim <= x.shape[1]:
            raise ValueError(f"PCA size must be in [1, {x.shape[1]}], got {dim}")
        if len(x) < dim:
            raise ValueError(f"PCA to {dim} dimensions needs at least {dim} patch vectors, got {len(x)}")
        if len(x) > max_samples:
            x = x[np.random.default_rng(seed).choice(len(x), max_samples, replace=False)]
        pca = faiss.PCAMatrix(x.shape[1], dim)
        pca.train(np.ascontiguousarray(x))
        components = faiss.vector_to_array(pca.A).reshape(-1, x.shape[1])[:dim]
        return cls(faiss.vector_to_array(pca.mean), components)

    def transform(self, patches: np.ndarray) -> np.ndarray:
        y = (patches.astype(np.float32) - self.mean) @ self.components.T
        return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

    def transform_tensor(self, patches: "torch.Tensor") -> "torch.Tensor":
        """:meth:`transform` in torch on the tensor's device: ``(..., D) -> (..., d)`` fp32,
        ``normalise((x - mean) @ components.T)``; the (small) matrices are copied to that device
        once and cached per device."""
        import torch

        device = patches.device
        cached = self._tensors.get(device)
        if cached is None:
            cached = (torch.from_numpy(self.mean).to(device), torch.from_numpy(self.components).T.contiguous().to(device))
            self._tensors[device] = cached
        mean, components_t = cached
        y = (patches.float() - mean) @ components_t
        return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1e-12)

    def save(self, folder: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components)
        write_bytes(Path(folder) / PCA_NAME, buf.getvalue())

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / PCA_NAME).is_file()

    @classmethod
    def load(cls, folder: Path) -> "PatchPCA":
        with np.load(Path(folder) / PCA_NAME) as data:
            return cls(data["mean"], data["components"])
