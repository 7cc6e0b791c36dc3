"""How a backbone's forward runs on the chip: ``torch`` (float32, as loaded) or ``int8``.

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

import warnings

import torch
from torch import nn

from ..defaults import DEFAULT_RUNTIME, RUNTIMES
from .base import Backbone

__all__ = ["DEFAULT_RUNTIME", "RUNTIMES", "check_runtime", "set_runtime"]


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return runtime


def set_runtime(backbone: Backbone, runtime: str) -> Backbone:
    """Make ``backbone`` (on its device, in eval mode) run with ``runtime``, in place; returns it.

    ValueError for an unknown runtime, ``int8`` off the CPU, or a change from ``int8`` back to
    ``torch`` (quantization cannot be undone: load the backbone again)."""
    check_runtime(runtime)
    current = getattr(backbone, "runtime", DEFAULT_RUNTIME)
    if runtime == current:
        return backbone
    if current != DEFAULT_RUNTIME:
        raise ValueError(f"this backbone already runs with {current}: create it again for {runtime}")
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
