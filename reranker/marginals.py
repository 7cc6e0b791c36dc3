"""Patch weights (the OT marginals): rollout, cross-correlation and uniform."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # the maths imports torch only; backbones (timm) are not needed to run it
    from .backbones.base import BackboneOutput
from .rollout import PER_IMAGE_KINDS, HeadFusion, attention_rollout, cls_attention_rollout

#: At search time: ``rollout`` uses the per-image weights stored with the index (whichever
#: kind of :data:`PER_IMAGE_KINDS` it stores), ``crosscorr`` is DIML's per-pair weights.
Marginals = Literal["rollout", "crosscorr", "uniform"]
PerImageWeights = Literal["rollout", "rollout_mean", "rollout_max", "cls_rollout", "last_cls", "uniform"]
MARGINALS: tuple[str, ...] = ("rollout", "crosscorr", "uniform")

_DIML_EPS = 1e-5


def uniform_weights(batch_shape: tuple[int, ...], num_patches: int, device=None) -> torch.Tensor:
    """``1 / G^2`` for every patch."""
    return torch.full((*batch_shape, num_patches), 1.0 / num_patches, device=device)


def image_patch_weights(
    output: BackboneOutput,
    kind: PerImageWeights = "rollout",
    head_fusion: HeadFusion = "min",
    discard_ratio: float = 0.1,
) -> torch.Tensor:
    """Per-image patch weights ``(B, G*G)`` from a backbone output: the ones computed during its
    forward when it has them, else (pooled or CLS-row rollout) from its captured attention."""
    B, n = output.patch_features.shape[:2]
    if kind in output.patch_weights:
        return output.patch_weights[kind]
    if kind == "uniform":
        return uniform_weights((B,), n, output.patch_features.device)
    if kind not in ("rollout", "cls_rollout"):
        raise ValueError(f"unknown patch weights {kind!r}: use {', '.join(PER_IMAGE_KINDS)}")
    if output.attentions is None:
        raise ValueError(f"{kind} weights need the attention: embed with with_attention=True")
    fn = attention_rollout if kind == "rollout" else cls_attention_rollout
    return fn(
        output.attentions,
        output.token_grid,
        output.num_prefix_tokens,
        grid=output.grid,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        block_grids=output.attention_grids,
    )


def cross_correlation_weights(
    query_global: torch.Tensor,
    query_patches: torch.Tensor,
    cand_global: torch.Tensor,
    cand_patches: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIML's pair-wise weights for queries ``(Q, D), (Q, n, D)`` and candidates ``(Q, K, D), (Q, K, m, D)``.

    ``mu_x[i] ~ relu(g_q . f_x[i])`` and ``mu_q[j] ~ relu(f_q[j] . g_x)``, each divided by
    its sum + 1e-5. Returns ``(mu_q (Q, K, n), mu_x (Q, K, m))``.
    """
    mu_x = torch.einsum("qd,qkmd->qkm", query_global, cand_patches)
    mu_q = torch.einsum("qnd,qkd->qkn", query_patches, cand_global)
    return diml_normalise(mu_q), diml_normalise(mu_x)


def diml_normalise(cosines: torch.Tensor) -> torch.Tensor:
    """DIML's weights from raw cosines ``(..., n)``: ``relu(c) / (sum relu(c) + 1e-5)``."""
    w = torch.relu(cosines)
    return w / (w.sum(-1, keepdim=True) + _DIML_EPS)
