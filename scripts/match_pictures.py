"""Look at the matches before believing a number: pictures of queries that reranking won and lost.

For each shared set (clothing-small test, corridor) it evaluates the ``shipped`` preset with the real
DINOv2 ViT-S/14 of ``../shared/weights`` (the evaluation's feature cache: nothing is embedded twice),
picks the queries whose top-1 reranking made right (won) and made wrong (lost), and draws, for each, the
query beside its new top-1 with the correspondences the reranker used (the same ``render_match`` the
service draws), plus one line per picture in ``index.txt``: set, query, top-1 before and after, scores
and the share of the query's matches that fall on the central half of the photo (a rough "on the object,
not the background" measure for centred product photos)::

    python scripts/match_pictures.py OUT_DIR [--per-kind 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETS = (("clothing-test", "folder", "clothing-small/test"), ("corridor", "pairs", "corridor"))


def central_share(match: np.ndarray, grid: int) -> float:
    """Of the query patches with a match, the share inside the central half of the grid (each side)."""
    rows, cols = np.divmod(np.flatnonzero(match >= 0), grid)
    lo, hi = grid / 4, 3 * grid / 4
    inside = (rows >= lo) & (rows < hi) & (cols >= lo) & (cols < hi)
    return float(inside.mean()) if len(rows) else float("nan")


def main() -> int:
    from evaluation.datasets import ClassSet, load_dataset
    from evaluation.features import cache_key, compute_features, default_cache_dir
    from evaluation.protocol import DeviceFeatures, class_ranking, place_ranking, reranked_order
    from indexer.atomic import write_bytes
    from indexer.loading import load_image
    from indexer.search_params import SHIPPED, preset, preset_patches
    from reranker.backbones import create_backbone
    from reranker.defaults import DEFAULT_MODEL, default_model_kwargs
    from reranker.mnn import correspondence_plan
    from reranker.rerank import rerank_batch
    from reranker.views import model_view
    from reranker.visualize import render_match

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-kind", type=int, default=4, help="pictures of won and of lost queries per set")
    parser.add_argument("--cache", type=Path, default=None, help="the evaluation's feature cache (default: eval's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    setting, patches = preset(SHIPPED), preset_patches(SHIPPED)
    kwargs = default_model_kwargs(DEFAULT_MODEL)
    weights = str(SHARED / "weights" / "dinov2_vits14.safetensors")
    backbone = create_backbone(DEFAULT_MODEL, weights, grid=patches["grid"], model_kwargs=kwargs,
                               patch_layer=patches["patch_layer"]).eval()
    K, lam = setting["rerank_k"], setting["lam"]
    lines = []
    for name, loader, folder in SETS:
        data = load_dataset(loader, str(SHARED / "data" / folder))
        records = data.records if isinstance(data, ClassSet) else data.queries + data.database
        key = cache_key(data.name, data.root, records, backbone, kwargs, ["uniform"])
        store = compute_features(backbone, records, key, args.cache or default_cache_dir(), progress=False)
        feats = DeviceFeatures(store, torch.device("cpu"))
        if isinstance(data, ClassSet):
            ranking, _ = class_ranking(data, store, feats, K, False)
        else:
            ranking, _ = place_ranking(data, store, feats, K)
        sigma, match, similarity = [], [], []
        for start in range(0, len(ranking.query_rows), 8):  # a few queries at a time: (8, K, n, m) cosines
            q = torch.from_numpy(ranking.query_rows[start:start + 8])
            rows = torch.from_numpy(ranking.rows[start:start + 8, :K])
            scores = torch.from_numpy(ranking.scores[start:start + 8, :K])
            res = rerank_batch(feats.features(q), feats.features(rows), scores, scorer=setting["scorer"],
                               threshold=setting["threshold"], lam=lam)
            sigma.append(res.structural_scores)
            match.append(res.matches.match)
            similarity.append(res.matches.similarity)
        sigma, match, similarity = torch.cat(sigma), torch.cat(match), torch.cat(similarity)
        order = reranked_order(ranking, sigma.numpy(), K, lam)
        before, after = ranking.relevant[:, 0], ranking.relevant[np.arange(len(order)), order[:, 0]]
        won, lost = np.flatnonzero(~before & after), np.flatnonzero(before & ~after)
        print(f"{name}: {len(won)} queries won at top-1, {len(lost)} lost, of {len(order)}", file=sys.stderr)
        for kind, picked in (("won", won[: args.per_kind]), ("lost", lost[: args.per_kind])):
            for qi in picked:
                top = int(order[qi, 0])
                plan = correspondence_plan(match[qi, top], similarity[qi, top], match.shape[-1])
                pair_match = match[qi, top].numpy()
                query_rec, cand_rec = records[ranking.query_rows[qi]], records[ranking.rows[qi, top]]
                png = render_match(model_view(load_image(query_rec.path), backbone.transform),
                                   model_view(load_image(cand_rec.path), backbone.transform), plan,
                                   grid=backbone.grid, top_matches=8, faded_matches=40,
                                   title=f"{name} {kind}: {query_rec.id} -> {cand_rec.id}")
                file = args.out / f"{name}-{kind}-{qi:03d}.png"
                write_bytes(file, png)
                lines.append(f"{file.name}\t{query_rec.id}\tbefore {records[ranking.rows[qi, 0]].id}\tafter "
                             f"{cand_rec.id}\tmatches {int((pair_match >= 0).sum())}\tsigma "
                             f"{float(sigma[qi, top]):.3f}\tcentral {central_share(pair_match, backbone.grid):.2f}")
        shares = [central_share(match[i, int(order[i, 0])].numpy(), backbone.grid) for i in range(len(order))]
        lines.append(f"# {name}: mean central share of the new top-1's matches {np.nanmean(shares):.2f} "
                     f"(uniform over the grid: 0.25)")
    (args.out / "index.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
