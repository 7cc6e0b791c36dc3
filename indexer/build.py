"""Turn image records into committed index entries: embed, dedupe, store, commit in chunks.

The one recipe every caller shares (the CLI, the demo, the benchmarks, the Ray build):
:func:`plan_index` (the manifest, checked before anything is written) →
:func:`create_index` (the index directory) → :func:`add_records`; :func:`build_index` does all
three. A build that is interrupted resumes where it stopped: rerunning :func:`add_records` skips
every id that a previous run already committed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from reranker.backbones import NAMED_WEIGHTS, Backbone, create_backbone, set_runtime, weights_identity
from reranker.defaults import DEFAULT_RUNTIME, OT_MAX_PATCHES, same_features
from reranker.features import StoredFeatures

from .atomic import write_json
from .embedding import Failure, PreDecoded, embed_records
from .image_copies import DEFAULT_SIDE as DEFAULT_COPY_SIDE, parse as parse_copies, write as write_copies
from .index_dir import IndexDir, NewImages
from .loading import LoadLimits
from .manifest import IndexMismatchError, Manifest
from .metadata import ImageRow, now_iso
from .near_duplicates import finder_for
from .sources import ImageRecord
from .stages import Stages, begin, skip

#: The stages of ``index build`` / ``index add``, in order (:class:`indexer.stages.Stages`); the command
#: announces the first two, :func:`add_records` the rest.
BUILD_STAGES = ("load the model", "list the images", "embed and store", "train the global index",
                "find near-duplicates")


@dataclass
class BuildReport:
    """What a build or an add did."""

    added: int = 0
    already_indexed: int = 0
    failures: list[Failure] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (id, id of the first copy)
    duplicates_skipped: bool = False
    # (new id, id of an indexed image, global cosine): same photo resized / re-encoded / cropped (near_duplicates)
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)
    near_duplicate_threshold: float | None = None  # None: no threshold measured for this backbone
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)  # e.g. the FAISS index was retrained (never silent)

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_second"] = self.images_per_second
        return d


def default_patch_weights(backbone: Backbone) -> str:
    """The per-image patch weights an index stores unless told: rollout where the backbone has global
    attention and its patch grid is small enough for OT (a calibration may then choose OT with them, or
    other marginals), else uniform: on a larger grid (the default 16 x 16 tokens of DINOv2 ViT-S/14)
    searches and calibration use mutual nearest neighbours, which read no weights, and the build then
    skips the attention capture (measured: the build ran at 0.77-0.89 of the bare forward with it)."""
    small_grid = backbone.grid ** 2 <= OT_MAX_PATCHES
    return "rollout" if backbone.supports_rollout and small_grid else "uniform"


def new_manifest(
    backbone: Backbone,
    *,
    patch_weights: str,
    factory: str = "Flat",
    pca_dim: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    patch_codes: str | None = None,
    max_index_memory: int | None = None,
    target_recall: float = 0.95,
    image_copies: int | str | None = None,
) -> Manifest:
    """The manifest of a new index made with ``backbone`` (its weights source and preprocessing)."""
    return Manifest(
        model=backbone.name,
        weights=backbone.weights_id,
        weights_source=backbone.weights_source,
        grid=backbone.grid,
        patch_layer=backbone.patch_layer,
        global_dim=backbone.output_dim,
        patch_dim=pca_dim or backbone.output_dim,
        patch_weights=patch_weights,
        factory=factory,
        model_kwargs=dict(model_kwargs or {}),
        preprocessing=backbone.preprocessing,
        pca_dim=pca_dim,
        patch_codes=patch_codes,
        max_index_memory=max_index_memory,
        target_recall=target_recall,
        image_copies=image_copies,
        runtime=backbone.runtime,
    )


@dataclass(frozen=True)
class IndexSpec:
    """What a new index stores and how its global index is made (the manifest's choices beyond the
    backbone). ``patch_weights=None``: :func:`default_patch_weights`."""

    patch_weights: str | None = None
    factory: str = "Flat"
    pca_dim: int | None = None
    patch_codes: str | None = None
    max_index_memory: int | None = None
    target_recall: float = 0.95
    image_copies: int | str | None = DEFAULT_COPY_SIDE  # kept in DIR/images: px, "original" or None


def plan_index(backbone: Backbone, spec: IndexSpec = IndexSpec(), model_kwargs: dict[str, Any] | None = None) -> Manifest:
    """The manifest of a new index, checked before anything is written: the backbone can give the
    patch weights (one blank image is embedded), the patch codes fit the patch width, the target
    recall is a fraction. Raises ValueError naming what is wrong."""
    from PIL import Image

    from .embedding import embed_pil_images
    from .patch_codes import parse_spec

    kind = spec.patch_weights or default_patch_weights(backbone)
    if kind != "uniform" and not backbone.supports_rollout:
        raise ValueError(f"{backbone.name!r} has no global attention for {kind} weights: use --patch-weights uniform")
    embed_pil_images(backbone, [Image.new("RGB", (64, 64))], kind)
    if spec.patch_codes:
        parse_spec(spec.patch_codes, spec.pca_dim or backbone.output_dim)
    if not 0 < spec.target_recall <= 1:
        raise ValueError("--target-recall must be in (0, 1]")
    return new_manifest(backbone, patch_weights=kind, factory=spec.factory, pca_dim=spec.pca_dim,
                        model_kwargs=model_kwargs, patch_codes=spec.patch_codes,
                        max_index_memory=spec.max_index_memory, target_recall=spec.target_recall,
                        image_copies=parse_copies(spec.image_copies))


def create_index(folder: Any, backbone: Backbone, spec: IndexSpec = IndexSpec(),
                 model_kwargs: dict[str, Any] | None = None) -> IndexDir:
    """A new, empty index directory for ``backbone`` (FileExistsError if one is there), open."""
    return IndexDir.create(folder, plan_index(backbone, spec, model_kwargs))


def build_index(folder: Any, backbone: Backbone, records: Sequence[ImageRecord], spec: IndexSpec = IndexSpec(), *,
                model_kwargs: dict[str, Any] | None = None, **add_options: Any) -> BuildReport:
    """A new index of ``records`` embedded by ``backbone`` (on its device), closed when done;
    ``add_options`` are :func:`add_records`'s."""
    with create_index(folder, backbone, spec, model_kwargs) as index_dir:
        return add_records(index_dir, backbone, records, **add_options)


def backbone_for(manifest: Manifest, device: torch.device, weights: str | None = None,
                 runtime: str | None = None) -> Backbone:
    """The backbone that made the index, checked against the manifest's weights identity, running with
    ``runtime`` (default: the index's, :mod:`reranker.backbones.runtimes`)."""
    source = weights or manifest.weights_source
    if source not in NAMED_WEIGHTS and weights_identity(source) != manifest.weights:
        raise IndexMismatchError(
            f"weights file {source!r} is not the one the index was built with ({manifest.weights})"
        )
    backbone = create_backbone(manifest.model, source, grid=manifest.grid, model_kwargs=manifest.model_kwargs,
                               patch_layer=manifest.patch_layer)
    if backbone.weights_id != manifest.weights:
        raise IndexMismatchError(f"weights {backbone.weights_id!r} differ from the index's {manifest.weights!r}")
    # float32 indexes run the fastest float32 runtime of this machine unless told otherwise (the same features)
    if runtime is None:
        runtime = DEFAULT_RUNTIME if same_features(manifest.runtime, DEFAULT_RUNTIME) else manifest.runtime
    return set_runtime(backbone.to(device), runtime)


def _is_text(value: Any) -> bool:
    """Whether ``value`` (a string, or JSON of them) is valid Unicode, which the metadata database stores."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_text(k) and _is_text(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_text(v) for v in value)
    return True


def _printable(text: str) -> str:
    """``text`` with what is not valid Unicode written as escapes: a file name's bytes as ``\\xff``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte of a file name gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _storable(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[Failure]]:
    """The records the metadata database can store, and a failure for each other: an id, path, label or
    metadata value that is not valid Unicode (a file name with a non-UTF-8 byte reads as one) would stop
    the whole build at its commit."""
    keep, failures = [], []
    for position, rec in enumerate(records):
        if _is_text([rec.id, rec.path, rec.label or "", rec.metadata]):
            keep.append(rec)
            continue
        shown_id, shown_path = _printable(rec.id), _printable(rec.path)
        failures.append(Failure(position, shown_id, shown_path, "invalid_text",
                                "the id, path, label or metadata is not valid UTF-8 text (a file name with a "
                                "byte that is not UTF-8?): rename the file or give the record a valid id"))
    return keep, failures


def add_records(
    index_dir: IndexDir,
    backbone: Backbone,
    records: Sequence[ImageRecord],
    *,
    batch_size: int = 32,
    workers: int = 2,
    commit_every: int = 1024,
    skip_duplicates: bool = False,
    limits: LoadLimits = LoadLimits(),
    progress: bool = True,
    save_report: bool = True,
    decoded: Mapping[str, PreDecoded] | None = None,
    stages: Stages | None = None,
) -> BuildReport:
    """Embed and commit every record whose id the index does not hold yet.

    With ``save_report`` the report is also written to ``DIR/reports/`` (a build's record;
    single-image adds, such as the service's, pass False). ``decoded``: images decoded already, by path
    (:data:`indexer.embedding.PreDecoded`; the service's adds: it decoded the upload within its bounds).
    ``stages``: announces :data:`BUILD_STAGES` from "embed and store" on (a command's ``stage i of n``).
    """
    start = time.perf_counter()
    report = BuildReport(duplicates_skipped=skip_duplicates)
    near = finder_for(index_dir, backbone.random_weights, report.duplicates)
    report.near_duplicate_threshold = near.threshold if near else None
    existing = index_dir.ids()
    todo = [r for r in records if r.id not in existing]
    report.already_indexed = len(records) - len(todo)
    todo, unstorable = _storable(todo)
    report.failures += unstorable
    seen = index_dir.content_hashes()
    pending_rows: list[ImageRow] = []
    pending: list[StoredFeatures] = []  # the pending rows' features, a part per batch
    pending_copies: dict[str, tuple[bytes, str]] = {}  # their images' copies, by content hash

    def flush() -> None:
        if not pending_rows:
            return
        feats = StoredFeatures.concat(pending)
        index_dir.fit_pca(feats.patch_features)  # an index of reduced patches fits its PCA on its first chunk
        feats.patch_features = index_dir.reduce_patches(feats.patch_features)
        index_dir.fit_codes(feats.patch_features)  # an index of patch codes trains them on its first chunk, like the PCA
        index_dir.commit_new(NewImages(rows=list(pending_rows), features=feats, copies=dict(pending_copies)))
        report.added += len(pending_rows)
        if near:
            near.add([row.id for row in pending_rows], feats.global_features)
        pending_rows.clear()
        pending.clear()
        pending_copies.clear()

    kind = index_dir.manifest.patch_weights
    begin(stages, "embed and store", f"{len(todo)} new images" + (
        f" ({report.already_indexed} indexed already)" if report.already_indexed else ""))
    for batch in embed_records(
        backbone, todo, kinds=(kind,), batch_size=batch_size,
        workers=workers, limits=limits, progress=progress, decoded=decoded,
        copies=index_dir.manifest.image_copies,
    ):
        report.failures += batch.failures
        keep = []
        for k, pos in enumerate(batch.positions):
            rec, digest = todo[pos], batch.hashes[k]
            if digest in seen:
                report.duplicates.append((rec.id, seen[digest]))
                if skip_duplicates:
                    continue
            else:
                seen[digest] = rec.id
            pending_rows.append(ImageRow(
                id=rec.id, path=rec.path, label=rec.label, content_hash=digest,
                width=batch.sizes[k][0], height=batch.sizes[k][1], bytes=batch.nbytes[k],
                metadata=rec.metadata, added_at=now_iso(),
            ))
            keep.append(k)
            if batch.copies and batch.copies[k] is not None:
                pending_copies.setdefault(digest, batch.copies[k])
        if keep:
            pending.append(batch.features.select(kind).take(keep))
        if len(pending_rows) >= commit_every:
            flush()
    flush()
    if not index_dir.trained and len(index_dir):
        begin(stages, "train the global index", f"{len(index_dir)} images")
        index_dir.train()
    else:
        begin(stages, "train the global index", "trained already; checking whether it has outgrown its training")
        if report.added and (notice := index_dir.retrain_if_outgrown()):
            report.notices.append(notice)
    if report.added and (notice := index_dir.codes_notice()):
        report.notices.append(notice)
    if near:
        begin(stages, "find near-duplicates", f"among {report.added} new images")
        report.near_duplicates = near.finish()
    else:
        skip(stages, "find near-duplicates", "no threshold is measured for this backbone and weights")
    report.seconds = time.perf_counter() - start
    if not save_report:
        return report
    reports = index_dir.folder / "reports"
    reports.mkdir(exist_ok=True)
    write_json(reports / f"build-{now_iso().replace(':', '')}-{index_dir.generation:08d}.json", report.to_dict())
    return report
