"""Backbones: one interface (:class:`Backbone`) over timm ViTs, timm Swins and HF CvT, behind a
registry (:func:`register_backbone`, :func:`create_backbone`).

Importing the package registers the built-in kinds (``hf-cvt``, then ``timm``)."""

from ..defaults import DEFAULT_MODEL, default_model_kwargs
from .base import DEFAULT_GRID, AttentionGrid, Backbone, BackboneOutput, pool_tokens
from .runtimes import DEFAULT_RUNTIME, RUNTIMES, check_runtime, set_runtime
from .registry import (BackboneKind, backbone_kind, backbone_kinds, create_backbone, create_index_backbone,
                       register_backbone)
from .weights import NAMED_WEIGHTS, WeightsUnavailableError, read_state_dict, weights_identity

from . import hf_cvt  # noqa: E402,F401  (registers "hf-cvt")
from .timm_factory import wrap_timm_model  # noqa: E402  (registers "timm")

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_RUNTIME",
    "RUNTIMES",
    "check_runtime",
    "set_runtime",
    "DEFAULT_MODEL",
    "NAMED_WEIGHTS",
    "default_model_kwargs",
    "AttentionGrid",
    "Backbone",
    "BackboneKind",
    "BackboneOutput",
    "WeightsUnavailableError",
    "backbone_kind",
    "backbone_kinds",
    "create_backbone",
    "create_index_backbone",
    "pool_tokens",
    "read_state_dict",
    "register_backbone",
    "weights_identity",
    "wrap_timm_model",
]
