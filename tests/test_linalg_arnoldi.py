"""Arnoldi with full re-orthogonalisation, distill (Schioppa et al. 2022) and arnoldi_eigs."""

import numpy as np
import pytest
import torch

from gradsketch.linalg import ArnoldiResult, FunctionOperator, MatrixOperator, arnoldi, arnoldi_eigs, distill


def planted(eigs, seed=0):
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    A = (Q * eigs) @ Q.T
    return (A + A.T) / 2, Q


rng = np.random.default_rng(5)
EIGS = np.concatenate([[12.0, -11.0, 9.0, 8.5, -7.0, 6.0, 5.0, -4.5, 4.0, 3.5, 3.0, 2.5],
                       rng.uniform(-0.5, 1.0, 138)])
A, QA = planted(EIGS, seed=2)
OP = MatrixOperator(A)


def test_arnoldi_relation_and_orthonormality():
    res = arnoldi(OP, 40)
    assert isinstance(res, ArnoldiResult)
    Q, H = res  # unpacks as (Q, H)
    assert Q.shape == (150, 41) and H.shape == (41, 40)
    assert res.n_matvec == 40 and res.n_restarts == 0
    assert torch.allclose(Q.T @ Q, torch.eye(41, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(A @ Q[:, :40], Q @ H, atol=1e-10)
    assert torch.equal(torch.tril(H, -2), torch.zeros_like(H))  # upper Hessenberg
    # symmetric operator: H[:m, :m] is (numerically) tridiagonal and symmetric
    Hm = H[:40]
    assert torch.allclose(Hm, Hm.T, atol=1e-10)


def test_distill_matches_eigh_topk():
    Q, H = arnoldi(OP, 150)  # the whole space: distill must reproduce numpy's eigh exactly
    lam, V = distill(Q, H, 10)
    w = np.linalg.eigvalsh(A.numpy())
    want = w[np.argsort(-np.abs(w))][:10]
    np.testing.assert_allclose(lam.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose((A @ V - V * lam).norm(dim=0).numpy(), 0, atol=1e-9)


def test_distill_partial_krylov_top_eigs():
    Q, H = arnoldi(OP, 80, seed=1)
    lam, V = distill(Q, H, 6)
    w = np.linalg.eigvalsh(A.numpy())
    np.testing.assert_allclose(lam.numpy(), w[np.argsort(-np.abs(w))][:6], rtol=1e-8)
    lam_p, V_p = distill(Q, H, 4, positive_only=True)
    np.testing.assert_allclose(lam_p.numpy(), [12.0, 9.0, 8.5, 6.0], rtol=1e-8)
    # eigenvectors: aligned with the planted ones (|cos| ~ 1)
    assert float((V_p[:, 0] @ QA[:, 0]).abs()) > 1 - 1e-8


def test_positive_only_fewer_available():
    B, _ = planted([-3.0, -2.0, 1.0, -1.0, -0.5], seed=1)
    Q, H = arnoldi(MatrixOperator(B), 5)
    lam, V = distill(Q, H, 3, positive_only=True)
    assert lam.numel() == 1 and V.shape == (5, 1)
    np.testing.assert_allclose(lam.numpy(), [1.0], rtol=1e-10)


def test_arnoldi_eigs_and_host_store():
    r = arnoldi_eigs(OP, 5, n_iter=90)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [12.0, -11.0, 9.0, 8.5, -7.0], rtol=1e-8)
    assert float(r.residuals.max()) < 1e-6 and bool(r.converged.all())
    assert r.n_matvec == 95
    h = arnoldi(OP, 30, store="host")
    d = arnoldi(OP, 30, store="device")
    assert h.Q.device.type == "cpu"
    assert torch.allclose(h.H, d.H, atol=1e-12)


def test_float32_and_nonsymmetric_ok():
    r = arnoldi_eigs(MatrixOperator(A.float()), 3, n_iter=90)
    assert r.eigenvalues.dtype == torch.float32
    np.testing.assert_allclose(r.eigenvalues.numpy(), [12.0, -11.0, 9.0], rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 30, generator=g, dtype=torch.float64)
    Q, H = arnoldi(MatrixOperator(B), 20)  # Arnoldi itself is valid for non-symmetric operators
    assert torch.allclose(B @ Q[:, :20], Q @ H, atol=1e-10)


def test_breakdown_restart_and_exhaustion():
    v0 = QA[:, 0] + QA[:, 3]  # invariant 2-dim subspace
    res = arnoldi(OP, 6, v0=v0)
    Q, H = res
    assert res.n_restarts == 1 and float(H[2, 1]) == 0.0
    assert torch.isfinite(Q).all() and torch.isfinite(H).all()
    assert torch.allclose(Q.T @ Q, torch.eye(7, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(A @ Q[:, :6], Q @ H, atol=1e-10)
    small, _ = planted([3.0, 2.0, 1.0], seed=0)
    Q, H = arnoldi(MatrixOperator(small), 10)  # clamped to n = 3; last column zero
    assert Q.shape == (3, 4) and torch.equal(Q[:, 3], torch.zeros(3, dtype=torch.float64))
    np.testing.assert_allclose(np.sort(distill(Q, H, 3).eigenvalues.numpy()), [1.0, 2.0, 3.0], rtol=1e-12)


def test_nan_raises():
    bad = FunctionOperator(lambda V: V * float("nan"), (10, 10), torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        arnoldi(bad, 3)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: arnoldi(OP, 0), ValueError, "n_iter"),
    (lambda: arnoldi(OP, 3, store="gpu"), ValueError, "store"),
    (lambda: arnoldi("op", 3), TypeError, "op"),
    (lambda: arnoldi(OP, 3, v0=torch.zeros(150)), ValueError, "v0"),
    (lambda: distill(np.eye(3), torch.eye(3), 1), TypeError, "Q: expected a torch.Tensor"),
    (lambda: distill(torch.eye(5), torch.eye(3, 2), 1), ValueError, r"Q: expected shape \[n, 3\]"),
    (lambda: distill(torch.eye(5), torch.eye(4, 2), 1), ValueError, r"H: expected shape"),
    (lambda: distill(torch.eye(5, 3), torch.eye(3, 2), 3), ValueError, "top_k: expected at most m = 2"),
    (lambda: distill(torch.eye(5, 3), torch.eye(3, 2), 1, positive_only=1), TypeError, "positive_only"),
    (lambda: distill(torch.eye(3), torch.full((3, 2), float("nan")), 1), ValueError, "H: expected finite"),
    (lambda: arnoldi_eigs(OP, 151), ValueError, "top_k: expected at most n = 150"),
    (lambda: arnoldi_eigs(OP, 5, n_iter=3), ValueError, "n_iter: expected at least top_k = 5"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _planted(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([50.0, 30, 20, 12, 8, 5, 4, 3, 2.5, 2], dtype=torch.float64),
                     0.3 * torch.randn(n - 10, generator=g, dtype=torch.float64)])
    return ((U * lam) @ U.T).float(), lam[:10]


@pytest.mark.parametrize("basis_dtype", [torch.float16, torch.bfloat16])
def test_compressed_basis_keeps_top_eigenvalues(basis_dtype):
    # A float32 operator with a planted spectrum; the basis is stored in half precision. Each stored vector is
    # rounded by at most ε_b relative, so H is exact for the stored basis up to ε_b·‖A‖ per column, and a Ritz
    # value moves by at most a few ε_b·‖A‖ (first-order bound; second order in practice). ε16 = 2^-11, ε_bf16 = 2^-8.
    A, top = _planted()
    eps = torch.finfo(basis_dtype).eps
    r32 = arnoldi_eigs(MatrixOperator(A), 10, n_iter=80, which="LA")
    r16 = arnoldi_eigs(MatrixOperator(A), 10, n_iter=80, which="LA", basis_dtype=basis_dtype)
    assert r16.eigenvectors.dtype == torch.float32
    assert torch.allclose(r32.eigenvalues.double(), top, rtol=1e-4)
    err = (r16.eigenvalues.double() - top).abs().max().item()
    assert err <= 4 * eps * 50.0, err
    # the eigenvectors still satisfy A v ≈ λ v to the basis precision
    assert r16.residuals.max().item() <= 8 * eps * 50.0


def test_compressed_basis_halves_the_krylov_memory_and_keeps_the_arnoldi_relation():
    A, _ = _planted(300, seed=1)
    Q32, H32 = arnoldi(MatrixOperator(A), 40)
    Q16, H16 = arnoldi(MatrixOperator(A), 40, basis_dtype=torch.float16)
    assert Q16.dtype == torch.float16 and H16.dtype == torch.float32
    assert Q16.element_size() * Q16.numel() * 2 == Q32.element_size() * Q32.numel()
    Q = Q16.float()
    # A Q_m = Q_{m+1} H up to the rounding of the stored vectors (‖A‖ = 50, ε16 = 2^-11)
    assert (A @ Q[:, :40] - Q @ H16).norm(dim=0).max().item() <= 4 * 2.0 ** -11 * 50.0
    # near-orthonormal to the storage precision
    assert (Q.T @ Q - torch.eye(41)).abs().max().item() <= 4 * 2.0 ** -11


def test_basis_dtype_is_checked():
    A, _ = _planted(50)
    with pytest.raises(TypeError, match="basis_dtype"):
        arnoldi(MatrixOperator(A), 5, basis_dtype=torch.int8)
    with pytest.raises(ValueError, match="basis_dtype.*no wider"):
        arnoldi(MatrixOperator(A), 5, basis_dtype=torch.float64)
