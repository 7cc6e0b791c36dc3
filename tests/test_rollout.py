"""Attention rollout against a direct numpy computation from the captured attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_swin_kwargs, tiny_vit_kwargs
from reranker.backbones import AttentionGrid, create_backbone
from reranker.marginals import cross_correlation_weights, image_patch_weights
from reranker.rollout import (
    PER_IMAGE_KINDS,
    PatchWeightAccumulator,
    attention_rollout,
    cls_attention_rollout,
    discard_lowest,
)


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


# --- Streaming patch weights (computed by hooks while the forward runs) vs the captured-maps oracle ---

@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return create_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())


@pytest.fixture(scope="module")
def streamed(tiny_vit):
    """One batch through the tiny ViT: all kinds streamed, the captured maps, and a plain forward."""
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, tiny_vit(x, patch_weights=PER_IMAGE_KINDS), tiny_vit(x, with_attention=True), tiny_vit(x)


def numpy_last_cls(atts, prefix=1, side=14, grid=7) -> np.ndarray:
    """The last block's CLS-to-patch attention, mean over heads, average-pooled to G x G, ReLU, unit mass."""
    row = atts[-1].astype(np.float64).mean(axis=1)[:, 0, prefix:]  # (B, side*side)
    f = side // grid
    w = np.maximum(row.reshape(-1, grid, f, grid, f).mean(axis=(2, 4)).reshape(-1, grid**2), 0)
    return w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind, fusion", [("rollout", "min"), ("rollout_mean", "mean"), ("rollout_max", "max")])
def test_streaming_pooled_rollout_equals_numpy_oracle(streamed, kind, fusion):
    _, out, captured, _ = streamed
    atts = [a.numpy() for a in captured.attentions]
    assert len(atts) == 3
    np.testing.assert_allclose(out.patch_weights[kind].numpy(), numpy_rollout(atts, fusion), atol=1e-6)


def test_streaming_cls_rollout_equals_numpy_oracle(streamed):
    _, out, captured, _ = streamed
    atts = [a.numpy() for a in captured.attentions]
    np.testing.assert_allclose(out.patch_weights["cls_rollout"].numpy(), numpy_cls_rollout(atts, "min"), atol=1e-6)


def test_streaming_last_cls_equals_numpy_formula(streamed):
    _, out, captured, _ = streamed
    atts = [a.numpy() for a in captured.attentions]
    np.testing.assert_allclose(out.patch_weights["last_cls"].numpy(), numpy_last_cls(atts), atol=1e-6)


def test_streaming_uniform_is_one_over_g_squared(streamed):
    _, out, _, _ = streamed
    assert out.patch_weights["uniform"].shape == (3, 49)
    torch.testing.assert_close(out.patch_weights["uniform"], torch.full((3, 49), 1 / 49), atol=0, rtol=0)


def test_every_streamed_kind_is_a_distribution(streamed):
    _, out, _, _ = streamed
    assert set(out.patch_weights) == set(PER_IMAGE_KINDS)
    for kind, w in out.patch_weights.items():
        assert w.shape == (3, 49), kind
        assert w.dtype == torch.float32, kind
        assert bool(torch.isfinite(w).all()) and bool((w >= 0).all()), kind
        torch.testing.assert_close(w.sum(-1), torch.ones(3), atol=1e-6, rtol=0, msg=kind)
    # the kinds really differ (a kind silently aliased to another would pass the checks above)
    kinds = [k for k in PER_IMAGE_KINDS if k != "uniform"]
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert not torch.allclose(out.patch_weights[a], out.patch_weights[b], atol=1e-6), (a, b)


def test_streaming_does_not_keep_the_maps(streamed):
    _, out, _, _ = streamed
    assert out.attentions is None and out.attention_grids is None


def test_all_kinds_in_one_forward_equal_each_kind_alone(tiny_vit, streamed):
    x, together, _, _ = streamed
    with torch.no_grad():
        for kind in PER_IMAGE_KINDS:
            alone = tiny_vit(x, patch_weights=(kind,))
            assert set(alone.patch_weights) == {kind}
            torch.testing.assert_close(alone.patch_weights[kind], together.patch_weights[kind],
                                       atol=1e-6, rtol=0, msg=kind)


def test_streaming_leaves_the_features_unchanged(streamed):
    _, out, captured, plain = streamed
    assert plain.patch_weights == {} and plain.attentions is None
    for other in (out, captured):
        torch.testing.assert_close(other.global_features, plain.global_features, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.patch_features, plain.patch_features, atol=1e-5, rtol=0)
    assert out.token_grid == plain.token_grid == (14, 14) and out.num_prefix_tokens == 1


def test_streaming_with_attention_too_gives_the_same_weights(tiny_vit, streamed):
    x, out, _, _ = streamed
    with torch.no_grad():
        both = tiny_vit(x, with_attention=True, patch_weights=("rollout", "cls_rollout"))
    assert len(both.attentions) == 3
    for kind in ("rollout", "cls_rollout"):
        torch.testing.assert_close(both.patch_weights[kind], out.patch_weights[kind], atol=1e-6, rtol=0)
    replay = attention_rollout(both.attentions, (14, 14), 1)
    torch.testing.assert_close(replay, out.patch_weights["rollout"], atol=1e-6, rtol=0)


def _attn_state(backbone):
    return [blk.attn.fused_attn for blk in backbone.model.blocks]


def _no_hooks(backbone) -> bool:
    return all(not blk.attn.attn_drop._forward_hooks for blk in backbone.model.blocks)


def test_streaming_removes_its_hooks_and_restores_fused_attention(tiny_vit):
    import timm

    other = timm.create_model("test_vit", pretrained=False, **tiny_vit_kwargs())
    before, other_before = _attn_state(tiny_vit), [blk.attn.fused_attn for blk in other.blocks]
    seen = []
    probe = tiny_vit.model.blocks[-1].attn.register_forward_pre_hook(lambda m, i: seen.append(m.fused_attn))
    try:
        with torch.no_grad():
            tiny_vit(torch.randn(1, 3, 112, 112), patch_weights=("rollout", "last_cls"))
            tiny_vit(torch.randn(1, 3, 112, 112), patch_weights=("uniform",))  # needs no attention
    finally:
        probe.remove()
    assert seen == [False, before[-1]]  # maps materialised only when some kind needs them
    assert _attn_state(tiny_vit) == before
    assert [blk.attn.fused_attn for blk in other.blocks] == other_before
    assert _no_hooks(tiny_vit)


def test_hooks_are_removed_when_the_forward_fails(tiny_vit):
    before = _attn_state(tiny_vit)

    def boom(_module, _inputs, _output):
        raise RuntimeError("boom in block 1")

    failing = tiny_vit.model.blocks[1].register_forward_hook(boom)  # after block 0's map was observed
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            tiny_vit(torch.randn(1, 3, 112, 112), patch_weights=("rollout",))
    finally:
        failing.remove()
    assert _attn_state(tiny_vit) == before
    assert _no_hooks(tiny_vit)
    with torch.no_grad():  # and the next forward still works
        w = tiny_vit(torch.randn(1, 3, 112, 112), patch_weights=("rollout",)).patch_weights["rollout"]
    assert w.shape == (1, 49)


def test_accumulator_rejects_unknown_kinds(tiny_vit):
    with pytest.raises(ValueError, match="unknown patch weights 'bogus'"):
        PatchWeightAccumulator(["rollout", "bogus"], 7)
    with pytest.raises(ValueError, match="unknown patch weights 'crosscorr'"):  # per pair, not per image
        PatchWeightAccumulator(["crosscorr"], 7)
    with pytest.raises(ValueError, match="discard_ratio"):
        PatchWeightAccumulator(["rollout"], 7, discard_ratio=1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="unknown patch weights"):
        tiny_vit(torch.randn(1, 3, 112, 112), patch_weights=("rolout",))
    assert _no_hooks(tiny_vit)


def test_accumulator_rejects_mismatched_attention_shapes():
    acc = PatchWeightAccumulator(PER_IMAGE_KINDS, 7)
    square = AttentionGrid((14, 14), (14, 14), 1)
    att = torch.rand(2, 2, 197, 197).softmax(-1)
    with pytest.raises(ValueError, match=r"does not match 1 prefix tokens, a 7x7 query grid"):
        acc(att, AttentionGrid((7, 7), (7, 7), 1))
    with pytest.raises(ValueError, match="does not match"):
        acc(att, AttentionGrid((14, 14), (14, 14), 0))  # prefix tokens miscounted
    with pytest.raises(ValueError, match="does not match"):
        acc(att[0], square)  # no batch axis
    with pytest.raises(ValueError, match="at least one block"):
        acc.result()  # nothing was accepted
    acc(att, square)
    assert acc.blocks == 1
    with pytest.raises(ValueError, match="does not match"):
        acc(torch.rand(2, 2, 197, 50), square)
    out = acc.result()
    assert set(out) == set(PER_IMAGE_KINDS) and all(w.shape == (2, 49) for w in out.values())


def test_accumulator_matches_the_oracle_when_fed_by_hand(vit_output):
    acc = PatchWeightAccumulator(["rollout", "rollout_max", "cls_rollout", "last_cls"], 7)
    for a in vit_output.attentions:
        acc(a, AttentionGrid((14, 14), (14, 14), 1))
    out = acc.result()
    atts = [a.numpy() for a in vit_output.attentions]
    np.testing.assert_allclose(out["rollout"].numpy(), numpy_rollout(atts, "min"), atol=1e-6)
    np.testing.assert_allclose(out["rollout_max"].numpy(), numpy_rollout(atts, "max"), atol=1e-6)
    np.testing.assert_allclose(out["cls_rollout"].numpy(), numpy_cls_rollout(atts, "min"), atol=1e-6)
    np.testing.assert_allclose(out["last_cls"].numpy(), numpy_last_cls(atts), atol=1e-6)


def test_per_image_kinds_of_a_vit_and_a_swin(tiny_vit):
    assert tiny_vit.per_image_kinds == PER_IMAGE_KINDS
    assert "cls_rollout" in tiny_vit.per_image_kinds
    swin = create_backbone("swin_tiny_patch4_window7_224", "random", model_kwargs=tiny_swin_kwargs())
    assert swin.per_image_kinds == ("uniform",)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for kind in ("rollout", "cls_rollout", "last_cls"):
            with pytest.raises(ValueError, match="no global attention"):
                swin(x, patch_weights=(kind,))
        out = swin(x, patch_weights=("uniform",))  # uniform needs no attention
    torch.testing.assert_close(out.patch_weights["uniform"], torch.full((1, 49), 1 / 49), atol=0, rtol=0)
