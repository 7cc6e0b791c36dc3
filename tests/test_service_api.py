"""The HTTP API in-process (httpx through FastAPI's TestClient) over a real index of clothing photos."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service_support import assert_error, copy_index, index_dir, make_client, photos, png_bytes  # noqa: F401 (fixtures)
from indexer.search_params import default


@pytest.fixture(scope="module")
def client(index_dir):
    """A read-only client: tests using it never change the index."""
    with make_client(index_dir, max_upload_bytes=400_000, max_image_pixels=4_000_000) as c:
        yield c


@pytest.fixture()
def own_index(index_dir, tmp_path) -> Path:
    return copy_index(index_dir, tmp_path / "index")


def search(client: TestClient, data: bytes, name: str = "q.jpg", mime: str = "image/jpeg", **form):
    return client.post("/search", files={"image": (name, data, mime)}, data={k: str(v) for k, v in form.items()})


# --- health, info, metrics -----------------------------------------------------------------------
def test_health_ready_index(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    info = client.get("/index").json()
    assert info["images"] == 30 and info["model"] == "test_vit" and info["weights"] == "random"
    assert info["random_weights"] is True and info["patch_weights"] == "rollout" and info["factory"] == "Flat"
    assert info["bytes_per_image"] > 0
    assert client.get("/openapi.json").json()["paths"]["/search"]["post"]
    assert client.get("/docs").status_code == 200


def test_readyz_is_503_until_loaded_and_says_why(tmp_path):
    with make_client(tmp_path / "missing") as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "not an index directory" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
        assert_error(search(c, png_bytes()), 503, "not ready")


def test_metrics_count_requests_and_stages(client, photos):
    assert search(client, photos[3].read_bytes(), top_k=3).status_code == 200
    text = client.get("/metrics").text
    assert 'vit_rerank_requests_total{method="POST",route="/search",status="200"}' in text
    for stage in ("queue", "embed", "search", "rerank", "total"):
        assert f'vit_rerank_stage_seconds_count{{stage="{stage}"}}' in text
    assert "vit_rerank_queue_depth" in text and "vit_rerank_request_seconds_bucket" in text


def test_metrics_label_static_files_by_their_mount_and_unknown_paths_as_unmatched(client):
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/no/such/page").status_code == 404
    text = client.get("/metrics").text
    assert 'vit_rerank_requests_total{method="GET",route="/static",status="200"}' in text
    assert 'route="unmatched",status="404"' in text and "/no/such/page" not in text


# --- search ----------------------------------------------------------------------------------------
def test_search_matches_the_library(client, index_dir, photos):
    """The answer is the library's Searcher's answer (an independent in-process run), shaped by the contract."""
    from indexer.build import backbone_for
    from indexer.index_dir import IndexDir
    from indexer.loading import load_image
    from indexer.search import Searcher, SearchSettings

    query = photos[12]
    r = search(client, query.read_bytes(), top_k=8, rerank_k=12, s=0.9, **{"lambda": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"query_id", "model", "random_weights", "marginals", "settings", "timings_ms", "results",
                         "offset", "next_offset", "crop"}
    # an uncalibrated index: unset marginals take the measured default (cross-correlation)
    assert body["model"] == "test_vit" and body["random_weights"] is True and body["marginals"] == "crosscorr"
    # a 7 x 7 final-grid index: unset parameters take the preset measured on those features (ot-tuned)
    assert body["settings"] == {"top_k": 8, "rerank_k": 12, "scorer": "ot", "threshold": default("threshold"),
                                "s": 0.9, "lambda": 0.5, "marginals": "crosscorr", "eps": 0.05, "calibrated": False}
    assert set(body["timings_ms"]) == {"queue", "embed", "search", "rerank", "gather", "structural", "final", "total"}
    t = body["timings_ms"]
    assert t["rerank"] == pytest.approx(t["gather"] + t["structural"] + t["final"], abs=0.01)
    t = body["timings_ms"]
    assert all(v >= 0 for v in t.values()) and t["total"] >= t["embed"] + t["search"]
    hits = body["results"]
    assert [h["rank_after"] for h in hits] == list(range(8))

    with IndexDir.open(index_dir) as gallery:
        searcher = Searcher(gallery, backbone_for(gallery.manifest, "cpu"), "cpu")
        expected = searcher.search([load_image(query)], SearchSettings(top_k=8, rerank_k=12, s=0.9, lam=0.5))[0]
    assert [h["id"] for h in hits] == [e.id for e in expected.hits]
    for h, e in zip(hits, expected.hits):
        assert h["rank_before"] == e.rank_before and h["label"] == e.label and h["metadata"] == e.metadata
        assert h["global_score"] == pytest.approx(e.global_score, abs=1e-5)
        assert h["final_score"] == pytest.approx(e.final_score, abs=1e-5)
        assert h["final_score"] == pytest.approx(h["global_score"] + 0.5 * h["structural_score"], abs=1e-5)
        assert h["image_url"].startswith("/images/") and h["thumbnail_url"].endswith("?size=thumb")
        assert h["explanation_url"] == f"/explanations/{body['query_id']}/{h['id'].replace('/', '%2F')}.png"
    finals = [h["final_score"] for h in hits]
    assert finals == sorted(finals, reverse=True)
    first = [h for h in hits if h["rank_before"] == 0][0]  # the query is in the gallery: global cosine 1
    assert first["id"] == f"skirt/{query.name}" or first["global_score"] == pytest.approx(1.0, abs=1e-4)


def test_search_without_reranking_keeps_the_global_order(client, photos):
    body = search(client, photos[0].read_bytes(), top_k=5, rerank_k=0).json()
    hits = body["results"]
    assert [h["rank_before"] for h in hits] == list(range(5))
    assert all(h["structural_score"] is None and h["explanation_url"] is None for h in hits)
    assert all(h["final_score"] == h["global_score"] for h in hits)


def test_only_reranked_results_have_explanations(client, photos):
    hits = search(client, photos[5].read_bytes(), top_k=10, rerank_k=4).json()["results"]
    for h in hits:
        assert (h["explanation_url"] is not None) == (h["rank_before"] < 4)


def test_explanation_pictures(client, photos):
    body = search(client, photos[20].read_bytes(), top_k=4, rerank_k=10).json()
    for h in body["results"]:
        r = client.get(h["explanation_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(r.content))
        # two 448 px panels (224 before issue 14) and a title strip (the unmatched-mass bars are on request)
        assert picture.size == (2 * 448 + 16, 448 + 20)
    hit = body["results"][0]["id"].replace("/", "%2F")
    assert_error(client.get(f"/explanations/0123456789abcdef/{hit}.png"), 404, "search again")
    assert_error(client.get(f"/explanations/{body['query_id']}/not-a-result.png"), 404, "not among")
    assert_error(client.get(f"/explanations/{body['query_id']}/{hit}"), 404, ".png")


def test_explain_true_renders_eagerly(client, photos):
    body = search(client, photos[21].read_bytes(), top_k=3, explain="true").json()
    entry = client.app.state.service.explanations._cache[body["query_id"]]
    assert {gallery_id for gallery_id, _options in entry.pictures} == {h["id"] for h in body["results"]}


def test_explanations_expire(index_dir, photos):
    with make_client(index_dir, explanation_ttl_s=0.3) as c:
        url = search(c, photos[1].read_bytes(), top_k=2).json()["results"][0]["explanation_url"]
        time.sleep(0.5)
        assert_error(c.get(url), 404, "expire")


def test_query_view_is_the_model_crop(client, photos):
    """The cached query picture is the centre crop the model saw, not the squashed photo."""
    body = search(client, photos[2].read_bytes(), top_k=1).json()
    entry = client.app.state.service.explanations._cache[body["query_id"]]
    tensor = client.app.state.service.engine.transform(Image.open(photos[2]).convert("RGB"))
    assert entry.view(client.app.state.service.engine.transform).size == (tensor.shape[2], tensor.shape[1])


def test_query_crops_are_cut_when_a_picture_is_drawn_not_on_the_search_path(client, photos):
    body = search(client, photos[2].read_bytes(), top_k=1).json()
    entry = client.app.state.service.explanations._cache[body["query_id"]]
    assert entry.views == {}  # the search kept the decoded query only
    r = client.get(body["results"][0]["explanation_url"], params={"size": 448})
    assert r.status_code == 200
    assert list(entry.views) == [448] and max(entry.views[448].size) == 448


# --- gallery images --------------------------------------------------------------------------------
def test_images_and_thumbnails(client, photos):
    image_id = f"hat/{photos[0].name}"
    url = "/images/" + image_id.replace("/", "%2F")
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == photos[0].read_bytes()
    assert client.get(f"/images/{image_id}").content == r.content  # an unescaped slash works too
    thumb = client.get(url, params={"size": "thumb"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert_error(client.get(url, params={"size": "huge"}), 422)


@pytest.mark.parametrize("path", [
    "/images/..%2F..%2F..%2Fetc%2Fpasswd",
    "/images/%2Fetc%2Fpasswd",
    "/images/hat%2F..%2F..%2Fmeta.sqlite",
    "/images/meta.sqlite",
    "/images/manifest.json",
    "/images/no-such-id",
])
def test_images_never_serve_paths(client, path):
    assert_error(client.get(path), 404, "no image")


# --- bad input -------------------------------------------------------------------------------------
def _truncated_jpeg(photo: Path) -> bytes:
    data = photo.read_bytes()
    return data[: len(data) // 3]


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (2500, 2000)).save(buf, format="PNG")  # 5 MP: over the client's 4 MP limit, small file
    return buf.getvalue()


BAD_FILES = {
    "text": (b"hello, this is not an image\n" * 20, "notes.txt", "text/plain", 400, "not an image"),
    "empty": (b"", "empty.jpg", "image/jpeg", 400, "empty"),
    "pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "doc.pdf", "application/pdf", 415, "pdf"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "a.svg", "image/svg+xml",
            415, "svg"),
    "corrupt-png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "broken.png", "image/png", 400, "corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files(client, case):
    data, name, mime, status, word = BAD_FILES[case]
    assert_error(search(client, data, name, mime), status, word)


def test_truncated_jpeg(client, photos):
    assert_error(search(client, _truncated_jpeg(photos[4])), 400, "truncated")


def test_oversize_upload(client):
    assert_error(search(client, b"\xff\xd8\xff" + b"\x00" * 500_000), 413, "limit")


def test_oversize_by_content_length_is_refused_before_reading(client):
    r = client.post("/search", content=b"x" * 10, headers={"content-length": str(10**9),
                                                           "content-type": "multipart/form-data; boundary=x"})
    assert_error(r, 413, "limit")


def test_too_many_pixels(client):
    assert_error(search(client, _big_png(), "big.png", "image/png"), 413, "pixels")


@pytest.mark.parametrize("form", [
    {"top_k": 0}, {"top_k": 101}, {"top_k": "ten"}, {"rerank_k": -1}, {"rerank_k": 1001}, {"s": 0},
    {"s": 1.5}, {"s": "nan"}, {"lambda": -1}, {"lambda": "inf"}, {"marginals": "sinkhorn"}, {"explain": "maybe"},
])
def test_bad_options(client, photos, form):
    assert_error(search(client, photos[0].read_bytes(), **form), 422)


def test_missing_image(client):
    assert_error(client.post("/search", data={"top_k": "3"}), 422, "image")


def test_still_serving_after_bad_input(client, photos):
    for case in BAD_FILES.values():
        search(client, *case[:3])
    assert search(client, photos[0].read_bytes(), top_k=2).status_code == 200


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.put("/search"), 405)


# --- index changes ---------------------------------------------------------------------------------
def _add(client, data: bytes, headers=None, **form):
    return client.post("/index/images", files={"image": ("new.png", data, "image/png")},
                       data={k: str(v) for k, v in form.items()}, headers=headers or {})


def test_add_search_serve_remove(own_index):
    red = png_bytes((80, 60), (220, 20, 20))
    reports = sorted((own_index / "reports").glob("*"))
    with make_client(own_index) as c:
        r = _add(c, red, id="red square", label="red", metadata='{"colour": "red", "n": 1}')
        assert r.status_code == 201 and r.json() == {"id": "red square", "added": True, "near_duplicates": []}
        assert c.get("/index").json()["images"] == 31
        hits = search(c, red, "q.png", "image/png", top_k=3).json()["results"]
        top = [h for h in hits if h["rank_before"] == 0][0]
        assert top["id"] == "red square" and top["label"] == "red"
        assert top["metadata"] == {"colour": "red", "n": 1}
        assert top["global_score"] == pytest.approx(1.0, abs=1e-4)
        served = c.get(top["image_url"])
        assert served.status_code == 200 and served.content == red
        assert len(list((own_index / "uploads").iterdir())) == 1

        assert_error(_add(c, red, id="red square"), 409, "already")
        assert_error(_add(c, red, metadata="[1, 2]"), 422, "object")
        assert_error(_add(c, red, metadata="{oops"), 422, "json")
        assert_error(_add(c, red, id="tab\there"), 422, "id")
        assert_error(_add(c, b"not an image at all"), 400)
        auto = _add(c, png_bytes((10, 10), (0, 0, 255)))
        assert auto.status_code == 201 and auto.json()["id"].startswith("upload-")

        r = c.delete("/index/images/red%20square")
        assert r.status_code == 200 and r.json() == {"id": "red square", "removed": True}
        assert_error(c.delete("/index/images/red%20square"), 404)
        assert_error(c.get("/images/red%20square"), 404)
        assert c.get("/index").json()["images"] == 31  # the auto-named one stays
        assert len(list((own_index / "uploads").iterdir())) == 1
    assert sorted((own_index / "reports").glob("*")) == reports  # single adds leave no build reports


def test_remove_a_built_image(own_index, photos):
    image_id = f"shoes/{photos[10].name}"
    with make_client(own_index) as c:
        assert c.delete(f"/index/images/{image_id}").status_code == 200
        hits = search(c, photos[10].read_bytes(), top_k=30, rerank_k=0).json()["results"]
        assert image_id not in {h["id"] for h in hits} and len(hits) == 29
    assert photos[10].exists()  # the gallery's own files are never deleted


def test_api_key(own_index):
    data = png_bytes()
    with make_client(own_index, api_key="s3cret") as c:
        assert_error(_add(c, data, id="a"), 401, "X-API-Key")
        assert_error(_add(c, data, id="a", headers={"X-API-Key": "wrong"}), 403, "wrong")
        assert _add(c, data, id="a", headers={"X-API-Key": "s3cret"}).status_code == 201
        assert_error(c.delete("/index/images/a"), 401)
        assert_error(c.delete("/index/images/a", headers={"X-API-Key": "nope"}), 403)
        assert c.delete("/index/images/a", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert search(c, data, "q.png", "image/png").status_code == 200  # searching needs no key


def test_failed_mutation_changes_nothing(own_index, photos, monkeypatch):
    """A commit that fails leaves the index, its files and the answers exactly as they were."""
    from indexer.index_dir import IndexDir

    with make_client(own_index) as c:
        before = search(c, photos[7].read_bytes(), top_k=30, rerank_k=5).json()["results"]
        engine = c.app.state.service.engine

        def broken_commit(**_):
            raise OSError("disk full (simulated)")

        monkeypatch.setattr(engine.index_dir.db, "commit", broken_commit)
        assert_error(_add(c, png_bytes(), id="doomed"), 500, "internal error")
        assert_error(c.delete(f"/index/images/hat%2F{photos[0].name}"), 500)
        monkeypatch.undo()

        assert c.get("/index").json()["images"] == 30
        assert_error(c.get("/images/doomed"), 404)
        assert not any((own_index / "uploads").iterdir())
        after = search(c, photos[7].read_bytes(), top_k=30, rerank_k=5).json()["results"]
        assert [(h["id"], round(h["final_score"], 5)) for h in after] == \
               [(h["id"], round(h["final_score"], 5)) for h in before]
        assert _add(c, png_bytes(), id="fine").status_code == 201  # and the next change works
    with IndexDir.open(own_index) as gallery:
        report = gallery.verify()
        assert report.ok, report.problems
        assert len(gallery) == 31 and "doomed" not in gallery.ids()


def test_a_stored_calibration_sets_the_defaults_and_requests_override_it(index_dir, photos, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from indexer.calibration import Calibration
    from service.app import create_app
    from service.settings import ServiceSettings

    folder = tmp_path / "calibrated"
    shutil.copytree(index_dir, folder)
    Calibration(rerank=True, marginals="uniform", s=0.7, lam=0.05, rerank_k=15, metric="precision_at_1",
                baseline_heldout=0.5, calibrated_heldout=0.55, gain_heldout=0.05, gain_ci95=(0.01, 0.09),
                tuning_queries=10, heldout_queries=10, seed=0, source="test").save(folder)
    with TestClient(create_app(ServiceSettings(index=folder, device="cpu", load_in_background=False))) as c:
        info = c.get("/index").json()
        assert info["calibration"]["rerank"] is True and info["calibration"]["rerank_k"] == 15
        body = search(c, photos[3].read_bytes(), top_k=4).json()
        assert body["settings"] == {"top_k": 4, "rerank_k": 15, "scorer": "ot", "threshold": default("threshold"),
                                    "s": 0.7, "lambda": 0.05, "marginals": "uniform", "eps": 0.05, "calibrated": True}
        assert body["marginals"] == "uniform"
        body = search(c, photos[3].read_bytes(), top_k=4, s=1.0, marginals="rollout").json()
        assert (body["settings"]["s"], body["settings"]["marginals"], body["settings"]["lambda"]) == (1.0, "rollout", 0.05)
    # the layers, once: the request, then the index's calibration, then the service's configured defaults
    with TestClient(create_app(ServiceSettings(index=folder, device="cpu", load_in_background=False, top_k=3,
                                               rerank_k=9, lam=0.9, scorer="mnn"))) as c:
        body = search(c, photos[3].read_bytes()).json()
        settings = body["settings"]
        assert (settings["top_k"], settings["rerank_k"], settings["lambda"]) == (3, 15, 0.05)  # calibration wins
        assert settings["scorer"] == "ot"  # the calibration (a file of earlier releases) chose among OT settings
        body = search(c, photos[3].read_bytes(), rerank_k=5, scorer="mnn").json()
        assert (body["settings"]["rerank_k"], body["settings"]["scorer"]) == (5, "mnn")


def test_kept_plans_own_their_memory(index_dir, photos):
    """A result's plans must not be views of the whole batch's plan tensor (the explanation cache
    counts each query's own plans: views would keep every query of the batch alive)."""
    from indexer.build import backbone_for
    from indexer.index_dir import IndexDir
    from indexer.loading import load_image
    from indexer.search import Searcher, SearchSettings

    with IndexDir.open(index_dir) as gallery:
        searcher = Searcher(gallery, backbone_for(gallery.manifest, "cpu"), "cpu")
        results = searcher.search([load_image(p) for p in photos[:4]], SearchSettings(top_k=5, rerank_k=20),
                                  keep_plans=True)
    for result in results:
        for plan in result.plans.values():
            assert plan.untyped_storage().nbytes() == plan.numel() * plan.element_size()
