"""CG (batched over columns) and LiSSA against torch.linalg.solve."""

import numpy as np
import pytest
import torch

from gradsketch.linalg import FunctionOperator, MatrixOperator, SolveResult, cg, lissa


def planted(eigs, seed=0):
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    A = (Q * eigs) @ Q.T
    return (A + A.T) / 2


N = 120
EIGS = np.concatenate([[50.0, 20.0, 10.0], np.linspace(0.0, 2.0, N - 3)])  # PSD, singular
A = planted(EIGS, seed=0)
OP = MatrixOperator(A)
g = torch.Generator().manual_seed(1)
B = torch.randn(N, 4, generator=g, dtype=torch.float64)
I = torch.eye(N, dtype=torch.float64)


def test_cg_batched_matches_solve():
    r = cg(OP, B, damping=0.1)
    assert isinstance(r, SolveResult)
    X = torch.linalg.solve(A + 0.1 * I, B)
    assert r.x.shape == (N, 4)
    assert bool(r.converged.all()) and float(r.residual_norms.max()) <= 1e-8
    # forward error <= κ · relative residual, κ = 50.1 / 0.1
    err = ((r.x - X).norm(dim=0) / X.norm(dim=0)).max()
    assert float(err) <= 501 * 1e-8
    tight = cg(OP, B, damping=0.1, tol=1e-13)
    assert torch.allclose(tight.x, X, rtol=1e-9, atol=1e-10)
    assert r.n_iter < N  # CG on κ = 500: far fewer than n steps
    # each column equals its own single-vector run
    r1 = cg(OP, B[:, 2], damping=0.1)
    assert r1.x.shape == (N,)
    assert torch.allclose(r1.x, r.x[:, 2], rtol=1e-7, atol=1e-9)


def test_cg_columns_converge_independently_and_x0():
    Bm = torch.cat([B[:, :1], torch.zeros(N, 1, dtype=torch.float64), 1e-3 * B[:, 1:2]], 1)
    r = cg(OP, Bm, damping=1.0, tol=1e-10)
    assert torch.equal(r.x[:, 1], torch.zeros(N, dtype=torch.float64))
    assert torch.allclose(r.x, torch.linalg.solve(A + I, Bm), rtol=1e-8, atol=1e-12)
    X = torch.linalg.solve(A + I, B)
    warm = cg(OP, B, damping=1.0, x0=X + 1e-6)
    assert warm.n_iter < cg(OP, B, damping=1.0).n_iter
    assert torch.allclose(warm.x, X, atol=1e-8)


def test_cg_maxiter_and_float32():
    r = cg(OP, B, damping=0.01, maxiter=3)
    assert r.n_iter == 3 and not bool(r.converged.any())
    r32 = cg(MatrixOperator(A.float()), B.float(), damping=0.1)
    assert r32.x.dtype == torch.float32
    X = torch.linalg.solve(A + 0.1 * I, B)
    assert float((r32.x.double() - X).norm() / X.norm()) < 1e-4


def test_cg_indefinite_raises():
    C = planted(np.concatenate([[-1.0], np.linspace(1, 2, 29)]), seed=3)
    with pytest.raises(ValueError, match="not positive definite"):
        cg(MatrixOperator(C), torch.ones(30, dtype=torch.float64))
    r = cg(MatrixOperator(C), torch.ones(30, dtype=torch.float64), damping=1.5)  # damping fixes it
    assert bool(r.converged.all())


def test_lissa_matches_solve_with_effective_damping():
    """Fixed point of x ← b + (1 − d)x − Ax/s is (A + d·s I)⁻¹ b after dividing by s."""
    s, d = 60.0, 0.02
    r = lissa(OP, B, damping=d, scale=s, depth=5000)
    X = torch.linalg.solve(A + d * s * I, B)
    assert torch.allclose(r.x, X, rtol=1e-6, atol=1e-8)
    assert bool(r.converged.all()) and float(r.residual_norms.max()) < 1e-6
    # the predicted contraction: log(tol)/log(1 - d) steps (λ_min = 0)
    assert r.n_iter <= int(np.log(1e-10) / np.log(1 - d)) + 50
    r1 = lissa(OP, B[:, 0], damping=d, scale=s, depth=5000)
    assert r1.x.shape == (N,) and torch.allclose(r1.x, X[:, 0], rtol=1e-6, atol=1e-8)


def test_lissa_default_scale_and_truncation():
    r = lissa(OP, B[:, 0], damping=0.05, depth=3000)
    # default scale 1.1·λ_max = 55 (from Lanczos): effective damping 0.05·55
    X = torch.linalg.solve(A + 0.05 * 55.0 * I, B[:, 0])
    assert torch.allclose(r.x, X, rtol=1e-4, atol=1e-6)
    short = lissa(OP, B[:, 0], damping=0.001, scale=60.0, depth=10)
    assert short.n_iter == 10 and not bool(short.converged.any())
    assert float(short.residual_norms[0]) > 1e-2


def test_lissa_diverges_raises():
    with pytest.raises(ValueError, match="diverges"):
        lissa(OP, B[:, 0], damping=0.0, scale=10.0, depth=200)  # λ_max = 50 > 2·scale
    C = planted(np.concatenate([[-1.0], np.linspace(1, 2, 29)]), seed=3)
    with pytest.raises(ValueError, match="damping"):
        lissa(MatrixOperator(C), torch.ones(30, dtype=torch.float64), damping=0.0, scale=3.0, depth=2000)


def test_nan_operator():
    bad = FunctionOperator(lambda V: V * float("nan"), (5, 5), torch.float64, symmetric=True)
    with pytest.raises(ValueError, match="NaN"):
        cg(bad, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        lissa(bad, torch.ones(5, dtype=torch.float64), scale=1.0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: cg(OP, B[:5]), ValueError, r"B: expected a tensor of shape \[120\] or \[120, k\]"),
    (lambda: cg(OP, B.numpy()), TypeError, "B: expected a torch.Tensor"),
    (lambda: cg(OP, B, damping="a"), TypeError, "damping"),
    (lambda: cg(OP, B, tol=-1.0), ValueError, "tol"),
    (lambda: cg(OP, B, maxiter=0), ValueError, "maxiter"),
    (lambda: cg(OP, B, x0=B[:, 0]), ValueError, "x0"),
    (lambda: cg(OP, torch.full((N,), float("nan"))), ValueError, "B: expected finite"),
    (lambda: cg(A, B), TypeError, "op"),
    (lambda: lissa(OP, B, damping=1.0, scale=60.0), ValueError, "damping"),
    (lambda: lissa(OP, B, damping=-0.1, scale=60.0), ValueError, "damping"),
    (lambda: lissa(OP, B, scale=0.0), ValueError, "scale"),
    (lambda: lissa(OP, B, scale=60.0, depth=0), ValueError, "depth"),
    (lambda: lissa(OP, torch.ones(3), scale=1.0), ValueError, "b: expected a tensor"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
