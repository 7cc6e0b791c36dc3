"""scripts/gpu-check.sh (issue 13's GPU check) runs end to end on the CPU in its small configuration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.shared
def test_gpu_check_runs_on_the_cpu(tmp_path, shared_data):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--small",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert steps["tests"] == {"skipped": "no CUDA device"}
    assert not any("error" in v for v in steps.values() if isinstance(v, dict))
    # cpu against cpu: the comparison itself must hold exactly
    assert steps["index"]["same_rankings"] and steps["index"]["max_score_diff"] == 0.0
    assert steps["ot"]["max_abs_sigma_diff"] <= 1e-4 and steps["ot"]["device"] == "cpu"
    assert {r["problem"] for r in steps["ot"]["rows"]} >= {"1x6x49x49", "2x6x49x49", "1x6x64x64"}
    assert steps["serve"]["embed_p50_ms"] > 0 and steps["serve"]["serve_vs_embed_p50"] > 0
    assert [r["concurrency"] for r in steps["serve"]["rows"]] == [1, 8, 32]
    names = [g["name"] for g in result["goals"]]
    assert any(n.startswith("bench ot 2x6x49x49") for n in names) and any("serve p50" in n for n in names)
    assert all(g["met"] is not False for g in result["goals"]), result["goals"]
    assert "GOAL " in proc.stdout
