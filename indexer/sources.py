"""Where a gallery's images come from: a folder tree or a manifest (CSV or JSON lines).

Listing never opens the images: a path that does not exist is not an error here,
the loader reports it later (reason ``missing``), so one bad line never aborts a
build. Errors here are about the listing itself (a malformed manifest, a root
that does not exist).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")

_Row = tuple[int, str, str | None, str | None, dict[str, Any]]  # line, path, id, label, metadata


@dataclass
class ImageRecord:
    """One gallery image: absolute ``path``, stable ``id``, optional ``label`` and metadata."""

    path: str
    id: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class ManifestError(ValueError):
    """A malformed manifest; the message names the file and the line."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(file, line, message)  # all three in args: the error pickles
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}, line {self.line}"
        return f"{where}: {self.message}"


def from_folder(
    root: str | os.PathLike, *, label_from_parent: bool = False, recursive: bool = True
) -> list[ImageRecord]:
    """The images under ``root`` (by extension, case-insensitive), sorted by id.

    ``id`` is the path relative to ``root`` with ``/`` separators; ``label`` (with
    ``label_from_parent``) the name of the file's folder, None for files directly
    in ``root``. Names starting with ``.`` are skipped. Symlinks to files are
    listed; symlinks to folders are not followed (so link loops cannot hang the
    walk). An unreadable sub-folder raises its ``OSError``.
    """
    top = os.path.abspath(os.fspath(root))
    if not os.path.isdir(top):
        if not os.path.exists(top):
            raise FileNotFoundError(errno.ENOENT, "gallery folder does not exist", top)
        raise NotADirectoryError(errno.ENOTDIR, "gallery source is not a folder", top)

    def fail(e: OSError) -> None:
        raise e

    records = []
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        rel_dir = os.path.relpath(dirpath, top)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            label = os.path.basename(dirpath) if label_from_parent and rel_dir != "." else None
            records.append(
                ImageRecord(path=os.path.join(dirpath, name), id=Path(rel).as_posix(), label=label)
            )
    return sorted(records, key=lambda r: r.id)


def from_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """The images listed in a manifest, in file order.

    CSV (``.csv``): a header row with a ``path`` column; optional ``id`` and
    ``label`` columns; every other column goes to ``metadata`` as a string. Cells
    are stripped of surrounding whitespace; an empty ``label`` is None.

    JSON lines (``.jsonl``, ``.ndjson``): one object per line with ``path``;
    optional ``id``, ``label`` and a ``metadata`` object; any other keys are merged
    into ``metadata`` (a key in both places is an error). Blank lines are skipped.

    Relative paths resolve against the manifest's folder; a missing ``id`` is the
    path as written in the manifest. The file is UTF-8 (a BOM is accepted).
    Raises :class:`ManifestError` naming the file and line.
    """
    name = os.fspath(path)
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(name, None, f"unknown manifest type {suffix!r}: use .csv, .jsonl or .ndjson")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ManifestError(name, line, "not valid UTF-8") from None
    base = os.path.dirname(os.path.abspath(name))
    rows = _csv_rows(name, text) if suffix == ".csv" else _jsonl_rows(name, text)

    records: list[ImageRecord] = []
    first_line: dict[str, int] = {}
    for line, rel_path, id_, label, metadata in rows:
        id_ = rel_path if id_ is None else id_
        if id_ in first_line:
            raise ManifestError(
                name, line, f"duplicate id {id_!r} (first on line {first_line[id_]})"
            )
        first_line[id_] = line
        abs_path = os.path.normpath(os.path.join(base, rel_path))
        records.append(ImageRecord(path=abs_path, id=id_, label=label, metadata=metadata))
    return records


def from_source(source: str | os.PathLike, *, label_from_parent: bool = False) -> list[ImageRecord]:
    """A folder (:func:`from_folder`) or a ``.csv``/``.jsonl``/``.ndjson`` manifest.

    ``label_from_parent`` applies to folders only: a manifest carries its own labels.
    """
    p = Path(source)
    if p.is_dir():
        return from_folder(p, label_from_parent=label_from_parent)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, "gallery source does not exist", str(p))
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        return from_manifest(p)
    raise ValueError(
        f"{p}: a gallery source is a folder of images or a manifest "
        f"({', '.join(MANIFEST_SUFFIXES)}), not a {p.suffix or 'suffix-less'} file"
    )



def _csv_rows(name: str, text: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ManifestError(name, 1, "empty manifest: a header row with a 'path' column is required") from None
    except csv.Error as e:
        raise ManifestError(name, 1, f"invalid CSV ({e})") from None
    if "path" not in header:
        raise ManifestError(name, 1, f"no 'path' column in the header {header}")
    if len(set(header)) != len(header):
        raise ManifestError(name, 1, f"repeated column names in the header {header}")

    rows: list[_Row] = []
    end = reader.line_num
    while True:
        line = end + 1  # where this record starts (a quoted cell may span lines)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ManifestError(name, line, f"invalid CSV ({e})") from None
        end = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            raise ManifestError(name, line, f"{len(cells)} cells, the header has {len(header)}")
        row = {h: c.strip() for h, c in zip(header, cells)}
        path = row.pop("path")
        if not path:
            raise ManifestError(name, line, "blank path")
        id_ = row.pop("id", "") or None
        label = row.pop("label", "") or None
        rows.append((line, path, id_, label, row))
    return rows


def _jsonl_rows(name: str, text: str) -> list[_Row]:
    rows: list[_Row] = []
    for line, content in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not content.strip():
            continue
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as e:
            raise ManifestError(name, line, f"invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ManifestError(name, line, f"expected a JSON object, got {type(obj).__name__}")
        if "path" not in obj:
            raise ManifestError(name, line, "no 'path' key")
        path = obj.pop("path")
        if not isinstance(path, str):
            raise ManifestError(name, line, f"'path' must be a string, got {type(path).__name__}")
        if not path.strip():
            raise ManifestError(name, line, "blank path")
        id_ = _optional_str(name, line, obj, "id")
        label = _optional_str(name, line, obj, "label")
        metadata = obj.pop("metadata", None) or {}
        if not isinstance(metadata, dict):
            raise ManifestError(name, line, f"'metadata' must be an object, got {type(metadata).__name__}")
        if clash := sorted(metadata.keys() & obj.keys()):
            raise ManifestError(name, line, f"keys both in 'metadata' and at the top level: {clash}")
        rows.append((line, path, id_, label, {**metadata, **obj}))
    return rows


def _optional_str(name: str, line: int, obj: dict[str, Any], key: str) -> str | None:
    """``obj[key]`` (popped) as a string: strings and integers are accepted, null and "" are None."""
    value = obj.pop(key, None)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ManifestError(name, line, f"{key!r} must be a string, got {json.dumps(value)}")
    return str(value)
