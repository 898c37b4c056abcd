"""Frequent Directions: the covariance error guarantees, escaped mass, merging."""

import numpy as np
import pytest
import torch

from gradsketch.linalg import FrequentDirections


def stream(n=600, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, d, dtype=torch.float64)  # decaying spectrum
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales


def tail_bound(A, ell):
    s2 = torch.linalg.svdvals(A) ** 2
    return min(float(s2[k:].sum()) / (ell + 1 - k) for k in range(ell + 1))


def check(fd, A):
    B = fd.sketch
    assert B.shape == (fd.ell, fd.d)
    E = A.T @ A - B.T @ B
    w = torch.linalg.eigvalsh(E)
    scale = float((A * A).sum())
    assert float(w.min()) >= -1e-10 * scale  # AᵀA − BᵀB ⪰ 0
    err = float(w.abs().max())
    assert err <= fd.escaped_mass * (1 + 1e-9) + 1e-10 * scale
    assert fd.escaped_mass <= tail_bound(A, fd.ell) * (1 + 1e-9)
    return err


def test_bounds_streaming_in_chunks():
    A = stream()
    fd = FrequentDirections(10, 40)
    for i in range(0, 600, 37):
        fd.update(A[i: i + 37])
    assert fd.n_seen == 600
    assert fd.squared_frobenius == pytest.approx(float((A * A).sum()))
    err = check(fd, A)
    # the sketch is useful: error far below ‖A‖₂² and the top direction is recovered
    assert err < 0.05 * float(torch.linalg.matrix_norm(A, 2) ** 2)
    v_true = torch.linalg.svd(A, full_matrices=False)[2][0]
    v_fd = torch.linalg.svd(fd.sketch, full_matrices=False)[2][0]
    assert float((v_true @ v_fd).abs()) > 0.99


def test_single_rows_equal_batches_and_small_stream():
    A = stream(n=50, d=8, seed=1)
    a = FrequentDirections(3, 8)
    for row in A:
        a.update(row)
    b = FrequentDirections(3, 8).update(A)
    assert torch.allclose(a.sketch.T @ a.sketch, b.sketch.T @ b.sketch, atol=1e-9)
    few = FrequentDirections(5, 8).update(A[:4])  # fewer rows than ℓ: exact
    assert few.escaped_mass == 0.0
    assert torch.allclose(few.covariance(), A[:4].T @ A[:4], atol=1e-12)


def test_merge_and_robust_covariance():
    A = stream(seed=2)
    left = FrequentDirections(10, 40).update(A[:300])
    right = FrequentDirections(10, 40).update(A[300:])
    left.merge(right)
    assert left.n_seen == 600
    check(left, A)
    C, Cr = left.covariance(), left.covariance(robust=True)
    assert torch.allclose(Cr - C, 0.5 * left.escaped_mass * torch.eye(40, dtype=torch.float64))
    # the robust estimate's worst-case error is half the escaped mass
    w = torch.linalg.eigvalsh(A.T @ A - Cr)
    assert float(w.abs().max()) <= 0.5 * left.escaped_mass * (1 + 1e-9) + 1e-8


def test_float32():
    A = stream().float()
    fd = FrequentDirections(10, 40, dtype=torch.float32).update(A)
    assert fd.sketch.dtype == torch.float32
    E = (A.T @ A - fd.sketch.T @ fd.sketch).double()
    assert float(torch.linalg.eigvalsh(E).abs().max()) <= fd.escaped_mass * 1.001 + 1e-3


def test_errors():
    with pytest.raises(ValueError, match="ell"):
        FrequentDirections(0, 3)
    with pytest.raises(TypeError, match="d: expected an integer"):
        FrequentDirections(2, 3.0)
    with pytest.raises(TypeError, match="dtype"):
        FrequentDirections(2, 3, dtype=torch.float16)
    fd = FrequentDirections(2, 3)
    with pytest.raises(ValueError, match=r"rows: expected shape \[b, 3\]"):
        fd.update(torch.ones(2, 4))
    with pytest.raises(TypeError, match="rows"):
        fd.update(np.ones((2, 3)))
    with pytest.raises(TypeError, match="rows"):
        fd.update(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="finite"):
        fd.update(torch.full((1, 3), float("nan")))
    with pytest.raises(ValueError, match="other"):
        fd.merge(FrequentDirections(3, 3))
    with pytest.raises(TypeError, match="other"):
        fd.merge("x")
