"""Patch codes: a product quantizer (optionally OPQ-rotated) for the stored patch vectors.

Trained with FAISS on a sample of the gallery's patches (like the PCA), it stores each patch as
``M`` bytes (one centroid index per sub-vector). Decoding is a gather of centroids, done in torch on
whatever device the reranker runs on, and only for the candidates being reranked. Decoded vectors
are re-normalised (the reranker works on unit patch vectors).

Spec strings: ``pq<M>`` (e.g. ``pq32``: 32 bytes per patch) or ``opq<M>`` (a learned rotation first).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from .atomic import write_bytes
from .checksum import file_digest

CODES_NAME = "codes.npz"
_SPEC = re.compile(r"^(o?pq)(\d+)$")
NBITS = 8  # one byte per sub-quantizer: 256 centroids each


def parse_spec(spec: str, dim: int) -> tuple[bool, int]:
    """``(rotated, M)`` of a spec string; ValueError when it does not fit ``dim``."""
    m = _SPEC.match(spec or "")
    if not m:
        raise ValueError(f"patch codes must look like pq32 or opq32, not {spec!r}")
    rotated, subs = m.group(1) == "opq", int(m.group(2))
    if subs < 1 or dim % subs:
        raise ValueError(f"{spec}: the patch dimension {dim} is not divisible into {subs} sub-vectors")
    return rotated, subs


@dataclass
class PatchCodec:
    """Product quantizer of ``dim``-d patch vectors into ``M`` uint8 codes."""

    spec: str
    centroids: np.ndarray  # (M, 256, dim / M) float32
    rotation: np.ndarray | None = None  # (dim, dim): rotated = x @ rotation.T (OPQ)
    trained_on: int = 0  # patch vectors in the training sample
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def subquantizers(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    @property
    def bytes_per_patch(self) -> int:
        return self.subquantizers

    @classmethod
    def fit(cls, patches: np.ndarray, spec: str, max_samples: int = 65_536, seed: int = 0) -> "PatchCodec":
        """Train on patch vectors ``(..., d)`` (a random subset of at most ``max_samples``)."""
        x = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]), dtype=np.float32)
        rotated, subs = parse_spec(spec, x.shape[1])
        if len(x) < 2 ** NBITS:
            raise ValueError(f"{spec} needs at least {2 ** NBITS} patch vectors to train, got {len(x)}")
        if len(x) > max_samples:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_samples, replace=False))]
        rotation = None
        if rotated:
            opq = faiss.OPQMatrix(x.shape[1], subs)
            opq.verbose = False
            opq.train(x)
            rotation = faiss.vector_to_array(opq.A).reshape(x.shape[1], x.shape[1]).astype(np.float32)
            x = np.ascontiguousarray(x @ rotation.T)
        pq = faiss.ProductQuantizer(x.shape[1], subs, NBITS)
        pq.train(x)
        centroids = faiss.vector_to_array(pq.centroids).reshape(subs, 2 ** NBITS, x.shape[1] // subs)
        return cls(spec, centroids.astype(np.float32), rotation, trained_on=len(x))

    def _faiss_pq(self) -> faiss.ProductQuantizer:
        pq = faiss.ProductQuantizer(self.dim, self.subquantizers, NBITS)
        faiss.copy_array_to_vector(self.centroids.ravel(), pq.centroids)
        return pq

    def encode(self, patches: np.ndarray) -> np.ndarray:
        """uint8 codes ``(..., M)`` of patch vectors ``(..., d)``."""
        shape = patches.shape[:-1]
        x = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]), dtype=np.float32)
        if x.shape[1] != self.dim:
            raise ValueError(f"patch codes are for {self.dim}-d vectors, got {x.shape[1]}")
        if self.rotation is not None:
            x = np.ascontiguousarray(x @ self.rotation.T)
        codes = self._faiss_pq().compute_codes(x) if len(x) else np.zeros((0, self.subquantizers), np.uint8)
        return codes.reshape(*shape, self.subquantizers)

    def decode_torch(self, codes: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """Unit patch vectors ``(..., d)`` float32 on ``device`` from codes ``(..., M)``: a gather of centroids."""
        device = torch.device(device)
        table, rot = self._tables(device)
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).to(device).long()
        subs = torch.arange(self.subquantizers, device=device)
        x = table[subs, c].reshape(*c.shape[:-1], self.dim)  # (..., M, dsub) -> (..., d)
        if rot is not None:
            x = x @ rot  # undo the rotation: x ~ rotated @ R
        return torch.nn.functional.normalize(x, dim=-1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Unit patch vectors as numpy float32 (decoded on the CPU)."""
        return self.decode_torch(codes, "cpu").numpy()

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = str(device)
        if key not in self._on_device:
            rot = None if self.rotation is None else torch.from_numpy(self.rotation).to(device)
            self._on_device[key] = (torch.from_numpy(self.centroids).to(device), rot)
        return self._on_device[key]

    # --- files ---------------------------------------------------------------
    def save(self, folder: Path) -> None:
        buf = io.BytesIO()
        arrays = {"centroids": self.centroids, "trained_on": np.int64(self.trained_on),
                  "spec": np.frombuffer(self.spec.encode(), np.uint8)}
        if self.rotation is not None:
            arrays["rotation"] = self.rotation
        np.savez(buf, **arrays)
        write_bytes(Path(folder) / CODES_NAME, buf.getvalue())

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / CODES_NAME).is_file()

    @staticmethod
    def digest(folder: Path) -> str:
        return file_digest(Path(folder) / CODES_NAME)

    @classmethod
    def load(cls, folder: Path) -> "PatchCodec":
        with np.load(Path(folder) / CODES_NAME, allow_pickle=False) as data:
            rotation = data["rotation"] if "rotation" in data.files else None
            return cls(bytes(data["spec"]).decode(), data["centroids"].astype(np.float32), rotation,
                       int(data["trained_on"]))
