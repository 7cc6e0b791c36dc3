"""The bad-file matrix for ``indexer.loading``: every case is made inside the test."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.loading import (
    ImageLoadError,
    LoadLimits,
    content_hash,
    load_image,
    load_image_and_hash,
    read_bytes,
)


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _jpeg_bytes(size=(64, 48), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _noise_jpeg_bytes(size=(120, 80)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _reason(source, limits: LoadLimits = LoadLimits()) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, limits)
    return info.value.reason


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    assert img.mode == "RGB"
    assert img.size == size


# --- images that load ---------------------------------------------------------------------------


def test_valid_jpeg(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg_bytes())
    img = load_image(path)
    _assert_rgb(img, (64, 48))
    assert np.abs(np.asarray(img, dtype=int)[24, 32] - (200, 30, 40)).max() <= 3
    assert load_image(str(path)).size == (64, 48)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # left quarter red
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(path)
    _assert_rgb(out, (20, 40))
    a = np.asarray(out, dtype=int)
    assert a[5, 10, 0] > 200 and a[5, 10, 2] < 60  # the red band is now on top
    assert a[35, 10, 2] > 200


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))
    path = _save(img, tmp_path / "palette.png", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    a = np.asarray(load_image(path))
    assert tuple(a[0, 0]) == (255, 255, 255)  # transparent index -> white, not black
    assert tuple(a[0, 6]) == (10, 200, 30)


def test_rgba_png_is_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[0, 0] = (0, 0, 0, 0)  # fully transparent black
    a[0, 1] = (255, 0, 0, 255)  # opaque red
    a[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = _save(Image.fromarray(a, "RGBA"), tmp_path / "rgba.png")
    out = np.asarray(load_image(path), dtype=int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert np.abs(out[0, 2] - 127).max() <= 1


def test_la_png_is_composited_on_white(tmp_path):
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    a[0, 1] = (50, 255)
    path = _save(Image.fromarray(a, "LA"), tmp_path / "la.png")
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (50, 50, 50)


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = load_image(path)
    _assert_rgb(out, (16, 16))
    r, g, b = np.asarray(out, dtype=int)[8, 8]
    assert r > 200 and g < 60 and b < 60  # no cyan, full magenta and yellow: red


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535, 256]], dtype=np.uint16)
    path = _save(Image.fromarray(a), tmp_path / "grey16.png")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    out = np.asarray(load_image(path), dtype=int)
    assert out.shape == (1, 4, 3)
    assert np.abs(out[0, :, 0] - [0, 128, 255, 1]).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_and_float_greyscale_tiff(tmp_path):
    ints = _save(Image.fromarray(np.array([[0, 65535]], dtype=np.int32)), tmp_path / "i.tif")
    floats = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), tmp_path / "f.tif")
    assert np.asarray(load_image(ints))[0, :, 0].tolist() == [0, 255]
    assert np.abs(np.asarray(load_image(floats), dtype=int)[0, :, 0] - [0, 128, 255]).max() <= 1


def test_1bit_image(tmp_path):
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    path = _save(img, tmp_path / "bilevel.png")
    out = np.asarray(load_image(path))
    assert out.shape == (8, 8, 3)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 7]) == (0, 0, 0)


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    out = load_image(path)
    _assert_rgb(out, (10, 10))
    assert tuple(np.asarray(out)[5, 5]) == (255, 0, 0)


def test_bytes_and_stream_input():
    data = _jpeg_bytes()
    assert load_image(data).size == (64, 48)
    assert load_image(bytearray(data)).size == (64, 48)
    stream = io.BytesIO(data)
    assert load_image(stream).size == (64, 48)
    assert not stream.closed


def test_result_is_detached_and_loaded(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(path)
    img = load_image(path)
    path.unlink()  # the pixels must not depend on the file any more
    assert img.getpixel((2, 2)) == (1, 2, 3)
    assert getattr(img, "fp", None) is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_no_file_handles_left_open(tmp_path):
    good = tmp_path / "ok.jpg"
    good.write_bytes(_jpeg_bytes())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_noise_jpeg_bytes()[:500])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image(good)
        load_image_and_hash(good)
        with pytest.raises(ImageLoadError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) == before


def test_hash_of_the_same_bytes(tmp_path):
    path = tmp_path / "ok.jpg"
    data = _jpeg_bytes()
    path.write_bytes(data)
    img, digest = load_image_and_hash(path)
    assert img.size == (64, 48)
    assert digest == content_hash(data) == content_hash(read_bytes(path))
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- files that must be refused ------------------------------------------------------------------


def test_truncated_jpeg(tmp_path):
    data = _noise_jpeg_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path) == "truncated"


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_valid_header_then_garbage(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(5000))
    assert _reason(path) in ("corrupt", "truncated")
    real = _noise_jpeg_bytes()  # the first 200 bytes of a real image, then garbage
    assert _reason(real[:200] + rng.bytes(5000)) in ("corrupt", "truncated")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert _reason(path) == "empty"
    assert _reason(b"") == "empty"


def test_random_bytes_named_jpg(tmp_path):
    path = tmp_path / "random.jpg"
    path.write_bytes(np.random.default_rng(3).bytes(4096).lstrip(b"\xff"))
    assert _reason(path) == "unsupported"


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    assert _reason(path) == "unsupported"


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "x.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    err = info.value
    assert err.reason == "missing" and err.path == str(path)
    assert str(path) in str(err)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image_and_hash(path)


def test_directory_is_unreadable(tmp_path):
    assert _reason(tmp_path) == "unreadable"


def test_file_over_max_file_bytes(tmp_path):
    data = _jpeg_bytes()
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    limits = LoadLimits(max_file_bytes=len(data) - 1)
    assert _reason(path, limits) == "too_large_file"
    assert _reason(data, limits) == "too_large_file"
    assert _reason(io.BytesIO(data), limits) == "too_large_file"
    assert load_image(path, LoadLimits(max_file_bytes=len(data))).size == (64, 48)


def test_decompression_bomb_uses_our_limit(tmp_path):
    default = Image.MAX_IMAGE_PIXELS
    path = _save(Image.new("L", (3000, 3000)), tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError) as info:
        load_image(path, LoadLimits(max_pixels=1_000_000))
    assert info.value.reason == "decompression_bomb"
    assert "3000x3000" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == default
    assert load_image(path, LoadLimits(max_pixels=9_000_000)).size == (3000, 3000)
    assert Image.MAX_IMAGE_PIXELS == default


def test_pil_bomb_warning_made_an_error_is_reported(tmp_path, monkeypatch):
    path = _save(Image.new("L", (40, 40)), tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns past 1000, errors past 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert _reason(path) == "decompression_bomb"
    big = _save(Image.new("L", (50, 50)), tmp_path / "big.png")
    assert _reason(big) == "decompression_bomb"  # PIL's own error, at twice its limit


def test_error_is_a_value_error_and_pickles():
    err = ImageLoadError("a/b.jpg", "truncated", "image data is truncated")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.reason, copy.message) == ("a/b.jpg", "truncated", "image data is truncated")
    assert str(copy) == "a/b.jpg: image data is truncated"


# --- a real photo --------------------------------------------------------------------------------


@pytest.mark.shared
def test_real_photo_loads(shared_data):
    photo = sorted((shared_data / "clothing-small" / "test").rglob("*.jpg"))[0]
    img, digest = load_image_and_hash(photo)
    assert img.mode == "RGB" and min(img.size) > 0
    assert digest == content_hash(photo.read_bytes())
    assert np.asarray(img).std() > 0
