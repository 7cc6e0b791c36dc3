"""Near-duplicates (issue 14): threshold, pair finding, the build report and the search flag.

The real-backbone tests make near copies of shared photos (resized, re-encoded, cropped a little)
and check that they, and only they, are reported and flagged with the measured threshold.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.near_duplicates import near_copies, near_duplicate_pairs, threshold_for

MODEL = "vit_small_patch14_dinov2"


def test_the_default_backbone_has_a_measured_threshold():
    t = threshold_for(MODEL)
    assert t is not None and 0.5 < t < 1.0
    assert threshold_for(MODEL, random_weights=True) is None
    assert threshold_for("test_vit") is None


def test_near_copies_are_resized_reencoded_and_cropped():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    copies = near_copies(photo)
    assert copies["resized"].size == (150, 100)
    assert copies["jpeg30"].size == (300, 200) and copies["jpeg30"].format == "JPEG"
    assert copies["cropped"].size == (300 - 2 * 18, 200 - 2 * 12)
    assert copies["all"].size == (150 - 2 * 9, 100 - 2 * 6)


def test_pairs_above_the_threshold_without_the_exact_ones():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 16))
    vectors = np.concatenate([base, base[:2] + 0.05 * rng.normal(size=(2, 16))])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = ["a", "b", "c", "a-copy", "b-copy"]
    pairs = near_duplicate_pairs(vectors, ids, 0.95)
    assert {frozenset(p[:2]) for p in pairs} == {frozenset(("a", "a-copy")), frozenset(("b", "b-copy"))}
    assert all(p[2] >= 0.95 for p in pairs) and pairs == sorted(pairs, key=lambda p: -p[2])
    pairs = near_duplicate_pairs(vectors, ids, 0.95, exclude={frozenset(("b", "b-copy"))})
    assert [p[:2] for p in pairs] == [("a", "a-copy")]


# --- with the real backbone, on shared photos -------------------------------------------------
@pytest.fixture(scope="module")
def near_copy_folder(shared_data, tmp_path_factory) -> dict:
    """Five distinct dresses (same class: the hard case), two near copies of one (resized to half, as
    PNG; re-encoded as a JPEG of quality 30), one of another (re-encoded), an exact copy of a third."""
    folder = tmp_path_factory.mktemp("near") / "photos"
    folder.mkdir()
    originals = sorted((shared_data / "clothing-small" / "test" / "dress").glob("*.jpg"))[:5]
    for p in originals:
        shutil.copy(p, folder / p.name)
    a, b, c = originals[:3]
    copies = near_copies(Image.open(a))
    copies["resized"].save(folder / f"{a.stem}-resized.png")
    copies["jpeg30"].save(folder / f"{a.stem}-q30.jpg", quality=95)
    near_copies(Image.open(b))["jpeg30"].save(folder / f"{b.stem}-q30.jpg", quality=95)
    shutil.copy(c, folder / f"{c.stem}-exact.jpg")
    family = {p.name: p.stem for p in originals}
    family.update({f"{a.stem}-resized.png": a.stem, f"{a.stem}-q30.jpg": a.stem, f"{b.stem}-q30.jpg": b.stem,
                   f"{c.stem}-exact.jpg": c.stem})
    must = {frozenset((a.name, f"{a.stem}-resized.png")), frozenset((a.name, f"{a.stem}-q30.jpg")),
            frozenset((b.name, f"{b.stem}-q30.jpg"))}
    return {"folder": folder, "family": family, "must": must, "exact": frozenset((c.name, f"{c.stem}-exact.jpg")),
            "query": copies["resized"], "original": a.name}


@pytest.fixture(scope="module")
def real_index(near_copy_folder, real_weights, tmp_path_factory):
    from indexer.build import add_records, new_manifest
    from indexer.index_dir import IndexDir
    from indexer.sources import ImageRecord
    from reranker.backbones import create_backbone
    from reranker.defaults import default_model_kwargs

    kwargs = default_model_kwargs(MODEL)
    backbone = create_backbone(MODEL, str(real_weights), model_kwargs=kwargs)
    folder = tmp_path_factory.mktemp("near-index") / "index"
    manifest = new_manifest(backbone, patch_weights="rollout", model_kwargs=kwargs)
    records = [ImageRecord(str(p), p.name, "dress") for p in sorted(near_copy_folder["folder"].iterdir())]
    with IndexDir.create(folder, manifest) as gallery:
        report = add_records(gallery, backbone, records, workers=0, progress=False, commit_every=4)
    return folder, report


@pytest.mark.real_backbone
@pytest.mark.shared
@pytest.mark.slow
def test_the_build_reports_near_copies_and_only_them(real_index, near_copy_folder, capsys):
    from indexer.cli import _print_report

    _, report = real_index
    assert report.added == 9
    assert {frozenset(d) for d in report.duplicates} == {near_copy_folder["exact"]}
    found = {frozenset(p[:2]) for p in report.near_duplicates}
    family = near_copy_folder["family"]
    # every copy is found with its original; no pair joins two distinct dresses; the exact copy is not repeated
    assert near_copy_folder["must"] <= found, report.near_duplicates
    assert all(len({family[i] for i in pair}) == 1 for pair in found), report.near_duplicates
    assert near_copy_folder["exact"] not in found
    assert report.near_duplicate_threshold == threshold_for(MODEL)
    assert all(c >= report.near_duplicate_threshold for *_, c in report.near_duplicates)
    _print_report(report)
    out = capsys.readouterr().out
    assert "1 exact duplicates" in out and f"{len(found)} near-duplicate pairs" in out


@pytest.mark.real_backbone
@pytest.mark.shared
@pytest.mark.slow
def test_search_flags_the_near_copy_of_the_query(real_index, near_copy_folder):
    from service_support import make_client

    folder, _ = real_index
    buf = io.BytesIO()
    near_copy_folder["query"].save(buf, format="JPEG", quality=90)  # the resized copy of the original
    with make_client(folder) as client:
        body = client.post("/search", files={"image": ("q.jpg", buf.getvalue(), "image/jpeg")},
                           data={"top_k": "9", "rerank_k": "9"}).json()
        flagged = {h["id"] for h in body["results"] if h["near_duplicate"]}
        assert near_copy_folder["original"] in flagged
        family = near_copy_folder["family"]
        assert {family[i] for i in flagged} == {Path(near_copy_folder["original"]).stem}, body["results"]
        hit = next(h for h in body["results"] if h["id"] == near_copy_folder["original"])
        assert client.get(hit["explanation_json_url"]).json()["near_duplicate"] is True


def test_the_structural_rule_needs_both_the_cosine_and_the_patch_matches():
    import torch

    from indexer.manifest import Manifest
    from indexer.near_duplicates import is_near_duplicate

    def manifest(**kw):
        base = dict(model=MODEL, weights="w", weights_source="pretrained", grid=16, global_dim=8, patch_dim=8,
                    patch_weights="rollout", patch_layer=9)
        return Manifest(**{**base, **kw})

    torch.manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(256, 384), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(256, 384), dim=-1)
    m = manifest()
    assert is_near_duplicate(m, False, 0.99) is True  # the cosine alone
    assert is_near_duplicate(m, False, 0.90) is False  # no patches given: the cosine rule
    assert is_near_duplicate(m, False, 0.90, patches, patches) is True  # every patch matched
    assert is_near_duplicate(m, False, 0.90, patches, other) is False
    assert is_near_duplicate(m, False, 0.80, patches, patches) is False  # under the rule's cosine
    assert is_near_duplicate(manifest(patch_layer=None, grid=7), False, 0.90, patches, patches) is False
    assert is_near_duplicate(manifest(pca_dim=4), False, 0.90, patches, patches) is False
    assert is_near_duplicate(m, True, 0.99) is None and is_near_duplicate(manifest(model="test_vit"), False, 1.0) is None


@pytest.fixture(scope="module")
def cropped_index(shared_data, real_weights, tmp_path_factory):
    """Six distinct dresses and a 6 %-cropped copy of each, indexed with the default patch features."""
    from indexer.build import IndexSpec, add_records, create_index
    from indexer.sources import ImageRecord
    from reranker.backbones import create_index_backbone
    from reranker.defaults import default_model_kwargs

    folder = tmp_path_factory.mktemp("cropped") / "photos"
    folder.mkdir()
    originals = sorted((shared_data / "clothing-small" / "validation" / "dress").glob("*.jpg"))[:6]
    records = []
    for p in originals:
        shutil.copy(p, folder / p.name)
        near_copies(Image.open(p))["cropped"].save(folder / f"{p.stem}-cropped.png")
        records += [ImageRecord(str(folder / p.name), p.name, "dress"),
                    ImageRecord(str(folder / f"{p.stem}-cropped.png"), f"{p.stem}-cropped.png", "dress")]
    kwargs = default_model_kwargs(MODEL)
    backbone = create_index_backbone(MODEL, str(real_weights), model_kwargs=kwargs)
    index = tmp_path_factory.mktemp("cropped-index") / "index"
    with create_index(index, backbone, IndexSpec(), kwargs) as gallery:
        report = add_records(gallery, backbone, records, workers=0, progress=False)
    return index, report, originals


@pytest.mark.real_backbone
@pytest.mark.shared
@pytest.mark.slow
def test_cropped_copies_are_found_by_their_patch_matches(cropped_index):
    """A 6 % crop falls under the 0.98 cosine about six times in ten; the patch matches find it."""
    _, report, originals = cropped_index
    pairs = {frozenset(p[:2]): p[2] for p in report.near_duplicates}
    expected = {frozenset((p.name, f"{p.stem}-cropped.png")) for p in originals}
    assert set(pairs) <= expected, report.near_duplicates  # never two distinct dresses
    assert len(set(pairs) & expected) >= 5, report.near_duplicates
    assert any(c < threshold_for(MODEL) for c in pairs.values()), pairs  # found by structure, not the cosine


@pytest.mark.real_backbone
@pytest.mark.shared
@pytest.mark.slow
def test_an_add_answers_with_the_images_it_copies(cropped_index, tmp_path):
    from service_support import copy_index, make_client

    index, _, originals = cropped_index
    folder = copy_index(index, tmp_path / "index")
    buf = io.BytesIO()
    near_copies(Image.open(originals[0]))["cropped"].save(buf, format="JPEG", quality=90)
    with make_client(folder, api_key=None) as client:
        r = client.post("/index/images", files={"image": ("copy.jpg", buf.getvalue(), "image/jpeg")},
                        data={"id": "another-copy"})
        assert r.status_code == 201, r.text
        near = {n["id"] for n in r.json()["near_duplicates"]}
        assert near and near <= {originals[0].name, f"{originals[0].stem}-cropped.png"}, r.json()
        buf2 = io.BytesIO()
        near_copies(Image.open(originals[1]))["cropped"].save(buf2, format="JPEG", quality=95)
        body = client.post("/search", files={"image": ("q.jpg", buf2.getvalue(), "image/jpeg")},
                           data={"top_k": "5"}).json()
        flagged = {h["id"] for h in body["results"] if h["near_duplicate"]}
        assert originals[1].name in flagged and flagged <= {originals[1].name, f"{originals[1].stem}-cropped.png"}


def test_the_share_read_off_the_matches_is_the_share_matched_again():
    """The search's MNN matches made at a lower threshold give, above ``tau``, the very share a new matching
    at ``tau`` gives (mutuality does not depend on the threshold)."""
    import torch

    from indexer.near_duplicates import matched_share, share_of_matches
    from reranker.mnn import correspondence_plan, mutual_nearest_neighbours

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(64, 32), dim=-1)
    noise = torch.linspace(0.02, 0.35, 64)[:, None] * torch.randn(64, 32)  # cosines from ~1 down to ~0.3
    c = torch.nn.functional.normalize(q[torch.randperm(64)] + noise, dim=-1)
    found = mutual_nearest_neighbours((q @ c.T)[None], 0.5)
    plan = correspondence_plan(found.match, found.similarity, 64)[0]
    for tau in (0.5, 0.6, 0.7, 0.8):
        share = matched_share(q, c, tau)
        assert share_of_matches(plan, tau) == share
    assert 0 < matched_share(q, c, 0.8) < matched_share(q, c, 0.6) < matched_share(q, c, 0.5)  # a real range


@pytest.mark.real_backbone
@pytest.mark.shared
@pytest.mark.slow
def test_search_flags_from_its_own_matches_equal_the_flags_matched_again(cropped_index, real_weights):
    """A search reads each hit's share off its MNN matches; matching every pair again gives the same flags,
    and the cropped copy, under the 0.98 cosine, is flagged by its structure."""
    import dataclasses

    from indexer.index_dir import IndexDir
    from indexer.near_duplicates import near_duplicate_flags
    from indexer.search import Searcher, SearchSettings
    from indexer.loading import load_image
    from reranker.backbones import create_index_backbone
    from reranker.defaults import default_model_kwargs

    index, _, originals = cropped_index
    backbone = create_index_backbone(MODEL, str(real_weights), model_kwargs=default_model_kwargs(MODEL))
    with IndexDir.open(index) as gallery:
        searcher = Searcher(gallery, backbone)
        result = searcher.search([load_image(originals[0])], SearchSettings(top_k=12, rerank_k=12),
                                 keep_plans=True)[0]
        assert result.settings.scorer == "mnn" and result.settings.threshold <= 0.7
        read_off = near_duplicate_flags(gallery.manifest, False, result)
        matched_again = near_duplicate_flags(gallery.manifest, False, dataclasses.replace(result, settings=None))
    assert read_off == matched_again
    copy = f"{originals[0].stem}-cropped.png"
    hit = next(h for h in result.hits if h.id == copy)
    assert read_off[copy] is True and hit.global_score < threshold_for(MODEL)
    assert sum(read_off.values()) == 2  # the photo itself and its copy, no other dress
