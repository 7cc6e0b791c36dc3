"""Each evaluation loader on a miniature copy of its official layout."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.datasets import (
    DatasetError, load_cars, load_class_folder, load_cub, load_dataset, load_msls, load_pairs, load_sop,
    positives_within,
)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# --- CUB-200-2011 -------------------------------------------------------------------------

def make_cub(root):
    """Classes 1, 100 (train half) and 101, 150, 200 (test half), images listed out of class order."""
    rows = [(1, 150), (2, 1), (3, 101), (4, 200), (5, 100), (6, 101), (7, 150), (8, 101)]
    (root / "images").mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i} {c:03d}.Bird_{c}/img_{i}.jpg\n" for i, c in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c in rows))
    return rows


def test_cub_test_split_is_classes_101_to_200(tmp_path):
    make_cub(tmp_path)
    data = load_cub(tmp_path)
    assert data.name == "cub" and data.protocol == "class"
    assert [r.id for r in data.records] == [
        "101.Bird_101/img_3.jpg", "101.Bird_101/img_6.jpg", "101.Bird_101/img_8.jpg",
        "150.Bird_150/img_1.jpg", "150.Bird_150/img_7.jpg", "200.Bird_200/img_4.jpg",
    ]
    assert data.labels.tolist() == [101, 101, 101, 150, 150, 200]
    assert [r.label for r in data.records] == ["101", "101", "101", "150", "150", "200"]
    assert data.records[0].path == str(tmp_path.resolve() / "images" / "101.Bird_101" / "img_3.jpg")
    assert data.summary() == {"images": 6, "classes": 3}


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "images"])
def test_cub_incomplete_root_names_the_missing_file(tmp_path, missing):
    make_cub(tmp_path)
    target = tmp_path / missing
    target.rmdir() if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match=missing):
        load_cub(tmp_path)


def test_cub_malformed_line_names_file_and_line(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "image_class_labels.txt").write_text("1 150\n2 one\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt, line 2"):
        load_cub(tmp_path)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root does not exist"):
        load_dataset("cub", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)


# --- Cars196 ------------------------------------------------------------------------------

def make_cars(root, classes_and_test):
    from scipy.io import savemat

    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("class", "O"), ("test", "O")]
    ann = np.array(
        [(f"car_ims/{i + 1:06d}.jpg", np.uint16(3), np.uint8(c), np.uint8(t)) for i, (c, t) in enumerate(classes_and_test)],
        dtype=dtype,
    )
    (root / "car_ims").mkdir(parents=True)
    savemat(root / "cars_annos.mat", {"annotations": ann.reshape(1, -1),
                                      "class_names": np.array([f"car {i}" for i in range(196)], dtype=object)})


def test_cars_uses_classes_99_to_196_whatever_the_test_flag(tmp_path):
    make_cars(tmp_path, [(1, 0), (98, 1), (99, 0), (196, 1), (99, 1), (150, 0), (97, 1)])
    data = load_cars(tmp_path)
    assert data.labels.tolist() == [99, 99, 150, 196]
    assert [r.id for r in data.records] == ["car_ims/000003.jpg", "car_ims/000005.jpg", "car_ims/000006.jpg",
                                            "car_ims/000004.jpg"]
    assert data.records[0].path == str(tmp_path.resolve() / "car_ims" / "000003.jpg")


def test_cars_single_annotation_and_errors(tmp_path):
    make_cars(tmp_path, [(120, 1)])
    assert load_cars(tmp_path).labels.tolist() == [120]
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="cars_annos.mat"):
        load_cars(tmp_path)
    (tmp_path / "cars_annos.mat").unlink()
    with pytest.raises(DatasetError, match="missing file .*cars_annos.mat"):
        load_cars(tmp_path)


# --- Stanford Online Products --------------------------------------------------------------

def test_sop_reads_the_test_file(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 1 bicycle_final/1_0.JPG\n")
    (tmp_path / "Ebay_test.txt").write_text(
        "image_id class_id super_class_id path\n"
        "1 11319 1 bicycle_final/a_0.JPG\n"
        "2 11319 1 bicycle_final/a_1.JPG\n"
        "3 11320 1 bicycle_final/b_0.JPG\n"
        "4 11318 12 toaster_final/c_0.JPG\n"
    )
    data = load_sop(tmp_path)
    assert data.labels.tolist() == [11318, 11319, 11319, 11320]
    assert [r.id for r in data.records] == ["toaster_final/c_0.JPG", "bicycle_final/a_0.JPG",
                                            "bicycle_final/a_1.JPG", "bicycle_final/b_0.JPG"]
    assert data.summary() == {"images": 4, "classes": 3}
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 2 3\n")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt, line 2: expected 4 fields"):
        load_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError, match="Ebay_test.txt"):
        load_sop(tmp_path)


# --- folder per class ----------------------------------------------------------------------

def test_class_folder(tmp_path):
    for name in ("b/1.jpg", "b/2.png", "a/1.jpg", "a/notes.txt", "c/x.JPG"):
        touch(tmp_path / name)
    data = load_class_folder(tmp_path)
    assert [r.id for r in data.records] == ["a/1.jpg", "b/1.jpg", "b/2.png", "c/x.JPG"]
    assert data.labels.tolist() == [0, 1, 1, 2]
    assert data.subset(2).labels.tolist() == [0, 1]
    touch(tmp_path / "loose.jpg")
    with pytest.raises(DatasetError, match="directly in the root"):
        load_class_folder(tmp_path)


# --- MSLS ----------------------------------------------------------------------------------

E0, N0 = 350_000.0, 6_180_000.0  # a UTM origin in metres


def write_msls_split(folder, rows):
    """rows: (key, easting, northing, pano)."""
    (folder / "images").mkdir(parents=True)
    post = ",key,easting,northing,night,view_direction\n" + "".join(
        f"{i},{k},{e},{n},False,Forward\n" for i, (k, e, n, _) in enumerate(rows))
    raw = ",key,lon,lat,ca,captured_at,pano\n" + "".join(
        f"{i},{k},12.5,55.6,90.0,1500000000000,{p}\n" for i, (k, _, _, p) in reversed(list(enumerate(rows))))
    (folder / "postprocessed.csv").write_text(post)
    (folder / "raw.csv").write_text(raw)


def make_msls(root):
    base = root / "train_val"
    write_msls_split(base / "cph" / "query", [
        ("q1", E0, N0, False),
        ("qpano", E0, N0, True),       # panorama: out
        ("q2", E0 + 1000, N0, False),  # nothing within 25 m
    ])
    write_msls_split(base / "cph" / "database", [
        ("d_near", E0 + 24.9, N0, False),
        ("d_far", E0 + 25.1, N0, False),
        ("d_pano", E0 + 3, N0, True),      # panorama: out
        ("d_diag", E0 + 17.0, N0 + 17.0, False),  # 24.04 m
        ("d_edge", E0, N0 - 25.0, False),  # exactly 25 m: in
    ])
    write_msls_split(base / "sf" / "query", [("s1", E0, N0, False)])
    write_msls_split(base / "sf" / "database", [("s_db1", E0 + 2, N0, False), ("s_db2", E0 + 40, N0, False)])
    write_msls_split(base / "zurich" / "query", [("z1", E0, N0, False)])  # not a validation city
    write_msls_split(base / "zurich" / "database", [("z_db", E0, N0, False)])


def test_msls_positives_25m_panoramas_out_cities_filtered(tmp_path):
    make_msls(tmp_path)
    data = load_msls(tmp_path)
    assert data.protocol == "place" and data.group_names == ["cph", "sf"]
    assert [r.metadata["key"] for r in data.queries] == ["q1", "q2", "s1"]
    assert [r.metadata["key"] for r in data.database] == ["d_near", "d_far", "d_diag", "d_edge", "s_db1", "s_db2"]
    assert data.query_groups.tolist() == [0, 0, 1] and data.database_groups.tolist() == [0, 0, 0, 0, 1, 1]
    keys = [r.metadata["key"] for r in data.database]
    assert [[keys[i] for i in p] for p in data.positives] == [["d_near", "d_diag", "d_edge"], [], ["s_db1"]]
    q1 = data.queries[0]
    assert q1.id == "cph/query/images/q1.jpg"
    assert q1.path == str(tmp_path.resolve() / "train_val" / "cph" / "query" / "images" / "q1.jpg")
    assert data.summary()["queries_with_positives"] == 2
    # the train_val folder itself is accepted as the root too, and the cities can be chosen
    assert load_msls(tmp_path / "train_val", cities=("sf",)).group_names == ["sf"]


def test_msls_incomplete_root(tmp_path):
    make_msls(tmp_path)
    (tmp_path / "train_val" / "sf" / "database" / "raw.csv").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*sf/database/raw.csv"):
        load_msls(tmp_path)
    with pytest.raises(DatasetError, match="city 'cph'"):
        load_msls(tmp_path / "train_val" / "cph")
    (tmp_path / "train_val" / "cph" / "query" / "postprocessed.csv").write_text(",key,utm\n0,q1,x\n")
    with pytest.raises(DatasetError, match="no column 'easting'"):
        load_msls(tmp_path)


def test_positives_within_matches_brute_force():
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 200, (50, 2)) + [E0, N0]
    d = rng.uniform(0, 200, (300, 2)) + [E0, N0]
    got = positives_within(q, d, 25.0, chunk=7)
    for i in range(len(q)):
        expected = [j for j in range(len(d)) if np.hypot(*(q[i] - d[j])) <= 25.0]
        assert got[i].tolist() == expected


# --- query/database pairs ------------------------------------------------------------------

def test_pairs(tmp_path):
    for name in ("query/a.jpg", "query/b.jpg", "ref/1.jpg", "ref/2.jpg", "ref/3.jpg"):
        touch(tmp_path / name)
    (tmp_path / "ground_truth.csv").write_text("query,matching_refs\nquery/b.jpg,ref/3.jpg ref/1.jpg\nquery/a.jpg,\n")
    data = load_pairs(tmp_path)
    assert [r.id for r in data.queries] == ["query/b.jpg", "query/a.jpg"]
    assert [r.id for r in data.database] == ["ref/1.jpg", "ref/2.jpg", "ref/3.jpg"]
    assert [p.tolist() for p in data.positives] == [[0, 2], []]
    (tmp_path / "ground_truth.csv").write_text("query,matching_refs\nquery/a.jpg,ref/9.jpg\n")
    with pytest.raises(DatasetError, match=r"ground_truth.csv, line 2: 'ref/9.jpg'"):
        load_pairs(tmp_path)
    (tmp_path / "ground_truth.csv").write_text("query,refs\n")
    with pytest.raises(DatasetError, match="no column 'matching_refs'"):
        load_pairs(tmp_path)
    (tmp_path / "ground_truth.csv").unlink()
    with pytest.raises(DatasetError, match="missing file .*ground_truth.csv"):
        load_pairs(tmp_path)


def test_pairs_on_the_shared_corridor(shared_data):
    data = load_pairs(shared_data / "corridor")
    assert len(data.queries) == 111 and len(data.database) == 111
    assert data.positives[0].tolist() == [0, 1, 2]
    sub = data.subset(10)
    assert len(sub.queries) == 10 and len(sub.database) == 10 and all((p < 10).all() for p in sub.positives)
