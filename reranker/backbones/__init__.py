"""Backbones: one interface (:class:`Backbone`) over timm ViTs, timm Swins and HF CvT."""

from .base import DEFAULT_GRID, AttentionGrid, Backbone, BackboneOutput, pool_tokens
from .factory import WeightsUnavailableError, create_backbone, weights_identity, wrap_timm_model

__all__ = [
    "DEFAULT_GRID",
    "AttentionGrid",
    "Backbone",
    "BackboneOutput",
    "WeightsUnavailableError",
    "create_backbone",
    "pool_tokens",
    "weights_identity",
    "wrap_timm_model",
]
