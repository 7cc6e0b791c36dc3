"""The two-protocol table of docs/training.md: fine-tune DINOv2 ViT-S/14 with ``vit-rerank train`` and
compare, on the test images, the off-the-shelf global baseline, the fine-tuned global baseline and the
reranking on the fine-tuned model (the shipped preset, and the best variant of ``bench quality``'s sweep).

Protocols (the shared clothing photos):

- ``same-classes``: train on clothing-small/validation, test on clothing-small/test (10 classes).
- ``disjoint``: train on dress, hat, longsleeve, outwear, pants (validation + test photos), test on
  shirt, shoes, shorts, skirt, t-shirt (validation + test): the CUB / Cars196 protocol.

Test sets are evaluated exactly as ``bench quality`` evaluates a class folder (leave-one-out P@1, MAP@R,
the same sweep and calibration), by its own functions. Training runs go to ``--runs``; a finished run is
reused, an interrupted one resumes, so a second call costs the evaluation only. Usage:

    .venv/bin/python scripts/train_protocols.py --weights ../shared/weights/dinov2_vits14.safetensors \\
        --runs /tmp/train-runs [--protocol same-classes] [--json out.json]

On the 2-core CPU of the measurements a protocol took about 10 minutes (training) + 6 (evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.calibrate import K_GRID, LAMBDA_GRID  # noqa: E402
from evaluation.features import default_cache_dir  # noqa: E402
from evaluation.runner import EvalSettings, run_evaluation  # noqa: E402
from reranker.defaults import DEFAULT_MODEL, default_model_kwargs  # noqa: E402
from reranker.device import resolve_device  # noqa: E402
from evaluation.calibrate import PRIMARY_METRIC  # noqa: E402
from evaluation.report import setting_text  # noqa: E402
from indexer.search_params import SHIPPED, preset_patches  # noqa: E402
from vit_rerank.bench.quality import _sweep, feature_runs, patches_label_of, preset_variant, set_summary  # noqa: E402
from vit_rerank.cli import main as cli  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "clothing-small"
TRAIN_CLASSES = ("dress", "hat", "longsleeve", "outwear", "pants")
TEST_CLASSES = ("shirt", "shoes", "shorts", "skirt", "t-shirt")


def disjoint_folders(data: Path, work: Path) -> tuple[Path, Path]:
    """Symlinked class folders (validation + test photos) of the five training and five test classes."""
    for part, classes in (("train", TRAIN_CLASSES), ("test", TEST_CLASSES)):
        for cls in classes:
            folder = work / part / cls
            folder.mkdir(parents=True, exist_ok=True)
            for split in ("validation", "test"):
                for photo in sorted((data / split / cls).glob("*.jpg")):
                    link = folder / f"{split}_{photo.name}"
                    if not link.exists():
                        link.symlink_to(photo.resolve())
    return work / "train", work / "test"


def evaluate(root: Path, weights: str, cache: Path | None, seed: int = 0, every_preset: bool = False) -> dict:
    """``bench quality``'s figures for one class folder: baseline, the shipped preset, calibrated and the best
    of the sweep; on the shipped patch features only (their mutual-nearest-neighbour sweep, where ``bench
    quality``'s best was on clothing), unless ``every_preset`` (also the 7 x 7 final tokens and OT: slow)."""
    device = resolve_device("auto")
    runs = feature_runs()
    if not every_preset:
        shipped = patches_label_of(preset_patches(SHIPPED))
        runs = {shipped: runs[shipped]}
    docs = {}
    for label, patches in runs.items():
        print(f"[protocols] {root.name} {Path(weights).name}, patches {label}...", file=sys.stderr, flush=True)
        settings = EvalSettings(
            dataset="folder", root=str(root), model=DEFAULT_MODEL, weights=weights,
            model_kwargs=default_model_kwargs(DEFAULT_MODEL), grids=[patches["grid"]],
            patch_layers=[patches["patch_layer"]], k_values=list(K_GRID), lam_values=list(LAMBDA_GRID),
            cache_dir=cache or default_cache_dir(), progress=False, calibrate=True, seed=seed, **_sweep(patches),
        )
        docs[label] = run_evaluation(settings, device)
    return set_summary(docs) if every_preset else shipped_summary(docs)


def shipped_summary(docs: dict) -> dict:
    """:func:`set_summary`'s fields for a run on the shipped patch features alone."""
    (label, doc), = docs.items()
    metric = PRIMARY_METRIC[doc["protocol"]]
    variants = {f"{label},{name}": v for name, v in doc["variants"].items()}
    best = max(variants, key=lambda name: variants[name][metric])
    shipped = variants[preset_variant(SHIPPED)]
    cal = doc["calibration"]
    return {"metric": metric, "baseline": doc["baseline"][metric], "presets": {SHIPPED: shipped[metric]},
            "calibrated": cal["calibrated_heldout"], "calibrated_baseline": cal["baseline_heldout"],
            "calibrated_setting": setting_text(cal) if cal["rerank"] else "no rerank",
            "best": variants[best][metric], "best_variant": best,
            "all_metrics": {"baseline": doc["baseline"], SHIPPED: shipped, "best": variants[best]},
            "weights_id": doc["settings"]["weights_id"], "seconds": doc.get("seconds")}


def run_protocol(name: str, train: Path, test: Path, args: argparse.Namespace) -> dict:
    out = args.runs / name
    started = time.perf_counter()
    cli(["train", "--from", str(train), "--out", str(out), "--weights", args.weights, "--no-progress",
         *(["--cache", str(args.cache)] if args.cache else []), *args.train_args])
    wall = time.perf_counter() - started
    summary = json.loads((out / "training.json").read_text())
    base = evaluate(test, args.weights, args.cache)
    tuned = evaluate(test, str(out / "model.safetensors"), args.cache)
    return {"train": str(train), "test": str(test), "training": summary, "call_seconds": wall,
            "off_the_shelf": base, "fine_tuned": tuned}


def table(results: dict) -> str:
    lines = [f"{'protocol':<13} {'metric':<6} {'off-shelf':>9} {'tuned':>7} {'shipped':>8} {'best':>7}  "
             f"{'train s':>7}  best variant (fine-tuned)"]
    for name, r in results.items():
        base, tuned = r["off_the_shelf"], r["fine_tuned"]
        secs = r["training"]["seconds"]
        for metric, key in (("P@1", "precision_at_1"), ("MAP@R", "map_at_r")):
            b, t = base["all_metrics"]["baseline"][key], tuned["all_metrics"]["baseline"][key]
            s, best = tuned["all_metrics"]["shipped"][key], tuned["all_metrics"]["best"][key]
            lines.append(f"{name:<13} {metric:<6} {100 * b:9.2f} {100 * t:7.2f} {100 * s:8.2f} {100 * best:7.2f}  "
                         f"{secs['training'] + secs['frozen_tokens']:7.0f}  {tuned['best_variant']}")
        lines.append(f"{'':<13} off-the-shelf: shipped {100 * base['presets']['shipped']:.2f}, best "
                     f"{100 * base['best']:.2f} ({base['best_variant']}); fine-tuned calibrated "
                     f"{100 * tuned['calibrated']:.2f} vs {100 * tuned['calibrated_baseline']:.2f} "
                     f"({tuned['calibrated_setting']})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="the off-the-shelf DINOv2 ViT-S/14 checkpoint")
    p.add_argument("--runs", type=Path, required=True, help="folder of the training runs (reused / resumed)")
    p.add_argument("--data", type=Path, default=DATA, help=f"clothing-small (default {DATA})")
    p.add_argument("--protocol", choices=("same-classes", "disjoint", "both"), default="both")
    p.add_argument("--cache", type=Path, default=None, help="feature and token cache folder")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("train_args", nargs="*", help="extra `vit-rerank train` flags after --, e.g. -- --epochs 8")
    args = p.parse_args()
    args.weights = str(Path(args.weights).resolve())
    results = {}
    if args.protocol in ("same-classes", "both"):
        results["same-classes"] = run_protocol("same-classes", args.data / "validation", args.data / "test", args)
    if args.protocol in ("disjoint", "both"):
        train, test = disjoint_folders(args.data, args.runs / "disjoint-folders")
        results["disjoint"] = run_protocol("disjoint", train, test, args)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
