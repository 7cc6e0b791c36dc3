"""Attention rollout: per-image patch weights from a ViT's own attention maps.

Two variants, both from post-softmax attention ``(B, heads, N_q, N_k)`` per block:

* :func:`attention_rollout` (the method's default): fuse the heads, zero the lowest
  ``discard_ratio`` of entries per image, drop the prefix tokens, pool the query grid and
  the key grid (each from its own grid) to ``G x G``, add the identity and renormalise rows,
  chain over the blocks, and take the column mean of the result (then ReLU and normalise).
  Because every block is pooled to the same ``G x G`` grid, blocks may differ in layout:
  CvT has a grid per stage and strided (coarser) keys; pass ``block_grids`` for those.
* :func:`cls_attention_rollout` (Abnar & Zuidema): the same chain over all tokens,
  reading the CLS row of the result. It needs square attention over the same tokens in
  every block, so it is undefined for strided keys (CvT).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

from .backbones.base import AttentionGrid, pool_tokens

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
    """Zero the lowest ``ratio`` of each image's entries of ``(B, N_q, N_k)`` (a copy).

    Exactly ``int(ratio * N_q * N_k)`` entries are zeroed per image. Ties at the threshold are
    common in float32 (a CvT stage-1 block has 2.5 million entries), so they are broken the way
    a stable sort would: the tied entries that come first (row-major) are zeroed first. The result
    is then the same on every device, which ``topk`` does not promise.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    B = attention.shape[0]
    flat = attention.reshape(B, -1)
    k = int(flat.shape[1] * ratio)
    if not k:
        return attention.clone()
    threshold = flat.kthvalue(k, dim=1, keepdim=True).values
    at_most = flat <= threshold
    # The usual case: no tie straddles the k-th entry, and the tie-breaking pass can be skipped.
    # Only on the CPU: on a GPU, asking costs a device sync per block, more than the pass itself.
    if attention.device.type == "cpu" and bool((torch.count_nonzero(at_most, dim=1) == k).all()):
        return flat.masked_fill(at_most, 0.0).view_as(attention)
    below = flat < threshold
    tied = at_most & ~below
    room = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)  # tied entries still to zero
    zero = below | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))
    return flat.masked_fill(zero, 0.0).view_as(attention)


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


def _layouts(
    attentions: Sequence[torch.Tensor],
    token_grid: tuple[int, int],
    num_prefix_tokens: int,
    block_grids: Sequence[AttentionGrid] | None,
) -> list[AttentionGrid]:
    """Each block's layout (square over ``token_grid`` by default), checked against its shape."""
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    if block_grids is None:
        layouts = [AttentionGrid(tuple(token_grid), tuple(token_grid), num_prefix_tokens)] * len(attentions)
    else:
        layouts = [AttentionGrid(tuple(q), tuple(k), int(p)) for q, k, p in block_grids]
        if len(layouts) != len(attentions):
            raise ValueError(f"{len(attentions)} attention maps but {len(layouts)} block grids")
    for i, (a, (qg, kg, p)) in enumerate(zip(attentions, layouts)):
        n_q, n_k = p + qg[0] * qg[1], p + kg[0] * kg[1]
        if a.dim() != 4 or tuple(a.shape[-2:]) != (n_q, n_k):
            raise ValueError(
                f"attention of shape {tuple(a.shape)} (block {i}) does not match {p} prefix tokens, "
                f"a {qg[0]}x{qg[1]} query grid and a {kg[0]}x{kg[1]} key grid"
            )
    return layouts


def _chain(
    attentions: Sequence[torch.Tensor],
    layouts: Sequence[AttentionGrid],
    head_fusion: HeadFusion,
    discard_ratio: float,
    select: Callable[[torch.Tensor, AttentionGrid], torch.Tensor],
) -> torch.Tensor:
    """``R_l = A_l R_{l-1}`` with ``A_l`` = identity-added, row-normalised ``select(fused block, layout)``."""
    rollout = None
    for attention, layout in zip(attentions, layouts):
        fused = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)
        step = _add_identity_and_normalise(select(fused, layout))
        rollout = step if rollout is None else step @ rollout
    return rollout


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    token_grid: tuple[int, int],
    num_prefix_tokens: int,
    grid: int = 7,
    head_fusion: HeadFusion = "min",
    discard_ratio: float = 0.1,
    *,
    block_grids: Sequence[AttentionGrid] | None = None,
) -> torch.Tensor:
    """Patch weights ``(B, G*G)``, non-negative and summing to 1, by pooled attention rollout.

    Args:
        attentions: per block, post-softmax attention ``(B, heads, N_q, N_k)``, in forward order.
        token_grid: the patch grid ``(h, w)`` of square blocks (ignored when ``block_grids`` is given).
        num_prefix_tokens: prefix tokens of square blocks (ignored when ``block_grids`` is given).
        grid: side ``G`` of the pooled grid.
        head_fusion: how the heads are fused.
        discard_ratio: the fraction of each image's fused entries zeroed, lowest first.
        block_grids: per block, its ``(query_grid, key_grid, num_prefix_tokens)``
            (:attr:`BackboneOutput.attention_grids`); None for square blocks over ``token_grid``.
    """
    layouts = _layouts(attentions, token_grid, num_prefix_tokens, block_grids)

    def pooled_patches(fused: torch.Tensor, layout: AttentionGrid) -> torch.Tensor:
        p = layout.num_prefix_tokens
        pooled = pool_tokens(fused[:, p:, p:], layout.query_grid, grid)  # pool the query grid (rows)
        return pool_tokens(pooled.transpose(1, 2), layout.key_grid, grid).transpose(1, 2)  # and the keys

    rollout = _chain(attentions, layouts, head_fusion, discard_ratio, pooled_patches)
    return normalise_weights(rollout.mean(dim=1))


def cls_attention_rollout(
    attentions: Sequence[torch.Tensor],
    token_grid: tuple[int, int],
    num_prefix_tokens: int,
    grid: int = 7,
    head_fusion: HeadFusion = "min",
    discard_ratio: float = 0.1,
    *,
    block_grids: Sequence[AttentionGrid] | None = None,
) -> torch.Tensor:
    """Patch weights ``(B, G*G)`` from the CLS row of the rollout over all tokens.

    The chain multiplies the blocks' full token-to-token matrices, so every block must be
    square attention over the same tokens (``token_grid`` and ``num_prefix_tokens``);
    ``block_grids`` (see :func:`attention_rollout`) is accepted only when it says so.

    Raises:
        ValueError: no CLS token, attention that does not match, or blocks that are not
            square over ``token_grid`` (strided keys, as in CvT: use :func:`attention_rollout`).
    """
    if num_prefix_tokens < 1:
        raise ValueError("the CLS-row rollout needs a CLS token (this model has no prefix token)")
    layouts = _layouts(attentions, token_grid, num_prefix_tokens, block_grids)
    square = AttentionGrid(tuple(token_grid), tuple(token_grid), num_prefix_tokens)
    for i, layout in enumerate(layouts):
        if layout != square:
            (qh, qw), (kh, kw), p = layout
            raise ValueError(
                "the CLS-row rollout needs square attention over the same tokens in every block, "
                f"but block {i} has {p} prefix tokens, a {qh}x{qw} query grid and a {kh}x{kw} key grid "
                f"(the output has {num_prefix_tokens} prefix tokens and a {token_grid[0]}x{token_grid[1]} "
                "grid; strided keys, as in CvT, have no CLS-row rollout): use the pooled rollout"
            )
    rollout = _chain(attentions, layouts, head_fusion, discard_ratio, lambda fused, _layout: fused)
    cls_row = rollout[:, 0, num_prefix_tokens:]
    pooled = pool_tokens(cls_row.unsqueeze(-1), token_grid, grid).squeeze(-1)
    return normalise_weights(pooled)
