"""``vit-rerank bench ot`` on a small problem: its JSON is well formed and its sigma is right."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_ot_json_small():
    out = subprocess.run(
        [sys.executable, "-m", "vit_rerank", "bench", "ot", "--json", "--candidates", "8",
         "--batch-queries", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    summary = json.loads(out.stdout)
    assert summary["device"] == "cpu"
    assert summary["max_abs_sigma_diff"] <= 1e-4
    assert summary["speedup_vs_pot_solve_batch"] > 0
    solvers = {row["solver"].split(" (")[0] for row in summary["rows"]}
    assert {"vit-rerank sinkhorn", "POT ot.solve_batch(log_sinkhorn)", "POT ot.sinkhorn, one pair at a time"} <= solvers
    assert len(summary["rows"]) == 2 * 2 * 3  # (1 query, a batch) x (s = 1, 0.9) x three solvers


def test_serve_says_not_built_yet():
    out = subprocess.run([sys.executable, "-m", "vit_rerank", "serve", "--demo"], capture_output=True, text=True)
    assert out.returncode == 2 and "not built yet" in out.stderr
