"""The Docker image, run for real: built from ``docker/Dockerfile`` with Debian's podman
(``docker/build-local.sh``), started with compose's volumes (an index volume at /data/index and a
weights volume at /weights), searched over loopback with the real DINOv2, stopped.

Slow (the image holds torch: about 10 minutes to build on a 2-core machine the first time), so it is
not part of ``make test``: ``make test-container`` runs it, and CI runs that after the suite. It skips,
saying why, where no container can be built or started (not root, no podman and no apt-get, a kernel
that refuses containers).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytestmark = [pytest.mark.container, pytest.mark.shared, pytest.mark.real_backbone]

REPO = Path(__file__).resolve().parents[1]
TAG = "localhost/vit-rerank:container-test"
BASE_TAG = "localhost/vit-rerank-base"
WEIGHTS_NAME = "dinov2_vits14.safetensors"
# Where the container runtime cannot set the default resource limits or use cgroups (our sandbox:
# no CAP_SYS_RESOURCE, cgroups v1/v2 hybrid), runc with limits below the host's still runs containers.
SANDBOX_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
READY_TIMEOUT_S = 300


def _podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The image, built by docker/build-local.sh (which installs podman and debootstrap from Debian)."""
    if os.geteuid() != 0:
        pytest.skip("the container test needs root (debootstrap, podman's storage); run it as root")
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        pytest.skip("no podman and no apt-get to install it: no container engine can be had here")
    log = tmp_path_factory.mktemp("build") / "build-local.log"
    with log.open("w") as fh:
        done = subprocess.run(["bash", str(REPO / "docker" / "build-local.sh"), "--no-smoke", "--tag", TAG],
                              stdout=fh, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        raise AssertionError(f"docker/build-local.sh failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    return TAG


@pytest.fixture(scope="module")
def run_flags(image) -> list[str]:
    """The flags ``podman run`` needs on this host: none, or the sandbox's (see SANDBOX_FLAGS)."""
    tried = []
    for flags in ([], SANDBOX_FLAGS):
        probe = _podman("run", "--rm", *flags, "--entrypoint", "python", image, "-c", "print('ok')", check=False)
        if probe.returncode == 0 and probe.stdout.strip() == "ok":
            return flags
        tried.append(f"{flags or 'no flags'}: {probe.stderr.strip()[-300:]}")
    pytest.skip("podman cannot start a container on this host: " + " | ".join(tried))


@pytest.fixture
def volumes(image, run_flags, real_weights) -> Iterator[dict[str, str]]:
    """Compose's two named volumes, the weights one holding the real checkpoint (copied in by a container)."""
    names = {"index": f"vrt-index-{uuid.uuid4().hex[:8]}", "weights": f"vrt-weights-{uuid.uuid4().hex[:8]}"}
    for name in names.values():
        _podman("volume", "create", name)
    try:
        _podman("run", "--rm", *run_flags, "-v", f"{names['weights']}:/weights",
                "-v", f"{Path(real_weights).parent}:/src:ro", "--entrypoint", "cp", image,
                f"/src/{WEIGHTS_NAME}", f"/weights/{WEIGHTS_NAME}")
        yield names
    finally:
        _podman("volume", "rm", "-f", *names.values(), check=False)


@pytest.fixture
def photos(shared_data) -> Iterator[Path]:
    """Three classes of six clothing photos in a folder the image's user (uid 10001) can read."""
    folder = Path(tempfile.mkdtemp(prefix="vrt-photos-"))
    try:
        for cls in ("hat", "pants", "shoes"):
            (folder / cls).mkdir()
            for src in sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:6]:
                shutil.copy(src, folder / cls / src.name)
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    """One ``podman run -d`` of the image's service, published on a loopback port."""

    def __init__(self, image: str, flags: list[str], volumes: dict[str, str], *env: str) -> None:
        self.name = f"vrt-{uuid.uuid4().hex[:8]}"
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env_args = [a for e in env for a in ("-e", e)]
        _podman("run", "-d", "--name", self.name, *flags, "-p", f"127.0.0.1:{self.port}:8000",
                "-v", f"{volumes['index']}:/data/index", "-v", f"{volumes['weights']}:/weights", *env_args, image)

    def state(self) -> dict:
        return json.loads(_podman("inspect", self.name).stdout)[0]["State"]

    def logs(self) -> str:
        out = _podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def wait_ready(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < READY_TIMEOUT_S:
            if not self.state()["Running"]:
                raise AssertionError(f"the container exited ({self.state()['ExitCode']}):\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.base + "/readyz", timeout=3).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{self.logs()[-4000:]}")

    def search(self, photo: Path) -> dict:
        with photo.open("rb") as fh:
            answer = httpx.post(self.base + "/search", files={"image": (photo.name, fh, "image/jpeg")},
                                data={"top_k": "5"}, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def stop(self) -> float:
        """``podman stop`` (SIGTERM, as compose does); the seconds it took."""
        start = time.monotonic()
        _podman("stop", "-t", "30", self.name)
        return time.monotonic() - start

    def remove(self) -> None:
        _podman("rm", "-f", self.name, check=False)


def test_index_built_in_the_image_serves_without_the_photos(image, run_flags, volumes, photos):
    """The README's recipe: build the index with the photos mounted for that run only, then serve the
    index volume alone; search, thumbnails and explanations all work, and a stop is a clean exit."""
    build = _podman("run", "--rm", *run_flags, "-v", f"{volumes['index']}:/data/index",
                    "-v", f"{volumes['weights']}:/weights", "-v", f"{photos}:/photos:ro", "--entrypoint", "vit-rerank",
                    image, "index", "build", "/data/index", "--from", "/photos", "--label-from-parent",
                    "--weights", f"/weights/{WEIGHTS_NAME}", "--device", "cpu", "--no-progress", timeout=900)
    assert "added 18 images" in build.stdout, build.stdout + build.stderr

    server = Container(image, run_flags, volumes)
    try:
        server.wait_ready()
        info = httpx.get(server.base + "/index", timeout=10).json()
        assert info["images"] == 18 and not info["random_weights"] and info["weights"].startswith("file:")
        query = sorted((photos / "shoes").glob("*.jpg"))[2]
        answer = server.search(query)
        top = answer["results"][0]
        assert top["id"].endswith(query.name) and top["label"] == "shoes"
        assert [r["label"] for r in answer["results"][:3]].count("shoes") >= 2  # the real model, not noise
        thumb = httpx.get(server.base + top["thumbnail_url"], timeout=30)
        full = httpx.get(server.base + top["image_url"], timeout=30)
        assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")
        assert full.status_code == 200 and full.headers["content-type"].startswith("image/")
        picture = httpx.get(server.base + answer["results"][1]["explanation_url"], timeout=120)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        health = _podman("healthcheck", "run", server.name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        took = server.stop()
        assert server.state()["ExitCode"] == 0 and took < 25, (took, server.logs()[-3000:])
        assert "Traceback" not in server.logs()
    finally:
        server.remove()


def test_an_empty_index_volume_serves_and_keeps_what_is_added(image, run_flags, volumes, photos):
    """A new, empty index volume starts an empty index that accepts adds (no exit, no restart loop); what is
    added survives a new container on the same volumes."""
    env = (f"VIT_RERANK_WEIGHTS=/weights/{WEIGHTS_NAME}", "VIT_RERANK_API_KEY=container-test-key")
    first = Container(image, run_flags, volumes, *env)
    photo = sorted((photos / "hat").glob("*.jpg"))[0]
    try:
        first.wait_ready()
        assert httpx.get(first.base + "/index", timeout=10).json()["images"] == 0
        with photo.open("rb") as fh:
            refused = httpx.post(first.base + "/index/images", files={"image": (photo.name, fh, "image/jpeg")},
                                 data={"id": "hat-1"}, timeout=120)
        assert refused.status_code == 401
        with photo.open("rb") as fh:
            added = httpx.post(first.base + "/index/images", files={"image": (photo.name, fh, "image/jpeg")},
                               data={"id": "hat-1", "label": "hat"}, headers={"X-API-Key": "container-test-key"},
                               timeout=120)
        assert added.status_code == 201, added.text
        assert first.search(photo)["results"][0]["id"] == "hat-1"
        first.stop()
        assert first.state()["ExitCode"] == 0
    finally:
        first.remove()

    second = Container(image, run_flags, volumes, *env)
    try:
        second.wait_ready()
        assert httpx.get(second.base + "/index", timeout=10).json()["images"] == 1
        answer = second.search(photo)
        assert answer["results"][0]["id"] == "hat-1"
        assert httpx.get(second.base + answer["results"][0]["thumbnail_url"], timeout=30).status_code == 200
    finally:
        second.remove()
