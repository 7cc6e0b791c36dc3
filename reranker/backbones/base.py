"""The one interface every backbone implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_GRID = 7


class AttentionGrid(NamedTuple):
    """The token layout of one block's attention ``(B, heads, N_q, N_k)``.

    ``N_q = num_prefix_tokens + h_q * w_q`` and ``N_k = num_prefix_tokens + h_k * w_k``, prefix
    tokens first, patch tokens row-major. A plain ViT block is square (``query_grid == key_grid``);
    a CvT block's keys come from a strided convolution, so its key grid is coarser.
    """

    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    num_prefix_tokens: int


@dataclass
class BackboneOutput:
    """Features of a batch of images.

    Attributes:
        global_features: ``(B, D)`` global vectors, L2-normalised.
        patch_features: ``(B, G*G, D)`` patch vectors on a ``G x G`` grid, row-major, L2-normalised.
        attentions: per block, post-softmax attention ``(B, heads, N_q, N_k)`` over all tokens
            (prefix tokens first), when asked for and the backbone has global attention.
        token_grid: the backbone's own (final) patch grid ``(h, w)``.
        num_prefix_tokens: CLS / distillation / register tokens before the final patch tokens.
        random_weights: True when the backbone was randomly initialised (not pretrained).
        attention_grids: per block, the layout of ``attentions`` when the blocks differ from
            square attention over ``token_grid`` (CvT: a grid per stage, strided keys, a CLS
            token in the last stage only); None when every block is square over ``token_grid``
            with ``num_prefix_tokens`` prefix tokens (plain ViTs).
    """

    global_features: torch.Tensor
    patch_features: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None
    token_grid: tuple[int, int]
    num_prefix_tokens: int
    random_weights: bool
    attention_grids: tuple[AttentionGrid, ...] | None = None

    @property
    def grid(self) -> int:
        """Side ``G`` of the pooled patch grid."""
        return int(round(self.patch_features.shape[1] ** 0.5))


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


class RawFeatures(NamedTuple):
    """What :meth:`Backbone._features` returns."""

    global_vec: torch.Tensor
    patches: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None
    token_grid: tuple[int, int]
    num_prefix_tokens: int
    attention_grids: tuple[AttentionGrid, ...] | None = None


class Backbone(nn.Module):
    """A pretrained image model seen as: images -> global vector, patch grid, attention.

    Subclasses implement :meth:`_features`, returning the un-normalised global vector,
    the pooled patch grid and, when ``with_attention`` is set, the captured attention
    (and its per-block layout where the blocks are not square over the final grid).
    """

    #: True when the model has global self-attention whose rollout makes sense.
    supports_rollout: bool = False

    def __init__(self, name: str, weights_id: str, grid: int = DEFAULT_GRID) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be at least 1, got {grid}")
        self.name = name
        self.weights_id = weights_id
        self.grid = grid
        self.projection: nn.Module | None = None

    @property
    def random_weights(self) -> bool:
        return self.weights_id == "random"

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        """Dimension of the returned vectors (after the projection head, if any)."""
        if isinstance(self.projection, nn.Linear):
            return self.projection.out_features
        return self.embed_dim

    @property
    def transform(self) -> Callable:
        """Test-time preprocessing from the model's own pretrained config (PIL -> tensor)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_projection(self, head: nn.Module | None) -> None:
        """Apply ``head`` (e.g. a fine-tuned 384->128 linear layer) to global and patch vectors alike."""
        self.projection = head

    def _features(self, images: torch.Tensor, with_attention: bool) -> RawFeatures:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, with_attention: bool = False) -> BackboneOutput:
        """Embed a batch ``(B, 3, H, W)`` of preprocessed images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if with_attention and not self.supports_rollout:
            raise ValueError(f"{self.name} has no global attention to capture (use another marginal)")
        raw = self._features(images, with_attention)
        global_vec, patches = raw.global_vec, raw.patches
        if self.projection is not None:
            global_vec = self.projection(global_vec)
            patches = self.projection(patches)
        return BackboneOutput(
            global_features=F.normalize(global_vec.float(), dim=-1),
            patch_features=F.normalize(patches.float(), dim=-1),
            attentions=raw.attentions,
            token_grid=raw.token_grid,
            num_prefix_tokens=raw.num_prefix_tokens,
            random_weights=self.random_weights,
            attention_grids=raw.attention_grids,
        )
