"""Patch codes: the product quantizer round trip, bytes per image, an index of codes that searches,
and ``verify`` catching a corrupt or half-written code file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.index_dir import IndexDir
from indexer.patch_codes import PatchCodec, parse_spec
from scale_support import DIM, GRID, clustered, make_gallery, new_images


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    return clustered(4000, clusters=40, seed=3)


def test_codes_round_trip_matches_faiss_and_survives_save_load(patches, tmp_path):
    codec = PatchCodec.fit(patches, "pq8")
    codes = codec.encode(patches[:300].reshape(30, 10, DIM))
    assert codes.shape == (30, 10, 8) and codes.dtype == np.uint8 and codec.bytes_per_patch == 8
    decoded = codec.decode_torch(torch.from_numpy(codes), "cpu").numpy().reshape(300, DIM)
    pq = codec._faiss_pq()
    reference = pq.decode(codes.reshape(300, 8))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(decoded, reference, atol=1e-5)  # a gather of the same centroids
    cosine = (decoded * patches[:300]).sum(1)
    assert cosine.mean() > 0.9  # clustered data: 8 bytes keep the direction
    assert np.allclose(np.linalg.norm(decoded, axis=1), 1, atol=1e-5)
    codec.save(tmp_path)
    again = PatchCodec.load(tmp_path)
    assert again.spec == "pq8" and again.trained_on == codec.trained_on
    np.testing.assert_array_equal(again.encode(patches[:50]), codec.encode(patches[:50]))


def test_more_bytes_reconstruct_better_and_opq_rotates(patches):
    errors = []
    for spec in ("pq4", "pq8", "pq16"):
        codec = PatchCodec.fit(patches, spec)
        decoded = codec.decode(codec.encode(patches[:500]))
        errors.append(float(np.mean(1 - (decoded * patches[:500]).sum(1))))
    assert errors[0] > errors[1] > errors[2]
    opq = PatchCodec.fit(patches[:1000], "opq4")
    assert opq.rotation is not None and opq.rotation.shape == (DIM, DIM)
    decoded = opq.decode(opq.encode(patches[:200]))
    assert (decoded * patches[:200]).sum(1).mean() > 0.5


@pytest.mark.parametrize("spec, message", [("pq5", "not divisible"), ("q32", "look like"), ("", "look like")])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec, DIM)


def test_too_few_patches_to_train_is_an_error():
    with pytest.raises(ValueError, match="at least 256"):
        PatchCodec.fit(clustered(100), "pq8")


def test_an_index_of_codes_stores_bytes_and_decodes_only_on_request(tmp_path):
    gallery = make_gallery(tmp_path / "index", 300, patch_codes="pq8")
    with gallery:
        assert gallery.codec is not None and gallery.store.patch_part == "codes"
        assert gallery.patch_bytes_per_image() == GRID * GRID * (8 + 4)  # codes + float32 weights
        seg = gallery.segments[0]
        arrays = gallery.store.segment(seg)
        assert arrays["codes"].dtype == np.uint8 and arrays["codes"].shape[1:] == (GRID * GRID, 8)
        assert not (gallery.store.folder / f"{seg:08d}.patches.npy").exists()
        rows, raw = gallery.features([0, 5], decode=False)
        assert raw.patch_features.dtype == np.uint8
        rows, feats = gallery.features([0, 5])
        assert feats.patch_features.dtype == np.float16 and feats.patch_features.shape == (2, GRID * GRID, DIM)
        original = new_images(0, 200, seed=0).features.patch_features[[0, 5]]
        cosine = (feats.patch_features.astype(np.float32) * original).sum(-1)
        assert cosine.mean() > 0.85
        on_device = gallery.decode_patches(raw.patch_features, "cpu")
        np.testing.assert_allclose(on_device.numpy(), feats.patch_features.astype(np.float32), atol=2e-3)
        assert gallery.verify().ok
        info = gallery.info()
        assert info["patch_codes"] == "pq8" and info["patch_bytes_per_image"] == GRID * GRID * 12


def test_codes_are_checked_by_verify_corrupt_and_half_written(tmp_path):
    gallery = make_gallery(tmp_path / "index", 250, chunk=250, patch_codes="pq8")
    seg = gallery.segments[0]
    path = gallery.store.folder / f"{seg:08d}.codes.npy"
    gallery.close()
    good = path.read_bytes()
    # One flipped byte in the middle of the codes: same size, still a valid .npy.
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with IndexDir.open(tmp_path / "index") as g:
        report = g.verify()
        assert not report.ok and any("codes" in p and "differ" in p for p in report.problems), report.problems
    # Half-written: the file cut short.
    path.write_bytes(good[: len(good) // 2])
    with IndexDir.open(tmp_path / "index") as g:
        report = g.verify()
        assert not report.ok and any(f"segment {seg}" in p for p in report.problems)
    path.write_bytes(good)
    with IndexDir.open(tmp_path / "index") as g:
        assert g.verify().ok
    # The codebook itself.
    book = tmp_path / "index" / "codes.npz"
    data = bytearray(book.read_bytes())
    data[-40] ^= 0x01
    book.write_bytes(bytes(data))
    with IndexDir.open(tmp_path / "index") as g:
        report = g.verify()
        assert not report.ok and any("codes.npz" in p for p in report.problems)


def test_compaction_and_removal_keep_codes_and_checksums(tmp_path, monkeypatch):
    import indexer.compaction as compaction

    monkeypatch.setattr(compaction, "COMPACT_MAX_SMALL", 2)
    gallery = make_gallery(tmp_path / "index", 300, chunk=60, patch_codes="pq8")
    with gallery:
        assert len(gallery.segments) <= 3  # merged as they came
        before = gallery.features([10, 250])[1].patch_features
        assert gallery.remove(["img11", "img12"]) == []
        assert gallery.compact(force=True) >= 0
        assert gallery.verify().ok
        after = gallery.features([10, 250])[1].patch_features
        np.testing.assert_array_equal(before, after)  # codes copied exactly
        assert set(gallery.checksums) == {str(s) for s in gallery.segments}
