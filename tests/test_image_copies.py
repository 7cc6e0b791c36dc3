"""A self-contained index: it keeps a bounded copy of each image, so that thumbnails, served images and
explanation pictures survive the source folder being moved or deleted."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_cli
from indexer import open_index
from indexer.image_copies import find, parse
from service_support import make_client


@pytest.fixture()
def built(shared_data, tmp_path) -> tuple[Path, list[Path]]:
    """An index built from a folder of 12 photos (two of them the same bytes), then the folder deleted."""
    source = tmp_path / "photos"
    photos = []
    for cls in ("hat", "shoes", "skirt"):
        for p in sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:4]:
            (source / cls).mkdir(parents=True, exist_ok=True)
            photos.append(Path(shutil.copy(p, source / cls / p.name)))
    shutil.copy(photos[0], source / "hat" / "same-bytes.jpg")
    index = tmp_path / "index"
    out = run_cli("index", "build", str(index), "--from", str(source), "--model", "test_vit", "--weights", "random",
                  "--no-progress", "--workers", "0", "--label-from-parent")
    assert "added 13 images" in out.stdout, out.stdout
    shutil.rmtree(source)
    return index, photos


def test_the_index_shows_its_images_after_the_source_folder_is_gone(built, tmp_path):
    index, photos = built
    info = json.loads(run_cli("index", "info", str(index), "--json").stdout)
    assert info["image_copies"] == 1024 and info["images"] == 13
    copies = sorted((index / "images").iterdir())
    assert len(copies) == 12  # one per distinct content: the two identical files share theirs
    assert 0 < info["image_copies_bytes"] / 13 < 200_000  # what a self-contained index costs per image here
    with open_index(index) as gallery:
        for row in gallery.rows():
            image = Image.open(gallery.image_file(row))
            assert image.format == "JPEG" and max(image.size) <= 1024 and (row.width, row.height) != (0, 0)

    query = io.BytesIO()
    Image.open(copies[0]).save(query, format="PNG")
    with make_client(index) as client:
        r = client.post("/search", files={"image": ("q.png", query.getvalue(), "image/png")},
                        data={"top_k": "5", "rerank_k": "10", "explain": "true"})
        assert r.status_code == 200, r.text
        for hit in r.json()["results"]:
            for url in (hit["image_url"], hit["thumbnail_url"], hit["explanation_url"]):
                got = client.get(url)
                assert got.status_code == 200, (url, got.text[:200])
    explain = tmp_path / "explain"
    run_cli("search", str(copies[0]), "--index", str(index), "--top-k", "3", "--explain", str(explain))
    assert len(list(explain.glob("*.png"))) == 3


def test_copies_go_with_their_last_image_and_orphans_with_the_next_open(built):
    index, photos = built
    with open_index(index) as gallery:
        rows = {Path(r.path).name: r for r in gallery.rows()}
        twin, original = rows["same-bytes.jpg"], rows[photos[0].name]
        assert twin.content_hash == original.content_hash
        gallery.remove([twin.id])
        assert find(index, original.content_hash) is not None  # still shown by the other image
        gallery.remove([original.id])
        assert find(index, original.content_hash) is None
    orphan = index / "images" / ("f" * 64 + ".jpg")
    orphan.write_bytes(b"left by a build killed before its commit")
    with open_index(index):
        assert not orphan.exists()


def test_the_copies_option_is_checked_and_none_keeps_the_old_behaviour(shared_data, tmp_path):
    assert parse("original") == "original" and parse("none") is None and parse("512") == 512
    with pytest.raises(ValueError, match="side in px"):
        parse("big")
    with pytest.raises(ValueError, match="at least 64"):
        parse("10")
    photos = sorted((shared_data / "clothing-small" / "test" / "hat").glob("*.jpg"))[:3]
    manifest = tmp_path / "g.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in photos))
    for mode, expected in (("none", None), ("original", "original")):
        index = tmp_path / mode
        run_cli("index", "build", str(index), "--from", str(manifest), "--model", "test_vit", "--weights", "random",
                "--no-progress", "--workers", "0", "--image-copies", mode)
        with open_index(index) as gallery:
            assert gallery.manifest.image_copies == expected
            row = gallery.rows()[0]
            if expected is None:
                assert gallery.image_file(row) == row.path and not (index / "images").exists()
            else:
                assert Path(gallery.image_file(row)).read_bytes() == Path(row.path).read_bytes()
