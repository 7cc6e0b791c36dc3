"""Streaming rollout keeps memory bounded: one block's attention at a time, not every block's.

Each forward runs in its own subprocess and reports its peak RSS (``VmHWM`` of /proc/self/status), so that one
measurement cannot inherit another's high-water mark. The model is a random-weight ViT-S/16 at
448 px (N = 1 + 28 * 28 = 785 tokens, 6 heads, 12 blocks), where one block's post-softmax
attention for a batch of B images is ``B * 6 * 785^2 * 4`` bytes (about 15 MB per image).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BATCH, IMG, PATCH, HEADS, DEPTH = 2, 448, 16, 6, 12
TOKENS = 1 + (IMG // PATCH) ** 2  # 785
BLOCK_BYTES = BATCH * HEADS * TOKENS * TOKENS * 4  # one block's attention maps, float32

# The child: build the model, warm up on one image (plain forward), then read the peak RSS
# before and after one forward of the given mode. VmHWM is in KiB.
CHILD = r"""
import json, sys, time
import torch, timm
from reranker.backbones import wrap_timm_model
from reranker.rollout import attention_rollout

mode, batch, img, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img, depth=depth, num_classes=0)
backbone = wrap_timm_model(model, "vit_small_patch16_224", "random", grid=7)
x = torch.randn(batch, 3, img, img)
def peak():
    # VmHWM: this address space's peak RSS. (ru_maxrss is not: Linux carries the parent's
    # high-water mark across fork and exec, so a child of a big pytest process would see its peak.)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
with torch.inference_mode():
    backbone(x[:1])
    before, start = peak(), time.perf_counter()
    if mode == "plain":
        out = backbone(x)
        weights = None
    elif mode == "streaming":
        out = backbone(x, patch_weights=("rollout",))
        weights = out.patch_weights["rollout"]
    elif mode == "captured":
        out = backbone(x, with_attention=True)
        assert len(out.attentions) == depth
        weights = attention_rollout(out.attentions, out.token_grid, out.num_prefix_tokens, grid=7)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    after = peak()
    mass = None if weights is None else weights.sum(-1).tolist()
print(json.dumps(dict(mode=mode, before=before, after=after, seconds=seconds, mass=mass)))
"""


def _measure_all(modes: tuple[str, ...]) -> dict[str, dict]:
    """Run each mode in its own subprocess (concurrently: each is single-threaded)."""
    env = dict(os.environ)
    # Big tensors are mmap'ed and unmapped on free, so RSS follows the live tensors rather than
    # glibc's heap high-water mark (the dynamic mmap threshold would otherwise move ~10-20 MB
    # buffers onto the heap, where freed pages can stay resident and blur the comparison).
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(BATCH), str(IMG), str(DEPTH)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for mode in modes
    }
    results = {}
    try:
        for mode, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"{mode} child failed:\n{err[-3000:]}"
            results[mode] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_streaming_rollout_memory_is_bounded_by_one_block():
    r = _measure_all(("plain", "streaming", "captured"))
    # the growth of the peak over the (plain, one-image) warm-up, in bytes
    grow = {mode: max(0, v["after"] - v["before"]) for mode, v in r.items()}
    mib = {mode: round(g / 2**20, 1) for mode, g in grow.items()}
    report = (f"peak growth MiB {mib}, one block's maps {BLOCK_BYTES / 2**20:.1f} MiB, "
              f"seconds { {m: round(v['seconds'], 1) for m, v in r.items()} }")
    for mode in ("streaming", "captured"):
        assert all(abs(m - 1.0) < 1e-5 for m in r[mode]["mass"]), (mode, r[mode]["mass"])

    # Keeping every block's maps costs at least (L - 1) blocks over a plain forward ...
    assert grow["captured"] - grow["plain"] >= (DEPTH - 1) * BLOCK_BYTES, report
    # ... and streaming saves at least (L - 2) of them: the difference grows with depth ...
    assert grow["captured"] - grow["streaming"] >= (DEPTH - 2) * BLOCK_BYTES, report
    # ... since streaming only adds the current block's maps (q @ k^T and its softmax coexist for a
    # moment) and the accumulator's per-image scratch, a fraction of a block: independent of depth.
    assert grow["streaming"] - grow["plain"] <= 3 * BLOCK_BYTES + 16 * 2**20, report
