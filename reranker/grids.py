"""Token grids: the layout of a block's attention and average pooling of patch tokens (torch only)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class AttentionGrid(NamedTuple):
    """The token layout of one block's attention ``(B, heads, N_q, N_k)``.

    ``N_q = num_prefix_tokens + h_q * w_q`` and ``N_k = num_prefix_tokens + h_k * w_k``, prefix
    tokens first, patch tokens row-major. A plain ViT block is square (``query_grid == key_grid``);
    a CvT block's keys come from a strided convolution, so its key grid is coarser.
    """

    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    num_prefix_tokens: int


def pool_tokens(tokens: torch.Tensor, token_grid: tuple[int, int], grid: int) -> torch.Tensor:
    """Average-pool patch tokens ``(B, h*w, D)`` laid out on ``token_grid`` to ``(B, G*G, D)``."""
    B, N, D = tokens.shape
    h, w = token_grid
    if N != h * w:
        raise ValueError(f"{N} tokens do not fill a {h}x{w} grid")
    if (h, w) == (grid, grid):
        return tokens
    x = tokens.transpose(1, 2).reshape(B, D, h, w)
    x = F.adaptive_avg_pool2d(x, grid)
    return x.flatten(2).transpose(1, 2)
