"""Lanczos and the ARPACK bridge on planted spectra (float64), plus every error path."""

import numpy as np
import pytest
import torch

from gradsketch.linalg import EigResult, FunctionOperator, MatrixOperator, eigsh, lanczos, symmetry_defect


def planted(eigs, seed=0, dtype=torch.float64):
    """A = Q diag(eigs) Qᵀ with a Haar-random orthogonal Q."""
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * eigs) @ Q.T
    return ((A + A.T) / 2).to(dtype), Q


def spectrum(n=200, seed=1):
    """Outliers, a tight cluster near the top, negative outliers with a cluster, and a bulk in [-1, 1]."""
    rng = np.random.default_rng(seed)
    top = [10.0, 9.5, 9.0, 8.0, 7.5, 7.0, 7.001, 7.002, 6.0, 5.5, 5.0, 4.5]
    neg = [-9.2, -8.5, -6.0, -5.0, -5.001, -4.0, -3.5, -3.0, -2.5, -2.0]
    bulk = rng.uniform(-1, 1, n - len(top) - len(neg))
    return np.concatenate([top, neg, bulk])


EIGS = spectrum()
A64, Q64 = planted(EIGS)
OP = MatrixOperator(A64)


def expected(which, k):
    e = np.asarray(EIGS)
    if which == "LA":
        return np.sort(e)[::-1][:k]
    if which == "SA":
        return np.sort(e)[:k]
    return e[np.argsort(-np.abs(e), kind="stable")][:k]


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top10_planted(which):
    r = lanczos(OP, 10, which=which, tol=1e-8)
    assert isinstance(r, EigResult)
    want = expected(which, 10)
    got = r.eigenvalues.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # residuals are true ‖Av - λv‖ and small; eigenvectors orthonormal and aligned with the planted ones
    V = r.eigenvectors
    R = A64 @ V - V * r.eigenvalues
    np.testing.assert_allclose(R.norm(dim=0).numpy(), r.residuals.numpy(), rtol=1e-6, atol=1e-12)
    assert float(r.residuals.max()) < 1e-6 * 10
    assert bool(r.converged.all())
    assert torch.allclose(V.T @ V, torch.eye(10, dtype=torch.float64), atol=1e-10)
    assert r.n_matvec < 200  # early stop: fewer products than n (+ symmetry probes + residual checks)


def test_both_ends_and_ordering():
    r = lanczos(OP, 5, which="BE", n_iter=120)
    e = np.sort(EIGS)
    want = np.sort(np.concatenate([e[-3:], e[:2]]))[::-1]
    np.testing.assert_allclose(r.eigenvalues.numpy(), want, rtol=1e-6)
    r = lanczos(OP, 4, which="SA")
    assert np.all(np.diff(r.eigenvalues.numpy()) > 0)  # SA ascending, most negative first


def test_full_space_exact_and_clamped_n_iter():
    A, _ = planted(np.linspace(-2, 3, 30), seed=3)
    r = lanczos(MatrixOperator(A), 30, n_iter=1000, tol=0.0)
    assert r.n_iter == 30
    np.testing.assert_allclose(r.eigenvalues.numpy(), np.linspace(-2, 3, 30)[::-1], atol=1e-10)


def test_float32_and_determinism():
    op32 = MatrixOperator(A64.float())
    r1 = lanczos(op32, 5, seed=7)
    r2 = lanczos(op32, 5, seed=7)
    assert r1.eigenvalues.dtype == torch.float32 and r1.eigenvectors.dtype == torch.float32
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)
    np.testing.assert_allclose(r1.eigenvalues.numpy(), expected("LA", 5), rtol=1e-4)
    g = torch.Generator().manual_seed(7)
    r3 = lanczos(op32, 5, seed=g)
    assert torch.equal(r1.eigenvalues, r3.eigenvalues)


def test_v0_and_progress():
    v0 = torch.ones(200, dtype=torch.float64)
    r = lanczos(OP, 3, v0=v0, progress=True)
    np.testing.assert_allclose(r.eigenvalues.numpy(), expected("LA", 3), rtol=1e-6)


def test_breakdown_invariant_subspace_no_nan():
    # v0 in the span of 3 eigenvectors: the Krylov space is invariant after 3 steps.
    v0 = Q64[:, 0] + Q64[:, 5] - 2 * Q64[:, 20]
    with pytest.warns(RuntimeWarning, match="invariant"):
        r = lanczos(OP, 5, v0=v0, restart_on_breakdown=False)
    assert r.n_iter == 3 and r.eigenvalues.numel() == 3
    assert torch.isfinite(r.eigenvalues).all() and torch.isfinite(r.eigenvectors).all()
    np.testing.assert_allclose(np.sort(r.eigenvalues.numpy()), np.sort(EIGS[[0, 5, 20]]), rtol=1e-10)
    assert float(r.residuals.max()) < 1e-10
    # with restarts (default) the top eigenvalues are still found
    r = lanczos(OP, 5, v0=v0)
    np.testing.assert_allclose(r.eigenvalues.numpy(), expected("LA", 5), rtol=1e-6)


def test_breakdown_rank_deficient_and_repeated():
    # rank 4 PSD matrix with a repeated top eigenvalue: Lanczos from one vector sees one copy; the restart
    # after the breakdown finds the second one.
    eigs = np.zeros(60)
    eigs[:4] = [5.0, 5.0, 2.0, 1.0]
    A, _ = planted(eigs, seed=4)
    r = lanczos(MatrixOperator(A), 6, n_iter=60)
    assert torch.isfinite(r.eigenvalues).all() and torch.isfinite(r.eigenvectors).all()
    np.testing.assert_allclose(r.eigenvalues.numpy(), [5, 5, 2, 1, 0, 0], atol=1e-9)
    assert float(r.residuals.max()) < 1e-9
    V = r.eigenvectors
    assert torch.allclose(V.T @ V, torch.eye(6, dtype=torch.float64), atol=1e-8)


def test_zero_operator():
    r = lanczos(MatrixOperator(torch.zeros(10, 10, dtype=torch.float64)), 2)
    assert torch.equal(r.eigenvalues, torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(r.eigenvectors).all()


def test_nonsymmetric_detected():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 50, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(MatrixOperator(B), 3)
    lying = FunctionOperator(lambda V: B @ V, (50, 50), torch.float64, symmetric=True)
    with pytest.raises(ValueError, match="flagged symmetric=True"):
        lanczos(lying, 3)
    assert symmetry_defect(MatrixOperator(B))[0] > 1e-3
    assert symmetry_defect(OP)[0] < 1e-13
    # explicitly disabled: runs (garbage in, finite garbage out)
    r = lanczos(MatrixOperator(B), 3, check_symmetric=False)
    assert torch.isfinite(r.eigenvalues).all()


def test_nan_operator_raises():
    bad = FunctionOperator(lambda V: V * float("nan"), (20, 20), torch.float64, symmetric=True)
    with pytest.raises(ValueError, match="NaN"):
        lanczos(bad, 2)
    with pytest.raises(ValueError, match="NaN"):
        lanczos(bad, 2, check_symmetric=False)
    # NaN appearing only after a few products
    count = [0]

    def late(V):
        count[0] += 1
        return A64[:20, :20] @ V if count[0] < 4 else V * float("inf")

    with pytest.raises(ValueError, match="step"):
        lanczos(FunctionOperator(late, (20, 20), torch.float64, symmetric=True), 2, check_symmetric=False)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=0), ValueError, "k: expected an integer >= 1"),
    (dict(k=2.5), TypeError, "k: expected an integer"),
    (dict(k=True), TypeError, "k: expected an integer"),
    (dict(k=201), ValueError, "k: expected at most n = 200"),
    (dict(k=5, which="XX"), ValueError, "which"),
    (dict(k=5, which=3), TypeError, "which"),
    (dict(k=5, n_iter=4), ValueError, "n_iter: expected at least k = 5"),
    (dict(k=5, n_iter=0), ValueError, "n_iter"),
    (dict(k=5, tol=-1.0), ValueError, "tol"),
    (dict(k=5, tol="a"), TypeError, "tol"),
    (dict(k=5, seed=-1), ValueError, "seed"),
    (dict(k=5, seed="x"), TypeError, "seed"),
    (dict(k=5, v0=torch.zeros(200, dtype=torch.float64)), ValueError, "v0: expected a non-zero"),
    (dict(k=5, v0=torch.ones(199)), ValueError, r"v0: expected a tensor of shape \[200\]"),
    (dict(k=5, v0=[1.0] * 200), TypeError, "v0: expected a torch.Tensor"),
    (dict(k=5, v0=torch.full((200,), float("nan"))), ValueError, "v0: expected finite"),
    (dict(k=5, progress="yes"), TypeError, "progress"),
    (dict(k=5, check_symmetric="yes"), TypeError, "check_symmetric"),
    (dict(k=5, restart_on_breakdown=1), TypeError, "restart_on_breakdown"),
])
def test_lanczos_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lanczos(OP, **kwargs)


def test_operator_errors():
    with pytest.raises(TypeError, match="op: expected a gradsketch.linalg.LinearOperator"):
        lanczos(A64, 3)
    with pytest.raises(ValueError, match="op: expected a square operator"):
        lanczos(MatrixOperator(torch.ones(3, 4, dtype=torch.float64)), 1)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigsh_bridge(which):
    r = eigsh(OP, 6, which=which)
    ref = lanczos(OP, 6, which=which, n_iter=200, tol=0.0)
    np.testing.assert_allclose(r.eigenvalues.numpy(), ref.eigenvalues.numpy(), rtol=1e-9)
    assert float(r.residuals.max()) < 1e-8 and bool(r.converged.all())
    assert r.n_matvec > 6


def test_eigsh_errors_and_dtype():
    with pytest.raises(ValueError, match="k: ARPACK needs k < n = 200"):
        eigsh(OP, 200)
    with pytest.raises(ValueError, match="which"):
        eigsh(OP, 2, which="SM")
    r = eigsh(MatrixOperator(A64.float()), 3)
    assert r.eigenvalues.dtype == torch.float32
    np.testing.assert_allclose(r.eigenvalues.numpy(), expected("LA", 3), rtol=1e-5)
    bad = FunctionOperator(lambda V: V * float("nan"), (20, 20), torch.float64, symmetric=True)
    with pytest.raises(ValueError, match="NaN"):
        eigsh(bad, 2, check_symmetric=False)
