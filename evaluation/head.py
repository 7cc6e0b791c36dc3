"""A fine-tuned linear projection head (e.g. the paper's 384 -> 128) read from a file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reranker.backbones.weights import read_state_dict


def load_linear_head(path: str | Path, in_features: int) -> nn.Linear:
    """The one linear layer in ``path`` (``.safetensors`` or a torch state dict): a 2-D
    ``*weight`` of shape ``(out, in_features)`` and, optionally, the ``*bias`` beside it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projection head file not found: {path}")
    tensors = read_state_dict(path)
    weights = {k: v for k, v in tensors.items() if k.endswith("weight") and v.dim() == 2}
    if len(weights) != 1:
        raise ValueError(f"{path}: expected exactly one 2-D '*weight' tensor, found {sorted(weights) or 'none'}")
    (name, weight), = weights.items()
    if weight.shape[1] != in_features:
        raise ValueError(f"{path}: the head takes {weight.shape[1]}-d input, the backbone gives {in_features}-d")
    bias = tensors.get(name[: -len("weight")] + "bias")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head.eval()
