"""Distributed indexing and sharded search on a real local Ray cluster (``ray.cluster_utils.Cluster``):
a head with no CPU (the driver's) and two one-CPU worker nodes, loopback only, small object stores.

Builds a sharded index of shared photos through the CLI, checks that the sharded search ranks as
one local index does (library and HTTP), that a dead shard answers 503, and that killing a worker
node in the middle of a build loses nothing committed and a rerun finishes it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray's single-machine mode: every node address is 127.0.0.1 and nothing listens beyond loopback. Read once,
# when ray is first imported, so set before that (harmless to the other tests of a session).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from conftest import tiny_vit_kwargs
from service_support import assert_error, make_client

pytestmark = [pytest.mark.shared, pytest.mark.slow]

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
TINY = ["--model", "test_vit", "--weights", "random", "--model-kwargs", json.dumps(tiny_vit_kwargs())]


@pytest.fixture(scope="module")
def cluster():
    """Three nodes on this machine; every address is 127.0.0.1 (Ray's loopback-only mode)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before this module could make it loopback-only"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * 2**20, "include_dashboard": False})
    try:
        c.workers = [c.add_node(**NODE) for _ in range(2)]
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _photos(shared_data: Path, classes: tuple[str, ...], per_class: int) -> list[Path]:
    out: list[Path] = []
    for cls in classes:
        out += sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:per_class]
    return out


def _manifest(path: Path, photos: list[Path], bad: bool = True) -> Path:
    lines = "".join(f"{p},{p.parent.name}\n" for p in photos)
    path.write_text("path,label\n" + lines + ("/no/such/photo.jpg,none\n" if bad else ""))
    return path


def _shard_ids(root: Path) -> set[str]:
    """Committed ids of every shard, read without disturbing a running writer."""
    ids: set[str] = set()
    for db in root.glob("shard-*/meta.sqlite"):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as conn:
                ids |= {r[0] for r in conn.execute("SELECT id FROM images")}
        except sqlite3.Error:
            pass
    return ids


def _verify_shards(root: Path) -> set[str]:
    from indexer.index_dir import IndexDir
    from indexer.shards import ShardLayout

    ids: set[str] = set()
    for folder in ShardLayout.load(root).folders(root):
        with IndexDir.open(folder) as g:
            report = g.verify()
            assert report.ok, (folder, report.problems)
            assert not ids & g.ids()
            ids |= g.ids()
    return ids


@pytest.fixture(scope="module")
def built(cluster, shared_data, tmp_path_factory):
    """A 2-shard index built through ``vit-rerank index build --ray``, and a local index of the same photos."""
    from indexer.build import add_records, new_manifest
    from indexer.index_dir import IndexDir
    from indexer.sources import from_manifest
    from reranker.backbones import create_index_backbone
    from vit_rerank.cli import main

    tmp = tmp_path_factory.mktemp("ray-built")
    photos = _photos(shared_data, ("hat", "shoes", "skirt"), 8)
    source = _manifest(tmp / "gallery.csv", photos)
    root = tmp / "sharded"
    argv = ["index", "build", str(root), "--from", str(source), *TINY, "--ray", cluster.address, "--shards", "2",
            "--batch-size", "4", "--commit-every", "4", "--no-progress"]
    assert main(argv) == 0
    local = tmp / "local"
    backbone = create_index_backbone("test_vit", "random", model_kwargs=tiny_vit_kwargs())  # as the CLI makes it
    with IndexDir.create(local, new_manifest(backbone, patch_weights="rollout", model_kwargs=tiny_vit_kwargs())) as g:
        report = add_records(g, backbone, from_manifest(source), workers=0, progress=False)
    return root, local, photos, report


def test_sharded_build_holds_every_image_once_and_reports_the_bad_one(built):
    root, _, photos, local_report = built
    ids = _verify_shards(root)
    assert ids == {str(p) for p in photos}  # a CSV without ids: the id is the path as written
    reports = sorted((root / "reports").glob("build-*.json"))
    saved = json.loads(reports[-1].read_text())
    assert saved["added"] == len(photos) and len(saved["shard_images"]) == 2 and min(saved["shard_images"]) > 0
    failures = [(f["reason"], f["path"]) for f in saved["failures"]]
    assert failures == [(f.reason, f.path) for f in local_report.failures] == [("missing", "/no/such/photo.jpg")]


def test_a_parquet_list_of_paths_is_a_source(built, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexer.distributed_build import build_sharded
    from indexer.index_dir import IndexDir
    from indexer.shards import ShardLayout

    root, photos = built[0], built[2][:4]
    (tmp_path / "photos").mkdir()
    for p in photos:  # relative paths resolve against the Parquet file's folder, as in a CSV manifest
        (tmp_path / "photos" / p.name).symlink_to(p)
    table = pa.table({"path": [f"photos/{p.name}" for p in photos], "label": [p.parent.name for p in photos],
                      "camera": ["phone"] * len(photos)})
    pq.write_table(table, tmp_path / "list.parquet")
    with IndexDir.open(ShardLayout.load(root).folders(root)[0]) as g:
        manifest = g.manifest
    report = build_sharded(tmp_path / "index", tmp_path / "list.parquet", shards=2, manifest=manifest, actors=1,
                           progress=False)
    assert report.added == len(photos) and not report.failures
    rows = []
    for folder in ShardLayout.load(tmp_path / "index").folders(tmp_path / "index"):
        with IndexDir.open(folder) as g:
            rows += g.db.all_rows()
    assert sorted(r.id for r in rows) == sorted(f"photos/{p.name}" for p in photos)
    assert all(r.metadata == {"camera": "phone"} and Path(r.path).exists() for r in rows)


def test_every_shard_is_an_ordinary_index(built, capsys):
    from vit_rerank.cli import main

    root = built[0]
    shard = min(root.glob("shard-*"))
    assert main(["index", "verify", str(shard)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["search", str(built[2][0]), "--index", str(shard), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]


def test_sharded_search_ranks_as_the_local_index(built):
    from indexer.build import backbone_for
    from indexer.index_dir import IndexDir
    from indexer.loading import load_image
    from indexer.search import Searcher, SearchSettings
    from indexer.sharded_search import open_sharded
    from indexer.shards import shard_folders

    root, local, photos, _ = built
    queries = [load_image(p) for p in photos[::5]]
    settings = SearchSettings(top_k=10, rerank_k=10)
    sharded = open_sharded(shard_folders([root]), "cpu", runtime="torch")  # a runtime asked for is the one run
    try:
        assert sharded.backbone.runtime == "torch"
        with IndexDir.open(local) as g:
            want = Searcher(g, backbone_for(g.manifest, "cpu", None, "torch"), "cpu").search(queries, settings)
        got = sharded.search(queries, settings)
    finally:
        sharded.index_dir.close()
    for w, r in zip(want, got):
        assert [h.id for h in r.hits] == [h.id for h in w.hits]
        assert [h.rank_before for h in r.hits] == [h.rank_before for h in w.hits]
        for a, b in zip(r.hits, w.hits):
            assert a.final_score == pytest.approx(b.final_score, abs=1e-5)
            assert a.global_score == pytest.approx(b.global_score, abs=1e-5)


def test_http_service_over_shards(built, cluster):
    root, local, photos, _ = built
    query = photos[3].read_bytes()
    form = {"top_k": "8", "rerank_k": "8"}
    with make_client(local) as client:
        want = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")}, data=form).json()
        want_explained = client.get(want["results"][0]["explanation_json_url"]).json()
    with make_client(root, ray=cluster.address, shards=[root]) as client:
        assert client.get("/readyz").status_code == 200
        r = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")}, data=form)
        assert r.status_code == 200, r.text
        got = r.json()
        assert [x["id"] for x in got["results"]] == [x["id"] for x in want["results"]]
        # the explanation's numbers come from the features the sharded search gathered: as on one index
        explained = client.get(got["results"][0]["explanation_json_url"])
        assert explained.status_code == 200, explained.text
        e = explained.json()
        for key in ("global_score", "structural_score", "matched_mass"):
            assert e[key] == pytest.approx(want_explained[key], abs=1e-5), key
        def top_pairs(doc):
            return {(p["query"]["index"], p["candidate"]["index"]) for p in doc["pairs"][:3]}

        assert top_pairs(e) == top_pairs(want_explained)
        assert sorted(p["similarity"] for p in e["pairs"]) == pytest.approx(
            sorted(p["similarity"] for p in want_explained["pairs"]), abs=1e-5)
        info = client.get("/index").json()
        assert info["images"] == len(photos) and info["shards"] == 2
        assert client.get(f"/images/{got['results'][0]['id']}").status_code == 200
        added = client.post("/index/images", files={"image": ("a.jpg", query, "image/jpeg")}, data={"id": "new"})
        assert_error(added, 501, "sharded")
        assert_error(client.delete(f"/index/images/{got['results'][0]['id']}"), 501, "sharded")
        engine = client.app.state.service.engine
        ray.kill(engine.index_dir.shards[1].actor)  # a shard dies: no silent answer from the other one
        r = client.post("/search", files={"image": ("q.jpg", query, "image/jpeg")}, data=form)
        assert_error(r, 503, "shard 1", "unavailable")
        assert r.headers.get("Retry-After")


def test_killing_a_worker_node_then_the_driver_loses_nothing_committed(cluster, shared_data, tmp_path):
    """A worker node dies mid-build (Ray restarts its model actor elsewhere and the build goes on), then
    the driver is killed with SIGKILL: every commit survives, and the rerun embeds only the rest."""
    from indexer.distributed_build import build_sharded

    photos = _photos(shared_data, ("dress", "pants", "shorts", "t-shirt", "outwear"), 10)
    source = _manifest(tmp_path / "gallery.csv", photos, bad=False)
    root = tmp_path / "sharded"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vit_rerank", "index", "build", str(root), "--from", str(source), *TINY,
         "--ray", cluster.address, "--shards", "3", "--actors", "2", "--batch-size", "2", "--commit-every", "2",
         "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        at_kill = _wait_for(root, proc, more_than=0)
        assert at_kill and len(at_kill) < len(photos), "the build was not caught in the middle"
        dead = cluster.workers.pop(0)
        cluster.remove_node(dead, allow_graceful=False)
        cluster.workers.append(cluster.add_node(**NODE))  # the cluster gets a node back
        after = _wait_for(root, proc, more_than=len(at_kill) + 4)
        assert len(after) > len(at_kill) + 4 or proc.poll() == 0, "the build stopped when a worker node died"
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    committed = _verify_shards(root)
    assert at_kill <= committed, "a commit made before the node died was lost"
    report = build_sharded(root, source, actors=2, batch_size=4, commit_every=4, progress=False)
    assert _verify_shards(root) == {str(p) for p in photos}
    assert (report.already_indexed, report.added) == (len(committed), len(photos) - len(committed))
    assert not report.failures
    print(f"node killed at {len(at_kill)} committed, driver at {len(committed)}; the rerun added {report.added}")


def _wait_for(root: Path, proc, more_than: int, timeout: float = 90) -> set[str]:
    """The committed ids once more than ``more_than`` are committed (or the build ended, or time ran out)."""
    deadline = time.monotonic() + timeout
    while len(ids := _shard_ids(root)) <= more_than and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return ids


def test_serve_takes_several_index_directories_only_with_ray(capsys):
    from service.cli import run_serve
    from vit_rerank.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "a", "b"])
    assert run_serve(args) == 2
    assert "--ray" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--ray", "--index", "a", "b"])
    assert args.ray == "" and args.index == ["a", "b"]
    args = build_parser().parse_args(["index", "build", "d", "--from", "s", "--ray", "127.0.0.1:6379", "--shards", "4"])
    assert (args.ray, args.shards) == ("127.0.0.1:6379", 4)
