"""The Hugging Face CvT backbone, on a tiny randomly initialised config (no downloads)."""

from __future__ import annotations

import copy
import sys

import pytest

pytest.importorskip("transformers")

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reranker.backbones import WeightsUnavailableError, create_backbone
from reranker.backbones.hf_cvt import create_hf_cvt

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
    assert not backbone.supports_rollout


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


def test_no_attention(backbone, images):
    with pytest.raises(ValueError):
        backbone(images, with_attention=True)


@pytest.mark.parametrize("size", [(300, 200), (64, 500), (224, 224)])
def test_transform(backbone, size):
    x = backbone.transform(Image.new("RGB", size, (120, 30, 200)))
    assert isinstance(x, torch.Tensor) and x.shape == (3, 224, 224)
