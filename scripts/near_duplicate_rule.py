"""Measure near-duplicate rules on copies made from the shared photos, with the real backbone.

Positives: each photo with its copies (resized to half, JPEG quality 30, cropped 6 % a side, rotated 5
degrees, and resized + cropped + re-encoded at once). Negatives: distinct photos that are as alike as
galleries get: every pair of the same clothing class, and each corridor query with the reference frames
of its place. For each pair: the global cosine, and the share of the query's patches (block -3, native
16 x 16 grid: the index default) with a mutual nearest neighbour above a patch cosine tau.

Prints precision and recall of the global-cosine rule (the measured 0.98) beside rules that also look at
the patch matches, per copy kind. Usage:

    .venv/bin/python scripts/near_duplicate_rule.py [--weights ../shared/weights/dinov2_vits14.safetensors]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.embedding import embed_pil_images  # noqa: E402
from indexer.near_duplicates import near_copies  # noqa: E402
from reranker.backbones import create_index_backbone  # noqa: E402
from reranker.defaults import default_model_kwargs  # noqa: E402
from reranker.mnn import mutual_nearest_neighbours  # noqa: E402

TAUS = (0.7, 0.8, 0.9)


def copies(image: Image.Image) -> dict[str, Image.Image]:
    out = near_copies(image)
    out["rotated"] = image.convert("RGB").rotate(5, resample=Image.Resampling.BICUBIC, expand=False)
    return out


def embed(backbone, images: list[Image.Image]):
    feats = []
    for start in range(0, len(images), 16):
        feats.append(embed_pil_images(backbone, images[start:start + 16], None))
        print(f"embedded {start + 16} of {len(images)}", file=sys.stderr, flush=True)
    g = torch.cat([f.global_features for f in feats])
    p = torch.cat([f.patch_features for f in feats])
    return g, p


def pair_scores(g, p, pairs) -> list[tuple[float, dict[float, float]]]:
    out = []
    for i, j in pairs:
        cos = float(g[i] @ g[j])
        S = p[i] @ p[j].T
        share = {tau: float(mutual_nearest_neighbours(S[None], tau).score[0]) for tau in TAUS}
        out.append((cos, share))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/weights/dinov2_vits14.safetensors"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--per-class", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = "vit_small_patch14_dinov2"
    backbone = create_index_backbone(model, args.weights, model_kwargs=default_model_kwargs(model)).eval()

    rng = random.Random(0)
    clothing = sorted((args.data / "clothing-small/validation").iterdir())
    photos = [p for cls in clothing for p in sorted(cls.glob("*.jpg"))[:args.per_class]]
    corridor_refs = sorted((args.data / "corridor/ref").glob("*.jpg"))[::2]
    originals = [Image.open(p).convert("RGB") for p in photos + corridor_refs]
    images, positives, kinds = list(originals), [], []
    for k, image in enumerate(originals):
        for kind, copy in copies(image).items():
            images.append(copy)
            positives.append((k, len(images) - 1))
            kinds.append(kind)
    # negatives: same clothing class; corridor queries with their place's reference frames
    negatives, neg_kinds = [], []
    by_class: dict[str, list[int]] = {}
    for k, p in enumerate(photos):
        by_class.setdefault(p.parent.name, []).append(k)
    for members in by_class.values():
        negatives += list(itertools.combinations(members, 2))
        neg_kinds += ["same class"] * (len(members) * (len(members) - 1) // 2)
    gt = list(csv.DictReader(open(args.data / "corridor/ground_truth.csv")))
    index_of = {}
    for row in gt:
        q = args.data / "corridor" / row[list(row)[0]]
        refs = [args.data / "corridor" / r for r in row[list(row)[1]].split() if r]
        if q.is_file():
            if q not in index_of:
                images.append(Image.open(q).convert("RGB"))
                index_of[q] = len(images) - 1
            for r in refs:
                if r.is_file():
                    if r not in index_of:
                        images.append(Image.open(r).convert("RGB"))
                        index_of[r] = len(images) - 1
                    negatives.append((index_of[q], index_of[r]))
                    neg_kinds.append("same place")
    print(f"{len(images)} images: {len(positives)} copy pairs, {len(negatives)} distinct pairs", file=sys.stderr)
    g, p = embed(backbone, images)
    pos, neg = pair_scores(g, p, positives), pair_scores(g, p, negatives)

    def rule_global(c, s, a=0.98):
        return c >= a

    rules = {"global >= 0.98 (before)": lambda c, s: c >= 0.98,
             "shipped: global >= 0.98, or >= 0.85 and matched(tau 0.7) >= 0.4":
                 lambda c, s: c >= 0.98 or (c >= 0.85 and s[0.7] >= 0.4)}
    for tau in TAUS:
        for a, b in itertools.product((0.75, 0.8, 0.85, 0.9, 0.93, 0.95), (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)):
            rules[f"global >= {a} and matched(tau {tau}) >= {b}"] = (
                lambda c, s, a=a, b=b, tau=tau: c >= a and s[tau] >= b)
    print(f"{'rule':48} {'FP':>4} {'prec':>6} {'recall':>7}  recall by copy kind")
    rows = []
    for name, rule in rules.items():
        tp = [rule(c, s) for c, s in pos]
        fp = sum(rule(c, s) for c, s in neg)
        recall = sum(tp) / len(tp)
        precision = sum(tp) / max(1, sum(tp) + fp)
        by_kind = {k: sum(t for t, kk in zip(tp, kinds) if kk == k) / kinds.count(k) for k in dict.fromkeys(kinds)}
        rows.append((fp, -recall, name, precision, recall, by_kind))
    rows.sort()
    for fp, _, name, precision, recall, by_kind in [r for r in rows if "0.98" in r[2]] + rows[:8]:
        kinds_text = " ".join(f"{k} {v:.2f}" for k, v in by_kind.items())
        print(f"{name:48} {fp:4d} {precision:6.3f} {recall:7.3f}  {kinds_text}")
    close = [s[0.7] for c, s in neg if c >= 0.85]
    print(f"distinct pairs with global >= 0.85: {len(close)}, their largest matched share (tau 0.7) "
          f"{max(close, default=0):.3f}; copies with global >= 0.85: matched share (tau 0.7) p5 "
          f"{sorted(s[0.7] for c, s in pos if c >= 0.85)[len([1 for c, _ in pos if c >= 0.85]) // 20]:.3f}")
    worst = max(c for c, _ in neg)
    print(f"distinct pairs: max global {worst:.4f}; max matched share (tau 0.9) "
          f"{max(s[0.9] for _, s in neg):.3f}")


if __name__ == "__main__":
    main()
