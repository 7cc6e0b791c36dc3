"""``kill -9`` in the middle of a build: the index stays loadable, consistent, and keeps every
image a previous commit added; rerunning the build resumes and finishes it."""

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

import pytest

from conftest import tiny_vit_kwargs
from indexer.index_dir import IndexDir

pytestmark = pytest.mark.slow


def committed_count(index: Path) -> int:
    """Images committed so far, read without disturbing the running writer."""
    db = index / "meta.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0


def start_build(index: Path, manifest: Path, extra: tuple[str, ...] = ("--commit-every", "2")) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vit_rerank", "index", "build", str(index), "--from", str(manifest),
         "--model", "test_vit", "--weights", "random", "--model-kwargs", json.dumps(tiny_vit_kwargs()),
         "--batch-size", "2", "--workers", "0", "--no-progress", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


# Patch codes train on the first committed chunk (at least 256 patches: 6 images of 49), and an auto
# index has no FAISS file until the end of the build: kills land in both states.
@pytest.mark.parametrize("extra", [("--commit-every", "2"),
                                   ("--commit-every", "6", "--patch-codes", "pq8", "--factory", "auto")],
                         ids=["float16-flat", "codes-auto"])
def test_kill_9_during_a_build_loses_nothing_committed(shared_data, tmp_path, extra):
    photos = []
    for cls in ("dress", "pants", "shorts", "t-shirt"):
        photos += sorted((shared_data / "clothing-small" / "test" / cls).glob("*.jpg"))[:10]
    manifest = tmp_path / "gallery.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in photos))
    index = tmp_path / "index"
    rng = random.Random(1234)
    committed: set[str] = set()
    kills = 0
    for _ in range(4):
        proc = start_build(index, manifest, extra)
        before = committed_count(index)
        deadline = time.monotonic() + 120
        # Wait until this run is committing (past start-up), then kill at a random moment.
        while committed_count(index) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.05))  # a tiny build commits every few ms: kill within that
        if proc.poll() is not None:  # finished before the kill
            assert proc.returncode == 0, proc.stderr.read()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        with IndexDir.open(index) as gallery:
            report = gallery.verify()
            assert report.ok, report.problems
            ids = gallery.ids()
            assert committed <= ids, f"lost after kill {kills}: {sorted(committed - ids)}"
            assert len(ids) < len(photos) or kills > 0
            committed = ids
            # No torn or stray files remain once the index is opened again.
            leftovers = [p.name for p in index.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
            assert leftovers == []
    assert kills >= 2, "the build finished before it could be interrupted twice"

    # Resume to the end: every image is there exactly once, and the index searches.
    proc = start_build(index, manifest, extra)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    with IndexDir.open(index) as gallery:
        assert gallery.verify().ok
        assert gallery.ids() == {str(p) for p in photos}
        assert len(gallery) == len(photos) and gallery.faiss.ntotal == len(photos)
        if "--patch-codes" in extra:
            assert gallery.codec is not None and gallery.store.patch_part == "codes" and gallery.codec_digest
            assert gallery.plan is not None and gallery.plan.factory == "Flat"  # 40 images: exact
