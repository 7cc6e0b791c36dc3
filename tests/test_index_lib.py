"""The indexer as a library: bad files through a build, duplicates, PCA, FAISS factories,
searching from Python, CPU/GPU parity and refusing a mismatched index."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit_kwargs
from indexer.build import add_records, backbone_for, new_manifest
from indexer.index_dir import IndexDir
from indexer.loading import LoadLimits, load_image
from indexer.manifest import FORMAT_VERSION, IndexMismatchError, Manifest
from indexer.search import Searcher, SearchSettings
from indexer.sources import ImageRecord
from indexer.vector_index import VectorSearcher, base_index, build_index
from reranker.backbones import create_backbone

CLASSES = ("hat", "shoes", "skirt")


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    """24 real clothing photos, 8 from each of three classes."""
    out: list[Path] = []
    for cls in CLASSES:
        out += sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:8]
    return out


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())


def records_of(paths: list[Path]) -> list[ImageRecord]:
    return [ImageRecord(path=str(p), id=p.name, label=p.parent.name) for p in paths]


def build(folder: Path, backbone, records, *, factory="Flat", pca_dim=None, patch_weights="rollout", **kwargs):
    manifest = new_manifest(backbone, patch_weights=patch_weights, factory=factory,
                            pca_dim=pca_dim, model_kwargs=tiny_vit_kwargs())
    gallery = IndexDir.create(folder, manifest)
    report = add_records(gallery, backbone, records, workers=0, progress=False, **kwargs)
    return gallery, report


@pytest.fixture(scope="module")
def flat_gallery(tmp_path_factory, backbone, photos):
    gallery, report = build(tmp_path_factory.mktemp("flat") / "index", backbone, records_of(photos), commit_every=10)
    assert report.added == len(photos)
    yield gallery
    gallery.close()


# --- every kind of bad file in one build -------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_bad_files_are_skipped_with_their_reasons_and_the_build_goes_on(tmp_path, backbone, photos):
    src = tmp_path / "src"
    src.mkdir()
    good = []
    for p in photos[:4]:
        shutil.copy(p, src / p.name)
        good.append(src / p.name)
    real = photos[0].read_bytes()
    damaged = bytearray(_png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 60, 3), np.uint8))))
    damaged[200:400] = bytes(b ^ 0x5A for b in damaged[200:400])  # inside the compressed pixel data
    bad = {
        "corrupt": (src / "damaged.png", bytes(damaged)),
        "truncated": (src / "half.jpg", real[: len(real) // 2]),
        "empty": (src / "empty.jpg", b""),
        "unsupported": (src / "notes.png", b"just some text, not an image\n" * 20),
        # 2500 x 2000 = 5 Mpx of one colour: a few kB on disk, over the 4 Mpx limit below.
        "decompression_bomb": (src / "bomb.png", _png_bytes(Image.new("RGB", (2500, 2000), (9, 9, 9)))),
        # Noise does not compress: about 1.2 MB, over the 1 MB file limit below.
        "too_large_file": (src / "big.png", _png_bytes(Image.fromarray(
            np.random.default_rng(1).integers(0, 256, (640, 640, 3), np.uint8)))),
    }
    for path, data in bad.values():
        path.write_bytes(data)
    assert all(p.stat().st_size < 2**20 for p in good)
    records = records_of(good) + [ImageRecord(path=str(p), id=p.name) for p, _ in bad.values()]
    records.append(ImageRecord(path=str(src / "gone.jpg"), id="gone.jpg"))
    limits = LoadLimits(max_pixels=4_000_000, max_file_bytes=2**20)

    index = tmp_path / "index"
    gallery, report = build(index, backbone, records, limits=limits, commit_every=3)
    with gallery:
        assert report.added == 4 and len(gallery) == 4
        reasons = {f.id: f.reason for f in report.failures}
        expected = {path.name: reason for reason, (path, _) in bad.items()} | {"gone.jpg": "missing"}
        assert reasons == expected
        assert all(f.message for f in report.failures)
        assert gallery.verify().ok
    # The report on disk lists every skipped file with its reason.
    (saved,) = (index / "reports").glob("build-*.json")
    on_disk = json.loads(saved.read_text())
    assert on_disk["added"] == 4
    assert {f["id"]: f["reason"] for f in on_disk["failures"]} == expected


# --- exact duplicates ----------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_exact_duplicates_are_reported_and_skipped_on_request(tmp_path, backbone, photos, skip):
    src = tmp_path / "src"
    src.mkdir()
    for p in photos[:3]:
        shutil.copy(p, src / p.name)
    shutil.copy(photos[0], src / "copy-of-first.jpg")
    records = records_of(sorted(src.iterdir()))
    gallery, report = build(tmp_path / "index", backbone, records, skip_duplicates=skip)
    with gallery:
        assert report.duplicates == [("copy-of-first.jpg", photos[0].name)] or report.duplicates == [
            (photos[0].name, "copy-of-first.jpg")
        ]
        assert len(gallery) == (3 if skip else 4)
        # A later add of yet another copy is caught against what the index already holds.
        shutil.copy(photos[1], src / "second-copy.jpg")
        again = add_records(gallery, backbone, records_of([src / "second-copy.jpg"]), workers=0,
                            progress=False, skip_duplicates=skip)
        assert again.duplicates == [("second-copy.jpg", photos[1].name)]
        assert again.added == (0 if skip else 1)


# --- PCA of the patch store ---------------------------------------------------------------------


def test_pca_reduces_the_patch_store_and_matches_an_svd(tmp_path, backbone, photos, flat_gallery):
    gallery, _ = build(tmp_path / "index", backbone, records_of(photos), pca_dim=8, commit_every=100)
    with gallery:
        info = gallery.info()
        assert info["patch_dim"] == 8
        assert info["bytes_per_image"] < flat_gallery.info()["bytes_per_image"] / 2
        rows, feats = gallery.features([0, 1, 2])
        assert feats.patch_features.shape[1:] == (49, 8)
        np.testing.assert_allclose(np.linalg.norm(feats.patch_features.astype(np.float32), axis=-1), 1, atol=2e-3)

        # Oracle: the PCA subspace is the span of the top right singular vectors of the centred patches.
        _, full = flat_gallery.features(list(range(len(photos))))
        x = full.patch_features.astype(np.float64).reshape(-1, full.patch_features.shape[-1])
        _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        ours = gallery.pca.components.astype(np.float64)
        overlap = np.linalg.svd(ours @ vt[:8].T, compute_uv=False)  # cosines of the principal angles
        assert overlap.min() > 0.99

        result = Searcher(gallery, backbone).search([load_image(photos[5])], SearchSettings(top_k=10, rerank_k=10))[0]
        assert any(h.id == photos[5].name and h.rank_before == 0 for h in result.hits)
        assert all(h.structural_score is not None and -1 <= h.structural_score <= 1 for h in result.hits)
        with pytest.raises(ValueError, match="reduced by a PCA"):
            Searcher(gallery, backbone).search([load_image(photos[5])], SearchSettings(marginals="crosscorr"))


# --- FAISS factories ----------------------------------------------------------------------------


@pytest.mark.parametrize("factory, kind", [("IVF2,Flat", faiss.IndexIVFFlat), ("HNSW8", faiss.IndexHNSWFlat),
                                           ("IVF2,PQ4x4", faiss.IndexIVFPQ)])
def test_non_flat_factories_train_search_and_remove(tmp_path, backbone, photos, factory, kind):
    folder = tmp_path / "index"
    gallery, report = build(folder, backbone, records_of(photos), factory=factory, commit_every=10)
    with gallery:
        assert report.added == len(photos) and gallery.trained
        assert isinstance(base_index(gallery.faiss), kind)
        assert gallery.verify().ok
        searcher = Searcher(gallery, backbone)
        query = photos[3]
        hits = searcher.search([load_image(query)], SearchSettings(top_k=5, rerank_k=0))[0].hits
        lossy = kind is faiss.IndexIVFPQ  # PQ codes are approximate: the query is near the top, not surely first
        assert query.name in [h.id for h in hits[: 5 if lossy else 1]]
        # Remove two images (HNSW cannot remove in place: the index is rebuilt from the store).
        assert gallery.remove([photos[3].name, photos[4].name]) == []
        assert len(gallery) == len(photos) - 2 and gallery.faiss.ntotal == len(photos) - 2
        assert gallery.verify().ok
        searcher.refresh()
        hits = searcher.search([load_image(query)], SearchSettings(top_k=5, rerank_k=0))[0].hits
        assert query.name not in {h.id for h in hits}
    with IndexDir.open(folder) as reopened:
        assert len(reopened) == len(photos) - 2 and reopened.trained
        assert isinstance(base_index(reopened.faiss), kind)


def test_a_bad_factory_string_is_a_clear_error_and_the_build_keeps_its_images(tmp_path, backbone, photos):
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        build(tmp_path / "index", backbone, records_of(photos[:4]), factory="NoSuchIndex")
    with IndexDir.open(tmp_path / "index") as gallery:  # committed before training: not lost
        assert len(gallery) == 4


# --- search from Python -------------------------------------------------------------------------


def test_python_search_scores_orders_and_determinism(flat_gallery, backbone, photos):
    searcher = Searcher(flat_gallery, backbone)
    queries = [load_image(photos[2]), load_image(photos[20])]
    settings = SearchSettings(top_k=10, rerank_k=6, lam=0.5)
    first = searcher.search(queries, settings)
    again = searcher.search(queries, settings)
    assert len(first) == 2
    stored, ids = flat_gallery.all_global_features()
    for q, (res, res2) in enumerate(zip(first, again)):
        assert [(h.id, h.final_score) for h in res.hits] == [(h.id, h.final_score) for h in res2.hits]
        hits = res.hits
        assert [h.rank_after for h in hits] == list(range(10))
        (itself,) = [h for h in hits if h.id == photos[[2, 20][q]].name]  # the query is in the gallery
        assert itself.rank_before == 0 and abs(itself.global_score - 1) < 1e-4
        # Global scores are the cosines with the stored vectors (numpy oracle), best first before reranking.
        cos = stored @ res.query.global_features.numpy()
        by_global = np.argsort(-cos, kind="stable")
        for h in hits:
            assert abs(h.global_score - cos[list(ids).index(h.faiss_id)]) < 1e-4
            assert abs(cos[by_global[h.rank_before]] - h.global_score) < 1e-4
        reranked = [h for h in hits if h.rank_before < 6]
        rest = [h for h in hits if h.rank_before >= 6]
        assert len(reranked) == 6 and hits[:6] == reranked and [h.rank_before for h in rest] == list(range(6, 10))
        for h in reranked:
            assert abs(h.final_score - (h.global_score + 0.5 * h.structural_score)) < 1e-5
        finals = [h.final_score for h in reranked]
        assert finals == sorted(finals, reverse=True)
        assert all(h.structural_score is None and h.final_score == h.global_score for h in rest)
        assert set(res.timings_ms) == {"embed", "search", "rerank", "gather", "structural", "final", "total"}
        t = res.timings_ms
        assert abs(t["rerank"] - (t["gather"] + t["structural"] + t["final"])) < 1e-6


def test_a_batch_of_queries_gives_what_each_query_gives_alone(flat_gallery, backbone, photos):
    searcher = Searcher(flat_gallery, backbone)
    images = [load_image(photos[i]) for i in (0, 7, 13)]
    settings = SearchSettings(top_k=8, rerank_k=12, s=0.9)
    together = searcher.search(images, settings, keep_plans=True)
    for image, batched in zip(images, together):
        (alone,) = searcher.search([image], settings, keep_plans=True)
        assert [h.id for h in batched.hits] == [h.id for h in alone.hits]
        # Equal up to the solver's tolerance (sigma within 1e-4) and float noise of a batched forward.
        for a, b in zip(batched.hits, alone.hits):
            assert abs(a.final_score - b.final_score) < 1e-4 and abs(a.structural_score - b.structural_score) < 1e-4
        # only the hits that can be returned (top_k of the rerank_k) keep their correspondences
        assert batched.plans.keys() == alone.plans.keys() == {h.id for h in alone.hits}
        for key in alone.plans:
            torch.testing.assert_close(batched.plans[key], alone.plans[key], atol=1e-4, rtol=0)
        # The kept candidate weights are the stored ones.
        assert alone.candidate_weights.keys() == alone.plans.keys()
        hits = {h.id: h for h in alone.hits}
        for key, weights in alone.candidate_weights.items():
            if key in hits:
                _, stored = flat_gallery.features([hits[key].faiss_id])
                np.testing.assert_array_equal(weights, stored.weights()[0])
        # Kept features come back in the order asked for; an id without any is refused by name.
        picked = alone.candidates_of(alone.candidate_ids[::-1][:3])
        torch.testing.assert_close(picked.patch_features, alone.candidates.patch_features.flip(0)[:3])
        with pytest.raises(ValueError, match="'no-such-id'"):
            alone.candidates_of([alone.candidate_ids[0], "no-such-id"])


def test_python_search_without_reranking_keeps_the_global_order(flat_gallery, backbone, photos):
    res = Searcher(flat_gallery, backbone).search([load_image(photos[9])], SearchSettings(top_k=5, rerank_k=0))[0]
    assert [h.rank_before for h in res.hits] == list(range(5))
    assert all(h.structural_score is None for h in res.hits)


def test_search_settings_are_checked(flat_gallery, backbone, photos):
    searcher = Searcher(flat_gallery, backbone)
    image = [load_image(photos[0])]
    for bad in (SearchSettings(s=0.0), SearchSettings(s=1.5), SearchSettings(top_k=0), SearchSettings(rerank_k=-1)):
        with pytest.raises(ValueError):
            searcher.search(image, bad)
    assert len(searcher.search(image, SearchSettings(top_k=3))[0].hits) == 3  # still usable


def test_rollout_marginals_are_refused_on_an_index_without_rollout(tmp_path, backbone, photos):
    gallery, _ = build(tmp_path / "index", backbone, records_of(photos[:5]), patch_weights="uniform")
    with gallery:
        searcher = Searcher(gallery, backbone)
        with pytest.raises(ValueError, match="no rollout weights"):
            searcher.search([load_image(photos[0])], SearchSettings(marginals="rollout"))
        assert searcher.resolve_marginals("auto") == "crosscorr"


def test_torch_top_k_equals_faiss(flat_gallery):
    vectors, _ = flat_gallery.all_global_features()
    queries = torch.from_numpy(vectors[:5] + 0.01)
    faiss_scores, faiss_ids = VectorSearcher(flat_gallery.faiss, torch.device("cpu"), "faiss").search(queries, 7)
    torch_searcher = VectorSearcher(flat_gallery.faiss, torch.device("cpu"), "torch")
    assert torch_searcher.backend == "torch-cpu"
    torch_scores, torch_ids = torch_searcher.search(queries, 7)
    np.testing.assert_array_equal(faiss_ids, torch_ids)
    np.testing.assert_allclose(faiss_scores, torch_scores, atol=1e-5)
    hnsw = build_index(vectors, np.arange(len(vectors)), "HNSW8")
    with pytest.raises(ValueError, match="needs a Flat index"):
        VectorSearcher(hnsw, torch.device("cpu"), "torch")
    assert VectorSearcher(hnsw, torch.device("cpu")).backend == "faiss-cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_give_the_same_results(flat_gallery, photos):
    images = [load_image(photos[1]), load_image(photos[17])]
    settings = SearchSettings(top_k=10, rerank_k=20)
    cpu = Searcher(flat_gallery, backbone_for(flat_gallery.manifest, torch.device("cpu")), "cpu").search(images, settings)
    gpu_searcher = Searcher(flat_gallery, backbone_for(flat_gallery.manifest, torch.device("cuda")), "cuda")
    assert gpu_searcher.vectors.backend in ("faiss-gpu", "torch-cuda")
    gpu = gpu_searcher.search(images, settings)
    for a, b in zip(cpu, gpu):
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        for x, y in zip(a.hits, b.hits):
            assert abs(x.global_score - y.global_score) < 2e-3
            assert abs(x.final_score - y.final_score) < 2e-3


# --- refusing an index made by another model or a newer format ----------------------------------


def test_a_newer_format_is_refused(tmp_path, backbone, photos):
    gallery, _ = build(tmp_path / "index", backbone, records_of(photos[:2]))
    gallery.close()
    path = tmp_path / "index" / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(IndexMismatchError, match="upgrade vit-rerank"):
        IndexDir.open(tmp_path / "index")


def test_another_model_or_weights_file_is_refused(flat_gallery, tmp_path):
    with pytest.raises(IndexMismatchError, match="built with model 'test_vit'"):
        flat_gallery.manifest.check_compatible("vit_small_patch16_224", None)
    other = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    weights = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in other.model.state_dict().items()}, weights)
    with pytest.raises(IndexMismatchError, match="not the one the index was built with"):
        backbone_for(flat_gallery.manifest, torch.device("cpu"), str(weights))


def test_manifest_round_trip_keeps_every_field(flat_gallery):
    again = Manifest.load(flat_gallery.folder)
    assert again == flat_gallery.manifest


# --- the query path does no work it does not need (issue 13) -----------------------------------------------


def _count_attention_captures(monkeypatch) -> list[int]:
    """Count the blocks whose attention the rollout accumulator is fed."""
    from reranker.rollout import PatchWeightAccumulator

    calls = [0]
    original = PatchWeightAccumulator.__call__

    def counting(self, attention, layout):
        calls[0] += 1
        return original(self, attention, layout)

    monkeypatch.setattr(PatchWeightAccumulator, "__call__", counting)
    return calls


@pytest.mark.parametrize("marginals", ["crosscorr", "uniform"])
def test_query_is_embedded_without_attention_unless_rollout_needs_it(flat_gallery, backbone, photos, monkeypatch,
                                                                      marginals):
    searcher = Searcher(flat_gallery, backbone)
    image = [load_image(photos[4])]
    settings = SearchSettings(top_k=8, rerank_k=8, marginals=marginals)
    calls = _count_attention_captures(monkeypatch)
    fused = [m.fused_attn for m in backbone.model.blocks.modules() if hasattr(m, "fused_attn")]
    seen: list[bool] = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, _i: seen.append(m.fused_attn)) for blk in backbone.model.blocks]
    try:
        fast = searcher.search(image, settings, keep_plans=True)[0]
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == 0 and seen == fused  # no capture: every block ran with its own (fused) setting
    w = fast.query.patch_weights
    assert w is None if marginals == "crosscorr" else torch.allclose(w, torch.full((49,), 1 / 49))
    # The same ranking and scores as a search that captures attention (the old query path).
    monkeypatch.setattr(Searcher, "query_weight_kind", lambda self, m: "rollout")
    slow = searcher.search(image, settings)[0]
    assert calls[0] == len(backbone.model.blocks)
    assert [h.id for h in fast.hits] == [h.id for h in slow.hits]
    for a, b in zip(fast.hits, slow.hits):
        assert abs(a.final_score - b.final_score) < 1e-4


def test_rollout_search_captures_attention_and_returns_the_weights_used(flat_gallery, backbone, photos, monkeypatch):
    calls = _count_attention_captures(monkeypatch)
    res = Searcher(flat_gallery, backbone).search([load_image(photos[4])], SearchSettings(marginals="rollout"))[0]
    assert calls[0] == len(backbone.model.blocks)
    _, stored = flat_gallery.features([[h for h in res.hits if h.id == photos[4].name][0].faiss_id])
    np.testing.assert_allclose(res.query.patch_weights.numpy(), stored.weights("rollout")[0], atol=1e-5)


def test_last_cls_captures_the_last_block_only(backbone, photos, monkeypatch):
    """``last_cls`` reads the last block's CLS row: only that block is captured, the others keep
    fused attention, and the weights equal those of a full capture."""
    batch = torch.stack([backbone.transform(load_image(p)) for p in photos[:3]])
    full = backbone(batch, with_attention=True, patch_weights=("last_cls",)).patch_weights["last_cls"]
    calls = _count_attention_captures(monkeypatch)
    fused_seen: list[bool] = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, _i: fused_seen.append(m.fused_attn))
             for blk in backbone.model.blocks]
    try:
        fast = backbone(batch, patch_weights=("last_cls",)).patch_weights["last_cls"]
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == 1
    assert fused_seen[-1] is False and fused_seen[:-1] == [blk.attn.fused_attn for blk in backbone.model.blocks][:-1]
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)


def test_pca_in_torch_matches_numpy():
    from indexer.pca import PatchPCA

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    pca = PatchPCA.fit(x, 8)
    got = pca.transform_tensor(torch.from_numpy(x[:40]).view(5, 8, 32))
    assert got.shape == (5, 8, 8) and got.dtype == torch.float32
    np.testing.assert_allclose(got.reshape(40, 8).numpy(), pca.transform(x[:40]), atol=1e-5)
