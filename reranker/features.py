"""The one feature type: what reranking needs of an image, as tensors on one device.

An image is described by three tensors with the same leading axes (none for one image, ``(B,)``
for a batch, ``(Q, K)`` for each query's candidates):

* ``global_features``  ``(..., D)``       the global (CLS) vector, L2-normalised;
* ``patch_features``   ``(..., G*G, d)``  the patch vectors of a ``G x G`` grid, row-major,
  L2-normalised, any float dtype (stored patches are float16);
* ``patch_weights``    ``(..., G*G)``     per-patch weights (rollout and friends), or None.

The index stores the same triple as numpy arrays (:class:`indexer.patch_store.StoredFeatures`);
this module needs torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class Features:
    """Global vectors, patch vectors and patch weights of one or more images (see the module)."""

    global_features: torch.Tensor
    patch_features: torch.Tensor
    patch_weights: torch.Tensor | None = None

    @classmethod
    def from_numpy(cls, global_features: np.ndarray, patch_features: np.ndarray,
                   patch_weights: np.ndarray | None = None, device: torch.device | str = "cpu") -> "Features":
        """Tensors on ``device`` from arrays (dtypes kept; one copy per part)."""
        def move(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(move(global_features), move(patch_features), None if patch_weights is None else move(patch_weights))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Features":
        """``fn`` applied to each part (the weights only when there are any)."""
        w = self.patch_weights
        return Features(fn(self.global_features), fn(self.patch_features), None if w is None else fn(w))

    def to(self, device: torch.device | str) -> "Features":
        """The same features on ``device`` (no copy when they are already there)."""
        return self._apply(lambda t: t.to(device))

    def clone(self) -> "Features":
        """A copy that shares no storage (a view would keep the whole batch it came from alive)."""
        return self._apply(torch.Tensor.clone)

    def __getitem__(self, index: Any) -> "Features":
        """The images at ``index`` of the leading axes (an int, a slice, a list or a tensor of positions)."""
        return self._apply(lambda t: t[index])

    def __len__(self) -> int:
        return self.global_features.shape[0]

    def unsqueeze(self, dim: int = 0) -> "Features":
        """A new leading axis of length 1 (``dim`` counts among the leading axes)."""
        return self._apply(lambda t: t.unsqueeze(dim))
