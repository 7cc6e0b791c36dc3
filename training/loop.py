"""The training run: data, frozen-token cache, epochs with a held-out check, checkpoint/resume,
early stopping, and the outputs (``model.safetensors``, ``training.json``, history and plot)."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.features import default_cache_dir
from reranker.backbones import create_backbone, weights_identity
from reranker.defaults import DEFAULT_MODEL, DEFAULT_PATCH_LAYER

from . import checkpoint as ckpt
from .data import LabelledSet, class_balanced_sampler, heldout_split, load_labelled
from .heldout import leave_one_out_metrics
from .losses import DEFAULT_LOSS, PROXY_LR_FACTOR, make_loss
from .model import TrainableTail
from .tokens import cached_tokens, compute_token_cache, frozen_tokens, load_images

#: Blocks frozen unless told (of 12 in ViT-S/14): measured in docs/training.md.
DEFAULT_FREEZE = 10
#: Classes in a batch when --batch-size is not given (fewer when the folder has fewer).
CLASSES_PER_BATCH = 8
#: The held-out figure that picks the best epoch (less noisy than P@1 on a small held-out split).
SELECTION_METRIC = "map_at_r"


@dataclass
class TrainSettings:
    """What defines a run (``identity``) and how it runs (epochs, device, workers: free to change on resume)."""

    source: str
    out: str
    model: str = DEFAULT_MODEL
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "pretrained"
    loss: str = DEFAULT_LOSS
    freeze: int = DEFAULT_FREEZE
    lr: float = 5e-5
    batch_size: int | None = None  # None: --m-per-class images of min(8, classes) classes
    m_per_class: int = 4
    heldout: float = 0.2
    seed: int = 0
    augment: bool = False
    epochs: int = 12
    patience: int = 4
    device: str = "cpu"
    workers: int = 2
    embed_batch: int = 32
    progress: bool = True
    cache_dir: str | None = None  # frozen-token cache (None: the evaluation's feature cache folder)

    IDENTITY = ("source", "model", "model_kwargs", "weights", "loss", "freeze", "lr", "batch_size", "m_per_class",
                "heldout", "seed", "augment")

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.IDENTITY}


def _log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


class TokenSource:
    """Training inputs by image index: cached frozen tokens, or augmented images through the frozen blocks."""

    def __init__(self, tail: TrainableTail, transform_train, data: LabelledSet, cache: torch.Tensor | None,
                 device: torch.device, workers: int) -> None:
        self.tail, self.transform_train, self.data, self.cache = tail, transform_train, data, cache
        self.device, self.workers = device, workers

    def batches(self, order: list[int], batch_size: int):
        """``(tokens (B, T, C), positions (B,))`` for consecutive chunks of ``order``."""
        if self.cache is not None:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield self.cache[idx].to(self.device, torch.float32), idx
            return
        records = [self.data.records[i] for i in order]
        start = 0
        for images in load_images(records, self.transform_train, batch_size, self.workers):
            idx = order[start:start + len(images)]
            start += len(images)
            with torch.no_grad():  # the frozen blocks only; the yield (and the training step) stays outside
                tokens = frozen_tokens(self.tail.model, images.to(self.device), self.tail.freeze)
            yield tokens, idx


@torch.no_grad()
def embed_tokens(tail: TrainableTail, tokens: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Global vectors ``(N, D)`` of cached tokens ``(N, T, C)``, in eval mode."""
    tail.eval()
    out = [tail(tokens[i:i + batch].to(device, torch.float32)).cpu() for i in range(0, len(tokens), batch)]
    return torch.cat(out)


def patch_tokens_note(freeze: int, depth: int) -> dict[str, Any]:
    """Whether training changes the patch tokens an index reads (block ``DEFAULT_PATCH_LAYER``)."""
    layer = DEFAULT_PATCH_LAYER % depth
    changed = freeze <= layer
    return {"patch_layer": layer, "patch_tokens_changed": changed,
            "note": (f"blocks {freeze}..{depth - 1} trained: the default patch layer {layer} "
                     + ("is among them, so the reranking's patch tokens change too" if changed
                        else "is frozen, so the reranking's patch tokens are the base model's"))}


def require_metric_learning() -> None:
    """pytorch-metric-learning is an extra (``vit-rerank[train]``): say so in one line when it is missing."""
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        raise ValueError("vit-rerank train needs pytorch-metric-learning: pip install 'vit-rerank[train]'") from None


def run_training(settings: TrainSettings, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the run ``settings`` describes; returns the ``training.json`` summary."""
    require_metric_learning()
    out = Path(settings.out)
    data = load_labelled(settings.source)  # before any folder is made: bad input leaves nothing behind
    settings.source = data.root
    saved = ckpt.prepare_out_dir(out, settings.identity(), resume)
    if saved is not None and saved != settings.identity():
        _log("--resume: continuing the saved run with its own settings")
        settings = dataclasses.replace(settings, **saved)
        data = load_labelled(settings.source)
    device = torch.device(settings.device)
    ckpt.seed_everything(settings.seed)
    train_idx, held_idx = heldout_split(data.labels, settings.heldout, settings.seed)
    if settings.batch_size is None:
        settings.batch_size = settings.m_per_class * min(CLASSES_PER_BATCH, len(data.class_names))
    class_balanced_sampler(data.labels[train_idx], settings.m_per_class, settings.batch_size)  # bad sizes: now

    backbone = create_backbone(settings.model, settings.weights, model_kwargs=settings.model_kwargs)
    base_weights_id = backbone.weights_id
    tail = TrainableTail(backbone.model, settings.freeze).to(device)
    depth = len(tail.model.blocks)
    token_key = {"root": data.root, "model": settings.model, "model_kwargs": settings.model_kwargs, "weights": base_weights_id,
                 "freeze": settings.freeze, "data": data.fingerprint(), "transform": repr(backbone.transform),
                 "augment": settings.augment}
    t0 = time.perf_counter()
    cache_records = data.records if not settings.augment else [data.records[i] for i in held_idx]
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir().parent / "train-tokens"
    tokens = cached_tokens(cache_dir, token_key, lambda: compute_token_cache(
        tail.model, backbone.transform, cache_records, settings.freeze, device, settings.embed_batch,
        settings.workers, settings.progress))
    token_seconds = time.perf_counter() - t0
    held_tokens = tokens[held_idx] if not settings.augment else tokens
    transform_train = None
    if settings.augment:
        from timm.data import create_transform

        transform_train = create_transform(**backbone.data_config, is_training=True)
    source = TokenSource(tail, transform_train, data, None if settings.augment else tokens, device, settings.workers)

    metric = make_loss(settings.loss, len(data.class_names), backbone.embed_dim)
    metric.loss.to(device)
    groups = [{"params": [p for p in tail.parameters() if p.requires_grad], "lr": settings.lr}]
    if loss_params := list(metric.loss.parameters()):
        groups.append({"params": loss_params, "lr": settings.lr * PROXY_LR_FACTOR})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)

    def heldout_figures() -> dict[str, float] | None:
        if len(held_idx) < 2:
            return None
        return leave_one_out_metrics(embed_tokens(tail, held_tokens, device), data.labels[held_idx])

    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_FILE)
    if state is None:
        history = [{"epoch": 0, "loss": None, "seconds": 0.0, "heldout": heldout_figures()}]
        best = {"epoch": 0, "value": _selection(history[0])}
        start_epoch, train_seconds = 1, 0.0
        ckpt.save_model(out / ckpt.MODEL_FILE, tail.full_state_dict())
        _log(f"epoch 0 (base weights): held-out {_figures_text(history[0]['heldout'])}")
    else:
        tail.load_trainable_state(state["trainable"])
        metric.loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"])
        history, best, train_seconds = state["history"], state["best"], state["train_seconds"]
        start_epoch = state["epoch"] + 1
        _log(f"resuming after epoch {state['epoch']} (best so far: epoch {best['epoch']})")

    from tqdm import tqdm

    labels = torch.as_tensor(data.labels)
    for epoch in range(start_epoch, settings.epochs + 1):
        if best["value"] is not None and epoch - best["epoch"] > settings.patience:
            _log(f"early stop: no held-out gain for {settings.patience} epochs")
            break
        started = time.perf_counter()
        tail.train()
        # a new sampler each epoch: MPerClassSampler shuffles its own label list in place, state a resume would lose
        sampler = class_balanced_sampler(data.labels[train_idx], settings.m_per_class, settings.batch_size)
        order = [int(train_idx[i]) for i in sampler]
        losses = []
        steps = tqdm(source.batches(order, settings.batch_size), total=-(-len(order) // settings.batch_size),
                     desc=f"epoch {epoch}/{settings.epochs}", disable=not settings.progress, unit="batch")
        for batch_tokens, idx in steps:
            loss = metric(tail(batch_tokens), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps.set_postfix(loss=f"{losses[-1]:.4f}")
        figures = heldout_figures()
        seconds = time.perf_counter() - started
        train_seconds += seconds
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "seconds": seconds,
                        "heldout": figures})
        value = _selection(history[-1])
        if best["value"] is None or (value is not None and value > best["value"]):
            best = {"epoch": epoch, "value": value}
            ckpt.save_model(out / ckpt.MODEL_FILE, tail.full_state_dict())
        _log(f"epoch {epoch}: loss {history[-1]['loss']:.4f}, held-out {_figures_text(figures)} ({seconds:.0f} s)")
        ckpt.write_json(out / ckpt.HISTORY_FILE, history)
        write_plot(out / ckpt.PLOT_FILE, history)
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT_FILE, {
            "epoch": epoch, "trainable": tail.trainable_state(), "loss": metric.loss.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(), "history": history, "best": best,
            "train_seconds": train_seconds})

    ckpt.write_json(out / ckpt.HISTORY_FILE, history)
    write_plot(out / ckpt.PLOT_FILE, history)
    summary = {
        "settings": {**settings.identity(), "epochs": settings.epochs, "patience": settings.patience,
                     "selection_metric": SELECTION_METRIC, "device": str(device)},
        "base_weights_id": base_weights_id,
        "data": {"root": data.root, "classes": data.class_names, "images": len(data.records),
                 "train_images": len(train_idx), "heldout_images": len(held_idx), "fingerprint": data.fingerprint()},
        "seed": settings.seed,
        "best_epoch": best["epoch"],
        "epochs_run": history[-1]["epoch"],
        "heldout_base": history[0]["heldout"],
        "heldout_final": history[best["epoch"]]["heldout"],
        "seconds": {"frozen_tokens": token_seconds, "training": train_seconds},
        "model": {"file": ckpt.MODEL_FILE, "weights_id": weights_identity(str(out / ckpt.MODEL_FILE))},
        "patch_tokens": patch_tokens_note(settings.freeze, depth),
    }
    ckpt.write_json(out / ckpt.SUMMARY_FILE, summary)
    _log(f"best epoch {best['epoch']}: held-out {_figures_text(summary['heldout_final'])}; "
         f"model: {out / ckpt.MODEL_FILE}")
    return summary


def _selection(entry: dict[str, Any]) -> float | None:
    return None if entry["heldout"] is None else entry["heldout"][SELECTION_METRIC]


def _figures_text(figures: dict[str, float] | None) -> str:
    if figures is None:
        return "n/a (no held-out split)"
    return f"P@1 {100 * figures['precision_at_1']:.2f}, MAP@R {100 * figures['map_at_r']:.2f}"


def write_plot(path: Path, history: list[dict[str, Any]]) -> None:
    """Loss and held-out P@1 / MAP@R per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [h for h in history if h["loss"] is not None]
    ax_loss.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    scored = [h for h in history if h["heldout"] is not None]
    for key, label in (("precision_at_1", "P@1"), ("map_at_r", "MAP@R")):
        ax_metric.plot([h["epoch"] for h in scored], [100 * h["heldout"][key] for h in scored], marker="o", label=label)
    ax_metric.set(xlabel="epoch", ylabel="%", title="held-out (epoch 0: base weights)")
    ax_metric.legend()
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=80)
    plt.close(fig)
    partial.replace(path)
