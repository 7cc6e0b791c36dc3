"""Attention rollout against a direct numpy computation from the captured attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_vit_kwargs
from reranker.backbones import create_backbone
from reranker.marginals import cross_correlation_weights, image_patch_weights
from reranker.rollout import attention_rollout, cls_attention_rollout, discard_lowest


@pytest.fixture(scope="module")
def vit_output():
    torch.manual_seed(0)
    backbone = create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())
    with torch.no_grad():
        return backbone(torch.randn(3, 3, 112, 112), with_attention=True)


def _fuse_and_discard(att: np.ndarray, fusion: str, ratio: float) -> np.ndarray:
    fused = {"min": att.min(1), "mean": att.mean(1), "max": att.max(1)}[fusion].astype(np.float64)
    for img in fused:
        flat = img.reshape(-1)
        flat[np.argsort(flat, kind="stable")[: int(flat.size * ratio)]] = 0.0
    return fused


def _identity_rows(a: np.ndarray) -> np.ndarray:
    a = a + np.eye(a.shape[-1])
    return a / a.sum(-1, keepdims=True)


def numpy_rollout(atts, fusion="min", ratio=0.1, prefix=1, side=14, grid=7) -> np.ndarray:
    f = side // grid
    result = None
    for att in atts:
        a = _fuse_and_discard(att, fusion, ratio)[:, prefix:, prefix:]
        B = a.shape[0]
        a = a.reshape(B, grid, f, grid, f, grid, f, grid, f).mean(axis=(2, 4, 6, 8)).reshape(B, grid**2, grid**2)
        a = _identity_rows(a)
        result = a if result is None else a @ result
    w = np.maximum(result.mean(axis=1), 0)
    return w / w.sum(-1, keepdims=True)


def numpy_cls_rollout(atts, fusion="min", ratio=0.1, prefix=1, side=14, grid=7) -> np.ndarray:
    result = None
    for att in atts:
        a = _identity_rows(_fuse_and_discard(att, fusion, ratio))
        result = a if result is None else a @ result
    row = result[:, 0, prefix:].reshape(-1, side, side)
    f = side // grid
    w = np.maximum(row.reshape(-1, grid, f, grid, f).mean(axis=(2, 4)).reshape(-1, grid**2), 0)
    return w / w.sum(-1, keepdims=True)


def test_capture_has_one_softmax_map_per_block(vit_output):
    atts = vit_output.attentions
    assert len(atts) == 3
    for a in atts:
        assert a.shape == (3, 2, 197, 197)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 197), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", ["min", "mean", "max"])
def test_rollout_equals_numpy(vit_output, fusion):
    atts = [a.numpy() for a in vit_output.attentions]
    ours = attention_rollout(vit_output.attentions, (14, 14), 1, grid=7, head_fusion=fusion)
    np.testing.assert_allclose(ours.numpy(), numpy_rollout(atts, fusion), atol=1e-6)


@pytest.mark.parametrize("fusion", ["min", "mean", "max"])
def test_cls_rollout_equals_numpy(vit_output, fusion):
    atts = [a.numpy() for a in vit_output.attentions]
    ours = cls_attention_rollout(vit_output.attentions, (14, 14), 1, grid=7, head_fusion=fusion)
    np.testing.assert_allclose(ours.numpy(), numpy_cls_rollout(atts, fusion), atol=1e-6)


def test_discard_ratio_changes_the_result(vit_output):
    a = attention_rollout(vit_output.attentions, (14, 14), 1, discard_ratio=0.0)
    b = attention_rollout(vit_output.attentions, (14, 14), 1, discard_ratio=0.5)
    assert not torch.allclose(a, b)
    np.testing.assert_allclose(b.numpy(), numpy_rollout([x.numpy() for x in vit_output.attentions], ratio=0.5), atol=1e-6)


@pytest.mark.parametrize("kind", ["rollout", "cls_rollout", "uniform"])
def test_every_per_image_variant_is_a_distribution(vit_output, kind):
    w = image_patch_weights(vit_output, kind)
    assert w.shape == (3, 49)
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(3), atol=1e-6, rtol=0)


def test_cross_correlation_is_a_distribution_and_matches_formula():
    torch.manual_seed(1)
    norm = torch.nn.functional.normalize
    gq, fq = norm(torch.randn(2, 8), dim=-1), norm(torch.randn(2, 9, 8), dim=-1)
    gx, fx = norm(torch.randn(2, 5, 8), dim=-1), norm(torch.randn(2, 5, 9, 8), dim=-1)
    mu_q, mu_x = cross_correlation_weights(gq, fq, gx, fx)
    assert mu_q.shape == (2, 5, 9) and mu_x.shape == (2, 5, 9)
    for q in range(2):
        for k in range(5):
            raw_x = np.maximum(fx[q, k].numpy() @ gq[q].numpy(), 0)
            raw_q = np.maximum(fq[q].numpy() @ gx[q, k].numpy(), 0)
            np.testing.assert_allclose(mu_x[q, k].numpy(), raw_x / (raw_x.sum() + 1e-5), atol=1e-6)
            np.testing.assert_allclose(mu_q[q, k].numpy(), raw_q / (raw_q.sum() + 1e-5), atol=1e-6)
    assert bool((mu_q >= 0).all()) and torch.allclose(mu_q.sum(-1), torch.ones(2, 5), atol=1e-4)


def test_rollout_rejects_mismatched_attention(vit_output):
    with pytest.raises(ValueError, match="does not match"):
        attention_rollout(vit_output.attentions, (7, 7), 1)
    with pytest.raises(ValueError, match="at least one block"):
        attention_rollout([], (14, 14), 1)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(vit_output.attentions, (14, 14), 1, head_fusion="median")
    with pytest.raises(ValueError, match="CLS"):
        cls_attention_rollout(vit_output.attentions, (14, 14), 0)


def test_discard_breaks_ties_like_a_stable_sort():
    att = torch.tensor([[[0.3, 0.1, 0.2], [0.1, 0.1, 0.5], [0.2, 0.4, 0.1]]]).repeat(2, 1, 1)
    att[1] = att[1].flip(-1)
    for ratio in (0.0, 0.2, 0.3, 0.5, 0.9):
        expected = _fuse_and_discard(att.unsqueeze(1).numpy(), "min", ratio)
        ours = discard_lowest(att, ratio)
        assert int((ours == 0).sum()) == 2 * int(9 * ratio)
        np.testing.assert_array_equal(ours.numpy(), expected.astype(np.float32))
    assert torch.equal(att[0, 0], torch.tensor([0.3, 0.1, 0.2]))  # the input is not modified
