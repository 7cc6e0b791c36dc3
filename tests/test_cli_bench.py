"""``vit-rerank bench ot`` on a small problem: its JSON is well formed and its sigma is right."""

from __future__ import annotations

import json

import pytest

from helpers import build_tiny_index, run_cli  # in this process: the same ``main`` as the console script


def test_bench_ot_json_small():
    out = run_cli("bench", "ot", "--json", "--candidates", "8", "--batch-queries", "2", "--repeats", "1")
    summary = json.loads(out.stdout)
    assert summary["device"] == "cpu"
    assert summary["max_abs_sigma_diff"] <= 1e-4
    assert summary["speedup_vs_pot_solve_batch"] > 0
    solvers = {row["solver"].split(" (")[0] for row in summary["rows"]}
    assert {"vit-rerank sinkhorn", "POT ot.solve_batch(log_sinkhorn)", "POT ot.sinkhorn, one pair at a time"} <= solvers
    # (1 query, a batch) x (s = 1, 0.9) x three solvers, then the native 256 x 256 grid at s = 0.9
    assert len(summary["rows"]) == 2 * 2 * 3 + 3
    assert {row["problem"] for row in summary["rows"]} == {"1x8x49x49", "2x8x49x49", "1x8x256x256"}
    whole = summary["whole_rerank"]
    assert whole["problem"] == "1x8x49x49, D=384" and whole["time_ms"] > 0 and whole["iterations"] >= 1
    goals = summary["goals"]
    assert goals["rerank_met"] == (goals["rerank_ms"] < 2.0)
    assert goals["vs_solve_batch_met"] == (goals["ot_vs_pot_solve_batch"] >= 60)


def test_bench_index_json_small(tmp_path):
    out = run_cli("bench", "index", "--json", "--images", "12", "--queries", "2", "--rerank-k", "8",
                  "--model", "test_vit", "--workers", "0", "--batch-size", "4", "--workdir", str(tmp_path))
    r = json.loads(out.stdout)
    assert r["images"] == 12 and r["device"] == "cpu" and r["search_queries"] == 2
    assert r["forward_img_s"] > 0 and r["indexing_img_s"] > 0 and r["forward_plain_img_s"] > 0
    # the goal's ratio: indexing over the bare timm forward of the same images
    assert abs(r["ratio_indexing_to_forward"] - r["indexing_img_s"] / r["forward_plain_img_s"]) < 1e-9
    # a new index's defaults: test_vit's native grid, more patches than OT is calibrated on, so no rollout
    g = r["grid"]
    assert g * g > 64 and r["patch_weights"] == "uniform" and r["weights"] == "random"
    # test_vit: 64-d. Per image: float32 global, float16 patches, float32 weights
    # (plus a few npy headers shared by the images of a segment).
    payload = 64 * 4 + g * g * 64 * 2 + g * g * 4
    assert payload <= r["bytes_per_image_patch_store"] <= payload + 3 * 128
    assert set(r["latency_ms"]) == {"embed", "search", "rerank", "total"}
    for stage in r["latency_ms"].values():
        assert 0 <= stage["p50"] <= stage["p95"]
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 14


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # POT's own tight stop; sigma is checked
def test_bench_sinkhorn_solvers_agree_with_pot_and_anderson_needs_fewer_iterations():
    """The solvers ``bench sinkhorn`` compares: its float64 reference agrees with POT's, and Anderson
    reaches |dsigma| <= 1e-4 (with zero-mass columns, as cross-correlation marginals have) and stays
    there, at an iteration count where classic Sinkhorn has not."""
    import ot

    from helpers import patch_problem
    from reranker.ot import sinkhorn
    from vit_rerank.bench.sinkhorn import EPS, anderson, converged_sigma

    S, a, b = patch_problem(1, 6)
    S, a, b = S.reshape(6, 49, 49), a.expand(1, 6, 49).reshape(6, 49).clone(), b.reshape(6, 49).clone()
    b[:, :3] = 0.0  # columns without mass
    b /= b.sum(1, keepdim=True)
    for s in (1.0, 0.5):
        ref = converged_sigma(S, a, b, s)
        if s == 1.0:
            for i in range(2):
                plan = ot.sinkhorn(a[i].double().numpy(), b[i].double().numpy(), (1 - S[i]).double().numpy(), EPS,
                                   numItermax=20_000, stopThr=1e-9)
                assert abs(float((plan * S[i].double().numpy()).sum()) - float(ref[i])) < 1e-6
        _, errors = anderson(S, a, b, s, 60, 3, reference=ref.float())
        assert max(errors[-20:]) <= 1e-4
        first = next(k for k, e in enumerate(errors, 1) if e <= 1e-4)
        if s == 1.0:
            classic = sinkhorn(S, a, b, eps=EPS, s=s, omega=1.0, max_iter=first, tol=0.0, check_every=first)
            assert float((classic.sigma.double() - ref).abs().max()) > 1e-4


@pytest.mark.shared
def test_bench_search_times_every_stage_beside_the_bare_forward(shared_data, tmp_path):
    """Issue 25: one table of a query's stages, each a ratio of the bare forward, HTTP beside in process."""
    photos = sorted((shared_data / "clothing-small" / "test").glob("*/*.jpg"))[::12][:24]
    index = build_tiny_index(tmp_path, photos)
    out = run_cli("bench", "search", "--index", str(index), "--data", str(shared_data), "--queries", "3",
                  "--rerank-k", "8", "--json")
    r = json.loads(out.stdout)
    assert r["images"] == 24 and r["queries"] == 3 and r["settings"]["rerank_k"] == 8
    stages = r["stages"]
    assert {"decode", "queue", "embed", "search", "gather", "structural", "final", "in process", "HTTP",
            "(preprocess, in embed)"} == set(stages)
    assert all(v["p95"] >= v["p50"] > 0 for v in stages.values())
    bare = r["bare_forward"]["p50"]
    assert all(abs(r["ratio_to_bare_forward_p50"][k] - v["p50"] / bare) < 1e-9 for k, v in stages.items())
    # the end to end time holds its parts: each query's in-process time is at least its embed
    assert stages["in process"]["p50"] >= stages["embed"]["p50"] and stages["HTTP"]["p50"] > 0
    assert r["goals"]["http_vs_in_process_p50"] == pytest.approx(stages["HTTP"]["p50"] / stages["in process"]["p50"])


def test_busy_processes_load_the_machine_and_end_with_the_block_or_their_parent():
    """``bench search --load N``'s busy processes: running inside the block, gone after it, and gone by
    themselves when the benchmark that started them is killed (no stray load left behind)."""
    import subprocess
    import sys
    import time

    from vit_rerank.bench.load import busy_processes

    def busy_count() -> int:
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        return sum("os.getppid()" in line and "-c" in line for line in out.splitlines())

    before = busy_count()
    with busy_processes(2, limit_s=60):
        time.sleep(0.5)
        assert busy_count() == before + 2
    assert busy_count() == before
    orphaning = ("import sys, time\nsys.path[:0] = " + repr(sys.path) + "\nfrom vit_rerank.bench.load import busy_processes\n"
                 "load = busy_processes(1, limit_s=60)\nload.__enter__()\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", orphaning])
    deadline = time.monotonic() + 30
    while busy_count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert busy_count() == before + 1
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while busy_count() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert busy_count() == before


def test_commands_run_torch_with_passive_openmp_waits_unless_told():
    """Every ``vit-rerank`` process makes torch's OpenMP workers sleep between parallel regions (libgomp's
    spinning default collapses on a loaded machine); a value the user set is kept."""
    import os
    import subprocess
    import sys

    probe = "import vit_rerank, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    assert subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                          text=True, check=True).stdout.strip() == "ACTIVE"


def test_every_bench_has_quick_and_it_keeps_what_the_user_set(monkeypatch):
    """Issue 25: ``--quick`` on every benchmark (CI and smoke runs); it shrinks only the sizes left at their
    defaults."""
    import vit_rerank.bench.ot as bench_ot
    from vit_rerank.cli import build_parser

    parser = build_parser()
    bench = next(a for a in parser._subparsers._group_actions[0].choices["bench"]._actions
                 if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in bench.choices.items():
        assert any("--quick" in a.option_strings for a in sub._actions), f"bench {name} has no --quick"
    seen = {}
    monkeypatch.setattr(bench_ot, "run", lambda *a, **k: seen.update(args=a, kwargs=k))
    args = parser.parse_args(["bench", "ot", "--quick", "--repeats", "5"])
    args.handler(args)
    assert seen["args"][1] == 5  # the user's --repeats stays
    assert seen["kwargs"]["batch_queries"] == 8 and seen["kwargs"]["per_pair_sample"] == 4
    args = parser.parse_args(["bench", "ot"])
    args.handler(args)
    assert seen["args"][1] == 20 and seen["kwargs"]["batch_queries"] == 64 and seen["kwargs"]["per_pair_sample"] == 10


def test_bench_quality_measures_the_shipped_preset_unless_asked_for_more():
    """Issue 25's bound: a first ``bench quality`` computes one feature pass per set (the shipped preset's);
    ``--presets all`` adds the 7 x 7 presets' pass, and the shipped preset is always there (calibration)."""
    from indexer.search_params import PRESETS, SHIPPED
    from vit_rerank.bench.quality import feature_runs, selected_presets
    from vit_rerank.cli import build_parser

    default = build_parser().parse_args(["bench", "quality"]).presets
    assert selected_presets(default) == (SHIPPED,) and len(feature_runs(selected_presets(default))) == 1
    assert selected_presets("all") == tuple(PRESETS) and len(feature_runs(selected_presets("all"))) == 2
    assert selected_presets("paper") == tuple(n for n in PRESETS if n in ("paper", SHIPPED))
    with pytest.raises(ValueError, match="unknown preset.*fast"):
        selected_presets("fast")
