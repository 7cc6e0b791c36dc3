"""The int8 runtime (``--runtime int8``): what it changes in the model, that it keeps every output the
pipeline reads, that an index records it, and, with the real DINOv2 on real photos, that it ranks as the
float32 model does within the stated tolerance."""

from __future__ import annotations

import copy
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


def test_onnx_gives_torchs_features_and_caches_its_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_RERANK_CACHE", str(tmp_path))
    fp32 = _tiny()
    fp32.set_patch_layer(1)
    onnx = copy.deepcopy(fp32)
    assert set_runtime(onnx, "onnx") is onnx and onnx.runtime == "onnx"
    graphs = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(graphs) == 1  # exported once, under a key of the model
    from reranker.backbones.onnx_runtime import MICRO_BATCH

    images = torch.rand(MICRO_BATCH + 2, 3, 112, 112)  # two micro-batches, the second one short
    ref, out = forward_features(fp32, images, ()), forward_features(onnx, images, ())
    torch.testing.assert_close(out.global_features, ref.global_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_features, ref.patch_features, atol=1e-5, rtol=0)  # block 1, not the last
    last = copy.deepcopy(fp32)
    last.set_patch_layer(None)
    assert not torch.allclose(forward_features(last, images, ()).patch_features, ref.patch_features, atol=1e-3)
    # attention kinds run in torch (the graph has no attention maps) and give torch's weights
    with_weights = forward_features(onnx, images, ("rollout",))
    torch.testing.assert_close(with_weights.patch_weights["rollout"],
                               forward_features(fp32, images, ("rollout",)).patch_weights["rollout"])
    again = set_runtime(copy.deepcopy(fp32), "onnx")  # the same weights: the cached graph, no new export
    assert again.onnx_forward.path == graphs[0] and len(list((tmp_path / "onnx").glob("*"))) == 1
    other = copy.deepcopy(fp32)
    with torch.no_grad():
        other.model.blocks[0].mlp.fc1.weight.add_(0.1)
    set_runtime(other, "onnx")  # other weights (e.g. fine-tuned): another graph
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2
    assert set_runtime(onnx, "torch").onnx_forward is None and onnx.runtime == "torch"


def test_onnx_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_RERANK_CACHE", str(tmp_path))
    swin = create_backbone("swin_tiny_patch4_window7_224", "random", grid=7,
                           model_kwargs=dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))).eval()
    with pytest.raises(ValueError, match="plain timm ViTs only"):
        set_runtime(swin, "onnx")
    assert swin.runtime == "torch"


def test_auto_runs_onnx_on_the_cpu_and_torch_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_RERANK_CACHE", str(tmp_path))
    assert set_runtime(_tiny(), "auto").runtime == "onnx"
    swin = create_backbone("swin_tiny_patch4_window7_224", "random", grid=7,
                           model_kwargs=dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))).eval()
    assert set_runtime(swin, "auto").runtime == "torch"  # not a plain ViT
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    assert set_runtime(_tiny(), "auto").runtime == "torch"  # no ONNX Runtime installed


def test_an_index_made_in_torch_is_searched_and_grown_with_onnx(shared_data, tmp_path):
    photos = sorted((shared_data / "clothing-small" / "test").glob("*/*.jpg"))[::40][:8]
    index = build_tiny_index(tmp_path, photos[:6], "--runtime", "torch")
    assert json.loads((index / "manifest.json").read_text())["runtime"] == "torch"
    listing = tmp_path / "more.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in photos[6:]))
    run_cli("index", "add", str(index), "--from", str(listing), "--runtime", "onnx", "--no-progress",
            "--workers", "0")  # float32 alike: accepted
    for query in (photos[2], photos[7]):
        out = json.loads(run_cli("search", "--index", str(index), str(query), "--json", "--top-k", "3",
                                 "--runtime", "onnx").stdout)
        assert out["results"][0]["id"] == str(query)
    refused = run_cli("index", "add", str(index), "--from", str(listing), "--runtime", "int8", check=False)
    assert refused.returncode == 1 and "embedded with the torch runtime" in refused.stderr


@pytest.mark.real_backbone
def test_onnx_ranks_the_shared_photos_as_torch_does(shared_data, real_weights, tmp_path, monkeypatch):
    """The onnx runtime's stated tolerance with the real DINOv2 on 48 real photos: global vectors and block 9's
    patch tokens within 1e-4 of torch's (after L2 normalisation), hence the same leave-one-out ranking."""
    from indexer.loading import load_image

    monkeypatch.setenv("VIT_RERANK_CACHE", str(tmp_path))
    photos = sorted((shared_data / "clothing-small" / "validation").glob("*/*.jpg"))[::7][:48]
    backbone = create_backbone("vit_small_patch14_dinov2", str(real_weights), grid=0,
                               model_kwargs={"img_size": 224}, patch_layer=9).eval()
    batch = torch.stack([backbone.transform(load_image(p).convert("RGB")) for p in photos])
    ref = forward_features(backbone, batch, ())
    out = forward_features(set_runtime(backbone, "onnx"), batch, ())
    assert (out.global_features - ref.global_features).abs().max() < 1e-4
    assert (out.patch_features - ref.patch_features).abs().max() < 1e-4
    order = [(g @ g.T).fill_diagonal_(-2).argsort(dim=1, descending=True)[:, :5]
             for g in (ref.global_features, out.global_features)]
    assert torch.equal(order[0], order[1])
