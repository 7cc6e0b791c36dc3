"""Feature cache, search and reranking sweep of the evaluation, on synthetic data and a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit_kwargs
from evaluation.datasets import ClassSet, PlaceSet
from evaluation.features import FeatureStore, cache_key, compute_features, entry_folder, load_entry
from evaluation.metrics import class_metrics, class_r
from evaluation.protocol import (
    PAD, DeviceFeatures, Ranking, Structural, Sweep, evaluate, reranked_relevance, structural_scores, top_candidates,
)
from evaluation.runner import EvaluationError, resolve_marginals
from indexer.sources import ImageRecord
from reranker.backbones import create_backbone
from reranker.rerank import Features, rerank_batch

CPU = torch.device("cpu")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_store(n: int, seed: int = 0, dim: int = 16, patches: int = 9, classes: int = 5) -> tuple[FeatureStore, np.ndarray]:
    """Clustered features of ``n`` images in a store, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    g = unit(centres[labels] + rng.normal(size=(n, dim)))
    p = unit(centres[labels][:, None, :] + 1.5 * rng.normal(size=(n, patches, dim)))
    w = rng.uniform(0.1, 1, (n, patches)).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    store = FeatureStore(folder=None, key={}, ids=[str(i) for i in range(n)], ok=np.ones(n, bool),
                         global_features=g, patch_features=p.astype(np.float16), patch_weights={"rollout": w})
    return store, labels


def records(n: int) -> list[ImageRecord]:
    return [ImageRecord(f"/nowhere/{i}.jpg", f"{i}.jpg", None) for i in range(n)]


# --- search ------------------------------------------------------------------------------

def test_top_candidates_match_faiss_and_leave_the_query_out():
    store, _ = synthetic_store(200)
    x = store.global_features
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    want_scores, want_ids = index.search(x, 11)
    g = torch.from_numpy(x)
    scores, ids = top_candidates(g, g, 10, exclude=torch.arange(200), chunk=64)
    assert not (ids == np.arange(200)[:, None]).any()
    assert (want_ids[:, 0] == np.arange(200)).all()  # faiss finds each image itself first
    np.testing.assert_array_equal(ids, want_ids[:, 1:])
    np.testing.assert_allclose(scores, want_scores[:, 1:], atol=1e-5)


# --- one structural solve serves every K ----------------------------------------------------

def test_reranking_for_a_smaller_k_reuses_the_largest_solve():
    store, labels = synthetic_store(120, seed=3)
    feats = DeviceFeatures(store, CPU)
    g = torch.from_numpy(store.global_features)
    scores, rows = top_candidates(g, g, 30, exclude=torch.arange(120))
    ranking = Ranking(np.arange(120), rows, scores, labels[rows] == labels[:, None])
    sigma = structural_scores(ranking, feats, 30, Structural("ot", "rollout", 0.9), eps=0.05, batch=17, progress=False)
    k = 12
    direct = rerank_batch(
        Features(g, torch.from_numpy(store.patch_features.astype(np.float32)), torch.from_numpy(store.patch_weights["rollout"])),
        Features(g[rows[:, :k]], torch.from_numpy(store.patch_features[rows[:, :k]].astype(np.float32)),
                 torch.from_numpy(store.patch_weights["rollout"][rows[:, :k]])),
        torch.from_numpy(scores[:, :k]), marginals="rollout", s=0.9,
    )
    np.testing.assert_allclose(sigma[:, :k], direct.structural_scores.numpy(), atol=2e-4)
    expected = np.take_along_axis(ranking.relevant[:, :k], direct.order.numpy(), axis=1)
    got = reranked_relevance(ranking, sigma, k, lam=1.0)
    # ties within 2e-4 could swap; on these data the two orders agree exactly
    np.testing.assert_array_equal(got[:, :k], expected)
    np.testing.assert_array_equal(got[:, k:], ranking.relevant[:, k:])  # beyond K: global order
    assert (got != ranking.relevant).any()


def test_padding_stays_last():
    ranking = Ranking(np.array([0]), np.array([[1, 2, PAD]]), np.array([[0.9, 0.1, -np.inf]], np.float32),
                      np.array([[False, True, False]]))
    sigma = np.array([[0.0, 5.0, 9.0]], np.float32)
    assert reranked_relevance(ranking, sigma, 3, 1.0).tolist() == [[True, False, False]]


# --- the protocols on synthetic stores -----------------------------------------------------

def test_class_protocol_baseline_and_variants():
    store, labels = synthetic_store(90, seed=1)
    labels[0] = 99  # alone in its class: not a query
    store.ok[5] = False  # a failed image takes no part
    data = ClassSet("synthetic", "/nowhere", records(90), labels)
    out = evaluate(data, store, Sweep(["rollout", "uniform"], [1.0, 0.8], [5, 20]), CPU, progress=False)
    assert out.counts == {"images": 90, "images_failed": 1, "images_used": 89, "queries": 88,
                          "queries_without_match": 1}
    # baseline: brute force over the 89 images that loaded
    keep = np.flatnonzero(store.ok)
    x, lab = store.global_features[keep], labels[keep]
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]
    want = class_metrics(lab[order] == lab[:, None], class_r(lab))
    assert out.baseline == pytest.approx(want)
    assert list(out.variants) == [f"s={s},marginals={m},k={k}" for m in ("rollout", "uniform")
                                  for s in ("1", "0.8") for k in (5, 20)]
    for v in out.variants.values():
        assert set(v) == {"precision_at_1", "r_precision", "map_at_r"} and all(0 <= x <= 1 for x in v.values())
    assert set(out.rerank_timings) == {"s=1,marginals=rollout", "s=0.8,marginals=rollout",
                                       "s=1,marginals=uniform", "s=0.8,marginals=uniform"}


def test_place_protocol_searches_within_each_group():
    store, _ = synthetic_store(60, seed=2)
    nq = 10
    db_groups = np.array([0] * 30 + [1] * 20)
    q_groups = np.array([0] * 5 + [1] * 5)
    positives = [np.array([q, q + 1]) if q < 5 else np.array([30 + q - 5]) for q in range(nq)]
    positives[9] = np.array([], dtype=np.int64)  # no positive: left out
    store.ok[nq + 30] = False  # query 5's only positive failed to load: left out
    data = PlaceSet("p", "/nowhere", records(nq), records(50), positives, q_groups, db_groups, ["a", "b"])
    out = evaluate(data, store, Sweep(["crosscorr"], [1.0], [25]), CPU, progress=False)
    assert out.counts["queries_without_positive"] == 2 and out.counts["queries_evaluated"] == 8
    assert list(out.baseline) == [f"recall_at_{n}" for n in (1, 5, 10, 20, 50, 100)]
    # group b has 19 usable database images: every kept query of b finds its positive within 19
    assert out.baseline["recall_at_50"] == 1.0 and out.baseline["recall_at_100"] == 1.0
    # by hand: rank of the first positive among the query's own group
    ranks = []
    for q in range(nq):
        if q in (5, 9):
            continue
        db = np.flatnonzero((db_groups == q_groups[q]) & store.ok[nq:])
        sims = store.global_features[nq + db] @ store.global_features[q]
        order = db[np.argsort(-sims, kind="stable")]
        ranks.append(min(int(np.flatnonzero(order == p)[0]) for p in positives[q] if p in order))
    ranks = np.array(ranks)
    for n in (1, 5, 10, 20):
        assert out.baseline[f"recall_at_{n}"] == pytest.approx(np.mean(ranks < n))
    assert set(out.variants["s=1,marginals=crosscorr,k=25"]) == set(out.baseline)


# --- the feature cache ---------------------------------------------------------------------

@pytest.fixture
def image_records(tmp_path):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        recs.append(ImageRecord(str(path), path.name, None))
    bad = tmp_path / "img" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    recs.insert(2, ImageRecord(str(bad), bad.name, None))
    return recs


def test_feature_cache_reuse_failures_and_model_identity(tmp_path, image_records):
    kwargs = tiny_vit_kwargs()
    backbone = create_backbone("test_vit", "random", model_kwargs=kwargs)
    key = cache_key("folder", str(tmp_path), image_records, backbone, kwargs, ["rollout"])
    cache = tmp_path / "cache"
    first = compute_features(backbone, image_records, key, cache, batch_size=4, workers=0, progress=False)
    assert not first.cached and first.images_embedded == 6
    assert first.ok.tolist() == [True, True, False, True, True, True, True]
    assert [f["id"] for f in first.failures] == ["bad.jpg"] and first.failures[0]["reason"] == "corrupt"
    assert first.patch_features.shape == (7, 49, 32) and first.patch_features.dtype == np.float16
    np.testing.assert_allclose(first.patch_weights["rollout"][first.ok].sum(1), 1, atol=1e-5)
    assert [p.name for p in cache.iterdir()] == [entry_folder(cache, key).name]  # no staging left

    again = compute_features(backbone, image_records, key, cache, workers=0, progress=False)
    assert again.cached and again.images_embedded == 0
    np.testing.assert_array_equal(again.global_features, first.global_features)
    np.testing.assert_array_equal(again.patch_features, first.patch_features)

    # another model (here: other constructor arguments) gets its own entry, never this one
    other_kwargs = {**kwargs, "depth": 2}
    other = create_backbone("test_vit", "random", model_kwargs=other_kwargs)
    other_key = cache_key("folder", str(tmp_path), image_records, other, other_kwargs, ["rollout"])
    assert entry_folder(cache, other_key) != entry_folder(cache, key)
    # even an entry whose folder name matched would be refused on its recorded key
    assert load_entry(entry_folder(cache, key), other_key) is None
    meta = entry_folder(cache, key) / "meta.json"
    doc = json.loads(meta.read_text())
    doc["key"]["model"] = "something_else"
    meta.write_text(json.dumps(doc))
    assert not compute_features(backbone, image_records, key, cache, workers=0, progress=False).cached


def test_rollout_needs_global_attention():
    swin = create_backbone("swin_tiny_patch4_window7_224", "random",
                           model_kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)))
    assert resolve_marginals(swin, None) == ["crosscorr", "uniform"]
    with pytest.raises(EvaluationError, match="rollout marginals need global self-attention"):
        resolve_marginals(swin, ["rollout", "uniform"])
    vit = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    assert resolve_marginals(vit, None) == ["rollout", "crosscorr", "uniform"]
    with pytest.raises(EvaluationError, match="unknown marginals"):
        resolve_marginals(vit, ["sinkhorn"])
    with pytest.raises(ValueError, match="s must be in"):
        Sweep(["uniform"], [1.5], [10])


# --- a fine-tuned projection head -------------------------------------------------------------

def test_projection_head_files(tmp_path):
    from safetensors.torch import save_file

    from evaluation.head import load_linear_head

    layer = torch.nn.Linear(32, 8)
    torch.save({"state_dict": {"head.weight": layer.weight.detach(), "head.bias": layer.bias.detach()}},
               tmp_path / "head.pth")
    save_file({"proj.weight": layer.weight.detach().contiguous()}, str(tmp_path / "head.safetensors"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_linear_head(tmp_path / "head.pth", 32)(x), layer(x))
        torch.testing.assert_close(load_linear_head(tmp_path / "head.safetensors", 32)(x), x @ layer.weight.T)
    with pytest.raises(ValueError, match="takes 32-d input, the backbone gives 64-d"):
        load_linear_head(tmp_path / "head.pth", 64)
    with pytest.raises(FileNotFoundError, match="head file not found"):
        load_linear_head(tmp_path / "none.pth", 32)


def test_run_with_a_head_and_limit(tmp_path, image_records):
    from evaluation.runner import EvalSettings, run_evaluation

    root = tmp_path / "set"
    for i, rec in enumerate(image_records):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"class{i % 2}" / Path(rec.path).name).symlink_to(rec.path)
    torch.save(torch.nn.Linear(32, 8).state_dict(), tmp_path / "head.pth")
    common = dict(dataset="folder", root=str(root), model="test_vit", weights="random",
                  model_kwargs=tiny_vit_kwargs(), marginals=["rollout"], k_values=[3], workers=0,
                  progress=False, cache_dir=tmp_path / "cache")
    doc = run_evaluation(EvalSettings(**common, head=str(tmp_path / "head.pth"), limit=6), CPU)
    assert doc["settings"]["head"].startswith("file:head.pth:")
    assert doc["counts"]["images"] == 6 and doc["counts"]["images_failed"] == 1  # bad.jpg, kept in the first 6
    assert any("--limit 6" in n for n in doc["notes"])
    plain = run_evaluation(EvalSettings(**common, limit=6), CPU)
    assert plain["embedding"]["cached"] is False  # the head is part of the features' identity
    assert len(list((tmp_path / "cache").iterdir())) == 2
