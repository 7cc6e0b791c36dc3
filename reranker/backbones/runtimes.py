"""How a backbone's forward runs on the chip: ``torch`` (float32, as loaded), ``onnx`` or ``int8``.

``onnx`` runs a plain ViT's forward in ONNX Runtime (float32, the same features to ~2e-5; the graph is
exported once and cached, :mod:`reranker.backbones.onnx_runtime`), on the CPU only; forwards that need
attention stay in torch.

``int8`` is torch's dynamic quantization of every ``nn.Linear`` (the attention projections and
the MLPs: nearly all of a ViT's arithmetic): weights stored as int8 per tensor, activations
quantized per batch on the fly, products accumulated in int32 by fbgemm, on the CPU only. The
module tree is unchanged, so attention capture (rollout) and intermediate blocks work as before.

Measured on this project's 2-core AVX2 CPU, DINOv2 ViT-S/14 at 224 px, one image, two threads:
float32 95-110 ms, int8 64 ms; ONNX Runtime 78-81 ms and OpenVINO 83 ms on the same graph
(docs/benchmarks.md, "Runtimes", which also has the retrieval quality it costs with the real backbone:
0.3-3.6 points on the shipped rerank, 0.9-7.2 on the global baseline; hence an opt-in).

torch marks ``torch.ao.quantization`` as deprecated in favour of torchao (whose CPU int8 path
needs ``torch.compile``); the API still ships in torch 2.14, and an install without it gets a
clear error here rather than a wrong model.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch
from torch import nn

from ..defaults import DEFAULT_RUNTIME, RUNTIMES
from .base import Backbone

__all__ = ["DEFAULT_RUNTIME", "RUNTIMES", "check_runtime", "onnx_runs", "set_runtime"]

log = logging.getLogger(__name__)


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return runtime


def onnx_runs(backbone: Backbone) -> bool:
    """Whether the ``onnx`` runtime can run ``backbone``: a plain ViT, on the CPU, ONNX Runtime installed."""
    return (backbone.supports_onnx and backbone.device.type == "cpu"
            and importlib.util.find_spec("onnxruntime") is not None)


def set_runtime(backbone: Backbone, runtime: str) -> Backbone:
    """Make ``backbone`` (on its device, in eval mode) run with ``runtime``, in place; returns it.
    ``backbone.runtime`` then says which one runs (``auto`` resolved: ``onnx`` where :func:`onnx_runs`,
    else ``torch``; an export that fails is logged and leaves ``torch``).

    ValueError for an unknown runtime, ``onnx`` or ``int8`` where they cannot run, or a change from
    ``int8`` back to ``torch`` (quantization cannot be undone: load the backbone again)."""
    check_runtime(runtime)
    if runtime == "auto":
        if not onnx_runs(backbone):
            return set_runtime(backbone, "torch")
        try:
            return set_runtime(backbone, "onnx")
        except ValueError as err:
            log.warning("the onnx runtime is not available here (%s); running torch", err)
            return set_runtime(backbone, "torch")
    current = getattr(backbone, "runtime", "torch")
    if runtime == current:
        return backbone
    if current == "onnx":  # the torch model is still there: drop the session
        backbone.onnx_forward = None
        backbone.runtime = current = "torch"
        if runtime == "torch":
            return backbone
    if current != "torch":
        raise ValueError(f"this backbone already runs with {current}: create it again for {runtime}")
    if runtime == "onnx":
        _use_onnx(backbone)
    if runtime == "int8":
        if backbone.device.type != "cpu":
            raise ValueError(f"the int8 runtime runs on the CPU only (this backbone is on {backbone.device}): "
                             "use --runtime torch on a GPU")
        quantization = getattr(getattr(torch, "ao", None), "quantization", None)
        if not hasattr(quantization, "quantize_dynamic"):
            raise ValueError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic: "
                             "the int8 runtime needs it (use --runtime torch)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quantize_per_tensor|quint8).*")
            quantization.quantize_dynamic(backbone.eval(), {nn.Linear}, dtype=torch.qint8, inplace=True)
    backbone.runtime = runtime
    return backbone


def _use_onnx(backbone: Backbone) -> None:
    """Give ``backbone`` its ONNX Runtime session (ValueError off the CPU or for a model that cannot be
    exported)."""
    from .onnx_runtime import onnx_forward_for

    if not backbone.supports_onnx:
        raise ValueError(f"the onnx runtime runs plain timm ViTs only, not {backbone.name}: use --runtime torch")
    if backbone.device.type != "cpu":
        raise ValueError(f"the onnx runtime runs on the CPU only (this backbone is on {backbone.device}): "
                         "use --runtime torch on a GPU")
    backbone.onnx_forward = onnx_forward_for(backbone)
