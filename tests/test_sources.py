"""Gallery listings from folders and manifests (``indexer.sources``)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from indexer.sources import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    ManifestError,
    from_folder,
    from_manifest,
    from_source,
)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")  # listing never opens the files


@pytest.fixture
def gallery(tmp_path) -> Path:
    root = tmp_path / "gallery"
    _touch(
        root,
        "top.JPG",
        "readme.txt",
        "shoes/b.png",
        "shoes/a.jpeg",
        "shoes/.hidden.jpg",
        "hats/summer/straw.webp",
        "hats/cap.GIF",
        ".cache/thumb.jpg",
        "Dresses/x.TIFF",
        "Dresses/y.bmp",
        "Dresses/z.tif",
    )
    return root


# --- folders --------------------------------------------------------------------------------------


def test_folder_walk_is_sorted_with_relative_posix_ids(gallery):
    records = from_folder(gallery)
    assert [r.id for r in records] == [
        "Dresses/x.TIFF",
        "Dresses/y.bmp",
        "Dresses/z.tif",
        "hats/cap.GIF",
        "hats/summer/straw.webp",
        "shoes/a.jpeg",
        "shoes/b.png",
        "top.JPG",
    ]
    for r in records:
        assert os.path.isabs(r.path)
        assert Path(r.path) == gallery / r.id
        assert r.label is None and r.metadata == {}


def test_folder_labels_from_parent(gallery):
    labels = {r.id: r.label for r in from_folder(gallery, label_from_parent=True)}
    assert labels["shoes/a.jpeg"] == "shoes"
    assert labels["hats/summer/straw.webp"] == "summer"
    assert labels["Dresses/x.TIFF"] == "Dresses"
    assert labels["top.JPG"] is None


def test_folder_not_recursive(gallery):
    assert [r.id for r in from_folder(gallery, recursive=False)] == ["top.JPG"]


def test_folder_relative_root_gives_absolute_paths(gallery, monkeypatch):
    monkeypatch.chdir(gallery.parent)
    records = from_folder("gallery")
    assert all(os.path.isabs(r.path) for r in records)
    assert records[0].path == str(gallery / "Dresses" / "x.TIFF")


def test_folder_extensions_are_case_insensitive():
    assert {".jpg", ".png", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() for e in IMAGE_EXTENSIONS)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_folder_symlinks_files_followed_and_loops_do_not_hang(tmp_path):
    root = tmp_path / "g"
    _touch(root, "a/real.jpg")
    _touch(tmp_path, "outside.png")
    try:
        (root / "a" / "link.png").symlink_to(tmp_path / "outside.png")
        (root / "a" / "loop").symlink_to(root, target_is_directory=True)
        (root / "a" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    except OSError:
        pytest.skip("cannot create symlinks here")
    ids = [r.id for r in from_folder(root)]
    assert ids == ["a/dangling.jpg", "a/link.png", "a/real.jpg"]  # the loader reports the dangling one


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_folder(tmp_path / "nowhere")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        from_folder(tmp_path / "f.jpg")
    assert from_folder(tmp_path / ".") != []


@pytest.mark.shared
def test_real_gallery_folder(shared_data):
    records = from_folder(shared_data / "clothing-small" / "test", label_from_parent=True)
    assert len(records) == 372
    assert len({r.label for r in records}) == 10
    assert len({r.id for r in records}) == 372
    assert all(r.id.count("/") == 1 and r.id.split("/")[0] == r.label for r in records)
    assert [r.id for r in records] == sorted(r.id for r in records)


# --- manifests ------------------------------------------------------------------------------------


def test_csv_manifest(tmp_path):
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "gallery.csv"
    manifest.write_text(
        "path,id,label,color,price\n"
        "imgs/a.jpg,A,shoes,red,10\n"
        "../b.png,,, blue ,\n"
        f"{tmp_path / 'abs.jpg'},C,hats,green,3\n",
        encoding="utf-8",
    )
    records = from_manifest(manifest)
    assert records == [
        ImageRecord(str(tmp_path / "m" / "imgs" / "a.jpg"), "A", "shoes", {"color": "red", "price": "10"}),
        ImageRecord(str(tmp_path / "b.png"), "../b.png", None, {"color": "blue", "price": ""}),
        ImageRecord(str(tmp_path / "abs.jpg"), "C", "hats", {"color": "green", "price": "3"}),
    ]


def test_csv_manifest_only_path_column_with_bom_and_blank_lines(tmp_path):
    manifest = tmp_path / "g.csv"
    manifest.write_bytes("\ufeffpath\r\nsub/é.jpg\r\n\r\n\"with,comma.jpg\"\r\n".encode("utf-8"))
    records = from_manifest(manifest)
    assert [r.id for r in records] == ["sub/é.jpg", "with,comma.jpg"]
    assert records[0].path == str(tmp_path / "sub" / "é.jpg")
    assert all(r.label is None and r.metadata == {} for r in records)


def test_jsonl_manifest(tmp_path):
    manifest = tmp_path / "gallery.jsonl"
    lines = [
        {"path": "a.jpg", "id": "A", "label": "shoes", "metadata": {"sku": 12}, "color": "red"},
        {"path": "sub/b.jpg"},
        {"path": "c.jpg", "label": 3, "id": 7, "tags": ["x", "y"], "label_note": None},
    ]
    manifest.write_text(json.dumps(lines[0]) + "\n\n   \n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]))
    records = from_manifest(manifest)
    assert records == [
        ImageRecord(str(tmp_path / "a.jpg"), "A", "shoes", {"sku": 12, "color": "red"}),
        ImageRecord(str(tmp_path / "sub" / "b.jpg"), "sub/b.jpg", None, {}),
        ImageRecord(str(tmp_path / "c.jpg"), "7", "3", {"tags": ["x", "y"], "label_note": None}),
    ]


def test_ndjson_suffix_and_missing_files_are_not_errors(tmp_path):
    manifest = tmp_path / "g.ndjson"
    manifest.write_text('{"path": "does/not/exist.jpg"}\n')
    (record,) = from_manifest(manifest)
    assert record.path == str(tmp_path / "does" / "not" / "exist.jpg")


def _manifest_error(tmp_path, name: str, text: str) -> ManifestError:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        from_manifest(path)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize(
    "name, text, line, match",
    [
        ("no_path.csv", "file,label\na.jpg,x\n", 1, "'path' column"),
        ("empty.csv", "", 1, "header"),
        ("blank.csv", "path,label\na.jpg,x\n  ,y\n", 3, "blank path"),
        ("dup.csv", "path,id\na.jpg,1\nb.jpg,2\nc.jpg,1\n", 4, r"duplicate id '1' \(first on line 2\)"),
        ("dup_default.csv", "path\na.jpg\n\na.jpg\n", 4, r"duplicate id 'a.jpg' \(first on line 2\)"),
        ("cells.csv", "path,label\na.jpg,x,extra\n", 2, "3 cells"),
        ("multiline.csv", 'path,note\na.jpg,"two\nlines"\n,x\n', 4, "blank path"),
        ("bad.jsonl", '{"path": "a.jpg"}\n\n{"path": "b.jpg",\n', 3, "invalid JSON"),
        ("no_path.jsonl", '{"path": "a.jpg"}\n{"id": "b"}\n', 2, "no 'path' key"),
        ("blank.jsonl", '{"path": "  "}\n', 1, "blank path"),
        ("dup.jsonl", '{"path": "a.jpg", "id": "x"}\n{"path": "b.jpg", "id": "x"}\n', 2, r"first on line 1"),
        ("array.jsonl", '["a.jpg"]\n', 1, "JSON object"),
        ("meta.jsonl", '{"path": "a.jpg", "metadata": [1]}\n', 1, "'metadata' must be an object"),
        ("clash.jsonl", '{"path": "a.jpg", "metadata": {"k": 1}, "k": 2}\n', 1, "both in 'metadata'"),
        ("pathtype.jsonl", '{"path": 3}\n', 1, "'path' must be a string"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, name, text, line, match):
    err = _manifest_error(tmp_path, name, text)
    assert err.line == line
    assert f"line {line}:" in str(err)
    assert err.file.endswith(name)
    with pytest.raises(ManifestError, match=match):
        raise err


def test_manifest_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("path\na.jpg\ncafé.jpg\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.csv, line 3: not valid UTF-8"):
        from_manifest(path)


def test_manifest_unknown_suffix(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a.jpg\n")
    with pytest.raises(ManifestError, match=r"\.csv, \.jsonl or \.ndjson"):
        from_manifest(path)


def test_manifest_error_pickles():
    err = pickle.loads(pickle.dumps(ManifestError("m.csv", 3, "blank path")))
    assert (err.file, err.line, str(err)) == ("m.csv", 3, "m.csv, line 3: blank path")


# --- dispatch -------------------------------------------------------------------------------------


def test_from_source_dispatch(gallery, tmp_path):
    assert from_source(gallery) == from_folder(gallery)
    assert from_source(str(gallery), label_from_parent=True) == from_folder(gallery, label_from_parent=True)
    csv_path = tmp_path / "g.CSV"
    csv_path.write_text("path,label\na.jpg,x\n")
    jsonl_path = tmp_path / "g.jsonl"
    jsonl_path.write_text('{"path": "a.jpg", "label": "x"}\n')
    assert from_source(csv_path) == from_source(str(jsonl_path)) == [
        ImageRecord(str(tmp_path / "a.jpg"), "a.jpg", "x", {})
    ]


def test_from_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        from_source(tmp_path / "nowhere.csv")
    other = tmp_path / "photo.jpg"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"folder of images or a manifest \(\.csv, \.jsonl, \.ndjson\)") as info:
        from_source(other)
    assert "photo.jpg" in str(info.value)
