"""The backbone interface on tiny random timm models (no weights are downloaded)."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from conftest import tiny_swin_kwargs, tiny_vit_kwargs
from reranker.backbones import WeightsUnavailableError, create_backbone


@pytest.fixture(scope="module")
def vit():
    return create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())


@pytest.fixture(scope="module")
def swin():
    return create_backbone("swin_tiny_patch4_window7_224", "random", model_kwargs=tiny_swin_kwargs())


def _is_unit(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5)


def test_vit_shapes_and_normalisation(vit):
    with torch.no_grad():
        out = vit(torch.randn(2, 3, 112, 112))
    assert out.global_features.shape == (2, 32)
    assert out.patch_features.shape == (2, 49, 32)
    assert out.token_grid == (14, 14) and out.num_prefix_tokens == 1 and out.grid == 7
    assert out.attentions is None and out.random_weights
    assert _is_unit(out.global_features) and _is_unit(out.patch_features)


def test_vit_global_is_the_cls_token_and_patches_are_pooled_tokens(vit):
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = vit(x)
        tokens = vit.model.forward_features(x)  # after the final norm
    cls = torch.nn.functional.normalize(tokens[:, 0], dim=-1)
    torch.testing.assert_close(out.global_features, cls, atol=1e-5, rtol=0)
    grid = tokens[:, 1:].reshape(2, 7, 2, 7, 2, 32).mean(dim=(2, 4)).reshape(2, 49, 32)
    torch.testing.assert_close(out.patch_features, torch.nn.functional.normalize(grid, dim=-1), atol=1e-5, rtol=0)


def test_capturing_attention_changes_neither_outputs_nor_global_state(vit):
    other = timm.create_model("test_vit", pretrained=False, **tiny_vit_kwargs())
    fused_before = [blk.attn.fused_attn for blk in vit.model.blocks]
    other_before = [blk.attn.fused_attn for blk in other.blocks]
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        plain = vit(x)
        captured = vit(x, with_attention=True)
    assert [blk.attn.fused_attn for blk in vit.model.blocks] == fused_before
    assert [blk.attn.fused_attn for blk in other.blocks] == other_before
    assert all(not blk.attn.attn_drop._forward_hooks for blk in vit.model.blocks)
    torch.testing.assert_close(captured.global_features, plain.global_features, atol=1e-5, rtol=0)
    assert len(captured.attentions) == 3


def test_plain_path_keeps_fused_attention_during_the_forward(vit, monkeypatch):
    seen = []
    hook = vit.model.blocks[0].attn.register_forward_pre_hook(lambda m, i: seen.append(m.fused_attn))
    try:
        with torch.no_grad():
            vit(torch.randn(1, 3, 112, 112))
            vit(torch.randn(1, 3, 112, 112), with_attention=True)
    finally:
        hook.remove()
    assert seen == [vit.model.blocks[0].attn.fused_attn, False]


def test_swin_shapes(swin):
    with torch.no_grad():
        out = swin(torch.randn(2, 3, 224, 224))
    assert out.global_features.shape == (2, 128)
    assert out.patch_features.shape == (2, 49, 128)
    assert out.token_grid == (7, 7) and out.num_prefix_tokens == 0
    assert _is_unit(out.global_features) and _is_unit(out.patch_features)
    with pytest.raises(ValueError, match="no global attention"):
        swin(torch.randn(1, 3, 224, 224), with_attention=True)


def test_swin_global_is_the_mean_of_final_tokens(swin):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = swin(x)
        tokens = swin.model.forward_features(x)
    expected = torch.nn.functional.normalize(tokens.mean(dim=(1, 2)), dim=-1)
    torch.testing.assert_close(out.global_features, expected, atol=1e-5, rtol=0)


def test_grid_is_configurable():
    bb = create_backbone("test_vit", "random", grid=4, model_kwargs=tiny_vit_kwargs())
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 112, 112), with_attention=True)
    assert out.patch_features.shape == (1, 16, 32)


def test_transform_comes_from_the_pretrained_config(swin):
    tensor = swin.transform(Image.new("RGB", (640, 480), (200, 10, 10)))
    assert tensor.shape == (3, 224, 224)
    # ImageNet normalisation of the red channel: (200/255 - 0.485) / 0.229.
    assert abs(float(tensor[0, 100, 100]) - (200 / 255 - 0.485) / 0.229) < 0.02


def test_projection_head_is_applied_to_global_and_patches(vit):
    head = torch.nn.Linear(32, 8, bias=False)
    vit.set_projection(head)
    try:
        with torch.no_grad():
            out = vit(torch.randn(1, 3, 112, 112))
        assert out.global_features.shape == (1, 8) and out.patch_features.shape == (1, 49, 8)
        assert vit.output_dim == 8
    finally:
        vit.set_projection(None)


def test_local_weights_file_loads_the_same_model(tmp_path, vit):
    path = tmp_path / "tiny.pth"
    torch.save(vit.model.state_dict(), path)
    again = create_backbone("test_vit", str(path), model_kwargs=tiny_vit_kwargs())
    assert again.weights_id.startswith("file:tiny.pth:") and not again.random_weights
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(again(x).global_features, vit(x).global_features)


def test_offline_pretrained_says_what_to_do():
    with pytest.raises(WeightsUnavailableError, match="--weights random"):
        create_backbone("test_vit", "pretrained")


def test_bad_names_and_paths():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no_such_model_xyz", "random")
    with pytest.raises(ValueError, match="not supported"):
        create_backbone("resnet18", "random")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_backbone("test_vit", "/nonexistent/weights.pth")


def test_bad_image_batches(vit):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vit(torch.randn(3, 112, 112))


def test_random_weights_are_reproducible_and_leave_the_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    b = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(a(x).global_features, b(x).global_features, atol=0, rtol=0)
