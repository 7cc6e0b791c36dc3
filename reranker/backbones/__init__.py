"""Backbones: one interface (:class:`Backbone`) over timm ViTs, timm Swins and HF CvT."""

from ..defaults import DEFAULT_MODEL, default_model_kwargs
from .base import DEFAULT_GRID, AttentionGrid, Backbone, BackboneOutput, pool_tokens
from .factory import WeightsUnavailableError, create_backbone, weights_identity, wrap_timm_model

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_MODEL",
    "default_model_kwargs",
    "AttentionGrid",
    "Backbone",
    "BackboneOutput",
    "WeightsUnavailableError",
    "create_backbone",
    "pool_tokens",
    "weights_identity",
    "wrap_timm_model",
]
