"""Loaders for the evaluation sets, by name."""

from __future__ import annotations

import os
from typing import Callable

from .base import ClassSet, DatasetError, EvalSet, PlaceSet
from .classes import load_cars, load_class_folder, load_cub, load_sop
from .places import load_msls, load_pairs, positives_within

LOADERS: dict[str, Callable[[str | os.PathLike], EvalSet]] = {
    "cub": load_cub,
    "cars": load_cars,
    "sop": load_sop,
    "msls": load_msls,
    "folder": load_class_folder,
    "pairs": load_pairs,
}


def load_dataset(name: str, root: str | os.PathLike) -> EvalSet:
    """The test split of dataset ``name`` (one of :data:`LOADERS`) found at ``root``."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(LOADERS)}")
    return LOADERS[name](root)


__all__ = [
    "ClassSet", "DatasetError", "EvalSet", "LOADERS", "PlaceSet", "load_cars", "load_class_folder",
    "load_cub", "load_dataset", "load_msls", "load_pairs", "load_sop", "positives_within",
]
