"""Per-image patch weights from a ViT's own attention, computed while the forward runs.

Every kind is read from post-softmax attention ``(B, heads, N_q, N_k)``, one block at a time,
by a :class:`PatchWeightAccumulator` that the backbone feeds from a hook. Each block is
folded into a small running state and then dropped, so memory never holds every block's
maps: the bound is one block's attention ``B * heads * N_q * N_k`` floats (transient) plus the
state, ``B * G^4`` floats per pooled rollout and ``B * N^2`` for the CLS-row rollout.

Kinds (:data:`PER_IMAGE_KINDS`):

* ``rollout`` (the method's): fuse the heads by **min**, zero the lowest ``discard_ratio``
  of entries per image, drop the prefix tokens, pool the query grid and the key grid (each
  from its own grid) to ``G x G``, add the identity and renormalise rows, chain
  ``R_l = A_l R_{l-1}``, and take the column mean of the result (then ReLU, normalise).
  ``rollout_mean`` and ``rollout_max`` fuse the heads by mean and max instead.
  Because every block is pooled to the same ``G x G`` grid, blocks may differ in layout (CvT).
* ``cls_rollout`` (Abnar & Zuidema): the same chain over all tokens (min fusion), reading the
  CLS row. It needs square attention over the same tokens in every block (not CvT).
* ``last_cls``: the last block's CLS-to-patch attention, averaged over heads, pooled to ``G x G``.
* ``uniform``: ``1 / G^2`` (needs no attention).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from .grids import AttentionGrid, pool_tokens

HeadFusion = Literal["min", "mean", "max"]

#: Per-image patch-weight kinds, stored at index time (``crosscorr`` is per pair, see marginals).
PER_IMAGE_KINDS: tuple[str, ...] = ("rollout", "rollout_mean", "rollout_max", "cls_rollout", "last_cls", "uniform")
_POOLED_FUSION: dict[str, HeadFusion] = {"rollout": "min", "rollout_mean": "mean", "rollout_max": "max"}


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


def _check_layout(attention: torch.Tensor, layout: AttentionGrid, block: int) -> None:
    (qh, qw), (kh, kw), p = layout
    n_q, n_k = p + qh * qw, p + kh * kw
    if attention.dim() != 4 or tuple(attention.shape[-2:]) != (n_q, n_k):
        raise ValueError(
            f"attention of shape {tuple(attention.shape)} (block {block}) does not match {p} prefix tokens, "
            f"a {qh}x{qw} query grid and a {kh}x{kw} key grid"
        )


class PatchWeightAccumulator:
    """Patch weights ``(B, G*G)`` of several kinds, from attention fed one block at a time.

    Call the accumulator with each block's attention ``(B, heads, N_q, N_k)`` and its
    :class:`AttentionGrid`, in forward order, then read :meth:`result`. It keeps only the
    running chains (see the module docstring for the memory bound).
    """

    def __init__(self, kinds: Sequence[str], grid: int, discard_ratio: float = 0.1,
                 cls_fusion: HeadFusion = "min") -> None:
        if unknown := [k for k in kinds if k not in PER_IMAGE_KINDS]:
            raise ValueError(f"unknown patch weights {unknown[0]!r}: use {', '.join(PER_IMAGE_KINDS)}")
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        self.kinds = tuple(dict.fromkeys(kinds))
        self.grid = grid
        self.discard_ratio = discard_ratio
        self.cls_fusion = cls_fusion
        self._pooled: dict[str, torch.Tensor | None] = {k: None for k in self.kinds if k in _POOLED_FUSION}
        self._cls_chain: torch.Tensor | None = None
        self._first_layout: AttentionGrid | None = None
        self._last: tuple[torch.Tensor, AttentionGrid] | None = None
        self.blocks = 0

    @property
    def needs_attention(self) -> bool:
        return any(k != "uniform" for k in self.kinds)

    @property
    def last_block_only(self) -> bool:
        """True when only the last block's attention is read (``last_cls`` alone, besides
        uniform): a backbone may then capture that block alone and keep the others fused."""
        return self.needs_attention and all(k in ("last_cls", "uniform") for k in self.kinds)

    def __call__(self, attention: torch.Tensor, layout: AttentionGrid) -> None:
        """Fold one block's attention into the running state."""
        layout = AttentionGrid(tuple(layout[0]), tuple(layout[1]), int(layout[2]))
        _check_layout(attention, layout, self.blocks)
        attention = attention.float()
        fusions = {_POOLED_FUSION[k] for k in self._pooled}
        if "cls_rollout" in self.kinds:
            fusions.add(self.cls_fusion)
        fused = {f: discard_lowest(fuse_heads(attention, f), self.discard_ratio) for f in sorted(fusions)}
        for kind, chain in self._pooled.items():
            step = _add_identity_and_normalise(self._pool_patches(fused[_POOLED_FUSION[kind]], layout))
            self._pooled[kind] = step if chain is None else step @ chain
        if "cls_rollout" in self.kinds:
            self._fold_cls_chain(fused[self.cls_fusion], layout)
        if "last_cls" in self.kinds and layout.num_prefix_tokens >= 1:
            cls_row = attention[:, :, 0, layout.num_prefix_tokens:].mean(dim=1)  # (B, h_k * w_k)
            self._last = (cls_row, layout)
        self.blocks += 1

    def _pool_patches(self, fused: torch.Tensor, layout: AttentionGrid) -> torch.Tensor:
        p = layout.num_prefix_tokens
        pooled = pool_tokens(fused[:, p:, p:], layout.query_grid, self.grid)  # pool the query grid (rows)
        return pool_tokens(pooled.transpose(1, 2), layout.key_grid, self.grid).transpose(1, 2)  # and the keys

    def _fold_cls_chain(self, fused: torch.Tensor, layout: AttentionGrid) -> None:
        if self._first_layout is None:
            self._first_layout = layout
        if layout != self._first_layout or layout.query_grid != layout.key_grid:
            (qh, qw), (kh, kw), p = layout
            raise ValueError(
                "the CLS-row rollout needs square attention over the same tokens in every block, "
                f"but block {self.blocks} has {p} prefix tokens, a {qh}x{qw} query grid and a {kh}x{kw} key grid "
                "(strided keys, as in CvT, have no CLS-row rollout): use the pooled rollout"
            )
        if layout.num_prefix_tokens < 1:
            raise ValueError("the CLS-row rollout needs a CLS token (this model has no prefix token)")
        step = _add_identity_and_normalise(fused)
        self._cls_chain = step if self._cls_chain is None else step @ self._cls_chain

    def result(self, batch: int | None = None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Each kind's weights ``(B, G*G)``, non-negative, summing to 1."""
        if self.needs_attention and self.blocks == 0:
            raise ValueError("rollout needs the attention of at least one block")
        out: dict[str, torch.Tensor] = {}
        for kind in self.kinds:
            if kind in self._pooled:
                out[kind] = normalise_weights(self._pooled[kind].mean(dim=1))
            elif kind == "cls_rollout":
                layout = self._first_layout
                row = self._cls_chain[:, 0, layout.num_prefix_tokens:]
                out[kind] = normalise_weights(pool_tokens(row.unsqueeze(-1), layout.query_grid, self.grid).squeeze(-1))
            elif kind == "last_cls":
                if self._last is None:
                    raise ValueError("last_cls weights need a CLS token in the last block")
                row, layout = self._last
                out[kind] = normalise_weights(pool_tokens(row.unsqueeze(-1), layout.key_grid, self.grid).squeeze(-1))
            else:  # uniform
                b = batch if batch is not None else self._batch_size()
                out[kind] = torch.full((b, self.grid**2), 1.0 / self.grid**2, device=device)
        return out

    def _batch_size(self) -> int:
        for t in (*self._pooled.values(), self._cls_chain):
            if t is not None:
                return t.shape[0]
        if self._last is not None:
            return self._last[0].shape[0]
        raise ValueError("uniform weights alone need the batch size")


def _square_layouts(n_blocks: int, token_grid: tuple[int, int], num_prefix_tokens: int,
                    block_grids: Sequence[AttentionGrid] | None) -> list[AttentionGrid]:
    if block_grids is None:
        return [AttentionGrid(tuple(token_grid), tuple(token_grid), num_prefix_tokens)] * n_blocks
    if len(block_grids) != n_blocks:
        raise ValueError(f"{n_blocks} attention maps but {len(block_grids)} block grids")
    return list(block_grids)


def _replay(kind: str, attentions: Sequence[torch.Tensor], token_grid: tuple[int, int], num_prefix_tokens: int,
            grid: int, head_fusion: HeadFusion, discard_ratio: float,
            block_grids: Sequence[AttentionGrid] | None) -> torch.Tensor:
    """Feed already captured attention maps through an accumulator (tests and offline use)."""
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    fuse_heads(attentions[0][:1, :1, :1, :1], head_fusion)  # reject an unknown fusion up front
    name = kind if kind == "cls_rollout" else {"min": "rollout", "mean": "rollout_mean", "max": "rollout_max"}[head_fusion]
    acc = PatchWeightAccumulator([name], grid, discard_ratio, cls_fusion=head_fusion)
    for attention, layout in zip(attentions, _square_layouts(len(attentions), token_grid, num_prefix_tokens,
                                                             block_grids)):
        acc(attention, layout)
    return acc.result()[name]


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
    """Pooled rollout ``(B, G*G)`` of captured per-block attention (see :class:`PatchWeightAccumulator`).

    ``block_grids`` gives each block's layout where blocks are not square over ``token_grid``
    with ``num_prefix_tokens`` prefix tokens (CvT).
    """
    return _replay("rollout", attentions, token_grid, num_prefix_tokens, grid, head_fusion, discard_ratio,
                   block_grids)


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
    """CLS-row rollout ``(B, G*G)`` of captured per-block attention (square blocks only)."""
    if num_prefix_tokens < 1:
        raise ValueError("the CLS-row rollout needs a CLS token (this model has no prefix token)")
    return _replay("cls_rollout", attentions, token_grid, num_prefix_tokens, grid, head_fusion, discard_ratio,
                   block_grids)
