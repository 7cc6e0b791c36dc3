"""Problem generators shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_problem(Q: int, K: int, n: int = 49, m: int = 49, dim: int = 32, spread: float = 0.8, seed: int = 0):
    """Similarities ``(Q, K, n, m)`` of clustered unit vectors and random marginals, in fp32."""
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
