"""Filters on a search (by label and metadata fields, exact, before the structural stage) and region search."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from indexer import open_index
from indexer.filters import parse
from indexer.index_dir import NewImages
from indexer.metadata import ImageRow
from service_support import assert_error, copy_index, index_dir, make_client, photos  # noqa: F401 (fixtures)


def test_filters_are_parsed_strictly():
    assert parse(None) is None and parse("") is None and parse("{}") is None
    f = parse('{"label": ["hat", "shoes"], "color": "red", "n": 3, "ok": true, "gone": null}')
    assert [k for k, _ in f.conditions] == ["label", "color", "n", "ok", "gone"]
    for bad, words in [("[1]", "JSON object"), ('{"a\\"b": 1}', "field names"), ('{"x": {"y": 1}}', "values are"),
                       ('{"x": []}', "1 to"), ("{not json", "Expecting")]:
        with pytest.raises(ValueError, match=words):
            parse(bad)


@pytest.fixture()
def tagged(index_dir, photos, tmp_path):
    """A copy of the service's index with three extra rows carrying metadata (the features of real images)."""
    folder = copy_index(index_dir, tmp_path / "index")
    with open_index(folder) as gallery:
        _, feats = gallery.features([0, 1, 2])
        rows = [ImageRow(id=f"tag{i}", path=str(photos[i]), label="tagged", content_hash=f"tag{i}", width=1,
                         height=1, bytes=1, metadata=m)
                for i, m in enumerate([{"color": "red", "n": 3, "ok": True}, {"color": "blue", "n": 3.0, "ok": False},
                                       {"color": "red"}])]
        gallery.commit_new(NewImages(rows, feats))
    return folder


def test_metadata_fields_match_by_json_value(tagged):
    with open_index(tagged) as gallery:
        ids = {r.row: r.id for r in gallery.rows()}

        def match(text):
            return sorted(ids[int(i)] for i in gallery.ids_where(parse(text)))

        assert match('{"color": "red"}') == ["tag0", "tag2"]
        assert match('{"color": ["red", "blue"], "n": 3}') == ["tag0", "tag1"]
        assert match('{"ok": true}') == ["tag0"] and match('{"ok": false}') == ["tag1"]
        assert match('{"label": "tagged", "ok": null}') == ["tag2"]
        assert match('{"color": "green"}') == []


def test_a_filtered_search_is_the_exact_ranking_of_the_allowed_images(tagged, photos):
    from indexer.build import backbone_for
    from indexer.loading import load_image
    from indexer.search import Searcher, SearchSettings

    with open_index(tagged) as gallery:
        searcher = Searcher(gallery, backbone_for(gallery.manifest, "cpu"))
        labels = sorted({r.label for r in gallery.rows() if r.label and r.label != "tagged"})
        where = parse(json.dumps({"label": labels[0]}))
        allowed = gallery.ids_where(where)
        res = searcher.search([load_image(photos[5])], SearchSettings(top_k=50, rerank_k=0), where=where)[0]
        assert len(res.hits) == len(allowed) and {h.label for h in res.hits} == {labels[0]}
        vectors, query = gallery.global_vectors(allowed), res.query.global_features.numpy().ravel()
        oracle = allowed[np.argsort(-(vectors @ query), kind="stable")]
        assert [h.faiss_id for h in res.hits] == oracle.tolist()
        reranked = searcher.search([load_image(photos[5])], SearchSettings(top_k=3, rerank_k=10), where=where)[0]
        assert len(reranked.hits) == 3 and all(h.label == labels[0] for h in reranked.hits)
        assert searcher.search([load_image(photos[5])], SearchSettings(top_k=3), where=parse('{"label": "none"}'))[0].hits == []


def test_search_over_http_with_a_filter_and_a_region(tagged, photos):
    with make_client(tagged) as client:
        data = photos[5].read_bytes()

        def search(**form):
            return client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=form)

        r = search(where='{"color": "red"}', top_k="5")
        assert r.status_code == 200, r.text
        assert sorted(h["id"] for h in r.json()["results"]) == ["tag0", "tag2"]
        assert_error(search(where="[1]"), 422, "where")
        assert_error(search(where='{"x": {"y": 1}}'), 422, "where")
        whole = search(top_k="3").json()["results"]
        part = search(top_k="3", crop="0.5,0.5,1,1")
        assert part.status_code == 200 and [h["global_score"] for h in part.json()["results"]] != \
            [h["global_score"] for h in whole]
        assert_error(search(crop="0.5,0.5,0.2,1"), 422, "crop")
        assert_error(search(crop="0,0,0.01,0.01"), 422, "16 px")
        assert search(crop="a,b,c,d").status_code == 422


def test_results_past_the_first_page(index_dir, photos):
    with make_client(index_dir) as client:
        data = photos[7].read_bytes()

        def search(**form):
            r = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=form)
            assert r.status_code == 200, r.text
            return r.json()

        whole = search(top_k="10", rerank_k="20")
        first, second = search(top_k="5", rerank_k="20"), search(top_k="5", offset="5", rerank_k="20")
        assert [h["id"] for h in first["results"] + second["results"]] == [h["id"] for h in whole["results"]]
        assert [h["rank_after"] for h in second["results"]] == [5, 6, 7, 8, 9]
        assert first["next_offset"] == 5 and second["offset"] == 5 and second["settings"]["top_k"] == 5
        last = search(top_k="100", offset="20")  # the session index holds 30 images: 10 left
        assert len(last["results"]) == 10 and last["next_offset"] is None
        assert client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"top_k": "101"}).status_code == 422
        assert client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"offset": "901"}).status_code == 422


def test_searches_can_need_the_key_too(index_dir, photos):
    from pydantic import ValidationError

    from service import ServiceSettings

    with pytest.raises(ValidationError, match="protect_search needs an api_key"):
        ServiceSettings(index=index_dir, protect_search=True)
    data = photos[1].read_bytes()
    with make_client(index_dir, api_key="k", protect_search=True) as client:
        def search(headers):
            return client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, headers=headers)

        assert_error(search({}), 401)
        assert_error(search({"X-API-Key": "wrong"}), 403)
        r = search({"X-API-Key": "k"})
        assert r.status_code == 200
        image_url = r.json()["results"][0]["image_url"]
        assert client.get(image_url).status_code == 401 and client.get("/index").status_code == 401
        assert client.get(image_url, headers={"X-API-Key": "k"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/").status_code == 200  # the page itself
    with make_client(index_dir, api_key="k") as client:  # by default, only changes need the key
        assert client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}).status_code == 200
