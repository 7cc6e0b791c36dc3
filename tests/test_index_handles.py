"""Open files of the patch store stay bounded however many segments an index has: removed
segments are closed and deleted, open segments are bounded (LRU), small segments are
compacted, compaction keeps every feature exactly, and ``kill -9`` during it loses nothing.

The images are synthetic features (no backbone), committed through ``IndexDir.commit_new``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import indexer.compaction as compaction
import indexer.patch_store as patch_store
from indexer.index_dir import IndexDir, NewImages
from indexer.manifest import Manifest
from indexer.metadata import ImageRow
from reranker.features import StoredFeatures

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
G, D = 4, 8  # a 4x4 grid of 8-d patches: tiny segments


# --- helpers (also imported by the child processes below) ---------------------------------------


def features_of(i: int, grid: int = G, dim: int = D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (global, patches, weights) of synthetic image ``i``: the same on every call."""
    rng = np.random.default_rng(i)
    g = rng.standard_normal(dim).astype(np.float32)
    g /= np.linalg.norm(g)
    p = rng.standard_normal((grid * grid, dim)).astype(np.float16)
    w = rng.random(grid * grid).astype(np.float32)
    return g, p, w / w.sum()


def new_images(indices, grid: int = G, dim: int = D) -> NewImages:
    feats = [features_of(i, grid, dim) for i in indices]
    rows = [ImageRow(id=f"img{i}", path=f"/nowhere/{i}.jpg", label=None, content_hash=f"hash{i}",
                     width=1, height=1, bytes=1) for i in indices]
    return NewImages(rows, StoredFeatures(np.stack([f[0] for f in feats]), np.stack([f[1] for f in feats]),
                                          {"uniform": np.stack([f[2] for f in feats])}))


def new_gallery(folder, grid: int = G, dim: int = D) -> IndexDir:
    manifest = Manifest(model="synthetic", weights="random", weights_source="random", grid=grid,
                        global_dim=dim, patch_dim=dim, patch_weights="uniform")
    return IndexDir.create(Path(folder), manifest)


def open_or_create(folder, grid: int = G, dim: int = D) -> IndexDir:
    folder = Path(folder)
    return IndexDir.open(folder) if (folder / "manifest.json").exists() else new_gallery(folder, grid, dim)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_features(gallery: IndexDir, grid: int = G, dim: int = D) -> int:
    """Every image's stored features are exactly those it was added with; returns the count."""
    rows = gallery.db.all_rows()
    if not rows:
        return 0
    got_rows, got = gallery.features([r.row for r in rows])
    expected = [features_of(int(r.id[3:]), grid, dim) for r in got_rows]
    np.testing.assert_array_equal(got.global_features, np.stack([e[0] for e in expected]))
    np.testing.assert_array_equal(got.patch_features, np.stack([e[1] for e in expected]))
    np.testing.assert_array_equal(got.weights(), np.stack([e[2] for e in expected]))
    return len(rows)


def gathered(gallery: IndexDir, faiss_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, got = gallery.features(list(faiss_ids))
    return got.global_features.copy(), got.patch_features.copy(), got.weights().copy()


def references_to(folder: Path) -> list[str]:
    """File descriptors and memory mappings of this process that point into ``folder``."""
    prefix = str(folder.resolve())
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            out.append(f"fd {fd}: {target}")
    out += [line.strip() for line in Path("/proc/self/maps").read_text().splitlines() if prefix in line]
    return out


def child(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, text=True, **kwargs)


# --- (a) 1000 single adds under a low open-files limit -------------------------------------------

ADD_1000 = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
import numpy as np
import indexer.patch_store as patch_store
from test_index_handles import new_gallery, new_images, features_of, open_fds, check_features

mode, folder = sys.argv[1], sys.argv[2]
if mode == "mmap":  # every segment memory-mapped, even the smallest: the most files
    patch_store.IN_MEMORY_BYTES = 0
rng = np.random.default_rng(0)
base = open_fds()
gallery = new_gallery(folder)
peak_fds = peak_segments = gathers = 0
for i in range(1000):
    gallery.commit_new(new_images([i]))
    n = i + 1
    if i % 5 == 0 or i % 100 == 99:
        size = 1000 if i % 100 == 99 else int(rng.integers(1, 60))  # now and then 1000 at once
        ids = rng.integers(0, n, size=size).tolist()
        rows, got = gallery.features(ids)
        assert [r.id for r in rows] == [f"img{j}" for j in ids]
        np.testing.assert_array_equal(got.global_features, np.stack([features_of(j)[0] for j in ids]))
        gathers += 1
    peak_fds = max(peak_fds, open_fds())
    peak_segments = max(peak_segments, len(gallery.segments))
assert check_features(gallery) == 1000 and gallery.verify().ok
print(json.dumps(dict(base=base, peak_fds=peak_fds, end_fds=open_fds(), segments=len(gallery.segments),
                      peak_segments=peak_segments, open_segments=len(gallery.store.open_segments()),
                      max_open=gallery.store.max_open, gathers=gathers)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "mmap"])
def test_1000_single_adds_keep_open_files_bounded_under_a_low_limit(tmp_path, mode):
    proc = child(ADD_1000, mode, str(tmp_path / "index"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err  # no OSError (too many open files) under RLIMIT_NOFILE 256
    stats = json.loads(out.strip().splitlines()[-1])
    # Segments do not grow with the adds: at most a few of >= 256 images plus 33 small ones.
    assert stats["peak_segments"] <= 1000 // compaction.COMPACT_SMALL_ROWS + compaction.COMPACT_MAX_SMALL + 1
    assert stats["open_segments"] <= stats["max_open"]
    # The store holds at most 3 descriptors per open segment, plus SQLite's 3 (db, -wal, -shm).
    assert stats["peak_fds"] <= stats["base"] + 3 * stats["max_open"] + 3 + 2, stats
    if mode == "default":  # single-image segments are read into memory: hardly any file is open
        assert stats["peak_fds"] < 100, stats
    assert stats["peak_fds"] < 128, stats


# --- (b) removed segments are closed and deleted -------------------------------------------------


def test_removed_segments_are_deleted_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(patch_store, "IN_MEMORY_BYTES", 0)  # memory-map every segment
    folder = tmp_path / "index"
    gallery = new_gallery(folder)
    for i in range(6):
        gallery.commit_new(new_images([i]))  # segments 1..6, one image each
    gallery.commit_new(new_images([6, 7, 8]))  # segment 7, three images
    assert gallery.segments == [1, 2, 3, 4, 5, 6, 7]
    check_features(gallery)  # opens (maps) every segment
    segments_dir = folder / "segments"
    assert references_to(segments_dir)  # the mappings are there to be seen

    assert gallery.remove(["img0", "img3", "img7", "nope"]) == ["nope"]
    # Segments 1 and 4 have no image left: out of the live list, their files gone, nothing points at them.
    assert gallery.segments == [2, 3, 5, 6, 7]
    on_disk = sorted(p.name for p in segments_dir.iterdir())
    assert on_disk == sorted(f"{s:08d}.{part}.npy" for s in (2, 3, 5, 6, 7) for part in patch_store.PARTS)
    for seg in (1, 4):
        assert not [r for r in references_to(segments_dir) if f"{seg:08d}." in r]
    assert 1 not in gallery.store.open_segments() and 4 not in gallery.store.open_segments()
    assert check_features(gallery) == 6 and gallery.verify().ok

    # Removing the rest of segment 7 drops it too; closing releases everything.
    gallery.remove(["img6", "img8"])
    assert gallery.segments == [2, 3, 5, 6] and not list(segments_dir.glob("00000007.*"))
    gallery.close()
    assert references_to(segments_dir) == []
    with IndexDir.open(folder) as reopened:
        assert reopened.segments == [2, 3, 5, 6] and check_features(reopened) == 4
        assert reopened.verify().ok
        # Removing every image leaves no segment at all.
        reopened.remove(sorted(reopened.ids()))
        assert reopened.segments == [] and list(segments_dir.iterdir()) == []
        assert len(reopened) == 0 and reopened.verify().ok


def test_open_segments_are_bounded_and_reopened_on_demand(tmp_path, monkeypatch):
    monkeypatch.setattr(patch_store, "MAX_OPEN_SEGMENTS", 4)
    monkeypatch.setattr(patch_store, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(compaction, "COMPACT_MAX_SMALL", 1000)  # keep every segment
    with new_gallery(tmp_path / "index") as gallery:
        for i in range(12):
            gallery.commit_new(new_images([i]))
        base = open_fds()
        for _ in range(3):
            assert check_features(gallery) == 12  # touches all 12 segments
            assert len(gallery.store.open_segments()) == 4
            assert open_fds() <= base + 3 * 4
        maps = [r for r in references_to(tmp_path / "index" / "segments") if "fd " not in r]
        assert len({line.split()[-1] for line in maps}) <= 3 * 4


# --- (c) compaction keeps every feature exactly ---------------------------------------------------


def test_compaction_merges_small_segments_and_keeps_every_feature(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    gallery = new_gallery(folder)
    gallery.commit_new(new_images(range(300)))  # one large segment (>= 256 images): never merged
    for i in range(300, 332):  # 32 single-image segments: at the threshold, not over it
        gallery.commit_new(new_images([i]))
    assert len(gallery.segments) == 33
    ids = [r.row for r in gallery.db.all_rows()]
    before = gathered(gallery, ids)
    faiss_before = gallery.faiss.search(before[0][:5], 3)

    gallery.commit_new(new_images([332]))  # the 33rd small segment: all small ones are merged
    assert len(gallery.segments) == 2 and gallery.segments[0] == 1
    after = gathered(gallery, ids)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert check_features(gallery) == 333
    assert gallery.verify().ok
    assert [np.array_equal(x, y) for x, y in zip(faiss_before, gallery.faiss.search(before[0][:5], 3))] == [True, True]
    files = {p.name.split(".")[0] for p in (folder / "segments").iterdir()}
    assert files == {f"{s:08d}" for s in gallery.segments}  # the merged-away files are gone
    gallery.close()
    with IndexDir.open(folder) as reopened:
        for a, b in zip(before, gathered(reopened, ids)):
            np.testing.assert_array_equal(a, b)
        assert reopened.verify().ok and len(reopened.segments) == 2


def test_compaction_with_removals_small_thresholds_and_force(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "COMPACT_SMALL_ROWS", 8)
    monkeypatch.setattr(compaction, "COMPACT_MAX_SMALL", 3)
    folder = tmp_path / "index"
    rng = random.Random(7)
    with new_gallery(folder) as gallery:
        n = 0
        for step in range(60):
            size = rng.choice([1, 1, 2, 3, 10])
            gallery.commit_new(new_images(range(n, n + size)))
            n += size
            if step % 4 == 3:  # remove a few images, which can make a large segment small or empty
                live = sorted(gallery.ids())
                gallery.remove(rng.sample(live, min(3, len(live))))
            small = [s for s, c in gallery.compaction.segment_counts().items() if c < 8]
            assert len(small) <= 3 and all(c > 0 for c in gallery.compaction.segment_counts().values())
            assert sorted(gallery.compaction.segment_counts()) == sorted(gallery.segments)
            assert gallery.compaction.segment_counts() == {s: c for s, c in gallery.db.segment_counts().items()}
        live = check_features(gallery)
        assert gallery.verify().ok
        ids = sorted(r.row for r in gallery.db.all_rows())
        before = gathered(gallery, ids)
        merged = gallery.compact(force=True)
        small = [s for s, c in gallery.compaction.segment_counts().items() if c < 8]
        assert len(small) <= 1 and (merged > 0 or len(small) <= 1)
        for a, b in zip(before, gathered(gallery, ids)):
            np.testing.assert_array_equal(a, b)
        assert check_features(gallery) == live and gallery.verify().ok
        on_disk = gallery.store.segment_ids_on_disk()
        assert on_disk == set(gallery.segments)


def test_a_failed_compaction_keeps_the_add_and_the_old_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "COMPACT_MAX_SMALL", 2)
    folder = tmp_path / "index"
    with new_gallery(folder) as gallery:
        for i in range(2):
            gallery.commit_new(new_images([i]))

        def disk_full(segment, locations, chunk=256):  # writes part of the new segment, then fails
            gallery.store.write_segment(segment, StoredFeatures(np.zeros(1), np.zeros(1), {"uniform": np.zeros(1)}))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(gallery.store, "write_merged", disk_full)
        gallery.commit_new(new_images([2]))  # committed; the compaction that follows fails, logged
        assert gallery.ids() == {"img0", "img1", "img2"} and gallery.segments == [1, 2, 3]
        assert gallery.store.segment_ids_on_disk() == {1, 2, 3}  # the failed merge left nothing
        assert check_features(gallery) == 3 and gallery.verify().ok
        monkeypatch.undo()
        monkeypatch.setattr(compaction, "COMPACT_MAX_SMALL", 2)
        gallery.commit_new(new_images([3]))  # the next commit compacts
        assert len(gallery.segments) == 1 and check_features(gallery) == 4 and gallery.verify().ok


# --- (d) kill -9 during compaction ---------------------------------------------------------------

ADD_UNTIL_KILLED = r"""
import sys
import indexer.compaction as compaction
from test_index_handles import open_or_create, new_images

folder, total = sys.argv[1], int(sys.argv[2])
compaction.COMPACT_MAX_SMALL = 3  # compact every few adds
gallery = open_or_create(folder, 16, 32)
original = gallery.store.write_merged

def announced(segment, locations, chunk=256):
    print("merge", len(locations), flush=True)
    return original(segment, locations, chunk=16)  # many small writes: a longer window to kill in

gallery.store.write_merged = announced
have = gallery.ids()
for i in range(total):
    if f"img{i}" not in have:
        gallery.commit_new(new_images([i], 16, 32))
print("done", flush=True)
"""


def live_segments_on_disk(folder: Path) -> tuple[set[int], set[int]]:
    """(segments the committed state lists, segments with files), read without opening the index."""
    with sqlite3.connect(f"file:{folder / 'meta.sqlite'}?mode=ro", uri=True) as conn:
        state = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM state")}
    files = {int(p.name.split(".")[0]) for p in (folder / "segments").iterdir()}
    return set(state.get("segments", [])), files


@pytest.mark.slow
def test_kill_9_during_compaction_loses_nothing(tmp_path):
    folder = tmp_path / "index"
    total = 400
    rng = random.Random(2024)
    committed: set[str] = set()
    kills = torn = 0
    for attempt in range(6):
        proc = child(ADD_UNTIL_KILLED, str(folder), str(total), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        skip = rng.randrange(0, 3)  # let a few merges pass, then kill within one
        line = ""
        while True:
            line = proc.stdout.readline()
            if not line or line.startswith("done"):
                break
            if line.startswith("merge"):
                if skip == 0:
                    break
                skip -= 1
        if not line or line.startswith("done"):
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
            break
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        live, files = live_segments_on_disk(folder)
        torn += bool(files - live or any(p.name.endswith(".tmp") for p in (folder / "segments").iterdir()))
        with IndexDir.open(folder) as gallery:
            report = gallery.verify()
            assert report.ok, report.problems
            ids = gallery.ids()
            assert committed <= ids, f"lost after kill {kills}: {sorted(committed - ids)[:5]}"
            assert check_features(gallery, 16, 32) == len(ids)  # every image's features, exactly
            assert gallery.store.segment_ids_on_disk() == set(gallery.segments)  # orphans removed at open
            assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
            committed = ids
    assert kills >= 3, "the adds finished before they could be interrupted"
    assert torn >= 1, "no kill landed inside a change (compaction windows are a few ms): nothing was tested"
    print(f"{kills} kills, {torn} of them left a torn layout (files of an unfinished change)")

    proc = child(ADD_UNTIL_KILLED, str(folder), str(total), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    with IndexDir.open(folder) as gallery:
        assert gallery.verify().ok
        assert gallery.ids() == {f"img{i}" for i in range(total)}
        assert check_features(gallery, 16, 32) == total
        assert len(gallery.segments) <= total // compaction.COMPACT_SMALL_ROWS + 4 + 1
