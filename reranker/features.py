"""The two feature carriers: what retrieval and reranking know of an image.

:class:`Features` is the torch form, on one device, that the reranker computes with;
:class:`StoredFeatures` is the numpy form the index and the evaluation cache store, row by row.
Both describe images by the same parts, with the same leading axes (none for one image, ``(B,)``
for a batch, ``(Q, K)`` for each query's candidates):

* ``global_features``  ``(..., D)``       the global (CLS) vector, L2-normalised;
* ``patch_features``   ``(..., G*G, d)``  the patch vectors of a ``G x G`` grid, row-major,
  L2-normalised, any float dtype (stored patches are float16, or uint8 codes in an index of
  patch codes);
* patch weights        ``(..., G*G)``     per-patch weights (rollout and friends).

A stored carrier keeps patch weights **by kind** (``{"rollout": ..., "last_cls": ...}``: one
forward computes several, an evaluation sweeps them, an index stores one); a torch carrier holds
the one kind a rerank reads, selected by :meth:`StoredFeatures.to_device` (or None: uniform).
Everything else that carries an image's features is a batch of rows around one of these (an
embedded batch, the images an index commits, an evaluation cache).

This module needs numpy and torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch


@dataclass
class Features:
    """Global vectors, patch vectors and one kind of patch weights of one or more images, as tensors
    (see the module)."""

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


@dataclass
class StoredFeatures:
    """Features of ``k`` images as numpy arrays, one leading axis of images, patch weights by kind
    (see the module)."""

    global_features: np.ndarray  # (k, D) float32
    patch_features: np.ndarray  # (k, G*G, d) float16 (float32 before storing), or (k, G*G, M) uint8 codes
    patch_weights: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (k, G*G) float32

    def __len__(self) -> int:
        return len(self.global_features)

    def weights(self, kind: str | None = None) -> np.ndarray | None:
        """The ``kind`` patch weights; ``kind=None``: the one kind carried (None when there is none).
        KeyError names the kinds carried when ``kind`` is not one of them."""
        if kind is None:
            if len(self.patch_weights) > 1:
                raise ValueError(f"these features carry several kinds of patch weights ({', '.join(self.patch_weights)}): name one")
            return next(iter(self.patch_weights.values()), None)
        if kind not in self.patch_weights:
            raise KeyError(f"no {kind!r} patch weights here (carried: {', '.join(self.patch_weights) or 'none'})")
        return self.patch_weights[kind]

    def select(self, kind: str) -> "StoredFeatures":
        """The same images with the ``kind`` patch weights only."""
        return StoredFeatures(self.global_features, self.patch_features, {kind: self.weights(kind)})

    def take(self, rows: slice | Sequence[int] | np.ndarray) -> "StoredFeatures":
        """The images at ``rows``."""
        return StoredFeatures(self.global_features[rows], self.patch_features[rows],
                              {kind: w[rows] for kind, w in self.patch_weights.items()})

    @staticmethod
    def concat(parts: Sequence["StoredFeatures"]) -> "StoredFeatures":
        """The images of ``parts``, one after the other (every part carrying the same kinds)."""
        return StoredFeatures._join(parts, np.concatenate)

    @staticmethod
    def stack(parts: Sequence["StoredFeatures"]) -> "StoredFeatures":
        """``parts`` along a new leading axis (e.g. ``(Q, K, ...)`` from each query's ``K`` candidates)."""
        return StoredFeatures._join(parts, np.stack)

    @staticmethod
    def _join(parts: Sequence["StoredFeatures"], join: Callable[[list[np.ndarray]], np.ndarray]) -> "StoredFeatures":
        kinds = list(parts[0].patch_weights)
        if any(list(p.patch_weights) != kinds for p in parts):
            raise ValueError("the parts carry different kinds of patch weights")
        return StoredFeatures(join([p.global_features for p in parts]), join([p.patch_features for p in parts]),
                              {kind: join([p.patch_weights[kind] for p in parts]) for kind in kinds})

    def to_device(self, device: Any = "cpu", kind: str | None = None) -> Features:
        """The same images as a :class:`Features` on ``device`` with the ``kind`` patch weights
        (``kind=None``: the one kind carried, if any); dtypes kept, so codes stay codes."""
        return Features.from_numpy(self.global_features, self.patch_features, self.weights(kind), device)


def weights_by_kind(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Patch weights by kind as float32 numpy arrays (from tensors on any device, or arrays)."""
    return {kind: (w.detach().float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32))
            for kind, w in weights.items()}
