"""``vit-rerank index ...`` and ``vit-rerank search``: the indexer's command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reranker.defaults import (AUTO, DEFAULT_MODEL, DEFAULT_PATCH_LAYER, DEFAULT_RUNTIME, METHOD_GRID, RUNTIMES,
                               RUNTIMES_HELP, default_model_kwargs, same_features)
from reranker.device import add_device_argument
from reranker.rollout import PER_IMAGE_KINDS

from .search_params import SEARCH_PARAMS, add_search_arguments, setting_summary, settings_from_args

if TYPE_CHECKING:
    from reranker.backbones import Backbone


def _device(name: str):
    from reranker.device import resolve_device

    return resolve_device(name)


def _patch_layer(value: str) -> int | str | None:
    """``--patch-layer``: an int, ``final`` (None) or ``auto``."""
    if value.lower() in ("final", "none"):
        return None
    if value.lower() == AUTO:
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block index (e.g. -2) or 'final', got {value!r}") from None


def _new_backbone(args: argparse.Namespace, model_kwargs: dict) -> "Backbone":
    """The backbone of a new index, as its flags ask (ValueError for a layer or grid it cannot give)."""
    from reranker.backbones import create_index_backbone

    return create_index_backbone(args.model, args.weights or "pretrained", model_kwargs=model_kwargs, grid=args.grid,
                                 patch_layer=args.patch_layer)


def _check_runtime(args: argparse.Namespace, manifest) -> None:
    """Refuse adding to an index with another runtime than the one that embedded its images (a search may
    use another: the features differ by less than the rerank's resolution, docs/benchmarks.md)."""
    from .manifest import IndexMismatchError

    if args.runtime is not None and not same_features(args.runtime, manifest.runtime):
        raise IndexMismatchError(f"the index's images were embedded with the {manifest.runtime} runtime, not "
                                 f"{args.runtime}: leave --runtime out, or build a new index")


def _check_patches(args: argparse.Namespace, backbone: "Backbone") -> None:
    """Refuse ``--patch-layer`` / ``--grid`` flags that differ from the index's (IndexMismatchError)."""
    from .manifest import IndexMismatchError

    def name(layer: int | None) -> str:
        return "final" if layer is None else str(layer)

    if args.patch_layer != AUTO:
        asked = None if args.patch_layer is None else args.patch_layer % max(backbone.depth, 1)
        if asked != backbone.patch_layer:
            raise IndexMismatchError(f"the index reads its patches from layer {name(backbone.patch_layer)}, not "
                                     f"{name(args.patch_layer)}: leave --patch-layer out, or build a new index "
                                     "(patch layer is fixed when an index is made)")
    if args.grid is not None and backbone.grid_side(args.grid) != backbone.grid:
        raise IndexMismatchError(f"the index's patch grid is {backbone.grid} x {backbone.grid}, not {args.grid}: "
                                 "leave --grid out, or build a new index")


def _embed_options(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm / HF backbone name (default {DEFAULT_MODEL})")
        p.add_argument("--model-kwargs", default=None,
                       help='JSON of extra model constructor arguments (default for DINOv2: {"img_size": 224})')
        p.add_argument("--grid", type=int, default=None,
                       help="patch grid side G; 0: the backbone's own token grid, unpooled (default: 0 on a plain "
                            f"ViT, {METHOD_GRID} elsewhere)")
        p.add_argument("--patch-layer", type=_patch_layer, default=AUTO,
                       help="the block whose output is the patch grid, counted like Python indices (-2: the "
                            "second-to-last); 'final': the final output after the norm, as the paper (default: "
                            f"{DEFAULT_PATCH_LAYER} on a plain ViT, final elsewhere)")
    p.add_argument("--weights", default=None, help="pretrained | random | PATH (default: pretrained, or the index's)")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help=f"how the model runs: {RUNTIMES_HELP} (docs/benchmarks.md, Runtimes); default: auto for a "
                        "new index, else the index's (auto for a float32 one)")
    add_device_argument(p)


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="image folder, or a CSV / JSON-lines manifest")
    p.add_argument("--label-from-parent", action="store_true", help="use each image's parent folder as its label")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    p.add_argument("--commit-every", type=int, default=1024, help="images per atomic commit")
    p.add_argument("--skip-duplicates", action="store_true", help="skip images whose content is already indexed")
    p.add_argument("--no-progress", action="store_true")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``index ...`` and ``search`` (higher layers add theirs to ``index`` through
    :func:`subcommands_of`: ``index calibrate`` comes from the evaluation package)."""
    sub = commands
    index = sub.add_parser("index", help="build and manage an index directory")
    which = index.add_subparsers(dest="index_command", required=True)

    build = which.add_parser("build", help="index a gallery (resumes an interrupted build)")
    build.add_argument("dir", type=Path)
    _source_options(build)
    _embed_options(build)
    build.add_argument("--patch-weights", default=None, choices=list(PER_IMAGE_KINDS),
                       help="per-image patch weights (default: rollout where the backbone has global attention)")
    build.add_argument("--factory", default="Flat",
                       help="FAISS factory string (Flat, IVF1024,Flat, HNSW32, ...), or auto: chosen by the gallery's "
                            "size and --max-index-memory, nprobe/efSearch tuned for --target-recall")
    build.add_argument("--max-index-memory", default=None,
                       help="memory budget of the global index for --factory auto, e.g. 512M or 4G (default 4G)")
    build.add_argument("--target-recall", type=float, default=0.95,
                       help="recall@100 against exact search that auto tunes nprobe/efSearch for (default 0.95)")
    build.add_argument("--pca-dim", type=int, default=None, help="reduce stored patch vectors to this size")
    build.add_argument("--image-copies", default="1024", metavar="PX|original|none",
                       help="keep a copy of each image in DIR/images, so that the index shows its images without "
                            "the source folder: reduced to PX on the longer side (JPEG; default 1024, about 0.1 MB a "
                            "photo), the original files (original), or none (the index points at the sources)")
    build.add_argument("--patch-codes", default=None,
                       help="store patches as product-quantizer codes, e.g. pq32 (32 bytes a patch) or opq32 "
                            "(a learned rotation first; slow to train); trained on the first committed chunk")
    build.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="embed on a Ray cluster and write --shards shard indexes (no ADDRESS: RAY_ADDRESS, "
                            "else the local `ray start` cluster, else a new local one)")
    build.add_argument("--shards", type=int, default=None, help="shard index directories (with --ray; default 1)")
    build.add_argument("--actors", type=int, default=None,
                       help="model actors (with --ray; default: one per GPU, else one per CPU of the cluster)")
    build.add_argument("--gpus-per-actor", type=float, default=None,
                       help="GPUs per model actor (with --ray; default 1 where the cluster has GPUs, else 0)")
    build.set_defaults(handler=_build)

    add = which.add_parser("add", help="add images to an existing index")
    add.add_argument("dir", type=Path)
    _source_options(add)
    _embed_options(add, with_model=False)
    add.set_defaults(handler=_add)

    remove = which.add_parser("remove", help="remove images by id")
    remove.add_argument("dir", type=Path)
    remove.add_argument("ids", nargs="+")
    remove.set_defaults(handler=_remove)

    info = which.add_parser("info", help="counts, model, sizes, bytes per image")
    info.add_argument("dir", type=Path)
    info.add_argument("--json", action="store_true")
    info.add_argument("--recall-queries", type=int, default=100,
                      help="gallery vectors used as queries to measure recall@100 against exact search (0: skip)")
    info.set_defaults(handler=_info)

    dups = which.add_parser("duplicates", help="exact and near-duplicate images, as text, JSON or CSV, with pictures")
    dups.add_argument("dir", type=Path)
    dups.add_argument("--threshold", type=float, default=None,
                      help="global cosine of a near-duplicate pair (default: the backbone's measured one)")
    dups.add_argument("--json", action="store_true")
    dups.add_argument("--csv", type=Path, default=None, help="also write the pairs to this CSV file")
    dups.add_argument("--pictures", type=Path, default=None, help="write a picture of each pair here")
    dups.add_argument("--limit", type=int, default=100, help="pictures of at most this many pairs (default 100)")
    dups.set_defaults(handler=_duplicates)

    export = which.add_parser("export", help="write the images' global vectors and metadata as Parquet")
    export.add_argument("dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="the .parquet file to write")
    export.set_defaults(handler=_export)

    verify = which.add_parser("verify", help="check that FAISS, the patch store and the metadata agree")
    verify.add_argument("dir", type=Path)
    verify.set_defaults(handler=_verify)

    search = sub.add_parser("search", help="search an index with a query image")
    search.add_argument("image", type=Path, help="the query image; or a folder or manifest (.csv, .jsonl): each "
                                                 "of its images as a query (with --json: one JSON line each)")
    search.add_argument("--batch-size", type=int, default=16, help="queries embedded together (a folder)")
    search.add_argument("--index", type=Path, required=True)
    add_search_arguments(search)
    search.add_argument("--json", action="store_true")
    search.add_argument("--explain", type=Path, default=None, help="write each result's matching picture here")
    search.add_argument("--where", default=None, metavar="JSON",
                        help='only images that match: {"label": "hat"}, {"label": ["hat", "shoes"], "color": "red"} '
                             "(other keys: metadata fields)")
    _embed_options(search, with_model=False)
    search.set_defaults(handler=_search)


def subcommands_of(commands: argparse._SubParsersAction, name: str) -> argparse._SubParsersAction:
    """The subcommands of the registered command ``name`` (e.g. ``index``), to add one to them."""
    parser = commands.choices[name]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def model_kwargs_arg(model: str, text: str | None) -> dict:
    """``--model-kwargs`` as a dict: the model's defaults when not given."""
    if text is None:
        return default_model_kwargs(model)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError("--model-kwargs must be a JSON object")
    return value


def _records(args):
    from .sources import from_source

    return from_source(args.source, label_from_parent=args.label_from_parent)


def _print_report(report) -> None:
    print(f"added {report.added} images in {report.seconds:.1f} s ({report.images_per_second:.1f} img/s); "
          f"{report.already_indexed} already indexed")
    if report.duplicates:
        verb = "skipped" if report.duplicates_skipped else "kept"
        print(f"{len(report.duplicates)} exact duplicates ({verb}):")
        for dup, first in report.duplicates[:20]:
            print(f"  {dup}  = {first}")
    if report.near_duplicates:  # resized / re-encoded / cropped copies (indexer.near_duplicates)
        print(f"{len(report.near_duplicates)} near-duplicate pairs (kept; global cosine >= "
              f"{report.near_duplicate_threshold}):")
        for new, other, cosine in report.near_duplicates[:20]:
            print(f"  {new}  ~ {other}  (cosine {cosine:.4f})")
    for notice in getattr(report, "notices", []):
        print(f"note: {notice}")
    if report.failures:
        print(f"{len(report.failures)} files skipped:")
        for f in report.failures:
            print(f"  {f.path}: {f.reason}: {f.message}")


def _index_labels_by_parent(index_dir) -> bool | None:
    """How the index's images are labelled: True when every labelled one is labelled by its parent folder,
    False when otherwise, None when none has a label."""
    labelled = [r for r in index_dir.rows() if r.label is not None]
    if not labelled:
        return None
    return all(r.label == Path(r.path).parent.name for r in labelled)


def _records_for(index_dir, args):
    """The records to add, labelled the way the index's images are: a folder added to an index labelled by
    parent folders is labelled the same way without ``--label-from-parent``; unlabelled records going into a
    labelled index are warned about."""
    records = _records(args)
    if args.label_from_parent or not len(index_dir) or not records:
        return records
    by_parent = _index_labels_by_parent(index_dir)
    if by_parent and Path(args.source).is_dir():
        print("labelling the new images by their parent folders, as the index's images are "
              "(pass --label-from-parent to say so)", file=sys.stderr)
        args.label_from_parent = True
        return _records(args)
    unlabelled = sum(r.label is None for r in records)
    if by_parent is not None and unlabelled:
        print(f"warning: {unlabelled} of the {len(records)} new images have no label, in an index whose images "
              "have labels (give them in the manifest's label column)", file=sys.stderr)
    return records


def _stages(args):
    from .build import BUILD_STAGES
    from .stages import Stages

    return Stages(BUILD_STAGES, enabled=not args.no_progress)


def _run_add(index_dir, backbone, args, stages) -> int:
    from .build import add_records

    stages.begin("list the images", str(args.source))
    report = add_records(
        index_dir, backbone, _records_for(index_dir, args), batch_size=args.batch_size, workers=args.workers,
        commit_every=args.commit_every, skip_duplicates=args.skip_duplicates, progress=not args.no_progress,
        stages=stages,
    )
    stages.finish()
    _print_report(report)
    return 0


def _build(args) -> int:
    from reranker.backbones import create_backbone, set_runtime

    from .build import backbone_for, create_index
    from .index_dir import IndexDir

    if args.ray is not None or args.shards is not None:
        return _build_sharded(args)
    device = _device(args.device)
    stages = _stages(args)
    stages.begin("load the model", args.model if not (args.dir / "manifest.json").exists() else "the index's")
    if (args.dir / "manifest.json").exists():
        index_dir = IndexDir.open(args.dir)
        index_dir.manifest.check_compatible(args.model, None)
        _check_runtime(args, index_dir.manifest)
        backbone = backbone_for(index_dir.manifest, device, args.weights)
        _check_patches(args, backbone)
        print(f"resuming the build in {args.dir} ({len(index_dir)} images already indexed)")
    else:
        model_kwargs = model_kwargs_arg(args.model, args.model_kwargs)
        backbone = set_runtime(_new_backbone(args, model_kwargs).to(device), args.runtime or DEFAULT_RUNTIME)
        index_dir = create_index(args.dir, backbone, _index_spec(args), model_kwargs)  # checked before it is written
    if backbone.random_weights:
        print("note: random weights: results are meaningless except for testing", file=sys.stderr)
    with index_dir:
        return _run_add(index_dir, backbone, args, stages)


def _build_sharded(args) -> int:
    """``index build DIR --ray [ADDRESS] --shards N``: see :mod:`indexer.distributed_build`."""
    from reranker.backbones import create_backbone

    from .build import plan_index
    from .distributed_build import build_sharded, connect
    from .shards import ShardLayout

    manifest = None
    if ShardLayout.exists(args.dir):
        print(f"resuming the sharded build in {args.dir}")
    else:
        model_kwargs = model_kwargs_arg(args.model, args.model_kwargs)
        backbone = _new_backbone(args, model_kwargs)
        manifest = plan_index(backbone, _index_spec(args), model_kwargs)  # checked before any shard is written
        if backbone.random_weights:
            print("note: random weights: results are meaningless except for testing", file=sys.stderr)
    connect(args.ray or None)
    import ray

    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
    report = build_sharded(
        args.dir, args.source, shards=args.shards or (None if manifest is None else 1), manifest=manifest,
        weights=args.weights, actors=args.actors, gpus_per_actor=gpus, batch_size=args.batch_size,
        commit_every=args.commit_every, skip_duplicates=args.skip_duplicates,
        label_from_parent=args.label_from_parent, progress=not args.no_progress,
    )
    _print_report(report)
    print(f"{report.actors} model actors; images per shard: {report.shard_images}")
    return 0


def _index_spec(args):
    """The new index's :class:`indexer.build.IndexSpec` from the build options."""
    from .build import IndexSpec
    from .index_plan import parse_bytes

    memory = parse_bytes(args.max_index_memory) if args.max_index_memory else None
    return IndexSpec(patch_weights=args.patch_weights, factory=args.factory, pca_dim=args.pca_dim,
                     patch_codes=args.patch_codes, max_index_memory=memory, target_recall=args.target_recall,
                     image_copies=args.image_copies)


def _add(args) -> int:
    from .build import backbone_for
    from .index_dir import IndexDir

    stages = _stages(args)
    with IndexDir.open(args.dir) as index_dir:
        _check_runtime(args, index_dir.manifest)
        stages.begin("load the model", index_dir.manifest.model)
        return _run_add(index_dir, backbone_for(index_dir.manifest, _device(args.device), args.weights), args, stages)


def _remove(args) -> int:
    from .index_dir import IndexDir

    with IndexDir.open(args.dir) as index_dir:
        unknown = index_dir.remove(args.ids)
        print(f"removed {len(args.ids) - len(unknown)} images; {len(index_dir)} remain")
        if unknown:
            print(f"not in the index: {', '.join(unknown)}", file=sys.stderr)
            return 1
    return 0


def _info(args) -> int:
    from .index_dir import IndexDir

    with IndexDir.open(args.dir) as index_dir:
        info = index_dir.info()
        if args.recall_queries and index_dir.manifest.factory != "Flat":  # exact search needs no check
            info["recall_vs_exact"] = index_dir.recall(queries=args.recall_queries)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>22}: {shown_value(value)}")
    return 0


def shown_value(value: Any) -> str:
    """A value of ``index info`` for a person: no Python reprs (``None``, dicts, 14-decimal floats)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {shown_value(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(shown_value(v) for v in value) or "-"
    return str(value)


def _duplicates(args) -> int:
    from .atomic import write_bytes
    from .duplicates import find_duplicates, pair_picture
    from .index_dir import IndexDir

    with IndexDir.open(args.dir) as index_dir:
        report = find_duplicates(index_dir, args.threshold)
        if args.pictures is not None:
            args.pictures.mkdir(parents=True, exist_ok=True)
            rows = {r.id: r for r in index_dir.rows()}
            pairs = [(g[0], other, 1.0, "exact") for g in report.exact for other in g[1:]]
            pairs += [(a, b, c, "near") for a, b, c in report.near]
            for k, (a, b, c, kind) in enumerate(pairs[:args.limit], 1):
                png = pair_picture(index_dir.image_file(rows[a]), index_dir.image_file(rows[b]),
                                   f"{kind} {c:.4f}: {a}  ~  {b}")
                write_bytes(args.pictures / f"{k:03d}-{kind}.png", png)
    if args.csv is not None:
        report.write_csv(args.csv)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(f"{sum(len(g) - 1 for g in report.exact)} exact duplicates in {len(report.exact)} groups; "
          f"{len(report.near)} near-duplicate pairs (global cosine >= {report.threshold})")
    for group in report.exact:
        print(f"  exact: {'  = '.join(group)}")
    for a, b, c in report.near:
        print(f"  near {c:.4f}: {a}  ~  {b}")
    if args.pictures is not None:
        print(f"pictures in {args.pictures}", file=sys.stderr)
    return 0


def _export(args) -> int:
    from .export import export_parquet
    from .index_dir import IndexDir

    with IndexDir.open(args.dir) as index_dir:
        written = export_parquet(index_dir, args.out)
    print(f"wrote {written} images to {args.out}")
    return 0


def _verify(args) -> int:
    from .index_dir import IndexDir

    with IndexDir.open(args.dir) as index_dir:
        report = index_dir.verify()
    print(f"checked {report.checked} images: {'OK' if report.ok else 'PROBLEMS'}")
    for p in report.problems:
        print(f"  {p}")
    return 0 if report.ok else 1


def _search(args) -> int:
    from .build import backbone_for
    from .index_dir import IndexDir
    from .filters import parse as parse_filter
    from .loading import load_image
    from .near_duplicates import near_duplicate_flags
    from .search import Searcher, SearchSettings

    where = parse_filter(args.where)
    many = args.image.is_dir() or args.image.suffix.lower() in (".csv", ".jsonl", ".ndjson")
    image = None if many else load_image(args.image)
    device = _device(args.device)
    with IndexDir.open(args.index) as index_dir:
        searcher = Searcher(index_dir, backbone_for(index_dir.manifest, device, args.weights, args.runtime), device)
        values = settings_from_args(args)
        settings = SearchSettings(**{**values, "marginals": values["marginals"] or "auto"})
        if many:
            return _search_many(args, searcher, settings, where, index_dir)
        result = searcher.search([image], settings, keep_plans=True, where=where)[0]
        if args.explain is not None:
            _write_explanations(args.explain, image, result, index_dir, searcher.backbone.transform)
        near = near_duplicate_flags(index_dir.manifest, searcher.backbone.random_weights, result)
    if args.json:
        print(json.dumps(_result_json(result, near), indent=2))
        return 0
    _print_result(result, searcher, near)
    return 0


def _result_json(result, near: dict | None = None) -> dict:
    return {
        "results": [{**h.__dict__, "near_duplicate": (near or {}).get(h.id)} for h in result.hits],
        "timings_ms": result.timings_ms,
        "settings": {SEARCH_PARAMS[k].public_name: v for k, v in result.settings.values().items()},
        "marginals": result.marginals,
        "random_weights": result.random_weights,
    }


def _search_many(args, searcher, settings, where, index_dir) -> int:
    """``search FOLDER|MANIFEST``: every image of a source as a query, ``--batch-size`` at a time; with
    ``--json`` one JSON line per query (``query``, ``path``, and the results, or ``error``)."""
    from tqdm.auto import tqdm

    from .loading import ImageLoadError, load_image
    from .near_duplicates import near_duplicate_flags
    from .sources import from_source

    records = from_source(args.image)
    failed = 0
    bar = tqdm(total=len(records), unit="query", desc="searching", disable=None,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, len(records), args.batch_size):
            batch, images = [], []
            for rec in records[start:start + args.batch_size]:
                try:
                    images.append(load_image(rec.path))
                    batch.append(rec)
                except ImageLoadError as err:
                    failed += 1
                    _emit(args, {"query": rec.id, "path": rec.path, "error": f"{err.reason}: {err.message}"})
            results = searcher.search(images, settings, keep_plans=True, where=where) if images else []
            for rec, image, result in zip(batch, images, results):
                near = near_duplicate_flags(index_dir.manifest, searcher.backbone.random_weights, result)
                if args.explain is not None:
                    _write_explanations(args.explain / _safe_name(rec.id), image, result, index_dir,
                                        searcher.backbone.transform)
                if args.json:
                    _emit(args, {"query": rec.id, "path": rec.path, **_result_json(result, near)})
                else:
                    print(f"\n== {rec.id}")
                    _print_result(result, searcher, near)
            bar.update(len(records[start:start + args.batch_size]))
    finally:
        bar.close()
    print(f"searched {len(records) - failed} images; {failed} could not be read", file=sys.stderr)
    return 1 if failed else 0


def _emit(args, line: dict) -> None:
    if args.json:
        print(json.dumps(line), flush=True)
    else:
        print(f"{line['query']}: {line.get('error')}", file=sys.stderr)


def _print_result(result, searcher, near: dict | None = None) -> None:
    if result.random_weights:
        print("note: random weights: results are meaningless except for testing")
    st = result.settings
    print(f"settings: {setting_summary(st.values())}"
          + (" (the index's calibration)" if searcher.calibration is not None else ""))
    print(f"{'after':>5} {'before':>6}  {'final':>7} {'global':>7} {'struct':>7}  id (label)")
    for h in result.hits:
        struct = "-" if h.structural_score is None else f"{h.structural_score:7.4f}"
        print(f"{h.rank_after:>5} {h.rank_before:>6}  {h.final_score:7.4f} {h.global_score:7.4f} {struct:>7}  "
              f"{h.id} ({h.label})" + ("  [near-duplicate]" if (near or {}).get(h.id) else ""))
    t = result.timings_ms
    print(f"embed {t['embed']:.1f} ms, search {t['search']:.1f} ms, rerank {t['rerank']:.1f} ms, total {t['total']:.1f} ms")


def _write_explanations(folder: Path, query, result, index_dir, transform) -> None:
    from reranker.views import model_view
    from reranker.visualize import render_match

    from .atomic import write_bytes
    from .loading import load_image

    folder.mkdir(parents=True, exist_ok=True)
    grid = index_dir.manifest.grid
    written = 0
    for h in result.hits:
        pair = result.pairs.get(h.id)
        if pair is None:
            continue
        # the same picture as the service's: the pair's correspondences, heat map of the masses the scorer used
        png = render_match(model_view(query, transform), model_view(load_image(h.image_file or h.path), transform),
                           pair.plan, grid=grid, query_weights=pair.query_mass, candidate_weights=pair.candidate_mass,
                           title=f"#{h.rank_after + 1} (was #{h.rank_before + 1})  {h.id}  final {h.final_score:.3f}")
        write_bytes(folder / f"{h.rank_after + 1:03d}-{_safe_name(h.id)}.png", png)
        written += 1
    print(f"{written} explanation pictures in {folder}", file=sys.stderr)


def _safe_name(image_id: str) -> str:
    """A gallery id as a short, safe file-name part."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:80] or "image"
