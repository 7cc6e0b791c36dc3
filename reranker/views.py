"""The view of an image that a backbone actually sees (e.g. resize 256 + centre crop 224).

Patch grids, heat maps and match lines only land on the right pixels when they are drawn
on this view, not on the full photo.
"""

from __future__ import annotations

from typing import Callable

from PIL import Image

__all__ = ["model_view"]


def model_view(image: Image.Image, transform: Callable) -> Image.Image:
    """``image`` after the geometric (PIL-to-PIL) steps of ``transform``, as RGB.

    ``transform`` is a backbone's test-time preprocessing, a torchvision ``Compose`` such as
    ``Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize``: its steps are applied in order
    until one stops returning a PIL image (the tensor conversion). A transform that is not a
    ``Compose`` leaves the image as it is (converted to RGB).
    """
    view = image.convert("RGB")
    for step in getattr(transform, "transforms", ()):
        out = step(view)
        if not isinstance(out, Image.Image):
            break
        view = out
    return view
