"""glibc's malloc keeps a query's large buffers (vit_rerank.allocator): the thresholds are set, the user's
own settings win, and a buffer freed and allocated again is no longer mapped and zero-filled every time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vit_rerank.allocator import keep_large_buffers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# The MNN scorer of one search (100 candidates of 256 x 384 float16 patches, as an index stores them), run 6
# times; prints the page faults of one run after the first
RERANK = """
import resource, sys
if sys.argv[1] == "tuned":
    from vit_rerank.allocator import keep_large_buffers
    assert keep_large_buffers()
import torch
from reranker.features import Features
from reranker.rerank import rerank_batch
torch.manual_seed(0)
unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)
query = Features(unit(1, 384), unit(1, 256, 384))
candidates = Features(unit(1, 100, 384), unit(1, 100, 256, 384).half())
rerank_batch(query, candidates, scorer="mnn", threshold=0.5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    rerank_batch(query, candidates, scorer="mnn", threshold=0.5)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults_per_rerank(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["VIT_RERANK_MALLOC"] = "unset"  # neither opted out nor set: the script decides
    out = subprocess.run([sys.executable, "-c", RERANK, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout)


def test_a_rerank_reuses_its_buffers_instead_of_faulting_them_in_again():
    default, tuned = _faults_per_rerank("default"), _faults_per_rerank("tuned")
    assert default > 2000  # glibc's default: ~5,900 pages (23 MB) mapped and zero-filled again per rerank
    assert tuned < 200  # measured: 0


def test_the_users_own_settings_and_the_opt_out_are_respected(monkeypatch):
    assert keep_large_buffers() is True
    monkeypatch.setenv("VIT_RERANK_MALLOC", "default")
    assert keep_large_buffers() is False
    monkeypatch.delenv("VIT_RERANK_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_large_buffers() is False
