"""The model's view of an image: the geometric part of the backbone's own preprocessing."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from reranker.backbones import create_backbone
from reranker.views import model_view

from conftest import tiny_vit_kwargs


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def test_view_is_the_tensor_the_model_gets():
    backbone = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    image = _gradient(300, 200)
    view = model_view(image, backbone.transform)
    tensor = backbone.transform(image)
    assert view.size == (tensor.shape[2], tensor.shape[1])
    # The view, pushed through the non-geometric tail (to tensor, normalise), is the model's input.
    tail = T.Compose([t for t in backbone.transform.transforms if not isinstance(t, (T.Resize, T.CenterCrop))])
    assert torch.allclose(tail(view), tensor, atol=1e-6)


def test_view_is_a_centre_crop_not_a_squash():
    image = _gradient(400, 200)
    view = model_view(image, T.Compose([T.Resize(100), T.CenterCrop(100), T.ToTensor()]))
    assert view.size == (100, 100)
    # A centre crop keeps the middle half of the width: red (x gradient) spans ~64..191, not 0..255.
    red = np.asarray(view)[:, :, 0]
    assert 50 < red[:, 0].mean() < 80 and 175 < red[:, -1].mean() < 205


def test_view_without_compose_is_the_rgb_image():
    image = _gradient(30, 20).convert("L")
    view = model_view(image, lambda im: im)
    assert view.mode == "RGB" and view.size == (30, 20)
