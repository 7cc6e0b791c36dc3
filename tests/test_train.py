"""``vit-rerank train`` end to end on real clothing photos: with the real DINOv2 the held-out figure
rises; with timm's tiny random ``test_vit`` (fast) the outputs are complete, only the blocks after
``--freeze`` change, the model loads through ``--weights`` in index build + search, an interrupted run
resumes where it stopped (and ends as an uninterrupted one does), and bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli

CLASSES = ("hat", "pants", "shoes", "skirt")
PER_CLASS = 12


@pytest.fixture(scope="module")
def labelled(shared_data, tmp_path_factory) -> Path:
    """4 classes x 12 clothing photos (symlinks), a folder per class."""
    root = tmp_path_factory.mktemp("labelled")
    for cls in CLASSES:
        (root / cls).mkdir()
        for photo in sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:PER_CLASS]:
            (root / cls / photo.name).symlink_to(photo)
    return root


def train_args(source: Path, out: Path, cache: Path, epochs: int = 4, model: tuple[str, ...] = ("--model", "test_vit",
               "--weights", "random", "--freeze", "1", "--lr", "1e-3")) -> list[str]:
    """A fast run: 8 images per class learn, 4 are held out (``--heldout 0.34``); two batches an epoch."""
    return ["train", "--from", str(source), "--out", str(out), *model, "--epochs", str(epochs), "--batch-size", "16",
            "--m-per-class", "4", "--heldout", "0.34", "--patience", "10", "--workers", "0", "--no-progress",
            "--cache", str(cache)]


@pytest.mark.slow
@pytest.mark.real_backbone
def test_training_the_real_backbone_raises_the_heldout_figure(labelled, real_weights, tmp_path):
    """DINOv2 ViT-S/14, its last block + norm trained for 2 epochs on 32 photos: held-out MAP@R rises well
    beyond the noise of 16 held-out queries (measured 0.30 -> 0.58 at this setting, 0.76 after a third epoch)."""
    out = tmp_path / "run"
    run_cli(*train_args(labelled, out, tmp_path / "cache", epochs=2,
                        model=("--weights", str(real_weights), "--freeze", "11", "--lr", "3e-4")))
    summary = json.loads((out / "training.json").read_text())
    base, final = summary["heldout_base"], summary["heldout_final"]
    assert final["map_at_r"] >= base["map_at_r"] + 0.15, (base, final)
    assert final["precision_at_1"] >= base["precision_at_1"], (base, final)
    assert summary["best_epoch"] >= 1 and summary["patch_tokens"]["patch_tokens_changed"] is False


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The frozen-token cache the tiny runs share (the photos are decoded once)."""
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def trained(labelled, cache, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted 4-epoch run; its summary."""
    out = tmp_path_factory.mktemp("run") / "run"
    run_cli(*train_args(labelled, out, cache))
    return out, json.loads((out / "training.json").read_text())


def test_training_writes_its_outputs_and_changes_only_the_blocks_after_freeze(trained):
    out, summary = trained
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "training.json", "history.json", "history.png",
                                                "checkpoint.pt", "run.json"}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4] and history[0]["loss"] is None
    assert summary["data"]["heldout_images"] == 4 * 4 and summary["data"]["train_images"] == 4 * 8
    assert all(h["heldout"] is not None and h["loss"] is not None for h in history[1:])
    # Only the blocks after --freeze learned; the embedding and block 0 are the random start's.
    from reranker.backbones import create_backbone, read_state_dict

    trained_state = read_state_dict(out / "model.safetensors")
    base_state = create_backbone("test_vit", "random").model.state_dict()
    assert trained_state.keys() == base_state.keys()
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        assert torch.equal(trained_state[name], base_state[name]), name
    last = torch.load(out / "checkpoint.pt", weights_only=False)["trainable"]  # the last epoch's (model.safetensors:
    assert set(last) == {k for k in base_state if k.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "blocks.4.",
                                                                "blocks.5.", "norm.", "fc_norm."))}  # the best's)
    assert all(not torch.equal(last[k], base_state[k]) for k in last if k.endswith("weight")), "a block did not learn"
    assert summary["patch_tokens"]["patch_tokens_changed"] is True  # patch layer 3 of 6 is trained
    assert summary["model"]["weights_id"].startswith("file:model.safetensors:")


def test_the_model_loads_through_weights_in_index_build_and_search(trained, labelled, cache, tmp_path):
    out, summary = trained
    index = tmp_path / "index"
    run_cli("index", "build", str(index), "--from", str(labelled), "--label-from-parent", "--model", "test_vit",
            "--weights", str(out / "model.safetensors"), "--no-progress", "--workers", "0")
    info = json.loads(run_cli("index", "info", str(index), "--json").stdout)
    assert info["weights"] == summary["model"]["weights_id"] and info["images"] == 4 * PER_CLASS
    query = sorted((labelled / "hat").iterdir())[0]
    res = json.loads(run_cli("search", str(query), "--index", str(index), "--top-k", "5", "--json").stdout)
    top = [h for h in res["results"] if h["rank_before"] == 0][0]
    assert Path(top["id"]).name == query.name and abs(top["global_score"] - 1.0) < 1e-4

    # --index: training starts from the index's backbone (model, its kwargs and weights from the manifest)
    again = tmp_path / "from_index"
    run_cli(*train_args(labelled, again, cache, epochs=1,
                        model=("--index", str(index), "--freeze", "1", "--lr", "1e-3")))
    second = json.loads((again / "training.json").read_text())
    assert second["base_weights_id"] == summary["model"]["weights_id"] and second["settings"]["model"] == "test_vit"


def test_an_interrupted_run_resumes_from_its_last_epoch(trained, labelled, cache, tmp_path, monkeypatch):
    from training import checkpoint

    _, uninterrupted = trained
    out = tmp_path / "run"
    save = checkpoint.save_checkpoint

    def killed_after_epoch_2(path, state):
        save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_after_epoch_2)
    assert run_cli(*train_args(labelled, out, cache), check=False).returncode == 130
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1, 2]
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)

    resumed = run_cli(*train_args(labelled, out, cache))  # the same command: resumes by itself
    assert "resuming after epoch 2" in resumed.stderr and "epoch 1:" not in resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    reference = json.loads((trained[0] / "history.json").read_text())
    for got, want in zip(history[1:], reference[1:]):  # model, optimizer and sampler RNG all restored
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["heldout"]["map_at_r"] == pytest.approx(want["heldout"]["map_at_r"], abs=1e-6)
    summary = json.loads((out / "training.json").read_text())
    assert summary["best_epoch"] == uninterrupted["best_epoch"]


def test_bad_input_is_refused_in_one_line(labelled, trained, cache, tmp_path):
    def error(*args: str) -> str:
        result = run_cli(*args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        return result.stderr

    assert "labelled folder not found" in error(*train_args(tmp_path / "missing", tmp_path / "o1", cache))
    one_class = tmp_path / "one_class"
    (one_class / "hat").mkdir(parents=True)
    for photo in sorted((labelled / "hat").iterdir())[:3]:
        (one_class / "hat" / photo.name).symlink_to(photo.resolve())
    assert "at least 2 classes" in error(*train_args(one_class, tmp_path / "o2", cache))
    lonely = tmp_path / "lonely"
    for cls, count in (("hat", 3), ("shoes", 1)):
        (lonely / cls).mkdir(parents=True)
        for photo in sorted((labelled / cls).iterdir())[:count]:
            (lonely / cls / photo.name).symlink_to(photo.resolve())
    assert "'shoes' has only one image" in error(*train_args(lonely, tmp_path / "o3", cache))
    assert not (tmp_path / "o3").exists()  # refused before anything was written

    out, _ = trained
    other = train_args(labelled, out, cache)
    other[other.index("--lr") + 1] = "5e-4"
    assert "holds another training run (different lr)" in error(*other)
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "file.txt").write_text("x")
    assert "not a training run folder" in error(*train_args(labelled, not_a_run, cache))
    assert "is not an index directory" in error(*train_args(labelled, tmp_path / "o4", cache,
                                                            model=("--index", str(tmp_path))))
    assert "no training run to resume" in error(*train_args(labelled, tmp_path / "empty", cache), "--resume")


def test_augment_runs_the_frozen_blocks_per_batch_and_still_learns(labelled, cache, tmp_path):
    from reranker.backbones import create_backbone

    out = tmp_path / "augmented"
    run_cli(*train_args(labelled, out, cache, epochs=1), "--augment")
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]
    last = torch.load(out / "checkpoint.pt", weights_only=False)["trainable"]
    base = create_backbone("test_vit", "random").model.state_dict()
    assert not torch.equal(last["blocks.5.mlp.fc1.weight"], base["blocks.5.mlp.fc1.weight"])
    assert "blocks.0.mlp.fc1.weight" not in last  # frozen: not trained, not saved in the checkpoint
