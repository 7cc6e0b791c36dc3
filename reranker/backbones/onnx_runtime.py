"""The ``onnx`` runtime: a plain timm ViT's forward exported once to ONNX and run by ONNX Runtime on the CPU.

What it runs is exactly what :class:`reranker.backbones.timm_models.TimmViT` reads from torch when no
attention is captured: the final tokens (after the model's norm) and the output of block
``patch_layer``. The graph is exported with the weights in it, so one file is one model; it is cached
on disk under a key of everything that shapes it (model name, a digest of the weights, patch layer, input
size, torch / timm / ONNX Runtime versions), so a process pays the export (~5 s for ViT-S) once per
machine, then ~0.4 s to open a session.

Float32 throughout: on DINOv2 ViT-S/14 the tokens agree with torch's to ~2e-5, so an index built with
``torch`` may be searched with ``onnx`` and the reverse. A forward that needs attention (rollout or
``last_cls`` weights, the explanations' maps) or an input size other than the exported one runs in torch,
which the backbone keeps.

Measured on this project's 2-core AVX2 CPU: docs/benchmarks.md, "Runtimes".
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: The ONNX operator set of the export (ONNX Runtime >= 1.17 runs it).
OPSET = 17
#: A batch runs as micro-batches of at most this many images. Without ORT's memory arena (see
#: :class:`OnnxForward`) every buffer comes from malloc, and at 32 images ViT-S's attention and MLP buffers
#: (50 and 25 MB) pass glibc's largest mmap threshold (32 MB): each is mapped and unmapped per operator, and
#: the page faults cost more than the batch saves. DINOv2 ViT-S/14 at 224 on this 2-core CPU, ms per image
#: over 3 rounds: batches of 1: 98-146, of 4: 101-123, of 8: 115-136, of 32: 154-244 (1.2-4.3 s of system time
#: per 32 images).
MICRO_BATCH = 4


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$VIT_RERANK_CACHE/onnx``, else ``$XDG_CACHE_HOME/vit-rerank/onnx``,
    else ``~/.cache/vit-rerank/onnx``."""
    root = os.environ.get("VIT_RERANK_CACHE")
    if root:
        return Path(root) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vit-rerank" / "onnx"


class _TokensAndBlock(nn.Module):
    """``images (B, 3, H, W)`` -> the backbone's :meth:`~reranker.backbones.timm_models.TimmViT.torch_tokens`
    (final tokens and the patch layer's, ``(B, T, D)`` each): the graph that is exported."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.torch_tokens(images)


def graph_key(model: nn.Module, name: str, layer: int | None, input_size: tuple[int, int, int]) -> str:
    """A digest of everything the exported graph depends on, the weights' bytes included (random weights
    differ per process; a fine-tuned file differs from its base)."""
    import onnxruntime
    import timm

    h = hashlib.sha256()
    for part in (name, layer, tuple(input_size), torch.__version__, timm.__version__, onnxruntime.__version__, OPSET):
        h.update(repr(part).encode())
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def export_graph(backbone: nn.Module, input_size: tuple[int, int, int], path: Path) -> None:
    """Export :class:`_TokensAndBlock` of ``backbone`` (batch dimension dynamic) to ``path``, atomically: a
    crash mid-export leaves no half-written file under the cached name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *input_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow in timm
            torch.onnx.export(_TokensAndBlock(backbone.eval()), (example,), tmp, input_names=["images"],
                              output_names=["tokens", "block"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "tokens": {0: "batch"}, "block": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxForward:
    """An ONNX Runtime session of a ViT's :class:`_TokensAndBlock` graph on the CPU.

    Call it with ``images (B, 3, H, W)`` of the exported size: ``(tokens, block)`` as float32 torch
    tensors."""

    def __init__(self, path: Path, input_size: tuple[int, int, int], layer: int | None, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No spinning after a run (as OMP_WAIT_POLICY=PASSIVE for torch): a search's structural stage follows
        # the forward at once, and ORT's spinning threads took a core from it (its 25,600 x 384 x 256 product
        # 87 ms right after a spinning run, 62 ms after a passive one, same process, 25 rounds each).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No arena and no per-shape memory plan: the service runs batches of every size from 1 to its queue, and
        # ORT's arena keeps the peak of each (the soak test's server grew 268 MB after its warm-up with it; 30
        # forwards of batches 1-8: +104 MB with the arena, -2 MB without; batch 1 about 4 % slower without).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_size = tuple(input_size)
        self.layer = layer  # the block whose output the graph returns (None: the final tokens)
        self.path = path

    def accepts(self, images: torch.Tensor) -> bool:
        """Whether ``images`` can run here (on the CPU, at the exported size); else the caller uses torch."""
        return images.device.type == "cpu" and tuple(images.shape[1:]) == self.input_size

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images.detach().float().numpy()
        parts = [self.session.run(None, {"images": np.ascontiguousarray(batch[i:i + MICRO_BATCH])})
                 for i in range(0, max(len(batch), 1), MICRO_BATCH)]  # an empty batch runs once, as before
        if len(parts) == 1:
            tokens, block = parts[0]
        else:
            tokens, block = (np.concatenate(outputs) for outputs in zip(*parts))
        return torch.from_numpy(tokens), torch.from_numpy(block)


def onnx_forward_for(backbone: nn.Module, directory: Path | None = None) -> OnnxForward:
    """The cached graph of ``backbone`` (a TimmViT, at its patch layer and input size; exported first when
    missing) opened in a session that uses as many threads as torch does. ValueError when ONNX Runtime is
    not installed or the export fails."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ValueError("the onnx runtime needs onnxruntime (pip install onnxruntime): use --runtime torch") from err
    name, layer, input_size = backbone.name, backbone.patch_layer, backbone.input_size
    directory = directory or cache_dir()
    path = directory / f"{name.replace('/', '_')}-{graph_key(backbone.model, name, layer, input_size)}.onnx"
    if not path.exists():
        try:
            export_graph(backbone, input_size, path)
        except OSError:  # the cache cannot be written (a read-only home): export to a private temporary folder
            path = Path(tempfile.mkdtemp(prefix="vit-rerank-onnx-")) / path.name
            export_graph(backbone, input_size, path)
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; say which model failed
            raise ValueError(f"{name} could not be exported to ONNX ({type(err).__name__}: {err}): "
                             "use --runtime torch") from err
    return OnnxForward(path, input_size, layer, torch.get_num_threads())
