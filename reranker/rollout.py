"""Attention rollout: per-image patch weights from a ViT's own attention maps.

Two variants, both from post-softmax attention ``(B, heads, N, N)`` per block:

* :func:`attention_rollout` (the method's default): fuse the heads, zero the lowest
  ``discard_ratio`` of entries per image, drop the prefix tokens, pool both grids to
  ``G x G``, add the identity and renormalise rows, chain over the blocks, and take the
  column mean of the result (then ReLU and normalise).
* :func:`cls_attention_rollout` (Abnar & Zuidema): the same chain over all tokens,
  reading the CLS row of the result.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

from .backbones.base import pool_tokens

HeadFusion = Literal["min", "mean", "max"]


def fuse_heads(attention: torch.Tensor, head_fusion: HeadFusion) -> torch.Tensor:
    """``(B, heads, N, N) -> (B, N, N)`` by min, mean or max over the heads."""
    if head_fusion == "min":
        return attention.min(dim=1).values
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.max(dim=1).values
    raise ValueError(f"head_fusion must be 'min', 'mean' or 'max', got {head_fusion!r}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each image's entries of ``(B, N, N)`` (a copy)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    B = attention.shape[0]
    flat = attention.reshape(B, -1).clone()
    k = int(flat.shape[1] * ratio)
    if k:
        lowest = flat.topk(k, dim=1, largest=False).indices
        flat.scatter_(1, lowest, 0.0)
    return flat.view_as(attention)


def _add_identity_and_normalise(attention: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    attention = attention + eye
    return attention / attention.sum(dim=-1, keepdim=True)


def normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """ReLU, then rescale each vector to unit mass; an all-zero vector becomes uniform."""
    weights = weights.clamp_min(0.0)
    total = weights.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > 0, weights / total.clamp_min(1e-30), uniform)


def _check(attentions: Sequence[torch.Tensor], token_grid: tuple[int, int], num_prefix_tokens: int) -> None:
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    h, w = token_grid
    for a in attentions:
        if a.dim() != 4 or a.shape[-1] != a.shape[-2] or a.shape[-1] != num_prefix_tokens + h * w:
            raise ValueError(
                f"attention of shape {tuple(a.shape)} does not match {num_prefix_tokens} prefix "
                f"tokens and a {h}x{w} patch grid"
            )


def _chain(
    attentions: Sequence[torch.Tensor],
    head_fusion: HeadFusion,
    discard_ratio: float,
    select: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``R_l = A_l R_{l-1}`` with ``A_l`` = identity-added, row-normalised ``select(fused block)``."""
    rollout = None
    for attention in attentions:
        fused = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)
        step = _add_identity_and_normalise(select(fused))
        rollout = step if rollout is None else step @ rollout
    return rollout


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    token_grid: tuple[int, int],
    num_prefix_tokens: int,
    grid: int = 7,
    head_fusion: HeadFusion = "min",
    discard_ratio: float = 0.1,
) -> torch.Tensor:
    """Patch weights ``(B, G*G)``, non-negative and summing to 1, by pooled attention rollout."""
    _check(attentions, token_grid, num_prefix_tokens)
    p = num_prefix_tokens

    def pooled_patches(fused: torch.Tensor) -> torch.Tensor:
        pooled = pool_tokens(fused[:, p:, p:], token_grid, grid)  # pool the query grid (rows)
        return pool_tokens(pooled.transpose(1, 2), token_grid, grid).transpose(1, 2)  # and the keys

    rollout = _chain(attentions, head_fusion, discard_ratio, pooled_patches)
    return normalise_weights(rollout.mean(dim=1))


def cls_attention_rollout(
    attentions: Sequence[torch.Tensor],
    token_grid: tuple[int, int],
    num_prefix_tokens: int,
    grid: int = 7,
    head_fusion: HeadFusion = "min",
    discard_ratio: float = 0.1,
) -> torch.Tensor:
    """Patch weights ``(B, G*G)`` from the CLS row of the rollout over all tokens."""
    if num_prefix_tokens < 1:
        raise ValueError("the CLS-row rollout needs a CLS token (this model has no prefix token)")
    _check(attentions, token_grid, num_prefix_tokens)
    rollout = _chain(attentions, head_fusion, discard_ratio, lambda fused: fused)
    cls_row = rollout[:, 0, num_prefix_tokens:]
    pooled = pool_tokens(cls_row.unsqueeze(-1), token_grid, grid).squeeze(-1)
    return normalise_weights(pooled)
