"""The Hugging Face CvT backbone, on a tiny randomly initialised config (no downloads)."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reranker.backbones import WeightsUnavailableError, create_backbone
from reranker.backbones.hf_cvt import create_hf_cvt
from reranker.marginals import image_patch_weights
from reranker.rollout import attention_rollout, cls_attention_rollout

# depth[i] > i: HF's CvtStage indexes its drop-path rates by stage number.
TINY = dict(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 1, 1])
D = 48


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    bb = create_backbone("microsoft/cvt-13", "random", model_kwargs=TINY)
    with torch.no_grad():  # a non-trivial final LayerNorm, so that using it (or not) shows
        bb.model.layernorm.weight.uniform_(0.5, 1.5)
        bb.model.layernorm.bias.normal_(0.0, 0.1)
    return bb


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def output(backbone, images):
    with torch.no_grad():
        return backbone(images)


@pytest.fixture(scope="module")
def small():
    """Smaller images (7 x 7 stage-3 tokens), to keep the reload checks fast."""
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def small_output(backbone, small):
    with torch.no_grad():
        return backbone(small)


def assert_same(a, b) -> None:
    assert torch.equal(a.global_features, b.global_features)
    assert torch.equal(a.patch_features, b.patch_features)


def test_shapes_and_flags(backbone, output):
    assert output.global_features.shape == (2, D)
    assert output.patch_features.shape == (2, 49, D)
    assert torch.allclose(output.global_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(output.patch_features.norm(dim=-1), torch.ones(2, 49), atol=1e-5)
    assert output.token_grid == (14, 14)
    assert output.attentions is None
    assert output.random_weights and backbone.random_weights
    assert backbone.embed_dim == D and backbone.output_dim == D
    assert backbone.input_size == (3, 224, 224)
    assert backbone.supports_rollout


def test_global_is_layernormed_cls_token(backbone, images, output):
    hf = copy.deepcopy(backbone.model)
    hf.classifier = nn.Identity()  # HF's own head path: layernorm(cls_token_value).mean(1)
    with torch.no_grad():
        expected = hf(pixel_values=images).logits
    assert expected.shape == (2, D)
    assert torch.allclose(output.global_features, F.normalize(expected, dim=-1), atol=1e-5)


def test_patch_grid_is_pooled_layernormed_stage3(backbone, images, output):
    hf = backbone.model
    with torch.no_grad():
        maps = hf.cvt(pixel_values=images).last_hidden_state  # (B, C, 14, 14)
        x = maps.permute(0, 2, 3, 1)  # (B, 14, 14, C)
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        x = (x - mu) / torch.sqrt(var + hf.layernorm.eps) * hf.layernorm.weight + hf.layernorm.bias
        pooled = x.reshape(2, 7, 2, 7, 2, D).mean(dim=(2, 4)).reshape(2, 49, D)
    assert torch.allclose(output.patch_features, F.normalize(pooled, dim=-1), atol=1e-5)


def test_save_pretrained_roundtrip(backbone, small, small_output, tmp_path):
    backbone.model.save_pretrained(tmp_path / "cvt")
    loaded = create_backbone("microsoft/cvt-13", str(tmp_path / "cvt"))
    assert loaded.weights_id.startswith("dir:cvt:") and not loaded.random_weights
    with torch.no_grad():
        assert_same(loaded(small), small_output)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_state_dict_file(backbone, small, small_output, tmp_path, suffix):
    path = tmp_path / f"cvt{suffix}"
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = create_backbone("microsoft/cvt-13", str(path), model_kwargs=TINY)
    assert loaded.weights_id.startswith(f"file:cvt{suffix}:")
    with torch.no_grad():
        assert_same(loaded(small), small_output)


def test_state_dict_without_final_layernorm_is_rejected(backbone, tmp_path):
    path = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in backbone.model.state_dict().items() if not k.startswith("layernorm.")}, path)
    with pytest.raises(ValueError, match="layernorm"):
        create_backbone("microsoft/cvt-13", str(path), model_kwargs=TINY)


def test_missing_weights_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        create_backbone("microsoft/cvt-13", str(tmp_path / "nope.safetensors"), model_kwargs=TINY)


def test_pretrained_failure_is_weights_unavailable(monkeypatch):
    from transformers import CvtForImageClassification

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(CvtForImageClassification, "from_pretrained", offline)
    with pytest.raises(WeightsUnavailableError, match="no connection"):
        create_backbone("microsoft/cvt-13", "pretrained")


def test_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'vit-rerank\[cvt\]'"):
        create_hf_cvt("microsoft/cvt-13", "random", model_kwargs=TINY)


# --- attention rollout -------------------------------------------------------------------------
# Two heads per stage, so that min / mean / max head fusion differ.
TWO_HEADS = dict(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[2, 2, 2])
# At 224 px: (query grid, key grid, prefix tokens) per block; keys are strided by 2 (3x3 conv, pad 1).
GRIDS_224 = [((56, 56), (28, 28), 0)] + [((28, 28), (14, 14), 0)] * 2 + [((14, 14), (7, 7), 1)] * 3


@pytest.fixture(scope="module")
def two_heads():
    torch.manual_seed(3)
    return create_backbone("microsoft/cvt-13", "random", model_kwargs=TWO_HEADS)


@pytest.fixture(scope="module")
def with_attention(two_heads, images):
    with torch.no_grad():
        return two_heads(images, with_attention=True)


def _pool_rows(a: np.ndarray, side: tuple[int, int], grid: int) -> np.ndarray:
    """``(B, h*w, M) -> (B, G*G, M)``: mean over each (h/G x w/G) cell of the row grid."""
    (h, w), B, M = side, a.shape[0], a.shape[-1]
    return a.reshape(B, grid, h // grid, grid, w // grid, M).mean(axis=(2, 4)).reshape(B, grid * grid, M)


def numpy_rollout(atts, grids, fusion="min", ratio=0.1, grid=7) -> np.ndarray:
    """docs/method.md's pooled rollout, block by block, each block pooled from its own grids."""
    result = None
    for att, (query_grid, key_grid, prefix) in zip(atts, grids):
        fused = {"min": att.min(1), "mean": att.mean(1), "max": att.max(1)}[fusion].astype(np.float64)
        for img in fused:  # zero the lowest `ratio` of each image's entries
            flat = img.reshape(-1)
            flat[np.argsort(flat, kind="stable")[: int(flat.size * ratio)]] = 0.0
        a = fused[:, prefix:, prefix:]
        a = _pool_rows(a, query_grid, grid)  # queries -> G*G rows
        a = _pool_rows(a.transpose(0, 2, 1), key_grid, grid).transpose(0, 2, 1)  # keys -> G*G columns
        a = a + np.eye(grid * grid)
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else a @ result
    w = np.maximum(result.mean(axis=1), 0.0)
    return w / w.sum(-1, keepdims=True)


def test_captures_every_block_of_every_stage(with_attention):
    atts, grids = with_attention.attentions, with_attention.attention_grids
    assert [tuple(g) for g in grids] == GRIDS_224
    assert len(atts) == 6
    for a, ((qh, qw), (kh, kw), p) in zip(atts, GRIDS_224):
        assert a.shape == (2, 2, p + qh * qw, p + kh * kw)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
    assert with_attention.token_grid == (14, 14) and with_attention.num_prefix_tokens == 1


@pytest.mark.parametrize("fusion", ["min", "mean", "max"])
def test_rollout_equals_numpy(with_attention, fusion):
    expected = numpy_rollout([a.numpy() for a in with_attention.attentions], GRIDS_224, fusion)
    ours = image_patch_weights(with_attention, "rollout", head_fusion=fusion)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)
    direct = attention_rollout(with_attention.attentions, (14, 14), 1, head_fusion=fusion, block_grids=GRIDS_224)
    torch.testing.assert_close(direct, ours, atol=0, rtol=0)


def test_fusions_differ(with_attention):
    w = [image_patch_weights(with_attention, "rollout", head_fusion=f) for f in ("min", "mean", "max")]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


@pytest.mark.parametrize("size", [224, 112])  # 112 px: 7x7 queries attend to 4x4 keys in stage 3
def test_rollout_is_a_distribution(two_heads, size):
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = two_heads(x, with_attention=True)
    w = image_patch_weights(out, "rollout")
    assert w.shape == (3, 49) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(3), atol=1e-6, rtol=0)
    if size == 112:
        assert tuple(out.attention_grids[-1]) == ((7, 7), (4, 4), 1)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_changes_no_output_and_leaves_no_hooks(two_heads, images, with_attention):
    with torch.no_grad():
        plain = two_heads(images)
    assert plain.attentions is None and plain.attention_grids is None
    assert_same(plain, with_attention)
    assert _hook_count(two_heads.model) == 0


def test_hooks_are_removed_when_the_forward_fails(two_heads, images, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(two_heads.model.cvt.encoder.stages[1], "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        two_heads(images, with_attention=True)
    assert _hook_count(two_heads.model) == 0


def test_cls_rollout_is_undefined_for_strided_keys(with_attention):
    with pytest.raises(ValueError, match="strided keys"):
        image_patch_weights(with_attention, "cls_rollout")
    with pytest.raises(ValueError, match="square attention"):
        cls_attention_rollout(with_attention.attentions, (14, 14), 1, block_grids=GRIDS_224)


def test_rollout_rejects_mismatched_grids(with_attention):
    atts = with_attention.attentions
    with pytest.raises(ValueError, match="does not match"):
        attention_rollout(atts, (14, 14), 1)  # square over the final grid: not CvT's layout
    with pytest.raises(ValueError, match="block grids"):
        attention_rollout(atts, (14, 14), 1, block_grids=GRIDS_224[:-1])


@pytest.mark.parametrize("size", [(300, 200), (64, 500), (224, 224)])
def test_transform(backbone, size):
    x = backbone.transform(Image.new("RGB", size, (120, 30, 200)))
    assert isinstance(x, torch.Tensor) and x.shape == (3, 224, 224)
