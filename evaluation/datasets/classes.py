"""Class-level test splits: CUB-200-2011, Cars196, Stanford Online Products, a folder per class.

Each loader reads the official file layout and returns the test split of the deep metric
learning protocol (``docs/method.md``), in a fixed order with each class's images together.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from indexer.sources import ImageRecord, from_folder

from .base import ClassSet, DatasetError, require_dir, require_file, require_root

CUB_TEST_CLASSES = range(101, 201)  # the second half of the 200 classes, by id
CARS_TEST_CLASSES = range(99, 197)  # the second half of the 196 classes, by id


def _columns(path: Path, ncols: int, header: bool = False) -> list[tuple[int, list[str]]]:
    """Whitespace-separated lines of ``path`` with exactly ``ncols`` fields: (line number, fields)."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if (header and number == 1) or not line.strip():
                continue
            fields = line.split()
            if len(fields) != ncols:
                raise DatasetError(f"{path}, line {number}: expected {ncols} fields, got {len(fields)}")
            rows.append((number, fields))
    return rows


def _int(path: Path, number: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}, line {number}: {value!r} is not an integer") from None


def load_cub(root: str | os.PathLike) -> ClassSet:
    """CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``images/``): classes 101-200."""
    top = require_root(root)
    what = "CUB-200-2011"
    images_txt = require_file(top / "images.txt", what)
    labels_txt = require_file(top / "image_class_labels.txt", what)
    images_dir = require_dir(top / "images", what)
    paths = {_int(images_txt, n, f[0]): f[1] for n, f in _columns(images_txt, 2)}
    classes = {_int(labels_txt, n, f[0]): _int(labels_txt, n, f[1]) for n, f in _columns(labels_txt, 2)}
    if missing := sorted(set(paths) - set(classes)):
        raise DatasetError(f"{labels_txt}: no class for image id {missing[0]} (and {len(missing) - 1} more)")
    chosen = sorted((classes[i], i) for i in paths if classes[i] in CUB_TEST_CLASSES)
    records = [ImageRecord(str(images_dir / paths[i]), paths[i], str(c)) for c, i in chosen]
    return ClassSet("cub", str(top), records, [c for c, _ in chosen])


def _mat_field(annotations, name: str, path: Path) -> np.ndarray:
    if name not in (annotations.dtype.names or ()):
        raise DatasetError(f"{path}: the 'annotations' struct has no field {name!r}")
    return np.atleast_1d(annotations[name])


def load_cars(root: str | os.PathLike) -> ClassSet:
    """Cars196 (``cars_annos.mat``, ``car_ims/``): classes 99-196, whatever the ``test`` flag says."""
    from scipy.io import loadmat

    top = require_root(root)
    what = "Cars196"
    mat_path = require_file(top / "cars_annos.mat", what)
    require_dir(top / "car_ims", what)
    try:
        mat = loadmat(mat_path, squeeze_me=True)
    except Exception as err:  # noqa: BLE001 - any unreadable .mat gets one clear message
        raise DatasetError(f"{mat_path}: not a readable MATLAB file ({err})") from None
    if "annotations" not in mat:
        raise DatasetError(f"{mat_path}: no 'annotations' variable")
    ann = np.atleast_1d(mat["annotations"])
    rel_paths = _mat_field(ann, "relative_im_path", mat_path)
    labels = _mat_field(ann, "class", mat_path)
    chosen = sorted((int(c), i) for i, c in enumerate(labels) if int(c) in CARS_TEST_CLASSES)
    records = [ImageRecord(str(top / str(rel_paths[i])), str(rel_paths[i]), str(c)) for c, i in chosen]
    return ClassSet("cars", str(top), records, [c for c, _ in chosen])


def load_sop(root: str | os.PathLike) -> ClassSet:
    """Stanford Online Products: the test split ``Ebay_test.txt`` (image_id class_id super_class_id path)."""
    top = require_root(root)
    test_txt = require_file(top / "Ebay_test.txt", "Stanford Online Products")
    chosen = []
    for number, (_, class_id, _, rel) in _columns(test_txt, 4, header=True):
        chosen.append((_int(test_txt, number, class_id), rel))
    chosen.sort(key=lambda row: row[0])  # stable: file order within a class
    records = [ImageRecord(str(top / rel), rel, str(c)) for c, rel in chosen]
    return ClassSet("sop", str(top), records, [c for c, _ in chosen])


def load_class_folder(root: str | os.PathLike) -> ClassSet:
    """A folder per class (``root/<class>/*.jpg``); every image is in the test split."""
    top = require_root(root)
    records = from_folder(top, label_from_parent=True)
    if unlabelled := [r.id for r in records if r.label is None]:
        raise DatasetError(
            f"{top}: {len(unlabelled)} images lie directly in the root (e.g. {unlabelled[0]}); "
            "the folder layout needs one sub-folder per class"
        )
    if not records:
        raise DatasetError(f"{top}: no images in any class sub-folder")
    names = sorted({r.label for r in records})
    index = {name: i for i, name in enumerate(names)}
    return ClassSet("folder", str(top), records, [index[r.label] for r in records])
