"""Choosing the torch device from a user's ``auto | cpu | cuda``."""

from __future__ import annotations

import torch

#: What every ``--device`` option and the service's ``device`` setting accept.
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU; asking for CUDA without one is an error."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}: use {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU")
    return torch.device(name)


def add_device_argument(parser, default: str | None = "auto", help: str | None = None) -> None:
    """The one ``--device`` option (``parser`` is an argparse parser)."""
    parser.add_argument("--device", default=default, choices=DEVICE_CHOICES,
                        help=help or "where the model and the OT run (auto: CUDA when torch sees a GPU)")
