"""Sketches are linear operators: S @ H @ S.T is Φ H Φᵀ; S.T is both the adjoint operator and callable."""

import torch
from torch import nn

import gradsketch
from gradsketch.linalg import MatrixOperator
from gradsketch.sketch import FactoredSketch


def test_sketch_operator_roles():
    S = gradsketch.sketch("affd", 64, 16, seed=1)
    P = S.matrix()  # [d, n] float64
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 64, generator=g, dtype=torch.float64)
    H = MatrixOperator(X + X.T)
    SH = S @ H @ S.T
    assert SH.symmetric and SH.shape == (16, 16) and SH.dtype == torch.float64
    torch.testing.assert_close(SH.to_dense(), P @ (X + X.T) @ P.T)
    v = torch.randn(64, generator=g, dtype=torch.float64)
    y = torch.randn(3, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(S @ v, P @ v)
    torch.testing.assert_close(S.T @ y.T, P.T @ y.T)      # adjoint as an operator (columns)
    torch.testing.assert_close(S.T(y), y @ P)              # adjoint called on rows, as before
    assert S.T.T is S


def test_block_sketch_operator_matches_its_matrix():
    B = gradsketch.BlockSketch({"a": (3, 5), "b": 7}, d=8, kind="sjlt", seed=2)
    M = B.matrix()
    v = torch.arange(22, dtype=torch.float64)
    torch.testing.assert_close(B @ v, M @ v)
    w = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(B.T @ w, M.T @ w)
    assert set(B.T(w)) == {"a", "b"}


def test_factored_sketch_spec_rebuilds_and_is_an_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    task = gradsketch.Task.from_classifier(model)
    F = task.factored_sketch(16, kind="sjlt", seed=4)
    G = gradsketch.sketch_from_spec(F.spec)
    assert isinstance(G, FactoredSketch)
    x = torch.randn(2, task.n_params, dtype=torch.float64)
    torch.testing.assert_close(G(x), F(x))
    # as an operator: F @ I @ F.T is the Gram matrix of F's rows
    Fm = (F @ torch.eye(task.n_params, dtype=torch.float64))  # [d, n]
    # a product of sketches alone works in the sketches' default precision (float32)
    torch.testing.assert_close((F @ F.T).to_dense().double(), Fm @ Fm.T, rtol=1e-5, atol=1e-5)


def test_chi_draws_follow_the_chi_distribution():
    """FFD's χ multipliers come from a torch Generator (no numpy RNG): Kolmogorov–Smirnov against scipy's
    χ distribution; with 20,000 draws the KS statistic exceeds 1.95/sqrt(n) ≈ 0.0138 with probability
    < 0.1% per dof under the null (< 0.5% for the five), seeds fixed."""
    import numpy as np
    from scipy import stats

    from gradsketch.sketch._random import chi, generator

    for dof in (1, 2, 7, 64, 1024):
        x = chi(dof, (20000,), generator(0, "test-chi", dof)).numpy()
        assert stats.kstest(x, stats.chi(dof).cdf).statistic < 1.95 / np.sqrt(20000), dof
    a = chi(8, (3, 4), generator(5, "x"))
    assert torch.equal(a, chi(8, (3, 4), generator(5, "x")))  # deterministic
