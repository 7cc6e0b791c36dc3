"""The indexer's command line end to end on real photos, with a small random model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_cli  # in this process; one call below goes through ``python -m vit_rerank``


@pytest.fixture(scope="module")
def small_gallery(shared_data, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A CSV manifest of 30 clothing photos (3 classes)."""
    folder = tmp_path_factory.mktemp("gallery")
    photos = []
    for cls in ("hat", "shoes", "skirt"):
        photos += sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:10]
    manifest = folder / "gallery.csv"
    manifest.write_text("path,label,source\n" + "".join(f"{p},{p.parent.name},shared\n" for p in photos))
    return manifest, photos


@pytest.fixture(scope="module")
def tiny_index(small_gallery, tmp_path_factory) -> Path:
    """The 30-photo gallery built once with the tiny random ViT, for the tests that only read it."""
    manifest, _ = small_gallery
    index = tmp_path_factory.mktemp("tiny") / "index"
    run_cli("index", "build", str(index), "--from", str(manifest), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0")
    return index


def test_build_search_remove_add_verify(small_gallery, tmp_path):
    manifest, photos = small_gallery
    index = tmp_path / "index"
    out = run_cli("index", "build", str(index), "--from", str(manifest), "--model", "test_vit",
                  "--weights", "random", "--no-progress", "--commit-every", "8", "--workers", "0")
    assert "added 30 images" in out.stdout

    info = json.loads(run_cli("index", "info", str(index), "--json").stdout)
    assert info["images"] == 30 and info["faiss_vectors"] == 30 and info["model"] == "test_vit"
    # test_vit's native 14 x 14 grid is past what OT is calibrated on: no rollout is captured or stored
    assert info["weights"] == "random" and info["patch_weights"] == "uniform" and info["bytes_per_image"] > 0
    assert "OK" in run_cli("index", "verify", str(index)).stdout

    res = json.loads(run_cli("search", str(photos[0]), "--index", str(index), "--top-k", "5",
                             "--rerank-k", "20", "--json", "--explain", str(tmp_path / "explain")).stdout)
    hits = res["results"]
    assert len(hits) == 5 and res["random_weights"] is True
    # The query itself is in the gallery: first by global cosine (1.0), wherever reranking puts it.
    first_global = [h for h in hits if h["rank_before"] == 0]
    assert first_global and first_global[0]["id"] == str(photos[0])
    assert abs(first_global[0]["global_score"] - 1.0) < 1e-4
    assert [h["rank_after"] for h in hits] == list(range(5))
    lam = res["settings"]["lambda"]
    for h in hits:
        assert abs(h["final_score"] - (h["global_score"] + lam * h["structural_score"])) < 1e-5
    assert len(list((tmp_path / "explain").glob("*.png"))) == 5

    out = run_cli("index", "remove", str(index), str(photos[0]), "no-such-id", check=False)
    assert out.returncode == 1 and "removed 1 images; 29 remain" in out.stdout and "no-such-id" in out.stderr
    out = run_cli("index", "add", str(index), "--from", str(manifest), "--no-progress", "--workers", "0")
    assert "added 1 images" in out.stdout and "29 already indexed" in out.stdout
    assert "OK" in run_cli("index", "verify", str(index)).stdout


def test_build_resumes_without_reembedding(small_gallery, tmp_path):
    manifest, _ = small_gallery
    index = tmp_path / "index"
    args = ("index", "build", str(index), "--from", str(manifest), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0")
    run_cli(*args)
    again = run_cli(*args)
    assert "resuming" in again.stdout and "added 0 images" in again.stdout and "30 already indexed" in again.stdout


def test_user_errors_are_one_line_messages_not_tracebacks(small_gallery, tmp_path):
    manifest, photos = small_gallery
    out = run_cli("index", "info", str(tmp_path / "nowhere"), check=False, in_process=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "vit-rerank: error:" in out.stderr and "is not an index directory" in out.stderr

    index = tmp_path / "index"
    one = tmp_path / "one.csv"
    one.write_text(f"path\n{photos[0]}\n")
    run_cli("index", "build", str(index), "--from", str(one), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0")
    out = run_cli("index", "build", str(index), "--from", str(one), "--model", "test_vit2", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "built with model 'test_vit'" in out.stderr

    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    out = run_cli("search", str(not_an_image), "--index", str(index), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "notes.jpg" in out.stderr
    out = run_cli("search", str(photos[0]), "--index", str(index), "--s", "1.5", check=False)
    assert out.returncode == 1 and "s must be at most 1" in out.stderr
    assert "OK" in run_cli("index", "verify", str(index)).stdout  # nothing was changed


def test_patch_weights_the_backbone_cannot_give_are_refused_before_anything_is_written(small_gallery, tmp_path):
    manifest, _ = small_gallery
    index = tmp_path / "index"
    tiny_swin = '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}'
    out = run_cli("index", "build", str(index), "--from", str(manifest), "--model", "swin_tiny_patch4_window7_224",
                  "--model-kwargs", tiny_swin, "--weights", "random", "--patch-weights", "rollout", "--no-progress",
                  "--workers", "0", check=False)
    assert out.returncode == 1 and "no global attention" in out.stderr and "Traceback" not in out.stderr
    assert not index.exists()


def test_calibrate_stores_a_choice_that_search_info_and_overrides_respect(small_gallery, tmp_path):
    manifest, photos = small_gallery
    index = tmp_path / "index"
    run_cli("index", "build", str(index), "--from", str(manifest), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0")
    out = run_cli("index", "calibrate", str(index), "--json", "--no-progress", "--seed", "1")
    cal = json.loads(out.stdout)
    assert cal["metric"] == "precision_at_1" and cal["queries"] == {"tuning": 15, "heldout": 15}
    assert cal["source"].startswith("the index's own labels")
    # Never worse than the baseline on the held-out half: either it reranks with a gain >= 0, or it does not.
    assert cal["calibrated_heldout"] >= cal["baseline_heldout"]
    assert cal["rerank"] == (cal["rerank_k"] > 0)
    stored = json.loads((index / "calibration.json").read_text())
    assert stored["seed"] == 1 and stored["rerank"] == cal["rerank"]

    info = json.loads(run_cli("index", "info", str(index), "--json").stdout)
    assert info["calibration"] == cal
    assert info["preprocessing"]["crop"] == [160, 160]  # test_vit is built at 160 px

    res = json.loads(run_cli("search", str(photos[0]), "--index", str(index), "--top-k", "3", "--json").stdout)
    for key, public in (("rerank_k", "rerank_k"), ("s", "s"), ("lam", "lambda"), ("scorer", "scorer")):
        assert res["settings"][public] == cal[key]
    res = json.loads(run_cli("search", str(photos[0]), "--index", str(index), "--top-k", "3", "--json",
                             "--lambda", "0.7", "--rerank-k", "12", "--s", "0.9").stdout)
    assert (res["settings"]["lambda"], res["settings"]["rerank_k"], res["settings"]["s"]) == (0.7, 12, 0.9)
    assert sum(h["structural_score"] is not None for h in res["results"]) == 3


def test_search_flags_are_checked_against_their_declared_bounds(small_gallery, tmp_path):
    manifest, photos = small_gallery
    index = tmp_path / "index"
    run_cli("index", "build", str(index), "--from", str(manifest), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0")
    for flag, value, word in (("--s", "0", "s must be greater than 0"), ("--lambda", "-1", "lam must be at least 0"),
                              ("--rerank-k", "5000", "rerank_k must be at most 1000")):
        out = run_cli("search", str(photos[0]), "--index", str(index), flag, value, check=False)
        assert out.returncode == 1 and word in out.stderr, out.stderr


def test_a_file_name_that_is_not_utf8_is_skipped_not_fatal(small_gallery, tmp_path):
    """Such a name reads as a lone surrogate, which the metadata database cannot store: before, the whole
    build stopped at its first commit."""
    import os
    import shutil

    _, photos = small_gallery
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:4]:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[4], os.path.join(os.fsencode(folder), b"bad-\xff-name.jpg"))
    index = tmp_path / "index"
    out = run_cli("index", "build", str(index), "--from", str(folder), "--model", "test_vit", "--weights", "random",
                  "--no-progress", "--workers", "0", in_process=False, check=False)
    assert "added 4 images" in out.stdout, out.stdout + out.stderr
    assert "invalid_text" in out.stdout + out.stderr and "bad-\\xff-name.jpg" in out.stdout + out.stderr
    assert "OK" in run_cli("index", "verify", str(index)).stdout
    (report,) = (index / "reports").glob("*.json")
    failures = json.loads(report.read_text())["failures"]
    assert [f["reason"] for f in failures] == ["invalid_text"]


def test_index_info_reads_as_text_not_python_reprs(tiny_index):
    text = run_cli("index", "info", str(tiny_index)).stdout
    assert "images: 30" in text and "model: test_vit" in text
    assert "None" not in text and "{" not in text and "True" not in text and "False" not in text
    floats = [w for w in text.replace(",", " ").split() if "." in w and w.replace(".", "").isdigit()]
    assert all(len(w.split(".")[1]) <= 4 for w in floats), floats


def test_index_add_keeps_the_indexs_labelling_rule(small_gallery, tmp_path):
    import shutil

    _, photos = small_gallery
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, chosen in ((first, photos[:3] + photos[10:13]), (second, photos[3:5] + photos[13:15])):
        for p in chosen:
            (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, folder / p.parent.name / p.name)
    index = tmp_path / "index"
    run_cli("index", "build", str(index), "--from", str(first), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0", "--label-from-parent")
    out = run_cli("index", "add", str(index), "--from", str(second), "--no-progress", "--workers", "0")
    assert "parent folders" in out.stderr and "added 4 images" in out.stdout
    from indexer import open_index

    with open_index(index) as gallery:
        assert all(r.label == Path(r.path).parent.name for r in gallery.rows()) and len(gallery) == 10
    unlabelled = tmp_path / "more.csv"
    unlabelled.write_text("path\n" + "".join(f"{p}\n" for p in photos[20:22]))
    out = run_cli("index", "add", str(index), "--from", str(unlabelled), "--no-progress", "--workers", "0")
    assert "warning: 2 of the 2 new images have no label" in out.stderr


def test_search_a_folder_as_json_lines(small_gallery, tiny_index, tmp_path):
    import shutil

    manifest, photos = small_gallery
    index = tiny_index
    queries = tmp_path / "queries"
    queries.mkdir()
    for p in photos[:5]:
        shutil.copy(p, queries / p.name)
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = run_cli("search", str(queries), "--index", str(index), "--json", "--top-k", "3", "--batch-size", "2",
                  "--where", '{"label": "hat"}', check=False)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 1 and "searched 5 images; 1 could not be read" in out.stderr
    by_query = {line["query"]: line for line in lines}
    assert set(by_query) == {p.name for p in photos[:5]} | {"broken.jpg"}
    assert "error" in by_query["broken.jpg"]
    for p in photos[:5]:
        hits = by_query[p.name]["results"]
        assert len(hits) == 3 and all(h["label"] == "hat" for h in hits)
    first = by_query[photos[0].name]["results"]
    assert any(h["path"] == str(photos[0]) and h["rank_before"] == 0 for h in first)  # itself (a hat), first by cosine


def test_export_writes_every_image_with_its_vector_and_metadata(tiny_index, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from indexer import open_index

    index = tiny_index
    out = tmp_path / "gallery.parquet"
    assert "wrote 30 images" in run_cli("index", "export", str(index), "--out", str(out)).stdout
    table = pq.read_table(out)
    assert table.num_rows == 30 and not list(tmp_path.glob(".*.partial"))
    with open_index(index) as gallery:
        ids = np.array(table.column("faiss_id").to_pylist())
        vectors = np.array(table.column("global").to_pylist(), np.float32)
        np.testing.assert_array_equal(vectors, gallery.global_vectors(ids))
        rows = {r.row: r for r in gallery.rows()}
    for faiss_id, image_id, label, meta in zip(ids, table.column("id").to_pylist(), table.column("label").to_pylist(),
                                               table.column("metadata").to_pylist()):
        row = rows[int(faiss_id)]
        assert (image_id, label, json.loads(meta)) == (row.id, row.label, row.metadata)


def test_the_duplicates_report(small_gallery, tmp_path):
    import csv
    import shutil

    from PIL import Image

    _, photos = small_gallery
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:6]:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[0], folder / "exact-copy.jpg")
    Image.open(photos[1]).convert("RGB").save(folder / "near-copy.png")  # the same pixels, other bytes
    index = tmp_path / "index"
    run_cli("index", "build", str(index), "--from", str(folder), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0")
    out = run_cli("index", "duplicates", str(index), check=False)
    assert out.returncode != 0 and "give --threshold" in out.stderr  # random weights: no measured threshold
    report = json.loads(run_cli("index", "duplicates", str(index), "--threshold", "0.999", "--json",
                                "--csv", str(tmp_path / "d.csv"), "--pictures", str(tmp_path / "pics")).stdout)
    assert [sorted(g) for g in report["exact"]] == [sorted([photos[0].name, "exact-copy.jpg"])]
    assert [sorted((p["id"], p["other"])) for p in report["near"]] == [sorted([photos[1].name, "near-copy.png"])]
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert [r["kind"] for r in rows] == ["exact", "near"]
    assert len(list((tmp_path / "pics").glob("*.png"))) == 2


def test_index_build_and_add_announce_their_stages(small_gallery, tmp_path):
    """Issue 23: a long command says ``[i/n] stage`` (on stderr, so stdout stays the result)."""
    from indexer.build import BUILD_STAGES

    manifest, _ = small_gallery
    index = tmp_path / "index"
    built = run_cli("index", "build", str(index), "--from", str(manifest), "--model", "test_vit", "--weights", "random",
                    "--workers", "0")
    stage_lines = [line for line in built.stderr.splitlines() if re.match(r"\[\d/\d\] ", line)]
    assert [line.split(":")[0] for line in stage_lines] == [
        f"[{k + 1}/{len(BUILD_STAGES)}] {name}" for k, name in enumerate(BUILD_STAGES)]
    assert "embed and store: 30 new images" in built.stderr and "done in" in built.stderr
    assert "added 30 images" in built.stdout  # the result stays on stdout

    added = run_cli("index", "add", str(index), "--from", str(manifest), "--workers", "0")
    assert "[3/5] embed and store: 0 new images (30 indexed already)" in added.stderr
    assert "[4/5] train the global index: trained already" in added.stderr
    quiet = run_cli("index", "add", str(index), "--from", str(manifest), "--no-progress", "--workers", "0")
    assert "[1/5]" not in quiet.stderr
