"""Hardening, round three: values no response can carry, formats off the allow-list, header sizes,
and the small refusals (labels, hostile numbers, echoed ids, duplicated Content-Length)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from indexer import open_index
from indexer.index_dir import NewImages
from indexer.metadata import ImageRow
from reranker.features import StoredFeatures
from service_support import assert_error, copy_index, index_dir, make_client, photos, png_bytes  # noqa: F401 (fixtures)


@pytest.fixture()
def writer(index_dir, tmp_path):
    with make_client(copy_index(index_dir, tmp_path / "index")) as c:
        yield c


def add(client, data: bytes = b"", **form):
    return client.post("/index/images", files={"image": ("new.png", data or png_bytes(), "image/png")}, data=form)


def search(client, data: bytes, **form):
    return client.post("/search", files={"image": ("q.png", data, "image/png")}, data=form)


# --- 1. a value no response can serialise ---------------------------------------------------------------
@pytest.mark.parametrize("metadata", [
    '{"a": "\\ud800"}',  # a lone surrogate as a JSON escape: json.loads lets it through
    '{"\\udfff": 1}',  # in a key
    '{"a": [{"b": "ok \\udc80"}]}',  # nested
])
def test_metadata_with_lone_surrogates_is_refused_at_the_door(writer, metadata):
    r = add(writer, metadata=metadata)
    assert_error(r, 422, "metadata", "Unicode")
    assert writer.get("/index").json()["images"] == writer.get("/index").json()["images"]  # still serving


def test_labels_are_bounded_and_printable(writer):
    assert_error(add(writer, label="x" * 900_000), 422, "label")
    assert_error(add(writer, label="tab\there"), 422, "label")
    ok = add(writer, label="a fine label", id="labelled")
    assert ok.status_code == 201, ok.text


def test_a_stored_value_that_cannot_be_serialised_degrades_that_field_not_the_search(index_dir, photos, tmp_path):
    """An index built by the library (or by an earlier version of the service) can hold metadata with
    lone surrogates (stored as JSON escapes); every search that returns the image must still answer."""
    folder = copy_index(index_dir, tmp_path / "index")
    with open_index(folder) as index:
        _, feats = index.features([0])
        row = ImageRow(id="bad-metadata", path=str(photos[0]), label="fine",
                       metadata={"a": "\ud800", "\udfff": ["ok", "\udc80"]}, content_hash="surrogates",
                       width=1, height=1, bytes=1)
        index.commit_new(NewImages([row], feats))
    with make_client(folder) as client:
        with open(photos[0], "rb") as fh:
            r = search(client, fh.read(), top_k="5", explain="true")
        assert r.status_code == 200, r.text
        (hit,) = [h for h in r.json()["results"] if h["id"] == "bad-metadata"]
        assert hit["label"] == "fine" and hit["metadata"] == {"a": "\ufffd", "\ufffd": ["ok", "\ufffd"]}
        others = [h for h in r.json()["results"] if h["id"] != "bad-metadata"]
        assert others and all("\ufffd" not in json.dumps(h, ensure_ascii=False) for h in others)
        if hit["explanation_url"]:  # the picture's title carries the id
            assert client.get(hit["explanation_url"]).status_code == 200


# --- 7. only the listed formats are ever opened ------------------------------------------------------
REFUSED = ["ICO", "PPM", "TGA", "PCX", "JPEG2000", "EPS", "SGI", "QOI", "AVIF"]


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", REFUSED)
def test_formats_off_the_list_are_refused_415_from_their_header(client, fmt):
    r = search(client, _encoded(fmt))
    assert_error(r, 415, "JPEG, PNG, WebP, GIF, BMP or TIFF")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_listed_formats_still_search(client, fmt):
    assert search(client, _encoded(fmt), top_k="2").status_code == 200


def test_a_refused_format_never_reaches_its_plugin(monkeypatch):
    """EPS's plugin would run Ghostscript where it is installed: it must not even parse the header."""
    from PIL import EpsImagePlugin

    from indexer.loading import ImageLoadError, load_image

    data = _encoded("EPS")
    calls = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append(1))
    with pytest.raises(ImageLoadError) as info:
        load_image(data)
    assert info.value.reason == "unsupported" and "EPS" in info.value.message and calls == []


@pytest.fixture(scope="module")
def client(index_dir):
    with make_client(index_dir) as c:
        yield c


# --- 4. idle sockets cannot lock anyone out; the 503 is the service's JSON -------------------------------
def test_idle_sockets_take_no_request_places_and_are_cycled_out(index_dir):
    """150 silent connections against a server allowed 64 open ones and 4 requests at once: every probe
    is still answered 200 (the longest-idle sockets are closed to make room), never a plain-text 503."""
    import socket

    from test_hardening_input import running

    from service import ServiceSettings, create_app

    app = create_app(ServiceSettings(index=index_dir, device="cpu", load_in_background=False, max_in_flight=4))
    with running(app, timeout_keep_alive=30, max_connections=64) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
        try:
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := s.recv(4096):
                        answer += chunk
                assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        finally:
            for s in idle:
                s.close()


def test_requests_past_the_in_flight_limit_get_a_json_503():
    import asyncio

    import httpx

    from service.middlewares import InFlightLimitMiddleware

    release = asyncio.Event()

    async def slow(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = InFlightLimitMiddleware(slow, limit=2)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = [asyncio.create_task(c.get("/")) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = await c.get("/")
            release.set()
            return refused, await asyncio.gather(*held)

    refused, held = asyncio.run(go())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "2 requests" in refused.json()["detail"]
    assert [r.status_code for r in held] == [200, 200]
    assert app.running == 0


# --- 6. the header limit holds for complete heads too --------------------------------------------------
@pytest.mark.parametrize("size", [20_000, 70_000, 100_000])
def test_a_head_over_the_limit_is_refused_431_however_it_arrives(client, size):
    r = client.get("/healthz", headers={"X-Big": "a" * size})
    assert_error(r, 431, "16384 bytes")
    assert client.get("/healthz").status_code == 200


def test_a_head_over_the_limit_in_two_pieces_over_a_real_socket(index_dir):
    import socket

    from test_hardening_input import running

    from service import ServiceSettings, create_app

    app = create_app(ServiceSettings(index=index_dir, device="cpu", load_in_background=False))
    with running(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        s.sendall(head[:12_000])
        s.sendall(head[12_000:])
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431") and b'"detail"' in answer, answer[:300]


# --- 9. the small refusals -------------------------------------------------------------------------------
def test_an_aspect_ratio_just_over_the_limit_reads_as_over_it():
    from indexer.loading import ImageLoadError, load_image

    buf = io.BytesIO()
    Image.new("L", (2001, 100)).save(buf, format="PNG")
    with pytest.raises(ImageLoadError) as info:
        load_image(buf.getvalue())
    assert "20.01:1, over the limit of 20:1" in info.value.message


def test_a_huge_integer_in_metadata_gets_the_services_message(writer):
    r = add(writer, metadata='{"n": ' + "9" * 5000 + "}")
    assert_error(r, 422, "metadata", "digits")
    assert "set_int_max_str_digits" not in r.text


def test_an_unknown_id_is_not_echoed_in_full(client):
    long_id = "x" * 10_000  # (a longer one is over the header limit: 431)
    r = client.get(f"/images/{long_id}")
    assert r.status_code == 404 and len(r.content) < 500, len(r.content)


# --- 5. explanations are bounded and do not vanish mid-request ---------------------------------------
def test_explain_draws_from_its_own_entry_even_when_the_cache_drops_it(index_dir, photos, monkeypatch):
    """A cache too small to keep any query: explain=true still answers (before: 404 'search again')."""
    from service import ServiceSettings, create_app
    from service.explanations import ExplanationCache
    from fastapi.testclient import TestClient

    drawn = []
    real = ExplanationCache._render
    monkeypatch.setattr(ExplanationCache, "_render", lambda self, *a: drawn.append(a[1]) or real(self, *a))
    monkeypatch.setattr(ExplanationCache, "put", lambda self, query_id, entry: None)  # evicted at once
    app = create_app(ServiceSettings(index=index_dir, device="cpu", load_in_background=False))
    with TestClient(app) as client, open(photos[0], "rb") as fh:
        r = search(client, fh.read(), top_k="20", explain="true")
    assert r.status_code == 200, r.text
    explained = [h for h in r.json()["results"] if h["explanation_url"]]
    assert len(drawn) == min(10, len(explained)) and len(drawn) > 0  # at most EXPLAIN_PICTURES per search


def test_pictures_drawn_at_once_are_bounded_and_the_rest_wait_or_get_503():
    import threading
    import time

    from service.errors import Unavailable
    from service.explanations import ExplanationCache, PictureOptions, QueryExplanations

    cache = ExplanationCache(10**8, 60, transform=None, max_renders=2, render_wait_s=0.3)
    running, peak, gate = [0], [0], threading.Event()

    def render(self, entry, gallery_id, match, options):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        gate.wait(2)
        running[0] -= 1
        return b"png"

    cache._render = render.__get__(cache)
    entry = QueryExplanations(Image.new("RGB", (8, 8)), None, 7, {})
    outcomes = []

    def draw(i):
        try:
            outcomes.append(cache._picture("q", entry, f"g{i}", None, PictureOptions()))
        except Unavailable as err:
            outcomes.append(err)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.6)  # past the wait: the three that found no place are answered 503
    gate.set()
    for t in threads:
        t.join()
    assert peak[0] == 2
    busy = [o for o in outcomes if isinstance(o, Unavailable)]
    assert len(busy) == 3 and all(o.status == 503 and o.headers["Retry-After"] for o in busy)
    assert outcomes.count(b"png") == 2


def test_index_changes_from_another_site_are_refused_unless_allowed(index_dir, tmp_path):
    """A multipart POST needs no CORS preflight: without a key, any page could add images."""
    folder = copy_index(index_dir, tmp_path / "index")
    with make_client(folder) as c:
        foreign = {"Origin": "https://evil.example"}
        r = c.post("/index/images", files={"image": ("a.png", png_bytes(), "image/png")}, headers=foreign)
        assert_error(r, 403, "evil.example", "VIT_RERANK_ALLOWED_ORIGINS")
        assert_error(c.delete("/index/images/x", headers={"Origin": "null"}), 403)
        own = {"Origin": "http://testserver"}  # the page the service serves itself
        assert c.post("/index/images", files={"image": ("a.png", png_bytes(), "image/png")}, data={"id": "own"},
                      headers=own).status_code == 201
        assert c.post("/index/images", files={"image": ("b.png", png_bytes(color=(1, 2, 3)), "image/png")},
                      data={"id": "no-origin"}).status_code == 201  # not a browser page
        assert c.post("/search", files={"image": ("q.png", png_bytes(), "image/png")},
                      headers=foreign).status_code == 200  # searching changes nothing
    with make_client(folder, allowed_origins=["https://app.example"]) as c:
        r = c.post("/index/images", files={"image": ("c.png", png_bytes(color=(9, 9, 9)), "image/png")},
                   data={"id": "allowed"}, headers={"Origin": "https://app.example"})
        assert r.status_code == 201, r.text


# --- 2 and 3. every decode through the gate, once, budgeted by the decoded mode's bytes --------------------
def _png(size, mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG", **save)
    return buf.getvalue()


def _tiff(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 90, 160)).save(buf, format="TIFF", compression="tiff_deflate")
    return buf.getvalue()


def test_served_copies_and_thumbnails_decode_through_the_gate(writer):
    from service.decoding import DecodeGate

    r = add(writer, _tiff((600, 400)), id="tiff")
    assert r.status_code == 201, r.text
    engine = writer.app.state.service.engine
    engine.decode_gate = DecodeGate(max_decodes=1, wait_s=0.05)
    with engine.decode_gate.admit(1):  # the gate is full: a decode of a stored image must wait, then 503
        for url in ("/images/tiff", "/images/tiff?size=thumb"):
            assert_error(writer.get(url), 503)
            assert writer.get(url).headers["retry-after"]
    full = writer.get("/images/tiff")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(full.content)).size == (600, 400)
    assert writer.get("/images/tiff?size=thumb").status_code == 200


def test_an_add_is_decoded_once_and_a_large_one_keeps_its_thumbnail(writer, monkeypatch):
    import indexer.embedding
    from pathlib import Path

    decodes = []
    real = indexer.embedding.load_image
    monkeypatch.setattr(indexer.embedding, "load_image", lambda *a, **k: decodes.append(1) or real(*a, **k))
    big = Image.new("RGB", (2400, 1800), (200, 120, 40))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=80)
    r = add(writer, buf.getvalue(), id="big")
    assert r.status_code == 201, r.text
    assert decodes == []  # the indexer embedded the route's own (gated) decode
    engine = writer.app.state.service.engine
    row = engine.catalog.row("big")
    assert (row.width, row.height) == (2400, 1800)  # the original's size, not the reduced decode's
    thumb = Path(row.path + ".thumb.jpg")
    assert thumb.is_file() and max(Image.open(thumb).size) == 256
    import service.gallery_images

    monkeypatch.setattr(service.gallery_images, "decode_stored", lambda *a: pytest.fail("decoded again"))
    assert writer.get("/images/big?size=thumb").content == thumb.read_bytes()
    assert writer.delete("/index/images/big").status_code == 200
    assert not thumb.exists() and not Path(row.path).exists()


def test_the_budget_counts_the_decoded_modes_bytes(monkeypatch):
    """An RGBA PNG costs over three times the bytes of a grey one of the same pixels (before: the same)."""
    from indexer.loading import LoadLimits
    from service.decoding import DecodeGate, _decode

    gate = DecodeGate()
    costs = []
    real = gate.admit
    monkeypatch.setattr(gate, "admit", lambda cost, wait_s=None: costs.append(cost) or real(cost, wait_s))
    for data in (_png((400, 300), "L"), _png((400, 300), "RGB"), _png((400, 300), "RGBA")):
        _decode(data, "image/png", LoadLimits(), gate, side=10_000)
    assert costs == [400 * 300 * 6, 400 * 300 * 12, 400 * 300 * 20], costs
