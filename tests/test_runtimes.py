"""The int8 runtime (``--runtime int8``): what it changes in the model, that it keeps every output the
pipeline reads, that an index records it, and, with the real DINOv2 on real photos, that it ranks as the
float32 model does within the stated tolerance."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_vit_kwargs
from helpers import build_tiny_index, run_cli
from indexer.embedding import forward_features
from reranker.backbones import create_backbone, set_runtime


def _tiny():
    return create_backbone("test_vit", "random", grid=0, model_kwargs=tiny_vit_kwargs()).eval()


def test_int8_quantizes_every_linear_layer_and_keeps_every_output():
    fp32, int8 = _tiny(), set_runtime(_tiny(), "int8")
    assert int8.runtime == "int8" and fp32.runtime == "torch"
    assert not any(type(m) is nn.Linear for m in int8.modules())  # every Linear became a dynamic int8 one
    assert sum(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in int8.modules()) == \
        sum(type(m) is nn.Linear for m in fp32.modules()) > 0
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        ref = forward_features(fp32, images, ("rollout",))
        out = forward_features(int8, images, ("rollout",))  # attention capture still works
    assert out.global_features.shape == ref.global_features.shape
    assert out.patch_features.shape == ref.patch_features.shape
    assert F.cosine_similarity(out.global_features, ref.global_features).min() > 0.98
    assert torch.allclose(out.patch_weights["rollout"].sum(-1), torch.ones(2), atol=1e-4)


def test_runtime_errors_are_clear():
    backbone = _tiny()
    with pytest.raises(ValueError, match="unknown runtime 'fp8'"):
        set_runtime(backbone, "fp8")
    set_runtime(backbone, "int8")
    assert set_runtime(backbone, "int8") is backbone  # asking again changes nothing
    with pytest.raises(ValueError, match="already runs with int8"):
        set_runtime(backbone, "torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_refuses_a_gpu():
    with pytest.raises(ValueError, match="CPU only"):
        set_runtime(_tiny().cuda(), "int8")


def test_an_index_records_its_runtime_and_searches_with_it(shared_data, tmp_path):
    photos = sorted((shared_data / "clothing-small" / "test").glob("*/*.jpg"))[::40][:8]
    index = build_tiny_index(tmp_path, photos, "--runtime", "int8")
    listing = tmp_path / "gallery.csv"
    assert json.loads((index / "manifest.json").read_text())["runtime"] == "int8"
    out = json.loads(run_cli("search", "--index", str(index), str(photos[3]), "--json", "--top-k", "3").stdout)
    assert out["results"][0]["id"] == str(photos[3])  # the query's own photo first, embedded the same way
    refused = run_cli("index", "add", str(index), "--from", str(listing), "--runtime", "torch", check=False)
    assert refused.returncode == 1 and "embedded with the int8 runtime" in refused.stderr


@pytest.mark.real_backbone
def test_int8_stays_within_its_stated_tolerance_on_real_photos(shared_data, real_weights):
    """The tolerance the int8 runtime is documented with (docs/benchmarks.md, "Runtimes"), on 32 real photos
    with the real DINOv2: global vectors at cosine >= 0.95 of float32's (0.99 on average), block 9's patch
    tokens at >= 0.975 on average. (Its retrieval cost, measured by bench quality: 0.3-3.6 points on the
    shipped rerank, 0.9-7.2 on the global baseline; so it is an opt-in, not the default.)"""
    from indexer.loading import load_image

    photos = sorted((shared_data / "clothing-small" / "validation").glob("*/*.jpg"))[::10][:32]
    batch = None
    outputs = {}
    for runtime in ("torch", "int8"):
        backbone = set_runtime(create_backbone("vit_small_patch14_dinov2", str(real_weights), grid=0,
                                               model_kwargs={"img_size": 224}).eval(), runtime)
        backbone.set_patch_layer(9)
        if batch is None:
            batch = torch.stack([backbone.transform(load_image(p).convert("RGB")) for p in photos])
        with torch.no_grad():
            outputs[runtime] = forward_features(backbone, batch, ())
    ref, q = outputs["torch"], outputs["int8"]
    cosines = F.cosine_similarity(q.global_features, ref.global_features)
    assert cosines.min() >= 0.95 and cosines.mean() >= 0.985, (float(cosines.min()), float(cosines.mean()))
    assert F.cosine_similarity(q.patch_features, ref.patch_features, dim=-1).mean() >= 0.975
