"""The evaluation's outputs: a terminal table, a JSON document, a Markdown file and plots.

Metrics are fractions in [0, 1] in the JSON; tables show them x100 with the difference
from the baseline.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from indexer.atomic import write_bytes

SHORT_NAMES = {"precision_at_1": "P@1", "r_precision": "RP", "map_at_r": "MAP@R"}


def short_name(metric: str) -> str:
    if metric.startswith("recall_at_"):
        return "R@" + metric.removeprefix("recall_at_")
    return SHORT_NAMES.get(metric, metric)


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _delta(value: float, base: float) -> str:
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return ""
    return f"{100 * (value - base):+.2f}"


def table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the baseline, then each variant as ``value (difference)``."""
    metrics = doc["metric_names"]
    header = ["variant"] + [short_name(m) for m in metrics]
    base = doc["baseline"]
    rows = [["baseline (global cosine)"] + [_pct(base[m]) for m in metrics]]
    for name, values in doc["variants"].items():
        rows.append([name] + [f"{_pct(values[m])} ({_delta(values[m], base[m])})" for m in metrics])
    return header, rows


def terminal_table(doc: dict[str, Any]) -> str:
    header, rows = table_rows(doc)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out)


def calibration_line(cal: dict[str, Any]) -> str:
    """One line on a calibration's decision and its held-out evidence."""
    lo, hi = cal["gain_ci95"]
    metric = short_name(cal["metric"])
    held = (f"held-out {metric} {_pct(cal['baseline_heldout'])} -> {_pct(cal['calibrated_heldout'])} "
            f"(gain {100 * cal['gain_heldout']:+.2f}, 95% CI {100 * lo:+.2f} .. {100 * hi:+.2f}; "
            f"{cal['queries']['tuning']} tuning / {cal['queries']['heldout']} held-out queries)")
    if not cal["rerank"]:
        return f"calibration: no setting beat the baseline above noise: no rerank; {held}"
    return f"calibration: {setting_text(cal)}; {held}"


def setting_text(setting: dict[str, Any]) -> str:
    """``scorer mnn, threshold 0.5, lambda 0.5, K 100`` (ot: its marginals and s instead of the threshold)."""
    scorer = setting.get("scorer", "ot")
    core = (f"scorer mnn, threshold {setting['threshold']:g}" if scorer == "mnn"
            else f"scorer ot, marginals {setting['marginals']}, s {setting['s']:g}")
    return f"{core}, lambda {setting['lam']:g}, K {setting['rerank_k']}"


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """Counts, timings and notes in a few lines."""
    emb, t = doc["embedding"], doc["timings"]
    lines = [
        f"dataset {doc['dataset']} ({doc['protocol']} protocol) at {doc['root']}; model {doc['settings']['model']} "
        f"(weights {doc['settings']['weights_id']})",
        "counts: " + ", ".join(f"{k} {v}" for k, v in doc["counts"].items()),
        ("embedding: cached features reused (no image embedded)" if emb["cached"] else
         f"embedding: {emb['images_embedded']} images in {emb['seconds']:.2f} s "
         f"({emb['images_per_second']:.1f} img/s)"),
        f"search: {t['search_s']:.3f} s; reranking: {t['rerank_s']:.3f} s in all "
        f"({t['rerank_queries_per_s']:.1f} queries/s per scoring pass; one pass serves every mnn threshold)",
    ]
    lines += [f"  rerank {name}: {sec:.3f} s" for name, sec in doc["rerank_timings_s"].items()]
    for grid, kinds in doc.get("patch_weight_entropy", {}).items():
        lines.append(f"patch-weight mean normalised entropy ({grid}; 1 = uniform): "
                     + ", ".join(f"{kind} {value:.4f}" for kind, value in kinds.items()))
    pre = doc["settings"].get("preprocessing")
    if pre:
        lines.append(f"preprocessing: resize {pre['resize']} ({pre['interpolation']}), centre crop "
                     f"{pre['crop'][0]}x{pre['crop'][1]}, mean {pre['mean']}, std {pre['std']}")
    if doc["failures"]:
        lines.append(f"{len(doc['failures'])} images failed to load and were left out:")
        lines += [f"  {f['path']}: {f['reason']}: {f['message']}" for f in doc["failures"][:20]]
    lines += [f"note: {n}" for n in doc["notes"]]
    return lines


def markdown(doc: dict[str, Any]) -> str:
    header, rows = table_rows(doc)
    s = doc["settings"]
    parts = [
        f"# Evaluation: {doc['dataset']} with {s['model']}",
        "",
        f"- root: `{doc['root']}`",
        f"- protocol: {doc['protocol']}"
        + (" (R counts the query itself, as the reference code did)" if s.get("count_query_in_r") else ""),
        f"- weights: {s['weights_id']}; grid {s['grid']}; patch weights {s['patch_weights']}; "
        f"lambda {s['lambda']}; eps {s['eps']}",
        "- counts: " + ", ".join(f"{k} {v}" for k, v in doc["counts"].items()),
        "",
        "Metrics x100; variants show the difference from the global-cosine baseline.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "## Time",
        "",
        *(f"- {line}" for line in summary_lines(doc)[2:4]),
        *(f"- rerank {name}: {sec:.3f} s" for name, sec in doc["rerank_timings_s"].items()),
    ]
    if doc["notes"]:
        parts += ["", "## Notes", "", *(f"- {n}" for n in doc["notes"])]
    return "\n".join(parts) + "\n"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_bytes(Path(path), (json.dumps(doc, indent=2, allow_nan=True) + "\n").encode())


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    write_bytes(Path(path), markdown(doc).encode())


def _figure(doc: dict[str, Any], axis: str, series_keys: tuple[str, str]):
    """One panel per metric: the metric against ``axis`` (``s`` or ``k``), a line per value of
    ``series_keys``, the baseline dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = doc["metric_names"]
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    series: dict[tuple, list[dict]] = defaultdict(list)
    for v in doc["sweep"]:
        series[tuple(v[key] for key in series_keys)].append(v)
    for ax, metric in zip(axes, metrics):
        for key, points in series.items():
            points = sorted(points, key=lambda v: v[axis])
            xs = [v[axis] for v in points]
            ys = [100 * doc["variants"][v["name"]][metric] for v in points]
            ax.plot(xs, ys, marker="o", label=", ".join(f"{k}={val:g}" if isinstance(val, float) else f"{k}={val}"
                                                        for k, val in zip(series_keys, key)))
        ax.axhline(100 * doc["baseline"][metric], color="grey", linestyle="--", label="baseline")
        ax.set_xlabel(axis if axis == "s" else "K (candidates reranked)")
        ax.set_ylabel(f"{short_name(metric)} (x100)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{doc['dataset']}, {doc['settings']['model']}: metrics against {axis}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_plots(folder: Path, doc: dict[str, Any]) -> list[Path]:
    """``metrics_vs_s.png`` and ``metrics_vs_k.png`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for axis, keys in (("s", ("marginals", "k")), ("k", ("marginals", "s"))):
        path = folder / f"metrics_vs_{axis}.png"
        write_bytes(path, _figure(doc, axis, keys))
        written.append(path)
    return written
