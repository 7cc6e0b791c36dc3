"""Place-recognition splits: Mapillary SLS (validation cities) and a query/database folder pair."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from indexer.sources import IMAGE_EXTENSIONS, ImageRecord, from_folder

from .base import DatasetError, PlaceSet, require_dir, require_file, require_root

MSLS_CITIES = ("cph", "sf")
MSLS_RADIUS_M = 25.0
PAIRS_GROUND_TRUTH = "ground_truth.csv"
PAIRS_DATABASE_FOLDERS = ("ref", "database")


def _read_csv(path: Path, columns: Iterable[str]) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if missing := [c for c in columns if c not in header]:
            raise DatasetError(f"{path}: no column {missing[0]!r} in the header {header}")
        return list(reader)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def positives_within(query_xy: np.ndarray, database_xy: np.ndarray, radius: float, chunk: int = 512) -> list[np.ndarray]:
    """For each query point, the database positions within ``radius`` (inclusive), by Euclidean
    distance in float64 (UTM metres). Sorted by position."""
    q = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
    d = np.asarray(database_xy, dtype=np.float64).reshape(-1, 2)
    out: list[np.ndarray] = []
    for start in range(0, len(q), chunk):
        diff = q[start:start + chunk, None, :] - d[None, :, :]
        within = np.einsum("qmc,qmc->qm", diff, diff) <= radius * radius
        out.extend(np.flatnonzero(row) for row in within)
    return out


def _msls_split(city_dir: Path, split: str) -> tuple[list[ImageRecord], np.ndarray]:
    """Non-panorama images of one city's ``query`` or ``database`` folder, with UTM coordinates."""
    folder = require_dir(city_dir / split, "MSLS")
    post = _read_csv(require_file(folder / "postprocessed.csv", "MSLS"), ("key", "easting", "northing"))
    raw = _read_csv(require_file(folder / "raw.csv", "MSLS"), ("key", "pano"))
    pano = {row["key"]: _truthy(row["pano"]) for row in raw}
    records, xy = [], []
    for line, row in enumerate(post, start=2):
        key = row["key"]
        if key not in pano:
            raise DatasetError(f"{folder / 'raw.csv'}: no row for key {key!r} of postprocessed.csv")
        if pano[key]:
            continue
        try:
            xy.append((float(row["easting"]), float(row["northing"])))
        except ValueError:
            raise DatasetError(f"{folder / 'postprocessed.csv'}, line {line}: bad easting/northing") from None
        rel = f"{city_dir.name}/{split}/images/{key}.jpg"
        records.append(ImageRecord(str(folder / "images" / f"{key}.jpg"), rel, city_dir.name, {"key": key}))
    return records, np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def load_msls(root: str | os.PathLike, cities: Iterable[str] = MSLS_CITIES, radius: float = MSLS_RADIUS_M) -> PlaceSet:
    """MSLS validation: ``train_val/<city>/{query,database}/`` of ``cities``; panoramas excluded;
    a database image is a positive within ``radius`` metres (UTM) of the query, in the same city."""
    top = require_root(root)
    base = top / "train_val" if (top / "train_val").is_dir() else top
    queries, database, positives = [], [], []
    query_groups, database_groups, names = [], [], []
    for group, city in enumerate(cities):
        city_dir = require_dir(base / city, f"MSLS city {city!r}")
        q_records, q_xy = _msls_split(city_dir, "query")
        d_records, d_xy = _msls_split(city_dir, "database")
        offset = len(database)
        positives += [p + offset for p in positives_within(q_xy, d_xy, radius)]
        queries += q_records
        database += d_records
        query_groups += [group] * len(q_records)
        database_groups += [group] * len(d_records)
        names.append(city)
    return PlaceSet("msls", str(top), queries, database, positives, query_groups, database_groups, names)


def load_pairs(root: str | os.PathLike) -> PlaceSet:
    """``root/ground_truth.csv`` (columns ``query``, ``matching_refs``: space-separated paths
    relative to ``root``), queries as listed, and every image under ``root/ref/`` (or
    ``root/database/``) as the database; one group."""
    top = require_root(root)
    gt_path = require_file(top / PAIRS_GROUND_TRUTH, "query/database pairs")
    db_dir = next((top / name for name in PAIRS_DATABASE_FOLDERS if (top / name).is_dir()), None)
    if db_dir is None:
        raise DatasetError(f"query/database pairs: missing folder {top / PAIRS_DATABASE_FOLDERS[0]} "
                           f"(or {top / PAIRS_DATABASE_FOLDERS[1]})")
    database = [
        ImageRecord(r.path, f"{db_dir.name}/{r.id}", None) for r in from_folder(db_dir)
    ]
    position = {r.id: i for i, r in enumerate(database)}
    queries, positives = [], []
    for line, row in enumerate(_read_csv(gt_path, ("query", "matching_refs")), start=2):
        rel = Path(row["query"].strip()).as_posix()
        if not rel or Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(f"{gt_path}, line {line}: {row['query']!r} is not an image path")
        refs = [Path(r).as_posix() for r in (row["matching_refs"] or "").split()]
        if unknown := [r for r in refs if r not in position]:
            raise DatasetError(f"{gt_path}, line {line}: {unknown[0]!r} is not an image under {db_dir}")
        queries.append(ImageRecord(str(top / rel), rel, None))
        positives.append(np.array(sorted(position[r] for r in refs), dtype=np.int64))
    return PlaceSet("pairs", str(top), queries, database, positives,
                    np.zeros(len(queries)), np.zeros(len(database)), [top.name])
