"""Shared parts of the service tests: a real index of clothing photos made with a tiny random ViT."""

from __future__ import annotations

import pytest

import contextlib
import signal
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from conftest import tiny_vit_kwargs

CLASSES = ("hat", "shoes", "skirt")
PER_CLASS = 10


def gallery_photos(shared_data: Path) -> list[Path]:
    photos: list[Path] = []
    for cls in CLASSES:
        photos += sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:PER_CLASS]
    return photos


def build_index(folder: Path, photos: list[Path]) -> Path:
    """Index ``photos`` (labels from their folders) with ``test_vit``, random weights, through the library."""
    from indexer.build import add_records, new_manifest
    from indexer.index_dir import IndexDir
    from indexer.sources import ImageRecord
    from reranker.backbones import create_backbone

    backbone = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    manifest = new_manifest(backbone, patch_weights="rollout",
                            model_kwargs=tiny_vit_kwargs())
    records = [ImageRecord(str(p), f"{p.parent.name}/{p.name}", p.parent.name, {"source": "clothing-small"})
               for p in photos]
    with IndexDir.create(folder, manifest) as gallery:
        report = add_records(gallery, backbone, records, workers=0, progress=False)
    assert report.added == len(photos), report
    return folder


def session_index(tmp_path_factory, shared_data: Path) -> Path:
    """The index of :func:`gallery_photos`, built once per test session (tests never change it)."""
    folder = tmp_path_factory.getbasetemp() / "service-index"
    if not (folder / "manifest.json").exists():
        build_index(folder, gallery_photos(shared_data))
    return folder


def copy_index(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def jpeg_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_RERANK_") or k == "VIT_RERANK_CACHE"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def start_server(args: list[str], port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``vit-rerank serve ...`` in a subprocess; returns once /readyz answers 200."""
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vit_rerank", "serve", *args, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_ready(proc, port, log)
    return proc


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    stop_server(proc)
    raise AssertionError(f"the server was not ready in {timeout} s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM, then wait; uvicorn shuts down gracefully and re-raises the signal (exit -15)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


GRACEFUL = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    """The gallery's photos (import this fixture into a test module to use it)."""
    return gallery_photos(shared_data)


@pytest.fixture(scope="module")
def index_dir(shared_data, tmp_path_factory) -> Path:
    """The session's shared index of the gallery photos (tests never change it)."""
    return session_index(tmp_path_factory, shared_data)


def make_client(index: Path, **settings):
    """An in-process client of the service over ``index`` (server exceptions become 500s)."""
    from fastapi.testclient import TestClient

    from service import ServiceSettings, create_app

    cfg = ServiceSettings(index=index, device="cpu", load_in_background=False, **settings)
    return TestClient(create_app(cfg), raise_server_exceptions=False)


def assert_error(response, status: int, *words: str) -> None:
    """``response`` is an error of ``status`` with the body ``{"detail": ...}`` naming every word."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]
    for w in words:
        assert w.lower() in body["detail"].lower(), body["detail"]
