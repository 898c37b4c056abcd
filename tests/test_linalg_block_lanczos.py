"""Block Lanczos (several Krylov vectors per product, residual stop), the block HVP and subsampled Hessian data,
against explicit float64 matrices on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import digits

from gradsketch.curvature import subsample_data
from gradsketch.linalg import MatrixOperator, block_lanczos_eigs
from gradsketch.model import Task, classifier_loss


def tiny(hidden: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)).double()


def problem(n: int = 30, hidden: int = 4):
    X, y = digits(n)
    return Task(tiny(hidden), classifier_loss()), X, y % 3


def explicit_hessian(task: Task, X, y) -> torch.Tensor:
    def mean_loss(flat):
        return task.losses_at(task.unflatten(flat), (X, y), len(X)).mean()

    return torch.func.hessian(mean_loss)(task.flatten(task.params_dict()))


def top_by_magnitude(H: torch.Tensor, k: int):
    lam, U = torch.linalg.eigh(H)
    idx = torch.argsort(-lam.abs())[:k]
    return lam[idx], U[:, idx]


def test_block_hvp_equals_double_backward_and_explicit_hessian():
    task, X, y = problem()
    data = [(X[:13], y[:13]), (X[13:], y[13:])]
    Hx = explicit_hessian(task, X, y)
    V = torch.randn(task.n_params, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for method in ("block", "double_backward"):
        torch.testing.assert_close(task.hessian(data, method=method) @ V, Hx @ V, atol=1e-10, rtol=0)
    torch.testing.assert_close(task.hessian(data, method="block") @ V[:, 0], Hx @ V[:, 0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_block_lanczos_on_hessian_matches_top_eigenpairs(block_size):
    """Tolerance: with the residual test at tol = 1e-10·|θ_max|, each Ritz value is within its residual of an
    eigenvalue (Bauer–Fike for symmetric A) and the top 6 are separated by ≫ 1e-10, so values agree to 1e-9
    relative and vectors to 1 − |cos| ≤ 1e-8."""
    task, X, y = problem()
    H = task.hessian([(X, y)], method="block")
    lam, U = top_by_magnitude(explicit_hessian(task, X, y), 6)
    r = block_lanczos_eigs(H, 6, block_size=block_size, tol=1e-10, max_dim=task.n_params)
    assert r.stop == "converged" and bool(r.converged.all())
    torch.testing.assert_close(r.eigenvalues, lam, atol=1e-9 * float(lam.abs().max()), rtol=0)
    cos = (r.eigenvectors * U).sum(0).abs()
    assert float((1 - cos).max()) < 1e-8
    assert r.n_passes == -(-r.n_iter // block_size)
    # the residual estimates are the true residuals
    true = (H @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    torch.testing.assert_close(r.residuals, true, atol=1e-10 * float(lam.abs().max()), rtol=0)


def test_convergence_stop_returns_the_top_k_of_a_long_run():
    torch.manual_seed(0)
    n = 160
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    ev = torch.cat([torch.linspace(10, 2, 30, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(15),
                    0.1 * torch.randn(n - 30, dtype=torch.float64)])
    A = MatrixOperator((U * ev) @ U.T)
    tol = 1e-6
    short = block_lanczos_eigs(A, 20, block_size=8, tol=tol, max_dim=n)
    long = block_lanczos_eigs(A, 20, block_size=8, tol=None, max_dim=n)
    assert short.stop == "converged" and long.stop == "exhausted"
    assert short.n_iter < long.n_iter and short.n_passes < long.n_passes
    # Bauer–Fike: each returned value is within tol·|θ_max| (its residual) of an eigenvalue; the top 20 are
    # 0.28 apart in |λ|, so they are the same eigenvalues in the same order
    np.testing.assert_allclose(short.eigenvalues.numpy(), long.eigenvalues.numpy(), rtol=0, atol=tol * 10)
    exact = ev[torch.argsort(-ev.abs())][:20]
    np.testing.assert_allclose(long.eigenvalues.numpy(), exact.numpy(), rtol=0, atol=1e-10)
    cos = (short.eigenvectors * long.eigenvectors).sum(0).abs()
    # sin of the angle ≤ residual / gap (Davis–Kahan): 1e-5 / 0.28
    assert float((1 - cos).max()) < 1e-8


def test_full_krylov_space_gives_exact_influence():
    """Dimension N on a tiny model: the Ritz pairs are the eigenpairs, so U diag(1/(λ+δ)) Uᵀ is (H + δI)⁻¹ and
    the influence scores g_testᵀ (H + δI)⁻¹ g_train are exact."""
    task, X, y = problem(n=24, hidden=2)
    N = task.n_params
    H = task.hessian([(X, y)], method="block")
    r = block_lanczos_eigs(H, N, block_size=8, tol=None)
    assert r.stop == "exhausted" and r.n_iter == N and r.n_passes == -(-N // 8)
    Hx = explicit_hessian(task, X, y)
    delta = 0.5
    G = task.grads((X, y))
    inv = r.eigenvectors @ torch.diag(1 / (r.eigenvalues + delta)) @ r.eigenvectors.T
    exact = G[:5] @ torch.linalg.solve(Hx + delta * torch.eye(N, dtype=torch.float64), G[5:].T)
    torch.testing.assert_close(G[:5] @ inv @ G[5:].T, exact, atol=1e-9 * float(exact.abs().max()), rtol=0)


def test_deflation_low_rank_and_partial_last_block():
    """A rank-3 operator with blocks of 4: the second block is rank-deficient (deflated with random directions)
    and n = 30 is not a multiple of 4 (the last block has 2 columns)."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 3, dtype=torch.float64, generator=g)
    A = B @ B.T
    r = block_lanczos_eigs(MatrixOperator(A), 30, block_size=4, tol=None)
    assert r.stop == "exhausted" and r.n_iter == 30
    lam = torch.linalg.eigvalsh(A)
    exact = lam[torch.argsort(-lam.abs())]
    torch.testing.assert_close(r.eigenvalues, exact, atol=1e-10, rtol=0)
    # A·Q_1 spans the range of A, so the second block completes it: exact after two products
    top = block_lanczos_eigs(MatrixOperator(A), 3, block_size=4, tol=1e-12)
    assert top.stop == "converged" and top.n_iter == 8
    torch.testing.assert_close(top.eigenvalues, exact[:3], atol=1e-10, rtol=0)


def test_float32_operator_positive_only_and_v0():
    torch.manual_seed(0)
    n = 200
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    ev = torch.cat([torch.tensor([5.0, -4.0, 3.0, 2.0], dtype=torch.float64), 0.01 * torch.rand(n - 4)])
    A64 = (U * ev) @ U.T
    r = block_lanczos_eigs(MatrixOperator(A64.float()), 3, block_size=4, tol=1e-4, positive_only=True,
                           v0=U[:, 0].float())
    assert r.eigenvectors.dtype == torch.float32 and r.which == "LA"
    np.testing.assert_allclose(r.eigenvalues.double().numpy(), [5.0, 3.0, 2.0], atol=1e-4 * 5)


def test_bad_arguments_name_the_argument():
    A = MatrixOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="top_k"):
        block_lanczos_eigs(A, 6)
    with pytest.raises(ValueError, match="block_size"):
        block_lanczos_eigs(A, 2, block_size=0)
    with pytest.raises(ValueError, match="max_dim"):
        block_lanczos_eigs(A, 3, max_dim=2)
    with pytest.raises(ValueError, match="v0"):
        block_lanczos_eigs(A, 2, block_size=2, v0=torch.ones(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol"):
        block_lanczos_eigs(A, 2, tol=-1.0)
    with pytest.raises(TypeError, match="op"):
        block_lanczos_eigs(torch.eye(5), 2)


def test_subsampled_operator_equals_the_explicit_sub_mean():
    task, X, y = problem(n=30)
    data = [(X[i:i + 7], y[i:i + 7]) for i in range(0, 30, 7)]
    sub = subsample_data(data, 11, seed=3, batch_size=4)
    assert [len(b[0]) for b in sub] == [4, 4, 3]
    chosen = torch.sort(torch.randperm(30, generator=torch.Generator().manual_seed(3))[:11]).values
    Xs = torch.cat([b[0] for b in sub])
    torch.testing.assert_close(Xs, X[chosen], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([b[1] for b in sub]), y[chosen], atol=0, rtol=0)
    V = torch.randn(task.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Hs = explicit_hessian(task, X[chosen], y[chosen])
    torch.testing.assert_close(task.hessian(sub, method="block") @ V, Hs @ V, atol=1e-10, rtol=0)
    # a fraction, and a size above n (all examples, same order)
    assert sum(len(b[0]) for b in subsample_data(data, 0.5)) == 15
    torch.testing.assert_close(torch.cat([b[0] for b in subsample_data(data, 100)]), X, atol=0, rtol=0)


def test_subsample_bad_input():
    X, y = digits(10)
    data = [(X, y)]
    with pytest.raises(ValueError, match="size"):
        subsample_data(data, 0)
    with pytest.raises(ValueError, match="size"):
        subsample_data(data, 1.5)
    with pytest.raises(TypeError, match="size"):
        subsample_data(data, "all")
    with pytest.raises(ValueError, match="batch_size"):
        subsample_data(data, 3, batch_size=0)
    with pytest.raises(TypeError, match="data"):
        subsample_data(iter(data), 3)


def test_max_batch_columns_splits_batches_without_changing_the_product():
    from gradsketch.curvature import GGNOperator, HessianOperator

    X, y = digits(30)
    task = Task.from_classifier(tiny())
    data = [(X, y % 3)]
    V = torch.randn(task.n_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for cls in (HessianOperator, GGNOperator):
        ref = cls(task, data) @ V
        torch.testing.assert_close(cls(task, data, max_batch_columns=20) @ V, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(cls(task, data, sampling="batch", max_batch_columns=9) @ V, ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="max_batch_columns"):
        HessianOperator(task, data, max_batch_columns=0)


def test_residuals_at_the_dimension_cap_are_the_true_residuals():
    """Stopped by max_dim, the run builds no further block: the estimates ‖W s‖ (W the last product made
    orthogonal to the basis) still equal the true residuals ‖A v − θ v‖."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(120, 120, generator=g, dtype=torch.float64)
    A = (A + A.T) / 2
    r = block_lanczos_eigs(MatrixOperator(A), 5, block_size=4, max_dim=24, tol=None)
    assert r.stop == "max_dim" and r.n_iter == 24 and r.n_passes == 6
    true = (A @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    assert float(true.min()) > 1e-3  # far from converged: the test compares non-trivial numbers
    torch.testing.assert_close(r.residuals, true, rtol=1e-8, atol=1e-12)
