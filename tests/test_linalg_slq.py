"""Stochastic Lanczos quadrature on a planted spectrum (float64)."""

import numpy as np
import pytest
import torch

from gradsketch.linalg import FunctionOperator, MatrixOperator, SLQResult, slq


def planted(eigs, seed=0):
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    A = (Q * eigs) @ Q.T
    return (A + A.T) / 2, Q


rng = np.random.default_rng(0)
# outliers (incl. negative), a uniform bulk and a Gaussian bump: n = 400
EIGS = np.concatenate([[8.0, 6.0, 5.0, -2.0, -1.5], rng.uniform(0, 1, 300), rng.normal(2, 0.2, 95)])
N = len(EIGS)
A, QA = planted(EIGS, seed=1)
OP = MatrixOperator(A)
P, M = 16, 50
RES = slq(OP, P, M, seed=0)


def per_probe_moment(r, p):
    return (r.weights * r.nodes**p).sum(1).numpy()


def test_structure():
    assert isinstance(RES, SLQResult)
    assert RES.nodes.shape == (P, M) and RES.weights.shape == (P, M) and RES.n == N
    np.testing.assert_allclose(RES.weights.sum(1).numpy(), 1.0, atol=1e-12)
    lo, hi = RES.spectral_range
    assert lo >= EIGS.min() - 1e-9 and hi <= EIGS.max() + 1e-9  # Ritz values interlace the spectrum
    assert hi == pytest.approx(8.0, abs=1e-8) and lo == pytest.approx(-2.0, abs=1e-8)
    assert RES.n_matvec == P * M + 2  # + one symmetry probe pair (MatrixOperator promises symmetric)


def test_density_integrates_to_one_and_moments():
    """Tolerances: ∫φ = 1 to 1e-6 (6σ margins); the smoothed density's mean equals moment(1) and its
    second moment equals moment(2) + σ² (Gaussian convolution) to 1e-6; moment(p) matches tr(A^p)/n within
    4 standard errors of the per-probe values (stochastic part; quadrature is exact for p ≤ 2m−1)."""
    grid, dens = RES.density()
    g, d = grid.numpy(), dens.numpy()
    assert np.all(d >= 0)
    assert np.trapezoid(d, g) == pytest.approx(1.0, abs=1e-6)
    sigma = RES.default_sigma()
    assert sigma == pytest.approx(0.01 * 10.0, rel=1e-8)
    assert np.trapezoid(g * d, g) == pytest.approx(RES.moment(1), abs=1e-6)
    assert np.trapezoid(g * g * d, g) == pytest.approx(RES.moment(2) + sigma**2, abs=1e-6)
    for p in (1, 2, 3):
        vals = per_probe_moment(RES, p)
        se = vals.std(ddof=1) / np.sqrt(P)
        assert abs(RES.moment(p) - np.mean(EIGS**p)) <= 4 * se, p
    assert RES.trace() == pytest.approx(N * RES.moment(1))
    assert abs(RES.trace() - EIGS.sum()) / abs(EIGS.sum()) < 0.05


def test_cdf_kolmogorov_distance():
    """sup_x |F_SLQ(x) − F(x)| ≤ 0.05 against the exact eigenvalue CDF (16 probes, 50 steps)."""
    x = np.linspace(-3, 9, 3001)
    exact = np.searchsorted(np.sort(EIGS), x, side="right") / N
    ks = np.abs(RES.cdf(x).numpy() - exact).max()
    assert ks <= 0.05
    # a much cruder run is measurably worse: the test can fail
    crude = slq(OP, 2, 4, seed=0)
    assert np.abs(crude.cdf(x).numpy() - exact).max() > ks


def test_density_options():
    grid = torch.linspace(-3, 9, 500, dtype=torch.float64)
    g, d = RES.density(grid=grid, sigma=0.05)
    assert torch.equal(g, grid) and d.shape == (500,)
    gl, dl = RES.density(kernel="lorentzian", sigma=0.05, n_grid=8001)
    assert 0.97 < np.trapezoid(dl.numpy(), gl.numpy()) <= 1.0  # heavy tails lose a little mass
    g2, _ = RES.density(rel_sigma=0.05)
    assert g2[0] == pytest.approx(-2.0 - 6 * 0.5)


def test_breakdown_exact_quadrature_and_float32():
    # 3 distinct eigenvalues: every probe's Krylov space is invariant after 3 steps, quadrature exact
    eigs = np.repeat([-1.0, 2.0, 5.0], [10, 20, 30])
    B, _ = planted(eigs, seed=2)
    r = slq(MatrixOperator(B), 4, 20, seed=1)
    assert torch.isfinite(r.nodes).all() and torch.isfinite(r.weights).all()
    assert int((r.weights[0] > 0).sum()) == 3
    nz = r.nodes[r.weights > 0].numpy()
    np.testing.assert_allclose(np.sort(np.unique(np.round(nz, 8))), [-1.0, 2.0, 5.0], atol=1e-8)
    assert r.n_matvec < 4 * 20
    r32 = slq(MatrixOperator(A.float()), 4, 30, seed=0)
    assert r32.nodes.dtype == torch.float64 and torch.isfinite(r32.nodes).all()
    assert abs(r32.moment(1) - slq(OP, 4, 30, seed=0).moment(1)) < 1e-4


def test_batching_and_determinism():
    a = slq(OP, 5, 20, seed=3, batch_size=2)
    b = slq(OP, 5, 20, seed=3)
    np.testing.assert_allclose(a.nodes.numpy(), b.nodes.numpy(), atol=1e-10)
    np.testing.assert_allclose(a.weights.numpy(), b.weights.numpy(), atol=1e-10)


def test_errors():
    with pytest.raises(ValueError, match="n_probes"):
        slq(OP, 0, 10)
    with pytest.raises(ValueError, match="n_steps"):
        slq(OP, 2, 0)
    with pytest.raises(ValueError, match="dist"):
        slq(OP, 2, 5, dist="x")
    with pytest.raises(ValueError, match="symmetric"):
        slq(MatrixOperator(torch.randn(20, 20, dtype=torch.float64)), 2, 5)
    bad = FunctionOperator(lambda V: V * float("nan"), (10, 10), torch.float64, symmetric=True)
    with pytest.raises(ValueError, match="NaN"):
        slq(bad, 2, 5, check_symmetric=False)
    with pytest.raises(ValueError, match="sigma"):
        RES.density(sigma=0.0)
    with pytest.raises(ValueError, match="kernel"):
        RES.density(kernel="box")
    with pytest.raises(TypeError, match="grid"):
        RES.density(grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="grid"):
        RES.density(grid=np.zeros((2, 2)))
