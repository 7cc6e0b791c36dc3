"""``vit-rerank bench ot``: the batched Sinkhorn beside POT on the same problems, in one process.

Problems: one query x 100 candidates and 64 queries x 100 candidates, 49 x 49 patches,
eps = 0.05, clustered unit vectors (so the cosines spread like real patch tokens). Every
solver is timed on the same tensors and its sigma compared with a float64 POT solution
run to a tight tolerance.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import ot
import torch
import torch.nn.functional as F

from reranker.device import resolve_device
from reranker.ot import sinkhorn

from .timing import time_call

EPS = 0.05


def synthetic_problem(Q: int, K: int, n: int = 49, m: int = 49, dim: int = 64, spread: float = 0.8, seed: int = 0):
    """Similarities ``(Q, K, n, m)`` of clustered unit vectors and random marginals (fp32)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(16, dim, generator=g)

    def grid(*shape):
        idx = torch.randint(0, 16, shape, generator=g)
        return F.normalize(protos[idx] + spread * torch.randn(*shape, dim, generator=g), dim=-1)

    fq, fx = grid(Q, n), grid(Q, K, m)
    S = torch.matmul(fq.unsqueeze(1), fx.transpose(-1, -2)).contiguous()
    a = torch.softmax(torch.randn(Q, 1, n, generator=g), -1)
    b = torch.softmax(torch.randn(Q, K, m, generator=g), -1)
    return S, a, b


def augmented_problem(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float):
    """The partial problem as a balanced one for POT: dummy cost -eps*ln(1-s), dummy-dummy forbidden."""
    B, n, m = S.shape
    M = torch.full((B, n + 1, m + 1), -EPS * math.log1p(-s), dtype=S.dtype, device=S.device)
    M[:, :n, :m] = 1.0 - S
    M[:, n, m] = math.inf
    mass = torch.full((B, 1), 1.0 - s, dtype=a.dtype, device=a.device)
    return M, torch.cat([a, mass], 1), torch.cat([b, mass], 1)


def pot_problem(S, a, b, s):
    """Flatten ``(Q, K, ...)`` to POT's ``(B, ...)`` and add the dummies when ``s < 1``."""
    n, m = S.shape[-2:]
    S = S.reshape(-1, n, m)
    a = a.expand(-1, b.shape[1], -1).reshape(-1, n)  # the query's weights, once per candidate
    b = b.reshape(-1, m)
    if s < 1.0:
        return augmented_problem(S, a, b, s)
    return 1.0 - S, a, b


def sigma_of(plan: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    n, m = S.shape[-2:]
    return (plan[:, :n, :m] * S.reshape(-1, n, m)).sum((-2, -1))


@dataclass
class Row:
    problem: str
    s: float
    solver: str
    time_ms: float
    iterations: int | None
    max_abs_sigma_diff: float
    ratio_vs_ours: float


REFERENCE_QUERIES = 8


def reference_sigma(S, a, b, s) -> torch.Tensor:
    """sigma from POT's batched Sinkhorn in float64, run far past the benchmark's tolerance.

    Only the first ``REFERENCE_QUERIES`` queries' problems are solved (float64 POT on all
    6,400 would take minutes); every solver's max |d sigma| is taken over those.
    """
    S, a, b = S[:REFERENCE_QUERIES], a[:REFERENCE_QUERIES], b[:REFERENCE_QUERIES]
    M, A, B = pot_problem(S.double().cpu(), a.double().cpu(), b.double().cpu(), s)
    res = ot.solve_batch(M, reg=EPS, a=A, b=B, max_iter=2000, tol=1e-7, method="sinkhorn")
    return sigma_of(res.plan, S.double().cpu())


def _sigma_diff(sigma: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |sigma - ref| over the problems the reference covers."""
    sigma = sigma.reshape(-1)[: len(ref)]
    return float((sigma.double().cpu() - ref[: len(sigma)]).abs().max())


def run_case(Q: int, K: int, s: float, device: torch.device, repeats: int, per_pair_limit: int) -> list[Row]:
    """Time the three solvers on one problem set; the slow POT runs are timed once."""
    S, a, b = synthetic_problem(Q, K)
    print(f"  {Q}x{K} s={s}: float64 reference ...", file=sys.stderr, flush=True)
    ref = reference_sigma(S, a, b, s)
    print(f"  {Q}x{K} s={s}: timing the solvers ...", file=sys.stderr, flush=True)
    S, a, b = S.to(device), a.to(device), b.to(device)
    label = f"{Q}x{K}x49x49"

    ours, ours_ms = time_call(lambda: sinkhorn(S, a, b, eps=EPS, s=s), device, repeats)
    rows = [Row(label, s, "vit-rerank sinkhorn (torch, plain domain)", ours_ms, ours.n_iter,
                _sigma_diff(ours.sigma, ref), 1.0)]

    M, A, B = pot_problem(S, a, b, s)
    res, pot_ms = time_call(
        lambda: ot.solve_batch(M, reg=EPS, a=A, b=B, max_iter=4000, tol=1e-4, method="log_sinkhorn"),
        device, repeats=1 if Q > 1 else max(1, repeats // 4), warmup=0 if Q > 1 else 1,
    )
    rows.append(Row(label, s, "POT ot.solve_batch(log_sinkhorn)", pot_ms, int(res.log["n_iter"]),
                    _sigma_diff(sigma_of(res.plan, S), ref), pot_ms / ours_ms))

    if per_pair_limit:
        count = min(per_pair_limit, M.shape[0])
        Mn, An, Bn = (t[:count].double().cpu().numpy() for t in (M, A, B))
        Mn = np.where(np.isinf(Mn), 1e3, Mn)  # ot.sinkhorn needs finite costs; exp(-1e3/eps) is 0
        plans, pair_ms = time_call(
            lambda: [ot.sinkhorn(An[i], Bn[i], Mn[i], EPS, numItermax=4000, stopThr=1e-4) for i in range(count)],
            device, repeats=1, warmup=0,
        )
        pair_ms *= M.shape[0] / count
        sig = sigma_of(torch.from_numpy(np.stack(plans)), S.reshape(-1, *S.shape[-2:])[:count].double().cpu())
        name = "POT ot.sinkhorn, one pair at a time" + ("" if count == M.shape[0] else f" ({count} timed, scaled)")
        rows.append(Row(label, s, name, pair_ms, None, _sigma_diff(sig, ref), pair_ms / ours_ms))
    return rows


def format_table(rows: list[Row], device: torch.device) -> str:
    header = f"{'problem':<14} {'s':>4}  {'solver':<48} {'time ms':>9} {'iters':>6} {'max|dsigma|':>12} {'peer/ours':>10}"
    lines = [
        f"OT benchmark on {device} (torch threads: {torch.get_num_threads()}), eps={EPS}; "
        f"max|dsigma| against float64 POT on the first {REFERENCE_QUERIES} queries' problems",
        header,
        "-" * len(header),
    ]
    for r in rows:
        it = "-" if r.iterations is None else str(r.iterations)
        ratio = "-" if r.ratio_vs_ours == 1.0 else f"{r.ratio_vs_ours:.1f}x"
        lines.append(f"{r.problem:<14} {r.s:>4}  {r.solver:<48} {r.time_ms:>9.2f} {it:>6} {r.max_abs_sigma_diff:>12.2e} {ratio:>10}")
    return "\n".join(lines)


def run(
    device_name: str = "auto",
    repeats: int = 20,
    as_json: bool = False,
    per_pair: bool = True,
    candidates: int = 100,
    batch_queries: int = 64,
) -> dict:
    """Run every case (1 query and a batch of queries, s = 1 and 0.9), print the table or JSON."""
    device = resolve_device(device_name)
    rows: list[Row] = []
    for Q in (1, batch_queries):
        for s in (1.0, 0.9):
            limit = candidates if per_pair else 0
            rows += run_case(Q, candidates, s, device, repeats if Q == 1 else max(3, repeats // 4), limit)
    ours = [r for r in rows if r.solver.startswith("vit-rerank")]
    batch = [r for r in rows if r.solver.startswith("POT ot.solve_batch")]
    summary = {
        "device": str(device),
        "eps": EPS,
        "speedup_vs_pot_solve_batch": min(r.ratio_vs_ours for r in batch),
        "max_abs_sigma_diff": max(r.max_abs_sigma_diff for r in ours),
        "rows": [asdict(r) for r in rows],
    }
    print(json.dumps(summary, indent=2) if as_json else format_table(rows, device))
    return summary
