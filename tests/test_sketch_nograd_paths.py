"""The no-autograd paths of the sketches used by subspace training (issue 18, memory): AFFD/FJL adjoints in
place on one padded buffer, Fastfood forward and adjoint over chunks of blocks. Each equals the autograd
path (the kinds' plain torch ops) in float64 to rounding, and ⟨Φx, y⟩ = ⟨x, Φᵀy⟩."""

import pytest
import torch

import gradsketch
from gradsketch.sketch import kinds


def _both(S, x, y):
    with torch.no_grad():
        fast = (S(x), S.T(y))
    xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    slow = (S(xx).detach(), S.T(yy).detach())
    return fast, slow


# affd/fjl: n = 600,000 (2 rows are above the forward fast path's 2^20-element minimum); ffd: chunks of
# 3000 elements = 5 blocks of L = 512, so n = 20,000 runs over 8 chunks (the last one partial)
@pytest.mark.parametrize("kind,pre,n,chunk", [("affd", "hadamard", 600000, 1 << 20),
                                              ("fjl", "hadamard", 600000, 1 << 20),
                                              ("ffd", "hadamard", 20000, 3000), ("ffd", "hadamard", 20000, 1 << 20),
                                              ("ffd", "orthogonal", 20000, 3000), ("ffd", "fft", 20000, 3000)])
def test_nograd_paths_equal_autograd_paths(kind, pre, n, chunk, monkeypatch):
    monkeypatch.setattr(kinds, "FFD_CHUNK", chunk)
    d = 512
    S = gradsketch.sketch(kind, n, d, seed=3, preconditioner=pre)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, dtype=torch.float64, generator=g)
    y = torch.randn(3, d, dtype=torch.float64, generator=g)
    called = {"f": 0, "a": 0}
    fwd, adj = S._forward_fast, S._adjoint_fast

    def f(*a):
        called["f"] += 1
        return fwd(*a)

    def t(*a):
        called["a"] += 1
        return adj(*a)

    monkeypatch.setattr(S, "_forward_fast", f)
    monkeypatch.setattr(S, "_adjoint_fast", t)
    (fx, fy), (sx, sy) = _both(S, x, y)
    assert called == {"f": 1, "a": 1}  # the no-grad calls took the fast paths, the autograd ones did not
    torch.testing.assert_close(fx, sx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fy, sy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx @ y.T, x @ fy.T, rtol=1e-10, atol=1e-9)
    # float32 too (the dtype subspace training uses): same map up to float32 rounding
    with torch.no_grad():
        f32 = S.T(y.float())
    torch.testing.assert_close(f32.double(), sy, rtol=1e-4, atol=1e-5)
