"""Patch grids read from an intermediate block at the native token grid: the backbone, the index, the eval."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_swin_kwargs, tiny_vit_kwargs
from reranker.backbones import create_backbone, create_index_backbone
from reranker.defaults import DEFAULT_PATCH_LAYER

VIT = "vit_small_patch14_dinov2"


@pytest.mark.parametrize("layer", [0, 1, -2, -1])
def test_patches_are_that_blocks_output_as_timm_gives_it(layer):
    backbone = create_backbone(VIT, "random", grid=0, patch_layer=layer, model_kwargs=tiny_vit_kwargs())
    assert backbone.grid == 14 and backbone.patch_layer == layer % 3
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = backbone(x, patch_weights=["rollout"])
        # timm's own intermediate API: the block's output, before the final norm, as (B, C, h, w)
        (inter,) = backbone.model.forward_intermediates(x, indices=[backbone.patch_layer], norm=False,
                                                        intermediates_only=True)
        final = backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
    expected = torch.nn.functional.normalize(inter.flatten(2).transpose(1, 2), dim=-1)
    torch.testing.assert_close(out.patch_features, expected, atol=1e-5, rtol=0)
    # the global vector stays the final one, and rollout still reads every block
    torch.testing.assert_close(out.global_features, torch.nn.functional.normalize(final, dim=-1), atol=1e-5, rtol=0)
    assert out.patch_weights["rollout"].shape == (2, 196)


def test_no_patch_layer_is_the_final_normed_output_pooled():
    a = create_backbone(VIT, "random", grid=7, model_kwargs=tiny_vit_kwargs())
    assert a.patch_layer is None
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        tokens = a.model.forward_features(x)[:, 1:]
        out = a(x)
    pooled = torch.nn.functional.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(1, -1, 14, 14), 7)
    expected = torch.nn.functional.normalize(pooled.flatten(2).transpose(1, 2), dim=-1)
    torch.testing.assert_close(out.patch_features, expected, atol=1e-5, rtol=0)


def test_a_block_that_does_not_exist_or_a_backbone_that_cannot_is_refused():
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone(VIT, "random", patch_layer=3, model_kwargs=tiny_vit_kwargs())
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone(VIT, "random", patch_layer=-4, model_kwargs=tiny_vit_kwargs())
    with pytest.raises(ValueError, match="plain ViT only"):
        create_backbone("swin_tiny_patch4_window7_224", "random", patch_layer=-2, model_kwargs=tiny_swin_kwargs())
    with pytest.raises(ValueError, match="grid must be"):
        create_backbone(VIT, "random", grid=-1, model_kwargs=tiny_vit_kwargs())


def test_index_backbones_default_to_the_native_grid_of_an_intermediate_block():
    vit = create_index_backbone(VIT, "random", model_kwargs=tiny_vit_kwargs())
    assert (vit.grid, vit.patch_layer) == (14, DEFAULT_PATCH_LAYER % 3)
    final = create_index_backbone(VIT, "random", model_kwargs=tiny_vit_kwargs(), grid=7, patch_layer=None)
    assert (final.grid, final.patch_layer) == (7, None)
    swin = create_index_backbone("swin_tiny_patch4_window7_224", "random", model_kwargs=tiny_swin_kwargs())
    assert (swin.grid, swin.patch_layer) == (7, None)


def _build(tmp_path, photos, *extra):
    from vit_rerank.cli import main

    index = tmp_path / "index"
    assert main(["index", "build", str(index), "--from", str(photos), "--label-from-parent", "--weights", "random",
                 "--model", VIT, "--model-kwargs", json.dumps(tiny_vit_kwargs()), "--workers", "0",
                 "--no-progress", *extra]) == 0
    return index


@pytest.fixture
def photos(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    rng = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 50, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


def test_the_index_records_its_patch_layer_and_searches_with_it(tmp_path, photos, capsys):
    from indexer import open_index
    from indexer.build import backbone_for
    from vit_rerank.cli import main

    index = _build(tmp_path, photos, "--patch-layer", "1", "--grid", "0")
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["patch_layer"], manifest["grid"]) == (1, 14)
    with open_index(index) as index_dir:
        backbone = backbone_for(index_dir.manifest, torch.device("cpu"))
        assert (backbone.patch_layer, backbone.grid) == (1, 14)
    capsys.readouterr()
    assert main(["search", "--index", str(index), str(next(photos.rglob("*.png"))), "--scorer", "mnn", "--json",
                 "--top-k", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["scorer"] == "mnn" and "lambda" in doc["settings"]
    assert all(h["structural_score"] is not None for h in doc["results"])


def test_resuming_a_build_with_another_patch_layer_or_grid_is_refused(tmp_path, photos, capsys):
    from vit_rerank.cli import main

    index = _build(tmp_path, photos, "--patch-layer", "1")
    common = ["index", "build", str(index), "--from", str(photos), "--weights", "random", "--model", VIT,
              "--model-kwargs", json.dumps(tiny_vit_kwargs()), "--workers", "0", "--no-progress"]
    capsys.readouterr()
    assert main(common + ["--patch-layer", "0"]) == 1
    assert "patch layer" in capsys.readouterr().err
    assert main(common + ["--grid", "7"]) == 1
    assert "grid" in capsys.readouterr().err
    assert main(common + ["--patch-layer", "-2"]) == 0  # the same block, counted from the end


def test_an_index_searches_with_the_preset_measured_on_its_patch_features(tmp_path, photos, capsys):
    """Unset parameters come last from the preset measured on the index's features: shipped (mnn) on the
    default features, ot-tuned on the 7 x 7 final grid of earlier indexes."""
    from indexer.search_params import PRESETS, features_preset
    from vit_rerank.cli import main

    assert features_preset(16, 9, 16, 12) == "shipped"
    assert features_preset(7, None, 16, 12) == "ot-tuned"
    assert features_preset(7, None, 7, 0) == "ot-tuned"  # Swin, CvT: no patch layer
    assert features_preset(16, 5, 16, 12) == "shipped"  # nothing measured: the shipped setting
    for extra, preset in (([], "shipped"), (["--grid", "7", "--patch-layer", "final"], "ot-tuned")):
        index = _build(tmp_path / preset, photos, *extra)
        capsys.readouterr()
        assert main(["search", "--index", str(index), str(next(photos.rglob("*.png"))), "--json"]) == 0
        settings = json.loads(capsys.readouterr().out)["settings"]
        assert {k: settings["lambda" if k == "lam" else k] for k in PRESETS[preset]} == PRESETS[preset]
