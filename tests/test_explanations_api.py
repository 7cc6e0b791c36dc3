"""The explanation of a result, as numbers (JSON) and as a picture with options (issue 14)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_support import assert_error, index_dir, make_client, photos  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def client(index_dir):
    with make_client(index_dir) as c:
        yield c


def search(client, photo, **form):
    r = client.post("/search", files={"image": ("q.jpg", photo.read_bytes(), "image/jpeg")},
                    data={k: str(v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("marginals", ["rollout", "crosscorr", "uniform"])
def test_numbers_agree_with_the_search_answer(client, photos, marginals):
    body = search(client, photos[4], top_k=6, rerank_k=10, s=0.7, marginals=marginals, **{"lambda": 0.5})
    entry = client.app.state.service.explanations._cache[body["query_id"]]
    for hit in body["results"]:
        assert hit["explanation_json_url"] == hit["explanation_url"].removesuffix(".png") + ".json"
        assert hit["structural_contribution"] == pytest.approx(0.5 * hit["structural_score"], abs=1e-6)
        assert hit["near_duplicate"] is None  # random weights: no measured threshold applies
        r = client.get(hit["explanation_json_url"])
        assert r.status_code == 200, r.text
        e = r.json()
        assert e["id"] == hit["id"] and e["query_id"] == body["query_id"] and e["label"] == hit["label"]
        assert e["marginals"] == marginals and e["s"] == 0.7 and e["lambda"] == 0.5 and e["grid"] == 7
        assert e["picture_url"] == hit["explanation_url"]
        for key in ("global_score", "structural_score", "final_score", "structural_contribution"):
            assert e[key] == pytest.approx(hit[key], abs=1e-6), key
        assert (e["rank_before"], e["rank_after"]) == (hit["rank_before"], hit["rank_after"])
        assert e["final_score"] == pytest.approx(e["global_score"] + 0.5 * e["structural_score"], abs=1e-5)
        # partial OT matched about s of the mass; the rest went to the dummy, patch by patch
        assert e["matched_mass"] == pytest.approx(0.7, abs=0.03)
        for side in ("query", "candidate"):
            unmatched, weights = np.array(e[f"{side}_unmatched"]), np.array(e[f"{side}_weights"])
            assert unmatched.shape == weights.shape == (49,)
            assert (unmatched >= 0).all() and (unmatched <= weights + 1e-6).all()
            assert weights.sum() == pytest.approx(1.0, abs=1e-4)
            assert unmatched.sum() == pytest.approx(1 - e["matched_mass"], abs=0.03)
        if marginals == "uniform":
            assert np.allclose(e["query_weights"], 1 / 49)
        # sigma is the plan's mass-weighted similarity: the kept similarities are the right ones
        match = entry.matches[hit["id"]]
        similarity = entry.query_patches.astype(np.float32) @ match.candidate_patches.astype(np.float32).T
        assert float((match.plan * similarity).sum()) == pytest.approx(hit["structural_score"], abs=1e-3)
        pairs = e["pairs"]
        assert [p["rank"] for p in pairs] == list(range(1, 11))
        masses = [p["mass"] for p in pairs]
        assert masses == sorted(masses, reverse=True) and masses[0] == pytest.approx(float(match.plan.max()), rel=1e-5)
        for p in pairs:
            for side, axis in (("query", 0), ("candidate", 1)):
                cell = p[side]
                assert cell["index"] == 7 * cell["row"] + cell["col"] and 0 <= cell["col"] < 7
            i, j = p["query"]["index"], p["candidate"]["index"]
            assert p["mass"] == pytest.approx(float(match.plan[i, j]), rel=1e-5)
            assert p["similarity"] == pytest.approx(float(similarity[i, j]), abs=1e-5)
            assert -1.001 <= p["similarity"] <= 1.001


def test_mnn_numbers_are_the_matches(client, photos):
    body = search(client, photos[4], top_k=4, rerank_k=10, scorer="mnn", threshold=0.2, **{"lambda": 2.0})
    assert body["settings"]["scorer"] == "mnn" and body["settings"]["threshold"] == 0.2
    entry = client.app.state.service.explanations._cache[body["query_id"]]
    for hit in body["results"]:
        e = client.get(hit["explanation_json_url"], params={"top": 100}).json()
        assert e["scorer"] == "mnn" and e["threshold"] == 0.2
        assert e["query_unmatched"] is None  # no dummy: a patch has a match or has none
        match = entry.matches[hit["id"]]
        count = int((match.plan > 0).sum())
        assert hit["structural_score"] == pytest.approx(count / 49, abs=1e-6)
        assert e["matched_mass"] == pytest.approx(count / 49, abs=1e-6)
        assert len(e["pairs"]) == min(100, count)
        sims = [p["similarity"] for p in e["pairs"][:count]]
        # best matches first (the listed cosines are recomputed from float16 patches: equal to 1e-3)
        assert all(a >= b - 1e-3 for a, b in zip(sims, sims[1:])) and all(v > 0.2 - 1e-3 for v in sims)
        # one-to-one: no patch is matched twice
        pairs = [(p["query"]["index"], p["candidate"]["index"]) for p in e["pairs"][:count]]
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == count
        assert _png(client.get(hit["explanation_url"])).width == 2 * 448 + 16


def test_top_and_errors(client, photos):
    body = search(client, photos[7], top_k=2)
    url = body["results"][0]["explanation_json_url"]
    assert len(client.get(url, params={"top": 3}).json()["pairs"]) == 3
    assert len(client.get(url, params={"top": 100}).json()["pairs"]) == 100
    assert_error(client.get(url, params={"top": 0}), 422, "top")
    assert_error(client.get(url, params={"top": 101}), 422, "top")
    hit = body["results"][0]["id"].replace("/", "%2F")
    assert_error(client.get(f"/explanations/0123456789abcdef/{hit}.json"), 404, "search again")
    assert_error(client.get(f"/explanations/{body['query_id']}/not-a-result.json"), 404, "not among")


def _png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_picture_options(client, photos):
    url = search(client, photos[9], top_k=1)["results"][0]["explanation_url"]
    default = _png(client.get(url))
    assert default.width == 2 * 448 + 16 and default.width >= 896
    small = _png(client.get(url, params={"size": 224}))
    assert small.size == (2 * 224 + 16, 224 + 20)
    bars = _png(client.get(url, params={"unmatched": "true"}))  # partial OT's dummy share, on request
    assert bars.width == default.width and bars.height > default.height
    big = _png(client.get(url, params={"size": 600}))
    assert big.width == 2 * 600 + 16
    heat = _png(client.get(url, params={"heatmap": "true"}))
    assert heat.size == bars.size  # the heat map's legend strip, as the bars' legend strip
    assert np.asarray(heat.crop((0, 0) + default.size)).astype(int).sum() != np.asarray(default).astype(int).sum()
    more = _png(client.get(url, params={"links": 12, "faded": 20}))
    assert not np.array_equal(np.asarray(more), np.asarray(default))
    for bad in ({"size": 100}, {"size": 5000}, {"size": "big"}, {"links": 0}, {"links": 13}, {"faded": -1}):
        name = next(iter(bad))
        assert_error(client.get(url, params=bad), 422, name)


def test_the_json_form_is_in_the_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/explanations/{query_id}/{gallery_id}.json"]["get"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/Explanation")
    props = schema["components"]["schemas"]["Explanation"]["properties"]
    assert {"global_score", "structural_score", "final_score", "rank_before", "rank_after", "matched_mass",
            "pairs", "lambda", "query_unmatched"} <= set(props)
    png = schema["paths"]["/explanations/{query_id}/{picture}"]["get"]
    size = [p for p in png["parameters"] if p["name"] == "size"][0]["schema"]
    assert size["minimum"] == 224 and size["maximum"] == 1024


def test_the_picture_crop_is_the_model_crop_at_a_larger_size(photos):
    """The picture's photos are the region the model saw, cut again from the full photo at 448 px."""
    from reranker.backbones import create_backbone
    from reranker.defaults import default_model_kwargs
    from reranker.views import model_view
    from service.explanations import sharp_view

    model = "vit_small_patch14_dinov2"
    backbone = create_backbone(model, "random", model_kwargs=default_model_kwargs(model))
    photo = Image.open(photos[0])
    seen, sharp = model_view(photo, backbone.transform), sharp_view(photo, backbone.transform, 448)
    assert seen.size == (224, 224) and sharp.size == (448, 448)
    diff = np.abs(np.asarray(sharp.resize(seen.size, Image.Resampling.BICUBIC)).astype(int) - np.asarray(seen))
    assert diff.mean() < 4, "the larger crop shows another region than the model's view"
    shifted = model_view(photo.crop((40, 0, photo.width, photo.height)), backbone.transform)
    assert np.abs(np.asarray(shifted).astype(int) - np.asarray(seen)).mean() > 4 * diff.mean()  # the check can fail
