"""``vit-rerank eval`` end to end on the shared photos with a tiny random ViT."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli

from conftest import tiny_vit_kwargs
from vit_rerank.cli import main

TINY = ["--model", "test_vit", "--weights", "random", "--model-kwargs", json.dumps(tiny_vit_kwargs()),
        "--workers", "0", "--no-progress"]


def run_eval(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("eval", *args, check=check)


def check_shape(doc: dict, metric_names: list[str], variants: list[str]) -> None:
    assert doc["metric_names"] == metric_names
    assert list(doc["baseline"]) == metric_names
    assert list(doc["variants"]) == variants
    for metrics in [doc["baseline"], *doc["variants"].values()]:
        assert list(metrics) == metric_names
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in metrics.values())
    assert doc["settings"]["random_weights"] is True
    assert set(doc["timings"]) >= {"embedding_s", "search_s", "rerank_s", "total_s"}


@pytest.fixture(scope="module")
def clothing_folder(shared_data, tmp_path_factory) -> Path:
    """4 classes x 6 photos of clothing-small/test, linked into a folder per class."""
    root = tmp_path_factory.mktemp("clothing")
    for cls in ("hat", "pants", "shoes", "skirt"):
        (root / cls).mkdir()
        for photo in sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:6]:
            (root / cls / photo.name).symlink_to(photo)
    return root


def test_folder_protocol_end_to_end(clothing_folder, tmp_path):
    cache = tmp_path / "cache"
    args = ["--dataset", "folder", "--root", str(clothing_folder), *TINY, "--preset", "paper", "--rerank-k", "5,10",
            "--s", "1.0,0.9",
            "--marginals", "rollout,uniform", "--cache", str(cache)]
    first = run_eval(*args, "--json-out", str(tmp_path / "a.json"), "--markdown-out", str(tmp_path / "a.md"),
                     "--plots", str(tmp_path / "plots"))
    doc = json.loads((tmp_path / "a.json").read_text())
    names = [f"s={s},marginals={m},k={k}" for m in ("rollout", "uniform") for s in ("1", "0.9") for k in (5, 10)]
    check_shape(doc, ["precision_at_1", "r_precision", "map_at_r"], names)
    assert doc["protocol"] == "class" and doc["counts"]["queries"] == 24 and doc["counts"]["images_failed"] == 0
    assert doc["embedding"] == {**doc["embedding"], "cached": False, "images_embedded": 24}
    assert "24 images in" in first.stdout and "baseline (global cosine)" in first.stdout
    # R = 5 other images per class: reranking only the top 5 cannot change R-Precision
    for m in ("rollout", "uniform"):
        for s in ("1", "0.9"):
            assert doc["variants"][f"s={s},marginals={m},k=5"]["r_precision"] == doc["baseline"]["r_precision"]
    assert any(v != doc["baseline"] for v in doc["variants"].values())  # reranking did something
    assert "| baseline (global cosine) |" in (tmp_path / "a.md").read_text()
    for png in ("metrics_vs_s.png", "metrics_vs_k.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the second run reuses the cached features and gives the same figures
    second = run_eval(*args, "--json-out", str(tmp_path / "b.json"))
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["embedding"]["cached"] is True and again["embedding"]["images_embedded"] == 0
    assert "cached features reused" in second.stdout
    assert again["baseline"] == doc["baseline"] and again["variants"] == doc["variants"]

    # with lambda = 0 the structural score cannot reorder anything (in-process: same command)
    assert main(["eval", *args, "--lambda", "0", "--s", "1.0", "--json-out", str(tmp_path / "c.json")]) == 0
    flat = json.loads((tmp_path / "c.json").read_text())
    assert flat["embedding"]["cached"] is True
    assert all(v == flat["baseline"] for v in flat["variants"].values())


def test_pairs_protocol_end_to_end(shared_data, tmp_path):
    run_eval("--dataset", "pairs", "--root", str(shared_data / "corridor"), *TINY, "--limit", "20",
             "--rerank-k", "10", "--preset", "paper", "--marginals", "rollout,crosscorr", "--cache", str(tmp_path / "cache"),
             "--json-out", str(tmp_path / "p.json"))
    doc = json.loads((tmp_path / "p.json").read_text())
    recalls = [f"recall_at_{n}" for n in (1, 5, 10, 20, 50, 100)]
    check_shape(doc, recalls, ["s=1,marginals=rollout,k=10", "s=1,marginals=crosscorr,k=10"])
    assert doc["protocol"] == "place" and doc["counts"]["queries"] == 20 and doc["counts"]["database"] == 20
    for metrics in [doc["baseline"], *doc["variants"].values()]:
        values = [metrics[r] for r in recalls]
        assert values == sorted(values)  # Recall@N grows with N
        assert metrics["recall_at_50"] == 1.0  # 20 database images: every positive is somewhere in them
        # reranking reorders only the top 10, so Recall@N for N >= 10 is the baseline's
        for n in (10, 20, 50, 100):
            assert metrics[f"recall_at_{n}"] == doc["baseline"][f"recall_at_{n}"]


def test_clear_errors(tmp_path, capsys):
    """Bad requests end with status 1 and one clear line (in-process: the same ``main``)."""

    def fails(*args: str) -> str:
        assert main(["eval", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("vit-rerank: error: ") and "Traceback" not in err
        return err

    err = fails("--dataset", "cub", "--root", str(tmp_path), *TINY)
    assert "missing file" in err and "images.txt" in err
    assert "dataset root does not exist" in fails("--dataset", "cub", "--root", str(tmp_path / "nowhere"), *TINY)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    swin = ["--model", "swin_tiny_patch4_window7_224", "--weights", "random", "--model-kwargs",
            json.dumps(dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]))]
    err = fails("--dataset", "folder", "--root", str(tmp_path), *swin, "--marginals", "rollout")
    assert "rollout marginals need global self-attention" in err
    assert "s must be at most 1, got 1.5" in fails("--dataset", "folder", "--root", str(tmp_path), *TINY, "--s", "1.5")
    assert "scorer must be one of ot, mnn" in fails("--dataset", "folder", "--root", str(tmp_path), *TINY,
                                                    "--scorer", "ransac")
    assert "does not exist" in fails("--dataset", "folder", "--root", str(tmp_path), *TINY, "--patch-layer", "7")
    assert "weights file not found" in fails("--dataset", "folder", "--root", str(tmp_path), "--model", "test_vit",
                                             "--weights", str(tmp_path / "none.safetensors"))
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "folder", "--root", str(tmp_path), "--model-kwargs", "{bad"])
    assert "not valid JSON" in capsys.readouterr().err


def test_grid_lambda_and_weight_kinds_sweep_with_calibration(clothing_folder, tmp_path):
    """Several G (0: the native grid, 14 for the tiny 112/8 ViT), several lambdas, every per-image kind."""
    kinds = "rollout,rollout_mean,rollout_max,cls_rollout,last_cls,crosscorr,uniform"
    run_eval("--dataset", "folder", "--root", str(clothing_folder), *TINY, "--rerank-k", "10", "--s", "1,0.5",
             "--grid", "7,0", "--patch-layer", "final", "--scorer", "ot", "--lambda", "0,0.5", "--marginals", kinds,
             "--calibrate", "--cache",
             str(tmp_path / "cache"), "--json-out", str(tmp_path / "a.json"))
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["settings"]["grid"] == [7, 14] and doc["settings"]["lambda"] == [0.0, 0.5]
    assert len(doc["variants"]) == 2 * 7 * 2 * 2
    for grid in (7, 14):
        for kind in kinds.split(","):
            name = f"G={grid},L=final,s=0.5,marginals={kind},k=10,lambda=0"
            assert doc["variants"][name] == doc["baseline"]  # lambda = 0 changes nothing
        entropy = doc["patch_weight_entropy"][f"G={grid},L=final"]
        assert set(entropy) == set(kinds.split(",")) - {"crosscorr", "uniform"}
        assert all(0.0 < e <= 1.0 for e in entropy.values())
    assert len(list((tmp_path / "cache").iterdir())) == 2  # features cached once per grid
    cal = doc["calibration"]
    assert cal["metric"] == "precision_at_1" and cal["calibrated_heldout"] >= cal["baseline_heldout"]
    assert doc["settings"]["preprocessing"]["crop"] == [112, 112]


def test_layers_and_scorers_sweep_and_calibrate_across_them(clothing_folder, tmp_path):
    """Two patch layers x (ot, mnn over thresholds): variants named by layer, calibration over both scorers."""
    run_eval("--dataset", "folder", "--root", str(clothing_folder), *TINY, "--rerank-k", "10", "--grid", "0",
             "--patch-layer", "final,-2", "--scorer", "ot,mnn", "--threshold", "0.2,0.6", "--marginals", "uniform",
             "--s", "0.5", "--lambda", "0,1", "--calibrate", "--cache", str(tmp_path / "cache"),
             "--json-out", str(tmp_path / "a.json"))
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["settings"]["patch_layer"] == [None, 1] and doc["settings"]["scorers"] == ["ot", "mnn"]
    structurals = ["s=0.5,marginals=uniform", "scorer=mnn,threshold=0.2", "scorer=mnn,threshold=0.6"]
    expected = [f"G=14,L={layer},{st},k=10,lambda={lam}" for layer in ("final", "1") for st in structurals
                for lam in ("0", "1")]
    assert sorted(doc["variants"]) == sorted(expected)
    for name in expected:
        if name.endswith("lambda=0"):
            assert doc["variants"][name] == doc["baseline"]
    assert doc["calibration"] is not None and "scorer" in doc["calibration"]
