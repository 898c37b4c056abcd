"""The operator algebra of gradsketch.linalg against explicit float64 matrices."""

import pytest
import torch

from gradsketch.linalg import (
    CGInverse,
    CholeskyInverse,
    EigenOperator,
    FunctionOperator,
    IdentityOperator,
    LiSSAInverse,
    MatrixOperator,
    WoodburyInverse,
    dense_inverse,
    inverse,
    ridge_inverse,
)

g = torch.Generator().manual_seed(0)
A = torch.randn(5, 4, generator=g, dtype=torch.float64)
B = torch.randn(4, 3, generator=g, dtype=torch.float64)
X = torch.randn(6, 6, generator=g, dtype=torch.float64)
SPD = X @ X.T + 0.1 * torch.eye(6, dtype=torch.float64)
IND = torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5, 0.25, 4.0], dtype=torch.float64))


def test_adjoint_product_sum_scale():
    opA, opB = MatrixOperator(A), MatrixOperator(B)
    assert torch.allclose(opA.T.to_dense(), A.T)
    assert opA.T.T is opA
    P = opA @ opB
    assert P.shape == (5, 3)
    assert torch.allclose(P.to_dense(), A @ B)
    assert torch.allclose(P.T.to_dense(), (A @ B).T)
    C = opA.T @ opA
    assert C.symmetric and not P.symmetric
    assert torch.allclose(C.to_dense(), A.T @ A)
    S = 2.0 * C - C / 4 + IdentityOperator(4, torch.float64)
    assert torch.allclose(S.to_dense(), 1.75 * (A.T @ A) + torch.eye(4, dtype=torch.float64))
    assert torch.allclose((-C).to_dense(), -(A.T @ A))
    D = C.damped(0.3)
    assert torch.allclose(D.to_dense(), A.T @ A + 0.3 * torch.eye(4, dtype=torch.float64))
    # rows: op(X) == (op @ X.T).T, with leading dimensions
    R = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(P(R), R @ (A @ B).T)
    # a non-symmetric operator without an adjoint says so
    f = FunctionOperator(lambda V: A[:4] @ V, (4, 4), torch.float64)
    with pytest.raises(NotImplementedError, match="adjoint"):
        f.T @ torch.ones(4, dtype=torch.float64)
    f2 = FunctionOperator(lambda V: A @ V, (5, 4), torch.float64, rfn=lambda W: A.T @ W)
    assert torch.allclose(f2.T.to_dense(), A.T)


def test_sandwich_is_symmetric_and_exact():
    S = MatrixOperator(A.T[:3])  # [3, 5]
    H = MatrixOperator(A @ A.T)  # [5, 5] symmetric
    M = S @ H @ S.T
    assert M.symmetric and M.shape == (3, 3)
    assert torch.allclose(M.to_dense(), A.T[:3] @ (A @ A.T) @ A.T[:3].T)


def test_shape_errors():
    with pytest.raises(ValueError, match="A @ B: expected"):
        MatrixOperator(A) @ MatrixOperator(A)
    with pytest.raises(ValueError, match="A \\+ B: expected operators of equal shape"):
        MatrixOperator(A) + MatrixOperator(B)
    with pytest.raises(ValueError, match="damping: expected a finite number"):
        MatrixOperator(SPD).damped(float("nan"))
    with pytest.raises(ValueError, match="damping: expected a number >= 0.0"):
        MatrixOperator(SPD).damped(-1.0)
    with pytest.raises(TypeError, match="operator @ x: expected"):
        MatrixOperator(SPD) @ [1.0]


@pytest.mark.parametrize("method", ["auto", "cholesky", "eigh", "cg", "lissa"])
def test_inverses_agree_with_solve(method):
    lam = 0.5
    opts = {"depth": 20000, "tol": 1e-13} if method == "lissa" else {}
    M = inverse(MatrixOperator(SPD), lam, method, **opts)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(SPD + lam * torch.eye(6, dtype=torch.float64), b)
    tol = 1e-6 if method == "lissa" else 1e-9
    assert torch.allclose(M @ b, want, atol=tol, rtol=tol)
    q = M.quadratic(b.T)
    assert torch.allclose(q, (b * want).sum(0), atol=tol, rtol=tol)


def test_inverse_kinds_and_indefinite():
    assert isinstance(dense_inverse(SPD, 0.1), CholeskyInverse)
    # indefinite: Cholesky refuses (naming damping), eigh inverts exactly
    with pytest.raises(ValueError, match="damping: K \\+ 0 I is not positive definite"):
        dense_inverse(IND, 0.0, "cholesky")
    E = dense_inverse(IND, 0.0)
    assert isinstance(E, EigenOperator)
    assert torch.allclose(E.to_dense(), torch.linalg.inv(IND))
    with pytest.raises(ValueError, match="not positive definite"):
        CGInverse(MatrixOperator(IND)) @ torch.ones(6, dtype=torch.float64)
    with pytest.raises(TypeError, match="options: expected some of"):
        inverse(MatrixOperator(SPD), 0.1, "cg", depth=3)
    with pytest.raises(ValueError, match="method: expected one of"):
        inverse(MatrixOperator(SPD), 0.1, "svd")


def test_lissa_uses_the_requested_damping():
    M = LiSSAInverse(MatrixOperator(SPD), 0.7, depth=20000, tol=1e-13)
    b = torch.ones(6, dtype=torch.float64)
    want = torch.linalg.solve(SPD + 0.7 * torch.eye(6, dtype=torch.float64), b)
    assert torch.allclose(M @ b, want, atol=1e-7)


def test_ridge_inverse_woodbury_and_dense():
    F = torch.randn(4, 9, generator=g, dtype=torch.float64)  # d = 9 > n = 4: Woodbury
    M = ridge_inverse(F, 0.3)
    assert isinstance(M, WoodburyInverse)
    want = torch.linalg.inv(F.T @ F + 0.3 * torch.eye(9, dtype=torch.float64))
    assert torch.allclose(M.to_dense(), want, atol=1e-10)
    assert torch.allclose(M.quadratic(F), torch.einsum("id,de,ie->i", F, want, F), atol=1e-10)
    F2 = torch.randn(12, 3, generator=g, dtype=torch.float64)  # d < n: dense Cholesky
    M2 = ridge_inverse(F2, 0.3)
    assert torch.allclose(M2.to_dense(), torch.linalg.inv(F2.T @ F2 + 0.3 * torch.eye(3, dtype=torch.float64)))


def test_eigen_operator():
    w = torch.tensor([2.0, -1.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))
    E = EigenOperator(w, Q)
    assert torch.allclose(E.to_dense(), Q @ torch.diag(w) @ Q.T)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(E.quadratic(x), torch.einsum("id,de,ie->i", x, Q @ torch.diag(w) @ Q.T, x))
