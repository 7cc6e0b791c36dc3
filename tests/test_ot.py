"""The batched Sinkhorn solver against POT and against the definition of partial transport."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from helpers import patch_problem
from reranker.ot import sinkhorn


def pot_reference_sigma(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float) -> np.ndarray:
    """sigma from POT's batched log-domain Sinkhorn, run to a tight tolerance in float64."""
    K = S.shape[0]
    M = (1.0 - S).double()
    res = ot.solve_batch(M, reg=eps, a=a.expand(K, -1).double(), b=b.double(),
                         max_iter=5000, tol=1e-7, method="log_sinkhorn")
    assert res.log["n_iter"] < 4999, "the reference did not converge"
    return (res.plan * S.double()).sum(dim=(1, 2)).numpy()


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_sigma_matches_pot_solve_batch(eps):
    S, a, b = patch_problem(1, 20)
    ours = sinkhorn(S, a, b, eps=eps, tol=1e-6, max_iter=5000)
    ref = pot_reference_sigma(S[0], a[0], b[0], eps)
    assert np.abs(ours.sigma[0].double().numpy() - ref).max() <= 1e-5


def test_plan_meets_both_marginals():
    S, a, b = patch_problem(2, 10)
    res = sinkhorn(S, a, b, tol=1e-6, max_iter=5000)
    torch.testing.assert_close(res.plan.sum(-1), a.expand(2, 10, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.plan.sum(-2), b, atol=1e-5, rtol=0)
    assert float(res.marginal_error.max()) < 1e-6
    direct_sigma = (res.plan * S).sum((-2, -1))
    torch.testing.assert_close(res.sigma, direct_sigma, atol=1e-6, rtol=0)


@pytest.mark.parametrize("s", [0.3, 0.7, 0.9])
def test_partial_transports_exactly_s(s):
    S, a, b = patch_problem(1, 16)
    res = sinkhorn(S, a, b, s=s, tol=1e-5, max_iter=5000)
    assert torch.allclose(res.transported_mass, torch.full_like(res.transported_mass, s), atol=1e-3)
    # Real points never send or receive more than their mass.
    assert bool((res.plan.sum(-1) <= a + 1e-5).all()) and bool((res.plan.sum(-2) <= b + 1e-5).all())


def test_partial_matches_pot_exact_partial_at_small_eps():
    S, a, b = patch_problem(1, 4, n=12, m=12, spread=1.0, seed=3)
    s = 0.6
    res = sinkhorn(S, a, b, s=s, eps=0.002, tol=1e-7, max_iter=50000, check_every=50)
    for k in range(4):
        M = (1.0 - S[0, k]).double().numpy()
        exact = ot.partial.partial_wasserstein(a[0, 0].double().numpy(), b[0, k].double().numpy(), M, m=s)
        plan = res.plan[0, k].double().numpy()
        assert abs(plan.sum() - exact.sum()) < 1e-3
        assert abs((plan * M).sum() - (exact * M).sum()) < 5e-3
        assert np.abs(plan - exact).sum() < 0.05


def test_s_one_is_plain_ot_and_the_limit_of_partial():
    S, a, b = patch_problem(1, 8)
    plain = sinkhorn(S, a, b, s=1.0, tol=1e-6, max_iter=5000)
    near = sinkhorn(S, a, b, s=1.0 - 1e-6, tol=1e-6, max_iter=5000)
    ref = pot_reference_sigma(S[0], a[0], b[0], 0.05)
    assert np.abs(plain.sigma[0].double().numpy() - ref).max() <= 1e-5
    torch.testing.assert_close(near.sigma, plain.sigma, atol=1e-4, rtol=0)


def test_scores_do_not_depend_on_candidate_order():
    S, a, b = patch_problem(1, 12)
    perm = torch.randperm(12)
    base = sinkhorn(S, a, b, s=0.9)
    shuffled = sinkhorn(S[:, perm], a, b[:, perm], s=0.9)
    torch.testing.assert_close(shuffled.sigma, base.sigma[:, perm], atol=1e-6, rtol=0)


def test_log_domain_agrees_with_plain_domain():
    S, a, b = patch_problem(2, 6)
    for s in (1.0, 0.8):
        plain = sinkhorn(S, a, b, s=s, tol=1e-6, max_iter=5000, log_domain=False)
        logd = sinkhorn(S, a, b, s=s, tol=1e-6, max_iter=5000, log_domain=True)
        torch.testing.assert_close(plain.sigma, logd.sigma, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain.plan, logd.plan, atol=1e-5, rtol=0)


def test_small_eps_switches_to_log_domain_and_stays_finite():
    S, a, b = patch_problem(1, 4)
    res = sinkhorn(S, a, b, eps=0.005, max_iter=2000)
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.sigma).all()
    assert torch.allclose(res.transported_mass, torch.ones(1, 4), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_iterate_in_fp32(dtype):
    S, a, b = patch_problem(1, 8)
    full = sinkhorn(S, a, b, tol=1e-5, max_iter=2000)
    half = sinkhorn(S.to(dtype), a.to(dtype), b.to(dtype), tol=1e-5, max_iter=2000)
    assert half.sigma.dtype == torch.float32
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(half.sigma, full.sigma, atol=tol, rtol=0)


def test_broadcast_batch_shapes():
    S, a, b = patch_problem(3, 5)
    res = sinkhorn(S, a, b)
    assert res.plan.shape == (3, 5, 49, 49) and res.sigma.shape == (3, 5)
    single = sinkhorn(S[1, 2], a[1, 0], b[1, 2])
    assert single.sigma.shape == ()
    torch.testing.assert_close(single.sigma, res.sigma[1, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(s=0.0), "s "),
        (dict(s=1.5), "s "),
        (dict(s=float("nan")), "s "),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1.0), "eps"),
        (dict(max_iter=0), "max_iter"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    S, a, b = patch_problem(1, 2)
    with pytest.raises(ValueError, match=message):
        sinkhorn(S, a, b, **kwargs)


def test_invalid_inputs_raise():
    S, a, b = patch_problem(1, 2)
    with pytest.raises(ValueError, match="marginals do not match"):
        sinkhorn(S, a[..., :10], b)
    bad = S.clone()
    bad[0, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn(bad, a, b)
    with pytest.raises(ValueError, match="non-negative"):
        sinkhorn(S, -a, b)
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.ones(3), a, b)


def far_patch_problem(K: int, far=None, n: int = 49, m: int = 49, dim: int = 16, spread: float = 0.2, seed: int = 0):
    """A query whose first patch points away from the candidates' patches.

    The patches of the candidates ``far`` (all by default) cluster around one direction and
    the query's first patch is the negative of their mean direction: it is at cosine <= -0.9
    from every one of their patches, so its kernel row is ~exp(-1.9 / eps). The other
    candidates' patches are random unit vectors. Returns ``S (K, n, m)``, ``a (n)``, ``b (K, m)``.
    """
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=g)
    fq = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    fx = torch.nn.functional.normalize(torch.randn(K, m, dim, generator=g), dim=-1)
    far = torch.arange(K) if far is None else torch.as_tensor(far)
    fx[far] = torch.nn.functional.normalize(center + spread * torch.randn(len(far), m, dim, generator=g), dim=-1)
    fq[0] = -torch.nn.functional.normalize(fx[far].mean(dim=(0, 1)), dim=0)
    S = torch.matmul(fq, fx.transpose(1, 2)).contiguous()
    a = torch.softmax(torch.randn(n, generator=g), -1)
    b = torch.softmax(torch.randn(K, m, generator=g), -1)
    return S, a, b


@pytest.mark.parametrize("log_domain", [False, None])
@pytest.mark.parametrize("s", [1.0, 0.7])
@pytest.mark.parametrize("eps", [0.025, 0.03, 0.035])
def test_far_query_patch_keeps_sigma_finite(eps, s, log_domain):
    # Over-relaxed updates overflow on the far patch's row within a few iterations; the
    # plain domain must recover (or hand the problem to the log domain), never return NaN.
    S, a, b = far_patch_problem(100)
    assert (1.0 - float(S.min())) / eps <= 80.0  # the default path is the plain domain too
    res = sinkhorn(S, a, b, eps=eps, s=s, log_domain=log_domain)
    assert torch.isfinite(res.sigma).all() and torch.isfinite(res.plan).all()
    ref = sinkhorn(S, a, b, eps=eps, s=s, log_domain=True)
    torch.testing.assert_close(res.sigma, ref.sigma, atol=1e-4, rtol=0)
    if s == 1.0:
        pot = pot_reference_sigma(S[:4], a, b[:4], eps)
        assert np.abs(res.sigma[:4].double().numpy() - pot).max() <= 1e-4


def test_plain_domain_underflow_is_solved_in_the_log_domain():
    # At eps = 0.02 the far patch's kernel row is below fp32's range: even plain Sinkhorn
    # overflows there, so forcing the plain domain must still give the log-domain answer.
    S, a, b = far_patch_problem(20)
    eps = 0.02
    assert (1.0 - float(S.min())) / eps > 80.0
    res = sinkhorn(S, a, b, eps=eps, log_domain=False)
    assert torch.isfinite(res.sigma).all() and torch.isfinite(res.plan).all()
    assert float(res.marginal_error.max()) < 2e-4
    ref = sinkhorn(S, a, b, eps=eps, log_domain=True)
    torch.testing.assert_close(res.sigma, ref.sigma, atol=1e-4, rtol=0)
    torch.testing.assert_close(sinkhorn(S, a, b, eps=eps).sigma, ref.sigma, atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", [1.0 - 1e-3, 1.0 + 1e-3])
def test_far_query_patch_at_the_plain_log_threshold(side):
    # Just on either side of the switch (max cost / eps = 80) the default path is finite and
    # agrees with the log domain.
    S, a, b = far_patch_problem(20)
    eps = (1.0 - float(S.min())) / 80.0 * side
    res = sinkhorn(S, a, b, eps=eps)
    assert torch.isfinite(res.sigma).all() and torch.isfinite(res.plan).all()
    ref = sinkhorn(S, a, b, eps=eps, log_domain=True)
    torch.testing.assert_close(res.sigma, ref.sigma, atol=1e-4, rtol=0)


@pytest.mark.parametrize("s", [1.0, 0.7])
def test_far_patch_problem_does_not_disturb_its_batch(s):
    # One pathological problem among 99 easy ones: every sigma is finite and the log-domain
    # answer, and the easy problems come out as they do when solved without it.
    at, eps = 37, 0.03
    S, a, b = far_patch_problem(100, far=[at])
    assert float(S[at, 0].max()) < -0.8 and float(torch.cat([S[:at], S[at + 1:]])[:, 0].max()) > 0.5
    res = sinkhorn(S, a, b, eps=eps, s=s)
    assert torch.isfinite(res.sigma).all() and torch.isfinite(res.plan).all()
    ref = sinkhorn(S, a, b, eps=eps, s=s, log_domain=True)
    torch.testing.assert_close(res.sigma, ref.sigma, atol=1e-4, rtol=0)
    easy = torch.cat([torch.arange(at), torch.arange(at + 1, 100)])
    alone = sinkhorn(S[easy], a, b[easy], eps=eps, s=s)
    torch.testing.assert_close(res.sigma[easy], alone.sigma, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.plan[easy], alone.plan, atol=1e-6, rtol=0)


@pytest.mark.parametrize("s", [1.0, 0.6])
@pytest.mark.parametrize("shift", [0.0, 7.5])
def test_padded_kernel_is_the_dummy_construction_up_to_a_constant(s, shift):
    """The kernel built contiguously and then padded is the method's (n+1) x (m+1) kernel,
    exp((S - 1) / eps) inside, 1 - s on the dummy row and column, 0 dummy-to-dummy, times the one
    constant exp(1 / eps - shift), which the scalings absorb (the plan is unchanged)."""
    from reranker.ot import _plain_kernel

    eps = 0.05
    S = torch.rand(3, 4, 5) * 2 - 1
    a, b = torch.full((3, 4), 0.25), torch.full((3, 5), 0.2)
    K, a_full, b_full = _plain_kernel(S, a, b, eps, s, shift)
    K = K.double() * math.exp(shift - 1 / eps)
    core = torch.exp((S.double() - 1) / eps)
    if s == 1.0:
        torch.testing.assert_close(K, core, rtol=1e-5, atol=0)
        return
    expected = torch.full((3, 5, 6), 1 - s, dtype=torch.float64)
    expected[:, :4, :5] = core
    expected[:, 4, 5] = 0.0
    torch.testing.assert_close(K, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(a_full[:, -1], torch.full((3,), 1 - s))
    torch.testing.assert_close(b_full[:, -1], torch.full((3,), 1 - s))


def test_kernel_shift_keeps_entries_in_fp32_or_chooses_the_log_domain():
    from reranker.ot import _kernel_shift

    assert _kernel_shift(-1.0, 1.0, 0.05, 0.5) == 0.0  # exp(+-20), dummy (1 - s) e^20: no shift needed
    shift = _kernel_shift(-0.2, 1.0, 0.02, 1.0)  # exponents -10 .. 50: centred
    assert shift == pytest.approx(20.0) and 50 - shift <= 40 and -10 - shift >= -40
    assert _kernel_shift(-1.0, 1.0, 0.02, 1.0) is None  # a spread of exp(100): beyond fp32, log domain
    # exponents 180 .. 200 and the dummy's ln(0.5) + 200: a spread of 20, far from 0: centred
    assert _kernel_shift(0.9, 1.0, 0.005, 0.5) == pytest.approx(190.0)


@pytest.mark.parametrize("s", [1.0, 0.7])
def test_a_shifted_plain_kernel_gives_the_log_domain_solution(s):
    """At eps = 0.015 on cosines in [0.2, 1] the plain kernel is shifted (exponents up to 67); the
    plain solve must still equal the log-domain one."""
    from reranker.ot import _kernel_shift

    S, a, b = patch_problem(1, 6)
    S = 0.2 + 0.8 * (S - S.min()) / (S.max() - S.min())
    assert _kernel_shift(float(S.min()), float(S.max()), 0.015, s) not in (None, 0.0)
    plain = sinkhorn(S, a, b, eps=0.015, s=s, tol=1e-6, max_iter=5000, log_domain=False)
    logd = sinkhorn(S, a, b, eps=0.015, s=s, tol=1e-6, max_iter=5000, log_domain=True)
    torch.testing.assert_close(plain.sigma, logd.sigma, atol=2e-5, rtol=0)
    torch.testing.assert_close(plain.plan, logd.plan, atol=2e-5, rtol=0)


# --- the default stop against the converged solution (issue 13) ------------------------------------------


def converged_sigma(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """sigma of our solver (fp32 iterations) run to an L1 marginal error of 1e-6 (fp32 stalls near 1e-7)."""
    return sinkhorn(S, a, b, s=s, tol=1e-6, max_iter=5000).sigma.double()


def pot_partial_sigma(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> np.ndarray:
    """POT's float64 batched Sinkhorn on the dummy-augmented problem (the bench's construction)."""
    from vit_rerank.bench.ot import pot_problem, sigma_of

    M, A, B = pot_problem(S.double(), a.double(), b.double(), s)
    res = ot.solve_batch(M, reg=0.05, a=A, b=B, max_iter=20000, tol=1e-9, method="sinkhorn")
    return sigma_of(res.plan, S.double()).numpy()


def assert_default_stop_is_close(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> None:
    """The default settings keep |d sigma| <= 1e-4 against the converged solution and POT, which
    agree with each other far more tightly (so the 1e-4 is the solver's, not the oracle's)."""
    fast = sinkhorn(S, a, b, s=s)
    ref = converged_sigma(S, a, b, s).reshape(-1).numpy()
    pot = pot_partial_sigma(S, a, b, s)
    assert np.abs(ref - pot).max() < 1e-5
    sigma = fast.sigma.reshape(-1).double().numpy()
    assert np.abs(sigma - ref).max() <= 1e-4 and np.abs(sigma - pot).max() <= 1e-4
    assert float(fast.marginal_error.max()) < 2e-4


@pytest.mark.parametrize("s", [1.0, 0.9, 0.5])
def test_default_stop_is_within_1e4_of_converged_on_clustered_problems(s):
    S, a, b = patch_problem(1, 16, seed=3)  # clustered: the hard, slow-converging kind
    assert_default_stop_is_close(S, a, b, s)


def test_transposed_similarity_is_solved_as_the_transposed_problem():
    """A similarity given as a transposed view (what reranker.rerank.similarity returns) is solved in
    its own memory order: same sigma as the contiguous copy, the plan meets both marginals."""
    S, a, b = patch_problem(1, 6, n=12, m=9)
    view = S.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert view.stride(-2) == 1 and torch.equal(view, S)
    for s in (1.0, 0.7):
        got = sinkhorn(view, a, b, s=s, tol=1e-7, max_iter=5000)
        want = sinkhorn(S.contiguous(), a, b, s=s, tol=1e-7, max_iter=5000)
        assert got.plan.shape == want.plan.shape == S.shape
        torch.testing.assert_close(got.sigma, want.sigma, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.plan, want.plan, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.transported_mass, torch.full((1, 6), s), atol=1e-5, rtol=0)
        assert bool((got.plan.sum(-1) <= a + 1e-5).all()) and bool((got.plan.sum(-2) <= b + 1e-5).all())


def test_any_omega_takes_the_same_path_to_the_same_answer():
    """omega = 1.5 (x sqrt x) and any other omega (exp(omega log x)) solve the same problem."""
    S, a, b = patch_problem(1, 8)
    ref = converged_sigma(S, a, b, 0.9)
    for omega in (1.0, 1.3, 1.5, 1.7):
        res = sinkhorn(S, a, b, s=0.9, omega=omega)
        assert float((res.sigma.double() - ref).abs().max()) <= 1e-4, omega


@pytest.mark.slow
@pytest.mark.real_backbone
def test_default_stop_is_within_1e4_of_converged_on_real_dinov2_problems(shared_data, real_weights):
    """Real DINOv2 ViT-S/14 patch grids of clothing photos, the search's default cross-correlation
    marginals: the default stop against the converged solution and POT, at the default s and others."""
    from PIL import Image

    from indexer.embedding import embed_pil_images
    from reranker.backbones import create_backbone
    from reranker.rerank import Features, _crosscorr_marginals, _normalised

    backbone = create_backbone("vit_small_patch14_dinov2", str(real_weights))
    paths = sorted((shared_data / "clothing-small" / "test").glob("*/*.jpg"))[::40][:9]
    query = embed_pil_images(backbone, [Image.open(x) for x in paths], None)
    g, p = query.global_features, query.patch_features
    query = Features(g[:1], p[:1])
    cands = Features(g[1:].unsqueeze(0), p[1:].half().unsqueeze(0))
    S, mu_q, mu_x = _crosscorr_marginals(query, cands, p[:1], cands.patch_features.float())
    for s in (0.5, 0.9, 1.0):
        assert_default_stop_is_close(S, _normalised(mu_q), _normalised(mu_x), s)
