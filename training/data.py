"""The labelled folder, its seeded held-out split and the class-balanced batch sampler."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.datasets.classes import load_class_folder
from indexer.sources import ImageRecord


@dataclass
class LabelledSet:
    """Images of a class folder: ``labels[i]`` is the class index of ``records[i]`` in ``class_names``."""

    root: str
    records: list[ImageRecord]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]

    def fingerprint(self) -> str:
        """A short hash of the image ids and labels (what a resumed run must see again)."""
        digest = hashlib.sha256()
        for record, label in zip(self.records, self.labels):
            digest.update(f"{record.id}\0{label}\n".encode())
        return digest.hexdigest()[:16]


def load_labelled(folder: str | Path) -> LabelledSet:
    """A folder per class; at least two classes and two images in every class.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: a layout or class counts training cannot use.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"labelled folder not found: {str(root)!r} (expected a sub-folder per class)")
    data = load_class_folder(root)  # DatasetError (a ValueError) for images outside class folders
    names = sorted({r.label for r in data.records})
    labels = np.asarray(data.labels, dtype=np.int64)
    if len(names) < 2:
        raise ValueError(f"{root}: training needs at least 2 classes (sub-folders), found {len(names)}")
    counts = np.bincount(labels, minlength=len(names))
    if lonely := [names[i] for i in np.flatnonzero(counts < 2)]:
        raise ValueError(f"{root}: class {lonely[0]!r} has only one image; every class needs at least 2 "
                         f"(a positive pair){f' ({len(lonely) - 1} more such classes)' if len(lonely) > 1 else ''}")
    return LabelledSet(str(root.resolve()), list(data.records), labels, names)


def heldout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` indices: ``fraction`` of each class's images held out (seeded).

    A class keeps at least 2 images for training; it gives at least 2 to the held-out part (a
    leave-one-out query needs another image of its class) or none, when it is too small.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--heldout must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(fraction * len(members)))
        n_held = max(n_held, 2) if n_held else 0
        if len(members) - n_held < 2:
            n_held = 0
        heldout += members[:n_held].tolist()
        train += members[n_held:].tolist()
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(heldout, np.int64))


def class_balanced_sampler(labels: np.ndarray, per_class: int, batch_size: int):
    """pytorch-metric-learning's ``MPerClassSampler``: ``per_class`` images of each of
    ``batch_size / per_class`` classes per batch; one pass is about one epoch of images."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    n_classes = len(np.unique(labels))
    if batch_size % per_class:
        raise ValueError(f"--batch-size ({batch_size}) must be a multiple of --m-per-class ({per_class})")
    if batch_size // per_class > n_classes:
        raise ValueError(f"--batch-size {batch_size} / --m-per-class {per_class} asks for {batch_size // per_class} "
                         f"classes per batch, but the training split has {n_classes}")
    length = max(batch_size, len(labels) - len(labels) % batch_size)
    return MPerClassSampler(labels.tolist(), m=per_class, batch_size=batch_size, length_before_new_iter=length)
