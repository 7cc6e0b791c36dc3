"""The model being trained: a timm ViT whose first ``freeze`` blocks are fixed; only the later blocks
and the final norm learn. The global vector is the model's own (``forward_head(pre_logits=True)``)."""

from __future__ import annotations

import torch
from torch import nn

from reranker.backbones.timm_models import is_plain_vit


class TrainableTail(nn.Module):
    """Blocks ``freeze..depth-1`` + final norm + the model's pooling, on the frozen blocks' tokens."""

    def __init__(self, model: nn.Module, freeze: int) -> None:
        super().__init__()
        if not is_plain_vit(model):
            raise ValueError(f"training needs a plain timm ViT (blocks + norm), not {type(model).__name__}")
        depth = len(model.blocks)
        if not 0 <= freeze < depth:
            raise ValueError(f"--freeze must be in 0..{depth - 1} for this {depth}-block model, got {freeze}")
        self.model, self.freeze = model, freeze
        trainable = self.trainable_prefixes()
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(trainable))

    def trainable_prefixes(self) -> tuple[str, ...]:
        """Parameter name prefixes that learn (the frozen blocks, embeddings and pos-embed do not)."""
        depth = len(self.model.blocks)
        return tuple(f"blocks.{i}." for i in range(self.freeze, depth)) + ("norm.", "fc_norm.")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` tokens entering block ``freeze`` -> ``(B, D)`` global vectors."""
        x = tokens
        for block in self.model.blocks[self.freeze:]:
            x = block(x)
        return self.model.forward_head(self.model.norm(x), pre_logits=True)

    def train(self, mode: bool = True) -> "TrainableTail":
        """Only the learning blocks switch mode; the frozen part stays in eval mode."""
        super().train(False)
        for block in self.model.blocks[self.freeze:]:
            block.train(mode)
        self.model.norm.train(mode)
        self.training = mode
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The learning parameters and buffers (what a checkpoint must keep)."""
        prefixes = self.trainable_prefixes()
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k.startswith(prefixes)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint holds parameters this model does not have: {unexpected[:3]}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole timm state dict (what ``--weights FILE`` loads), contiguous on the CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
