"""Batched entropic optimal transport between patch grids, with partial transport.

The solver works on a batch of similarity matrices ``S`` of shape ``(..., n, m)``
(cosines of patch tokens) and marginals ``a (..., n)``, ``b (..., m)``. The cost
is ``C = 1 - S`` and the Gibbs kernel ``K = exp(-C / eps)``.

Partial transport (``s < 1``) adds one dummy point to each side with mass
``1 - s``; the kernel entries to and from the dummy are ``1 - s`` and the
dummy-to-dummy entry is 0, so exactly ``s`` of the real mass is matched once the
marginals are met. ``s = 1`` is plain balanced OT.

Iterations run in fp32 (inputs may be fp16/bf16), in the plain domain by default
(at ``eps = 0.05`` and ``C <= 2`` the kernel is at least ``exp(-40)``, far from
fp32 underflow) and in the log domain when ``eps`` is too small for that. A
problem whose plain-domain scalings overflow anyway (a patch far from every patch of
the other side: its kernel row is tiny, its scaling huge) is solved again on its own,
with plain updates and, should those overflow too, in the log domain. The plain-domain
loop itself is :mod:`reranker.sinkhorn_plain`. They
stop when the row-marginal error (L1, per problem) of every problem in the batch
is below ``tol``, checked every ``check_every`` iterations, or at ``max_iter``.

Defaults: ``tol = 2e-4`` keeps sigma within 1e-4 of the converged value on hard,
clustered problems (``vit-rerank bench ot`` measures it); the reference code's
fixed 100 iterations do not reach that on such problems, so the cap is a safety
net (1000), not the stopping rule.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sinkhorn_plain import sinkhorn_plain
from .threads import torch_threads

# exp(-x) stays a normal fp32 number for x below ~87; keep a margin.
_PLAIN_DOMAIN_MAX_EXPONENT = 80.0
#: A batch of at most this many similarities is solved on the calling thread alone: its iterations are
#: dozens of operations on a few thousand numbers each, and with OpenMP's passive waits (vit_rerank's
#: default) waking a second thread for them costs more than it brings. On 1 x 100 x 49 x 49 (2 cores) one
#: thread took 8.9 ms where a bench run on two had taken 13.0 ms; a later A/B in one process stayed within
#: the machine's noise (7.8-16 ms either way), so the gain is not proven.
SINGLE_THREAD_MAX_ELEMENTS = 1 << 21


@dataclass
class OTResult:
    """Solution of a batch of transport problems.

    Attributes:
        plan: transport plans between the real points, ``(..., n, m)``, fp32.
        sigma: structural similarity ``sum(plan * S)``, ``(...)``, fp32.
        marginal_error: L1 error of the row marginals of the full problem, ``(...)``.
        n_iter: the most iterations any problem of the batch took.
    """

    plan: torch.Tensor
    sigma: torch.Tensor
    marginal_error: torch.Tensor
    n_iter: int

    @property
    def transported_mass(self) -> torch.Tensor:
        """Mass moved between real points, ``(...)``: about ``s``."""
        return self.plan.sum(dim=(-2, -1))


def _check_inputs(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, s: float) -> bool:
    """Check shapes, settings and marginals; return whether some marginal entry is 0. The similarity's
    values are checked by :func:`_similarity_range`, which the solver needs anyway."""
    if S.dim() < 2:
        raise ValueError(f"similarity must have shape (..., n, m), got {tuple(S.shape)}")
    n, m = S.shape[-2:]
    if n == 0 or m == 0:
        raise ValueError(f"similarity has an empty side: {tuple(S.shape)}")
    if a.shape[-1] != n or b.shape[-1] != m:
        raise ValueError(
            f"marginals do not match the similarity: a {tuple(a.shape)}, b {tuple(b.shape)}, "
            f"similarity {tuple(S.shape)}"
        )
    if not (0.0 < s <= 1.0) or math.isnan(s):
        raise ValueError(f"s (the fraction of mass to match) must be in (0, 1], got {s}")
    if not (eps > 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    has_zero = False
    for name, t in (("a", a), ("b", b)):
        low, high = (float(x) for x in torch.aminmax(t.float()))  # NaN anywhere makes both NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} contains NaN or inf")
        if low < 0:
            raise ValueError("marginals must be non-negative")
        has_zero = has_zero or low == 0.0
    return has_zero


def _similarity_range(S: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of the similarities in one pass; refuses NaN and inf (both make it non-finite)."""
    low, high = (float(x) for x in torch.aminmax(S))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("similarity contains NaN or inf")
    return low, high


def _kernel_shift(low: float, high: float, eps: float, s: float) -> float | None:
    """The shift ``h`` of the log-kernel ``S / eps - h`` that keeps the plain kernel (dummy entries
    included) inside fp32, or None when its entries span more than ``exp(80)`` (log domain).

    Scaling the whole kernel by ``exp(-h)`` leaves the plan unchanged (the scalings absorb it),
    so ``h = 0`` (no pass to subtract it) whenever every entry is within ``exp(+-40)``; else the
    log-range is centred."""
    lo, hi = low / eps, high / eps
    if s < 1.0:
        dummy = math.log1p(-s) + 1.0 / eps
        lo, hi = min(lo, dummy), max(hi, dummy)
    if hi - lo > _PLAIN_DOMAIN_MAX_EXPONENT:
        return None
    if -_PLAIN_DOMAIN_MAX_EXPONENT / 2 <= lo and hi <= _PLAIN_DOMAIN_MAX_EXPONENT / 2:
        return 0.0
    return (lo + hi) / 2


def _add_dummy(
    log_kernel: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the dummy row/column (kernel ``1 - s``, dummy-dummy 0) in the log domain."""
    B, n, m = log_kernel.shape
    full = log_kernel.new_full((B, n + 1, m + 1), math.log1p(-s))
    full[:, :n, :m] = log_kernel
    full[:, n, m] = -math.inf
    mass = a.new_full((B, 1), 1.0 - s)
    return full, torch.cat([a, mass], dim=1), torch.cat([b, mass], dim=1)


def _plain_kernel(S, a, b, eps, s, shift=0.0):
    """Gibbs kernel ``exp(S / eps - shift)``, with the dummy row and column when ``s < 1`` (entries
    ``(1 - s) exp(1 / eps - shift)``, 0 dummy-to-dummy), and the full marginals.

    Up to the constant factor ``exp(1 / eps - shift)`` this is the method's ``exp(-(1 - S) / eps)``
    with dummies ``1 - s``; the factor cancels in the plan. The exponential runs on a contiguous
    ``(B, n, m)`` buffer, which is then padded: writing through the strided core of the padded
    buffer costs more on the CPU.
    """
    core = torch.mul(S, 1.0 / eps)
    if shift:
        core.sub_(shift)
    core.exp_()
    if s == 1.0:
        return core, a, b
    kernel = F.pad(core, (0, 1, 0, 1), value=math.exp(math.log1p(-s) + 1.0 / eps - shift))
    kernel[:, -1, -1] = 0.0
    mass = a.new_full((a.shape[0], 1), 1.0 - s)
    return kernel, torch.cat([a, mass], 1), torch.cat([b, mass], 1)


def _chunk_size(n: int, m: int, device: torch.device) -> int:
    """Problems per chunk on the CPU: ~4 MB of kernel, so iterations run in cache."""
    if device.type != "cpu":
        return 1 << 62
    return max(64, (4 << 20) // (4 * n * m))


def _solve_log(S, a, b, eps, s, max_iter, tol, check_every):
    """Log-domain solve of ``S (B, n, m)``: the plan between the real points, the errors
    and the iteration count."""
    n, m = S.shape[-2:]
    log_kernel = (S - 1.0) / eps
    if s < 1.0:
        log_kernel, a, b = _add_dummy(log_kernel, a, b, s)
    f, g, err, n_iter = _sinkhorn_log(log_kernel, a, b, max_iter, tol, check_every)
    plan = (log_kernel + f.unsqueeze(2) + g.unsqueeze(1)).exp()[:, :n, :m]
    return plan, err, n_iter


def _transport_similarity(plan, S):
    """sigma ``sum(plan * S)`` of ``(B, n, m)`` plans, ``(B,)``: a multiply and a reduction (a batched
    ``bmm`` dot product of the flattened pair measured ~6x slower on the CPU)."""
    return torch.mul(plan, S).sum(dim=(-2, -1))


def _sinkhorn_log(logK, a, b, max_iter, tol, check_every):
    """Log-domain Sinkhorn for small eps; returns log-scalings f, g (u = exp f)."""
    B = logK.shape[0]
    log_a = a.log()
    log_b = b.log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    err = torch.full((B,), math.inf, dtype=logK.dtype, device=logK.device)
    it = 0
    while it < max_iter:
        it += 1
        f = log_a - torch.logsumexp(logK + g.unsqueeze(1), dim=2)
        g = log_b - torch.logsumexp(logK + f.unsqueeze(2), dim=1)
        if it % check_every == 0 or it == max_iter:
            rows = torch.logsumexp(logK + g.unsqueeze(1), dim=2) + f
            err = (rows.exp() - a).abs().sum(-1)
            if float(err.max()) < tol:
                break
    return f, g, err, it


def _solve(S, a, b, eps, s, max_iter, tol, check_every, omega, log_domain, has_zero_mass):
    """Solve ``S (B, n, m)`` (best contiguous) with marginals ``a (B, n)``, ``b (B, m)``: the plans
    between the real points ``(B, n, m)`` (contiguous), sigma, the L1 marginal errors and the largest
    iteration count. ``log_domain=None``: plain unless the kernel's entries span more than
    ``exp(80)`` (read off the similarity's range, the pass that also checks it is finite)."""
    n, m = S.shape[-2:]
    shift = _kernel_shift(*_similarity_range(S), eps, s)
    if log_domain is None:
        log_domain = shift is None
    if log_domain:
        plan, err, n_iter = _solve_log(S, a, b, eps, s, max_iter, tol, check_every)
        return plan, _transport_similarity(plan, S), err, n_iter
    # forced plain domain beyond fp32's range: the overflowing problems are redone in the log domain below
    kernel, a_full, b_full = _plain_kernel(S, a, b, eps, s, 0.0 if shift is None else shift)
    step = _chunk_size(n, m, kernel.device)
    errors, plans, n_iter = [], [], 0
    for start in range(0, kernel.shape[0], step):
        chunk = slice(start, start + step)
        K = kernel[chunk]
        # K^T contiguous: the row-times-matrix bmm reads it ~1.5x faster than a transposed view,
        # which repays the copy within a few iterations.
        u, v, e, iters = sinkhorn_plain(K, K.transpose(1, 2).contiguous(), a_full[chunk], b_full[chunk], max_iter,
                                         tol, check_every, omega, has_zero_mass)
        plans.append(_plan(K, u, v, n, m))
        errors.append(e)
        n_iter = max(n_iter, iters)
    err = errors[0] if len(errors) == 1 else torch.cat(errors)
    plan = plans[0] if len(plans) == 1 else torch.cat(plans)
    sigma = _transport_similarity(plan, S)
    # Problems the plain domain cannot represent even with plain updates (error inf) are
    # solved in the log domain; so is any whose plan overflowed (sigma not finite).
    if not math.isfinite(float(err.sum() + sigma.sum())):
        redo = (~(torch.isfinite(err) & torch.isfinite(sigma))).nonzero().squeeze(1)
        plan[redo], err[redo], iters = _solve_log(S[redo], a[redo], b[redo], eps, s, max_iter, tol, check_every)
        sigma[redo] = _transport_similarity(plan[redo], S[redo])
        n_iter = max(n_iter, iters)
    return plan, sigma, err, n_iter


def _plan(K: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``diag(u) K diag(v)`` restricted to the real points, ``(B, n, m)`` contiguous: in place when
    ``K`` has no dummy row and column, else one pass that reads the core of the padded ``K``."""
    if K.shape[-2:] == (n, m):
        return K.mul_(u.transpose(1, 2)).mul_(v)
    return torch.mul(K[:, :n, :m], u[:, :, :n].transpose(1, 2)).mul_(v[:, :, :m])


def sinkhorn(
    similarity: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float = 0.05,
    s: float = 1.0,
    max_iter: int = 1000,
    tol: float = 2e-4,
    check_every: int = 5,
    log_domain: bool | None = None,
    omega: float = 1.5,
) -> OTResult:
    """Solve a batch of (partial) entropic OT problems between patch grids.

    Args:
        similarity: cosine similarities ``(..., n, m)``; the cost is ``1 - similarity``.
        a: query-side marginals ``(..., n)``, broadcastable to the batch; each sums to 1.
        b: candidate-side marginals ``(..., m)``, broadcastable to the batch; each sums to 1.
        eps: entropic regularisation.
        s: fraction of mass to match, in ``(0, 1]``; ``1`` is plain OT.
        max_iter: iteration cap.
        tol: stop when every problem's L1 row-marginal error is below this.
        check_every: measure the error every this many iterations.
        log_domain: force (True) or forbid (False) log-domain iterations; by default
            they are used only when the plain kernel could underflow in fp32.
        omega: over-relaxation of the plain-domain updates, in ``[1, 2)``; 1 is classic
            Sinkhorn. The update before each error check is a plain one, so the columns
            are exact whenever the (row) error is measured, as in classic Sinkhorn.

    Returns:
        An :class:`OTResult` whose tensors have the batch shape of the inputs.
    """
    if max_iter < 1 or check_every < 1:
        raise ValueError("max_iter and check_every must be at least 1")
    if not 1.0 <= omega < 2.0:
        raise ValueError(f"omega must be in [1, 2), got {omega}")
    has_zero_mass = _check_inputs(similarity, a, b, eps, s)
    n, m = similarity.shape[-2:]
    batch_shape = torch.broadcast_shapes(similarity.shape[:-2], a.shape[:-1], b.shape[:-1])
    S = similarity.float().expand(*batch_shape, n, m).reshape(-1, n, m)
    a = a.float().expand(*batch_shape, n).reshape(-1, n)
    b = b.float().expand(*batch_shape, m).reshape(-1, m)
    small = S.device.type == "cpu" and S.numel() <= SINGLE_THREAD_MAX_ELEMENTS
    with torch_threads(1) if small else contextlib.nullcontext():
        if S.stride(-2) == 1 and S.stride(-1) != 1:
            # S is a transposed view, its columns in unit stride (what reranker.rerank.similarity gives):
            # solve the transposed problem (b, a), whose plan is the transpose, in the buffer's own order.
            plan, sigma, err, n_iter = _solve(S.transpose(1, 2), b, a, eps, s, max_iter, tol, check_every, omega,
                                              log_domain, has_zero_mass)
            plan = plan.transpose(1, 2)
        else:
            plan, sigma, err, n_iter = _solve(S, a, b, eps, s, max_iter, tol, check_every, omega, log_domain,
                                              has_zero_mass)
    return OTResult(
        plan=plan.reshape(*batch_shape, n, m),
        sigma=sigma.reshape(batch_shape),
        marginal_error=err.reshape(batch_shape),
        n_iter=n_iter,
    )
