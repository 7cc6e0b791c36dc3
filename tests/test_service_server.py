"""The service as users run it: ``vit-rerank serve`` in a subprocess on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import psutil
import pytest

from service_support import (GRACEFUL, copy_index, free_port, index_dir, photos,  # noqa: F401
                             png_bytes, service_env, start_server, stop_server)
from conftest import tiny_vit_kwargs

pytestmark = pytest.mark.slow  # starts real servers (each start imports torch)


class Server:
    """One running ``vit-rerank serve`` (restartable) over its own copy of the index."""

    def __init__(self, index: Path, logs: Path) -> None:
        self.index, self.logs, self.port = index, logs, free_port()
        self.args = ["--index", str(index), "--queue-size", "4", "--max-batch", "4", "--device", "cpu",
                     "--log-level", "warning"]
        self.env = service_env(VIT_RERANK_API_KEY="k")
        self.base = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.proc = self.start()

    def start(self):
        self.starts += 1
        self.proc = start_server(self.args, self.port, self.env, self.logs / f"server-{self.starts}.log")
        return self.proc

    def stop(self) -> int:
        return stop_server(self.proc)


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    srv = Server(copy_index(index_dir, folder / "index"), folder)
    yield srv
    srv.stop()


def test_32_concurrent_searches_against_a_small_queue(server, photos):
    """Every query is answered (200, or 503 with Retry-After); the process lives; memory stays bounded."""
    payloads = [p.read_bytes() for p in photos[:8]]

    async def one(client: httpx.AsyncClient, k: int) -> httpx.Response:
        files = {"image": (f"q{k}.jpg", payloads[k % len(payloads)], "image/jpeg")}
        return await client.post(f"{server.base}/search", files=files, data={"top_k": "5", "rerank_k": "30"})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(one(client, k) for k in range(32)))

    process = psutil.Process(server.proc.pid)
    asyncio.run(burst())  # warm-up: first allocations, caches
    rss_warm = process.memory_info().rss
    for _ in range(2):
        answers = asyncio.run(burst())
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 4 and codes.count(503) >= 1, codes  # the queue of 4 did fill up
        for r in answers:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["detail"]
            else:
                assert len(r.json()["results"]) == 5
    assert server.proc.poll() is None
    assert httpx.get(f"{server.base}/healthz").json() == {"status": "ok"}
    growth = process.memory_info().rss - rss_warm
    assert growth < 150 * 2**20, growth
    metrics = httpx.get(f"{server.base}/metrics").text
    assert 'route="/search",status="200"' in metrics and 'route="/search",status="503"' in metrics


def test_paths_never_escape_the_gallery(server):
    for target in ("/images/../../../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd",
                   "/images/..%2F..%2Fmanifest.json", "/static/../app.py", "/static/..%2F..%2Fapp.py"):
        answer = _raw_get(server.port, target)
        assert answer.split(b" ", 2)[1] in (b"404", b"400"), answer[:200]
        assert b"root:" not in answer and b"import" not in answer


def test_changes_survive_a_restart(server, photos):
    headers = {"X-API-Key": "k"}
    removed = f"hat/{photos[0].name}"
    blue = png_bytes((50, 70), (10, 10, 240))
    r = httpx.post(f"{server.base}/index/images", files={"image": ("b.png", blue, "image/png")},
                   data={"id": "blue", "label": "colour"}, headers=headers)
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{server.base}/index/images/{removed}", headers=headers).status_code == 200
    assert server.stop() in GRACEFUL

    server.start()
    info = httpx.get(f"{server.base}/index").json()
    assert info["images"] == 30
    assert httpx.get(f"{server.base}/images/blue").content == blue
    assert httpx.get(f"{server.base}/images/{removed}").status_code == 404
    hits = httpx.post(f"{server.base}/search", files={"image": ("q.png", blue, "image/png")},
                      data={"top_k": "30", "rerank_k": "0"}).json()["results"]
    assert hits[0]["id"] == "blue" and hits[0]["label"] == "colour"
    assert removed not in {h["id"] for h in hits}
    assert server.stop() in GRACEFUL


def _raw_get(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_serve_demo_with_random_weights(tmp_path):
    """``serve --demo --weights random``: indexes the shipped gallery on first start, then serves it."""
    port = free_port()
    env = service_env(VIT_RERANK_HOME=str(tmp_path / "home"))
    kwargs = json.dumps(tiny_vit_kwargs())
    args = ["--demo", "--weights", "random", "--model", "test_vit", "--model-kwargs", kwargs, "--device", "cpu",
            "--no-progress", "--log-level", "warning"]
    proc = start_server(args, port, env, tmp_path / "demo.log")
    base = f"http://127.0.0.1:{port}"
    try:
        info = httpx.get(f"{base}/index").json()
        assert info["images"] == 36 and info["random_weights"] is True and info["model"] == "test_vit"
        from service.demo import DEMO_GALLERY

        query = sorted(DEMO_GALLERY.glob("shoes/*.jpg"))[0]
        body = httpx.post(f"{base}/search", files={"image": ("q.jpg", query.read_bytes(), "image/jpeg")}).json()
        assert body["random_weights"] is True and len(body["results"]) == 10
        assert any(h["id"] == f"shoes/{query.name}" and h["label"] == "shoes" for h in body["results"])
        assert httpx.get(f"{base}/").headers["content-type"].startswith("text/html")
    finally:
        assert stop_server(proc) in GRACEFUL
    assert any((tmp_path / "home").glob("demo-test_vit-random-*/manifest.json"))


def test_an_empty_index_folder_is_served_as_a_new_index_that_takes_adds(tmp_path, photos):
    """A new, empty volume used to make `serve` exit 2 (a container then restarts in a loop)."""
    from service.cli import ensure_index
    from service_support import make_client

    folder = tmp_path / "volume"
    folder.mkdir()
    assert ensure_index(folder, "test_vit", "random", {}) is True
    assert ensure_index(folder, "test_vit", "random", {}) is False  # an index now: left as it is
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.txt").write_text("not an index")
    assert ensure_index(other, "test_vit", "random", {}) is False and not (other / "manifest.json").exists()
    with make_client(folder) as client:
        assert client.get("/readyz").status_code == 200
        query = photos[0].read_bytes()
        r = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"] == [], r.text
        assert client.post("/index/images", files={"image": ("a.jpg", query, "image/jpeg")},
                           data={"id": "first"}).status_code == 201
        r = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")})
        assert [h["id"] for h in r.json()["results"]] == ["first"]
