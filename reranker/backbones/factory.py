"""Create a backbone by name, with pretrained, local-file or (explicitly) random weights."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

import timm
from torch import nn

from .base import DEFAULT_GRID, Backbone
from .timm_models import TimmSwin, TimmViT, create_timm_model, is_plain_vit, is_swin

#: Names routed to the Hugging Face CvT wrapper (needs the ``cvt`` extra).
HF_CVT_PREFIXES = ("microsoft/cvt", "hf:microsoft/cvt")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be had; the message says what to do instead."""


def weights_identity(weights: str) -> str:
    """A stable name for the weights: ``random``, ``pretrained``, ``file:<name>:<sha256[:16]>``,
    or ``dir:<name>:<sha256[:16]>`` over the file names and contents of a saved model directory."""
    if weights in ("random", "pretrained"):
        return weights
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
    if weights in ("random", "pretrained"):
        return
    path = Path(weights)
    if not (path.is_file() or (allow_dir and path.is_dir())):
        raise FileNotFoundError(
            f"weights file not found: {weights!r} (use 'pretrained', 'random' or the path of a "
            "local .safetensors/.pth/.bin checkpoint"
            + (" or of a directory written by save_pretrained)" if allow_dir else ")")
        )


def _unavailable(name: str, err: Exception) -> WeightsUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    return WeightsUnavailableError(
        f"could not load pretrained weights for {name!r}: {type(err).__name__}: {err}\n"
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

        return create_hf_cvt(name.removeprefix("hf:"), weights, grid=grid, model_kwargs=kwargs)

    if not timm.is_model(name):
        raise _unknown_model(name)
    weights_file = None if weights in ("random", "pretrained") else weights
    try:
        with seeded_if_random(weights):
            model = create_timm_model(name, weights == "pretrained", weights_file, **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        if weights == "random":
            raise
        if weights_file is not None:
            raise ValueError(f"could not load weights file {weights_file!r} into {name!r}: {err}") from err
        raise _unavailable(name, err) from err
    return wrap_timm_model(model, name, weights_identity(weights), grid)


def wrap_timm_model(model: nn.Module, name: str, weights_id: str, grid: int = DEFAULT_GRID) -> Backbone:
    """Wrap an already built timm model in the backbone interface."""
    if is_swin(model):
        return TimmSwin(model, name, weights_id, grid)
    if is_plain_vit(model):
        return TimmViT(model, name, weights_id, grid)
    raise ValueError(
        f"{name!r} ({type(model).__name__}) is not supported: use a plain ViT (ViT, DeiT, DINO) or a Swin"
    )
