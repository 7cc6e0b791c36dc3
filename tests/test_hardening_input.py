"""Hostile input to the service and the shared loader: extreme aspect ratios, hostile metadata and ids,
HEAD, repeated form fields, the API key checked before the body, and connections that never finish."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from conftest import tiny_vit_kwargs
from indexer.loading import ImageLoadError, LoadLimits, load_image
from service import ServiceSettings, create_app
from service_support import assert_error, copy_index, free_port, index_dir, make_client, photos, png_bytes  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def client(index_dir):
    """A read-only client: tests using it never change the index."""
    with make_client(index_dir) as c:
        yield c


@pytest.fixture()
def writer(index_dir, tmp_path):
    """A client over a copy of the index, for tests that add images."""
    with make_client(copy_index(index_dir, tmp_path / "index")) as c:
        yield c


def search(client, data: bytes, **form):
    return client.post("/search", files={"image": ("q.png", data, "image/png")}, data=form)


def add(client, data: bytes = b"", headers=None, **form):
    return client.post("/index/images", files={"image": ("new.png", data or png_bytes(), "image/png")},
                       data=form, headers=headers or {})


def asgi(app, method: str, url: str, **kwargs) -> httpx.Response:
    """One request straight to the ASGI app: nothing strips HEAD bodies, and bodies are pulled lazily."""

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, url, **kwargs)

    return asyncio.run(go())


def thin_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


# --- 1. extreme aspect ratios ----------------------------------------------------------------------
THIN = [(40000, 1), (20000, 1), (1, 40000), (2100, 100)]


@pytest.mark.parametrize("size", THIN)
def test_loader_refuses_extreme_aspect_ratios(size):
    with pytest.raises(ImageLoadError) as info:
        load_image(thin_png(size))
    assert info.value.reason == "bad_aspect_ratio"
    assert "20" in info.value.message and f"{size[0]}x{size[1]}" in info.value.message


def test_aspect_ratio_limit_is_inclusive_and_configurable():
    assert load_image(thin_png((2000, 100))).size == (2000, 100)  # exactly 20:1
    assert load_image(thin_png((100, 2000))).size == (100, 2000)
    assert load_image(thin_png((4000, 100)), LoadLimits(max_aspect_ratio=40)).size == (4000, 100)
    with pytest.raises(ImageLoadError) as info:
        load_image(thin_png((400, 100)), LoadLimits(max_aspect_ratio=3))
    assert info.value.reason == "bad_aspect_ratio"


def test_loader_refuses_the_ratio_before_decoding(monkeypatch):
    """The check reads the header only: the pixel data is never decoded."""
    from PIL import ImageFile

    def no_load(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(ImageLoadError) as info:
        load_image(thin_png((40000, 1)))
    assert info.value.reason == "bad_aspect_ratio"


@pytest.mark.parametrize("size", THIN[:2])
def test_search_refuses_extreme_aspect_ratios_quickly(client, size):
    start = time.monotonic()
    r = search(client, thin_png(size))
    assert time.monotonic() - start < 2
    assert_error(r, 422, "aspect ratio", "20")


@pytest.mark.parametrize("size", THIN[:2])
def test_add_refuses_extreme_aspect_ratios_quickly(writer, size):
    start = time.monotonic()
    r = add(writer, thin_png(size), id="thin")
    assert time.monotonic() - start < 2
    assert_error(r, 422, "aspect ratio", "20")
    assert writer.get("/index").json()["images"] == 30


def test_index_build_skips_extreme_aspect_ratios(tmp_path):
    from indexer.build import add_records, new_manifest
    from indexer.index_dir import IndexDir
    from indexer.sources import ImageRecord
    from reranker.backbones import create_backbone

    (tmp_path / "ok.png").write_bytes(png_bytes((64, 48)))
    (tmp_path / "thin.png").write_bytes(thin_png((40000, 1)))
    backbone = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    manifest = new_manifest(backbone, patch_weights="rollout", model_kwargs=tiny_vit_kwargs())
    records = [ImageRecord(str(tmp_path / n), n) for n in ("ok.png", "thin.png")]
    with IndexDir.create(tmp_path / "index", manifest) as gallery:
        report = add_records(gallery, backbone, records, workers=0, progress=False)
        assert report.added == 1 and len(gallery) == 1
    assert [(f.id, f.reason) for f in report.failures] == [("thin.png", "bad_aspect_ratio")]


# --- 2. metadata ------------------------------------------------------------------------------------
def nested(depth: int) -> str:
    """A JSON object nested ``depth`` deep: ``{"a": {"a": ... 1}}``."""
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("text, words", [
    (nested(5000), ("deep", "32")),
    (nested(33), ("deep", "32")),
    ('{"a": ' + "[" * 40 + "]" * 40 + "}", ("deep",)),
    ('{"x": NaN}', ("finite",)),
    ('{"x": Infinity}', ("finite",)),
    ('{"x": [1, -Infinity]}', ("finite",)),
    ('{"x": 1e400}', ("finite",)),
    ('{"x": ' + "9" * 5000 + "}", ("metadata",)),
    ('{"x": "' + "a" * 70_000 + '"}', ("65536",)),
    ("[1, 2]", ("object",)),
    ('"text"', ("object",)),
    ("{oops", ("json",)),
])
def test_bad_metadata_is_422(writer, text, words):
    assert_error(add(writer, id="m", metadata=text), 422, "metadata", *words)
    assert writer.get("/index").json()["images"] == 30


def test_metadata_within_the_limits_is_kept(writer):
    deep = nested(32)
    r = add(writer, id="deep", metadata=deep)
    assert r.status_code == 201, r.text
    hits = search(writer, png_bytes(), top_k=3).json()["results"]
    stored = {h["id"]: h["metadata"] for h in hits}["deep"]
    for _ in range(31):
        stored = stored["a"]
    assert stored == {"a": 1}


# --- 3. ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_id", [
    ".", "..", "a/./b", "a/../b", "../x", "x/..", "./x", "a//b", "/a", "a/", "/",
    "a\x00b", "a\x1bb", "a\x7fb", "a\u0085b", "a\u2028b", "line\nbreak",
])
def test_ids_that_change_urls_are_refused(writer, image_id):
    assert_error(add(writer, id=image_id), 422, "id")
    assert writer.get("/index").json()["images"] == 30


def test_ids_with_dots_inside_segments_are_fine(writer):
    for image_id in ("v1.2", "...", "..a", "a..", "shop/.hidden", "hat/new photo.png"):
        r = add(writer, png_bytes((20, 20), (len(image_id) * 20, 9, 9)), id=image_id)
        assert r.status_code == 201 and r.json()["id"] == image_id, r.text


# --- 4. HEAD --------------------------------------------------------------------------------------
def test_head_on_get_routes(client, photos):
    for url in ("/healthz", "/readyz", "/index", "/", f"/images/hat%2F{photos[0].name}",
                f"/images/hat%2F{photos[0].name}?size=thumb"):
        got = client.get(url)
        assert got.status_code == 200, url
        r = asgi(client.app, "HEAD", url)
        assert r.status_code == 200, (url, r.text)
        assert r.content == b"", url
        assert r.headers["content-type"] == got.headers["content-type"], url
    image = asgi(client.app, "HEAD", f"/images/hat%2F{photos[0].name}")
    assert int(image.headers["content-length"]) == photos[0].stat().st_size
    assert client.head("/healthz").status_code == 200


def test_head_on_explanations_and_errors(client, photos):
    body = client.post("/search", files={"image": ("q.jpg", photos[3].read_bytes(), "image/jpeg")},
                       data={"top_k": "2"}).json()
    url = body["results"][0]["explanation_url"]
    r = asgi(client.app, "HEAD", url)
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "image/png"
    missing = asgi(client.app, "HEAD", "/images/no-such-id")
    assert missing.status_code == 404 and missing.content == b""
    assert client.head("/search").status_code == 405  # POST only


def test_head_is_counted_as_head(client):
    client.head("/healthz")
    assert 'method="HEAD",route="/healthz",status="200"' in client.get("/metrics").text


# --- 5. repeated form fields ----------------------------------------------------------------------
def test_search_refuses_two_images(client):
    data = png_bytes()
    r = client.post("/search", files=[("image", ("a.png", data, "image/png")), ("image", ("b.png", data, "image/png"))])
    assert_error(r, 422, "image", "once")


@pytest.mark.parametrize("field", ["top_k", "explain", "lambda"])
def test_search_refuses_repeated_fields(client, field):
    values = {"top_k": ["3", "5"], "explain": ["false", "false"], "lambda": ["0.5", "0.2"]}[field]
    r = client.post("/search", files={"image": ("q.png", png_bytes(), "image/png")}, data={field: values})
    assert_error(r, 422, field, "once")


@pytest.mark.parametrize("field", ["image", "id", "label", "metadata"])
def test_add_refuses_repeated_fields(writer, field):
    data = png_bytes()
    files = [("image", ("a.png", data, "image/png"))]
    form = {"id": "one", "label": "x", "metadata": "{}"}
    if field == "image":
        files.append(("image", ("b.png", png_bytes((9, 9)), "image/png")))
    else:
        form[field] = [form[field], form[field] + "2" if field != "metadata" else '{"a": 1}']
    assert_error(writer.post("/index/images", files=files, data=form), 422, field, "once")
    assert writer.get("/index").json()["images"] == 30


# --- 6. the API key before the body ---------------------------------------------------------------
class CountingBody:
    """An upload streamed in 64 KiB chunks that counts how many the server pulled."""

    def __init__(self, total: int = 16 * 2**20) -> None:
        self.chunks = total // 65536
        self.pulled = 0

    async def __aiter__(self):
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"\0" * 65536
        yield b"\r\n--x--\r\n"


@pytest.fixture()
def keyed_app(tmp_path):
    """An app with an API key whose index never loads: enough to see what happens before the endpoint."""
    return create_app(ServiceSettings(index=tmp_path / "none", device="cpu", api_key="s3cret",
                                      load_in_background=False))


@pytest.mark.parametrize("headers, status", [({}, 401), ({"X-API-Key": "wrong"}, 403)])
def test_api_key_is_checked_before_the_body_is_read(keyed_app, headers, status):
    body = CountingBody()
    r = asgi(keyed_app, "POST", "/index/images", content=body,
             headers={"content-type": "multipart/form-data; boundary=x", **headers})
    assert_error(r, status)
    assert body.pulled < body.chunks // 4, body.pulled
    assert r.headers.get("connection") == "close"


def test_api_key_passes_through_to_the_endpoint(keyed_app):
    body = CountingBody(4 * 65536)
    r = asgi(keyed_app, "POST", "/index/images", content=body,
             headers={"content-type": "multipart/form-data; boundary=x", "X-API-Key": "s3cret"})
    assert_error(r, 503)  # past the key: the index is not loaded
    assert body.pulled == body.chunks
    assert_error(asgi(keyed_app, "DELETE", "/index/images/x"), 401)
    assert_error(asgi(keyed_app, "DELETE", "/index/images/x", headers={"X-API-Key": "s3cret"}), 503)
    assert asgi(keyed_app, "GET", "/healthz").status_code == 200


# --- 7. connections that never finish -------------------------------------------------------------
def test_a_stalled_body_is_answered_408(tmp_path, monkeypatch):
    import service.app

    monkeypatch.setattr(service.app, "BODY_READ_TIMEOUT_S", 0.3)
    app = create_app(ServiceSettings(index=tmp_path / "none", device="cpu", load_in_background=False))

    async def stalled():
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        await asyncio.sleep(5)
        yield b"never"

    start = time.monotonic()
    r = asgi(app, "POST", "/search", content=stalled(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert time.monotonic() - start < 3
    assert_error(r, 408, "0.3")


def test_serve_passes_the_connection_limits_to_uvicorn(monkeypatch):
    import uvicorn

    from service.cli import uvicorn_options

    options = uvicorn_options()
    assert options["timeout_keep_alive"] == 5 and options["h11_max_incomplete_event_size"] == 16 * 1024
    assert options["limit_concurrency"] is None  # idle sockets must not take places: the app bounds requests
    config = uvicorn.Config(lambda *_: None, **options)  # every option is one uvicorn knows
    assert config.timeout_keep_alive == 5


def test_serve_flags_reach_uvicorn(index_dir, monkeypatch):
    import argparse

    import uvicorn

    from service.cli import register as add_serve_command
    from service.engine import Engine

    seen: dict = {}
    opened = []
    real_open = Engine.open
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(Engine, "open", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "--index", str(index_dir), "--device", "cpu", "--log-level", "warning",
                              "--timeout-keep-alive", "7", "--max-connections", "64",
                              "--max-in-flight", "9"])
    try:
        assert args.handler(args) == 0
    finally:
        for engine in opened:
            engine.close()
    assert seen["timeout_keep_alive"] == 7 and seen["limit_concurrency"] is None
    assert opened[0] is not None and args.max_in_flight == 9
    assert seen["h11_max_incomplete_event_size"] == 16 * 1024 and seen["http"].__name__ == "HeadTimeoutH11Protocol"


@contextlib.contextmanager
def running(app, **options):
    """uvicorn with the service's connection options over ``app``, in a thread; yields its port."""
    import uvicorn

    from service.cli import uvicorn_options

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **uvicorn_options(**options)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture()
def tiny_server():
    """A trivial app behind uvicorn with the service's options and a 1 s timeout."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with running(app, timeout_keep_alive=1) as port:
        yield port


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before it closed the connection, or None if it is still open."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    return got


def test_idle_connections_are_closed(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server)) as s:
        assert _closed_within(s, 4) == b""  # connected, never sent a byte


def test_a_trickled_request_head_is_cut_off(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server)) as s:
        start = time.monotonic()
        s.settimeout(0.2)
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if time.monotonic() - start > 6:
                break
        assert closed and time.monotonic() - start < 4


def test_requests_and_keep_alive_still_work(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server), timeout=5) as s:
        for _ in range(2):
            time.sleep(0.6)  # well within the timeout, twice over more than its length
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                answer += s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
        assert _closed_within(s, 4) == b""  # then closed after the keep-alive timeout


def test_oversized_request_head_is_refused(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)  # 16 KiB and still no end
        answer = _closed_within(s, 4)
        assert answer is not None and answer.startswith(b"HTTP/1.1 400")


def test_the_real_server_refuses_early_and_answers_head(keyed_app, monkeypatch):
    """Through uvicorn: 401 before the body is sent, HEAD without a body, a stalled body cut off."""
    import service.app

    monkeypatch.setattr(service.app, "BODY_READ_TIMEOUT_S", 0.5)
    app = create_app(keyed_app.state.service.settings)
    with running(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /index/images HTTP/1.1\r\nHost: x\r\nContent-Length: 16777216\r\n"
                      b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
            # No body byte is sent: the answer must come from the head alone. (Sending part of the
            # body would leave unread bytes in the server's socket, whose close then resets the
            # connection and can discard the 401 before this side reads it.)
            answer = _closed_within(s, 3)
            assert answer is not None and answer.startswith(b"HTTP/1.1 401") and b"X-API-Key" in answer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = _closed_within(s, 3)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")
            assert b"content-length: 15" in answer.lower()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                      b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n")
            answer = _closed_within(s, 3)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408")
