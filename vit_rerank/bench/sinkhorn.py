"""``vit-rerank bench sinkhorn``: how to reach |Δσ| ≤ 1e-4 in the fewest iterations and least time.

Real problems: the real DINOv2 ViT-S/14 features of clothing-small test (the evaluation's cache),
each of ``--queries`` queries against its global top ``--candidates`` (leave-one-out), with the
search's default cross-correlation marginals, at s = 1, 0.9 and 0.5 (eps 0.05). For each problem
the converged sigma comes from a long float64 solve.

Solvers, all batched over the problems, in the plain domain:

* ``default``: :func:`reranker.ot.sinkhorn` as shipped (over-relaxation omega = 1.5, its own stop:
  L1 row error < 2e-4, checked every 5 iterations);
* ``omega=1``: the same solver with classic Sinkhorn updates;
* ``anderson m=M``: Anderson acceleration (type II, memory ``M``) of the classic Sinkhorn map on the
  log column scalings, ``x <- log(b / K^T (a / K e^x))``: each step mixes the last ``M`` map values
  by the least-squares combination of their residuals (a batched ``M x M`` solve).

For each: the iterations after which every problem's sigma is within 1e-4 of converged (read off
the clock at every iteration), and the time of one solve of that many iterations (median of
``--repeats``; the shipped solver is timed as called, with its own stopping checks; Anderson is
timed without any check, which favours it). The ratio is the shipped solver's time over each one's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reranker.ot import _plain_kernel, sinkhorn

from .quality import DEFAULT_DATA
from .report import report_handler

TARGET = 1e-4
EPS = 0.05
S_VALUES = (1.0, 0.9, 0.5)
MEMORIES = (3, 5)


def add_parser(which: argparse._SubParsersAction) -> None:
    p = which.add_parser("sinkhorn", help="iterations and time to |dsigma| <= 1e-4: over-relaxation vs "
                                          "Anderson acceleration, on real problems")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--weights", default=str(DEFAULT_DATA.parent / "weights" / "dinov2_vits14.safetensors"))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--queries", type=int, default=8, help="queries (each against its own candidates)")
    p.add_argument("--candidates", type=int, default=100, help="candidates per query")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per solver (median reported)")
    p.add_argument("--max-iter", type=int, default=200, help="iterations tried before a solver counts as failed")
    p.set_defaults(handler=report_handler(measure, table))


def real_problems(weights: str, data: Path, queries: int, candidates: int):
    """``S (B, n, m)``, ``a (B, n)``, ``b (B, m)`` of real query-candidate pairs (crosscorr marginals)."""
    from evaluation.datasets import load_dataset
    from evaluation.features import cache_key, compute_features, default_cache_dir
    from reranker.backbones import create_backbone
    from reranker.defaults import DEFAULT_MODEL, default_model_kwargs
    from reranker.features import Features
    from reranker.rerank import _crosscorr_marginals, _normalised

    kwargs = default_model_kwargs(DEFAULT_MODEL)
    backbone = create_backbone(DEFAULT_MODEL, weights, grid=7, model_kwargs=kwargs).eval()
    dataset = load_dataset("folder", str(data / "clothing-small" / "test"))
    key = cache_key(dataset.name, dataset.root, dataset.records, backbone, kwargs, ["rollout"])
    store = compute_features(backbone, dataset.records, key, default_cache_dir(), progress=False)
    ok = np.flatnonzero(store.ok)
    g = torch.from_numpy(np.asarray(store.global_features[ok], np.float32))
    p = torch.from_numpy(np.asarray(store.patch_features[ok], np.float32))
    picks = np.linspace(0, len(ok) - 1, queries).astype(int)
    sims = g[picks] @ g.T
    sims[torch.arange(len(picks)), torch.from_numpy(picks)] = -2.0  # leave the query out
    top = sims.topk(min(candidates, len(ok) - 1), dim=1).indices  # (Q, K)
    query = Features(g[picks], p[picks])
    cands = Features(g[top], p[top].half())
    S, mu_q, mu_x = _crosscorr_marginals(query, cands, p[picks], cands.patch_features.float())
    n, m = S.shape[-2:]
    return (S.reshape(-1, n, m).contiguous(), _normalised(mu_q).reshape(-1, n), _normalised(mu_x).reshape(-1, m),
            backbone.weights_id)


def _kernel(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, dtype=torch.float32):
    """The shipped solver's plain Gibbs kernel, with the dummy row and column when s < 1, and the
    full marginals, in ``dtype``."""
    return _plain_kernel(S.to(dtype), a.to(dtype), b.to(dtype), EPS, s)


def _sigma(K: torch.Tensor, a: torch.Tensor, v: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """sigma of the plan ``diag(u) K diag(v)`` with ``u = a / K v`` (rows exact), real points only."""
    n, m = S.shape[-2:]
    u = a / torch.bmm(K, v.unsqueeze(2)).squeeze(2)
    plan = u[:, :n, None] * K[:, :n, :m] * v[:, None, :m]
    return (plan * S.to(K.dtype)).sum((1, 2))


def converged_sigma(S, a, b, s: float, iters: int = 5000) -> torch.Tensor:
    """sigma after ``iters`` classic float64 Sinkhorn iterations (the reference)."""
    K, a2, b2 = _kernel(S, a, b, s, torch.float64)
    v = torch.ones_like(b2)
    Kt = K.transpose(1, 2)
    for _ in range(iters):
        u = a2 / torch.bmm(K, v.unsqueeze(2)).squeeze(2)
        v = b2 / torch.bmm(Kt, u.unsqueeze(2)).squeeze(2)
    return _sigma(K, a2, v, S)


def anderson(S, a, b, s: float, iters: int, memory: int, reference: torch.Tensor | None = None,
             reg: float = 1e-8) -> tuple[torch.Tensor, list[float]]:
    """Anderson-accelerated classic Sinkhorn on ``x = log v``; sigma after ``iters`` steps and, with
    ``reference``, the worst |sigma - reference| after each step."""
    K, a2, b2 = _kernel(S, a, b, s)
    Kt = K.transpose(1, 2)
    B, m = b2.shape
    x = torch.zeros_like(b2)
    dX = torch.zeros(B, m, memory, dtype=K.dtype)  # columns: differences of iterates
    dF = torch.zeros(B, m, memory, dtype=K.dtype)  # ... and of residuals
    x_prev = f_prev = None
    errors: list[float] = []
    live = b2 > 0  # a column without mass keeps v = 0 (log v = -inf): it is left out of the mixing
    for k in range(iters):
        v = x.exp() * live
        u = a2 / torch.bmm(K, v.unsqueeze(2)).squeeze(2)
        f = torch.where(live, (b2 / torch.bmm(Kt, u.unsqueeze(2)).squeeze(2)).log() - x, 0.0)  # the residual
        if x_prev is None:
            x_next = x + f
        else:
            slot = (k - 1) % memory
            dX[:, :, slot] = x - x_prev
            dF[:, :, slot] = f - f_prev
            used = min(k, memory)
            Fm, Xm = dF[:, :, :used], dX[:, :, :used]
            gram = Fm.transpose(1, 2) @ Fm
            scale = gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]  # relative Tikhonov term
            gram = gram + (reg * scale + 1e-20) * torch.eye(used, dtype=K.dtype)
            gamma, info = torch.linalg.solve_ex(gram, Fm.transpose(1, 2) @ f.unsqueeze(2))  # (B, used, 1)
            x_next = x + f - ((Xm + Fm) @ gamma).squeeze(2)
            # a singular or wild mix (an ill-conditioned least squares near convergence): the plain step there
            bad = (info != 0) | ~torch.isfinite(x_next).all(1) | ((x_next - x).abs().amax(1) > 10 * f.abs().amax(1) + 5)
            if bool(bad.any()):
                x_next[bad] = (x + f)[bad]
        x_next -= (x_next * live).sum(1, keepdim=True) / live.sum(1, keepdim=True)  # log v is defined up to a shift
        x_prev, f_prev, x = x, f, x_next
        if reference is not None:
            errors.append(float((_sigma(K, a2, x.exp() * live, S) - reference).abs().max()))
    return _sigma(K, a2, x.exp() * live, S), errors


def shipped(S, a, b, s: float, omega: float, max_iter: int | None = None):
    """:func:`reranker.ot.sinkhorn` as the reranker calls it (or stopped at ``max_iter`` exactly)."""
    if max_iter is None:
        return sinkhorn(S, a, b, eps=EPS, s=s, omega=omega)
    return sinkhorn(S, a, b, eps=EPS, s=s, omega=omega, max_iter=max_iter, tol=0.0, check_every=max_iter)


STAY = 10  # a count is accepted once the target holds for this many counts in a row


def _first_within(error_at, max_iter: int) -> tuple[int | None, float | None]:
    """The fewest iterations from which the worst |dsigma| stays within the target (for ``STAY``
    counts in a row), and that error; ``error_at(k)`` is the error after ``k`` iterations."""
    first, err_first = None, None
    for k in range(1, max_iter + 1):
        err = error_at(k)
        if err <= TARGET:
            if first is None:
                first, err_first = k, err
            if k - first + 1 >= STAY:
                return first, err_first
        else:
            first = None
    return None, None


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def measure(args) -> dict[str, Any]:
    torch.manual_seed(0)
    S, a, b, weights_id = real_problems(args.weights, args.data, args.queries, args.candidates)
    out: dict[str, Any] = {"problems": f"{S.shape[0]}x{S.shape[1]}x{S.shape[2]}", "weights_id": weights_id,
                           "eps": EPS, "target": TARGET, "threads": torch.get_num_threads(), "rows": []}
    for s in S_VALUES:
        print(f"[bench sinkhorn] s={s}...", file=sys.stderr)
        ref = converged_sigma(S, a, b, s)
        default = shipped(S, a, b, s, 1.5)
        default_ms = _median_ms(lambda: shipped(S, a, b, s, 1.5), args.repeats)
        rows = [{"s": s, "solver": "default (omega=1.5, own stop)", "iterations": default.n_iter,
                 "max_dsigma": float((default.sigma.double() - ref).abs().max()), "ms": default_ms}]
        plain = shipped(S, a, b, s, 1.0)
        rows.append({"s": s, "solver": "omega=1 (own stop)", "iterations": plain.n_iter,
                     "max_dsigma": float((plain.sigma.double() - ref).abs().max()),
                     "ms": _median_ms(lambda: shipped(S, a, b, s, 1.0), args.repeats)})
        for omega in (1.0, 1.5):  # the fewest iterations that reach the target, stopped exactly there
            k, err = _first_within(
                lambda k: float((shipped(S, a, b, s, omega, k).sigma.double() - ref).abs().max()), args.max_iter)
            rows.append({"s": s, "solver": f"omega={omega:g}, fewest iterations", "iterations": k,
                         "max_dsigma": err,
                         "ms": _median_ms(lambda: shipped(S, a, b, s, omega, k), args.repeats) if k else None})
        for memory in MEMORIES:
            _, errors = anderson(S, a, b, s, args.max_iter, memory, reference=ref.float())
            k, err = _first_within(lambda k: errors[k - 1], args.max_iter)
            rows.append({"s": s, "solver": f"anderson m={memory}, fewest iterations", "iterations": k,
                         "max_dsigma": err,
                         "ms": _median_ms(lambda: anderson(S, a, b, s, k, memory), args.repeats) if k else None})
        for row in rows:
            row["speed_vs_default"] = default_ms / row["ms"] if row["ms"] else None
        out["rows"] += rows
    return out


def table(doc: dict[str, Any]) -> str:
    lines = [f"Sinkhorn to |dsigma| <= {doc['target']:g} on {doc['problems']} real DINOv2 problems (clothing-small "
             f"test, crosscorr marginals, eps {doc['eps']}), {doc['threads']} torch threads",
             "", "| s | solver | iterations | max dsigma | ms | default's time / this |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        it = "not reached" if r["iterations"] is None else str(r["iterations"])
        ds = "–" if r["max_dsigma"] is None else f"{r['max_dsigma']:.1e}"
        ms = "–" if r["ms"] is None else f"{r['ms']:.2f}"
        ratio = "–" if r["speed_vs_default"] is None else f"{r['speed_vs_default']:.2f}x"
        lines.append(f"| {r['s']:g} | {r['solver']} | {it} | {ds} | {ms} | {ratio} |")
    return "\n".join(lines)
