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
fp32 underflow) and in the log domain when ``eps`` is too small for that. They
stop when the row-marginal error (L1, per problem) of every problem in the batch
is below ``tol``, checked every ``check_every`` iterations, or at ``max_iter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# exp(-x) stays a normal fp32 number for x below ~87; keep a margin.
_PLAIN_DOMAIN_MAX_EXPONENT = 80.0


@dataclass
class OTResult:
    """Solution of a batch of transport problems.

    Attributes:
        plan: transport plans between the real points, ``(..., n, m)``, fp32.
        sigma: structural similarity ``sum(plan * S)``, ``(...)``, fp32.
        marginal_error: L1 error of the row marginals of the full problem, ``(...)``.
        n_iter: iterations run (the same for the whole batch).
    """

    plan: torch.Tensor
    sigma: torch.Tensor
    marginal_error: torch.Tensor
    n_iter: int

    @property
    def transported_mass(self) -> torch.Tensor:
        """Mass moved between real points, ``(...)``: about ``s``."""
        return self.plan.sum(dim=(-2, -1))


def _check_inputs(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, s: float) -> None:
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
    for name, t in (("similarity", S), ("a", a), ("b", b)):
        # One reduction instead of an elementwise test: any NaN or inf makes the sum non-finite.
        if not torch.isfinite(t.float().sum()):
            raise ValueError(f"{name} contains NaN or inf")
    if float(a.min()) < 0 or float(b.min()) < 0:
        raise ValueError("marginals must be non-negative")


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


def _sinkhorn_plain(K, a, b, s, max_iter, tol, check_every):
    """Plain-domain Sinkhorn with the dummy points handled in closed form.

    The full kernel is ``[[K, c], [c, 0]]`` with ``c = 1 - s`` and both dummy masses
    are ``c``, so the dummy scalings are ``u_d = 1 / sum(v)``, ``v_d = 1 / sum(u)``
    and the real updates only gain the terms ``c * v_d`` and ``c * u_d``. Vectors are
    kept as rows ``(B, 1, n)``: ``v K^T`` and ``u K`` are the fast forms of ``bmm``.
    Returns the real scalings ``u, v`` (as rows), the L1 row error and the iterations.
    """
    B, n, m = K.shape
    c = 1.0 - s
    Kt = K.transpose(1, 2)
    a = a.unsqueeze(1)
    b = b.unsqueeze(1)
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    v_d = torch.ones(B, 1, 1, dtype=K.dtype, device=K.device)
    u_d = v_d
    Kv = torch.empty_like(a)
    Ktu = torch.empty_like(b)
    err = torch.full((B,), math.inf, dtype=K.dtype, device=K.device)
    it = 0
    while it < max_iter:
        it += 1
        torch.bmm(v, Kt, out=Kv)
        if c:
            Kv.add_(v_d, alpha=c)
        torch.div(a, Kv, out=u)
        torch.bmm(u, K, out=Ktu)
        if c:
            u_d = 1.0 / v.sum(-1, keepdim=True)
            Ktu.add_(u_d, alpha=c)
        torch.div(b, Ktu, out=v)
        if c:
            v_d = 1.0 / u.sum(-1, keepdim=True)
        if it % check_every == 0 or it == max_iter:
            # Columns are exact after the v update; measure the rows (dummy row included).
            torch.bmm(v, Kt, out=Kv)
            if c:
                Kv.add_(v_d, alpha=c)
            err = (u * Kv - a).abs().sum(-1).squeeze(-1)
            if c:
                err = err + (c * u_d * v.sum(-1, keepdim=True) - c).abs().view(B)
            if float(err.max()) < tol:
                break
    return u, v, err, it


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


def sinkhorn(
    similarity: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float = 0.05,
    s: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-5,
    check_every: int = 5,
    log_domain: bool | None = None,
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

    Returns:
        An :class:`OTResult` whose tensors have the batch shape of the inputs.
    """
    if max_iter < 1 or check_every < 1:
        raise ValueError("max_iter and check_every must be at least 1")
    _check_inputs(similarity, a, b, eps, s)
    n, m = similarity.shape[-2:]
    batch_shape = torch.broadcast_shapes(similarity.shape[:-2], a.shape[:-1], b.shape[:-1])
    S = similarity.float().expand(*batch_shape, n, m).reshape(-1, n, m)
    a = a.float().expand(*batch_shape, n).reshape(-1, n)
    b = b.float().expand(*batch_shape, m).reshape(-1, m)
    if log_domain is None:
        max_cost = 1.0 - float(S.min())
        log_domain = max_cost / eps > _PLAIN_DOMAIN_MAX_EXPONENT

    if log_domain:
        log_kernel = (S - 1.0) / eps
        if s < 1.0:
            log_kernel, a_full, b_full = _add_dummy(log_kernel, a, b, s)
        else:
            a_full, b_full = a, b
        f, g, err, n_iter = _sinkhorn_log(log_kernel, a_full, b_full, max_iter, tol, check_every)
        plan = (log_kernel + f.unsqueeze(2) + g.unsqueeze(1)).exp()[:, :n, :m]
    else:
        kernel = torch.sub(S, 1.0).div_(eps).exp_()
        u, v, err, n_iter = _sinkhorn_plain(kernel, a, b, s, max_iter, tol, check_every)
        plan = kernel.mul_(u.transpose(1, 2)).mul_(v)
    B = plan.shape[0]
    sigma = torch.bmm(plan.reshape(B, 1, n * m), S.reshape(B, n * m, 1)).view(B)
    return OTResult(
        plan=plan.reshape(*batch_shape, n, m),
        sigma=sigma.reshape(batch_shape),
        marginal_error=err.reshape(batch_shape),
        n_iter=n_iter,
    )
