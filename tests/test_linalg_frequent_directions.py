"""Frequent Directions: the covariance guarantees on random and planted streams, decay, merging, float32,
one SVD per block, the low-rank-plus-tail inverse root, state round trip, bad input."""

import types

import numpy as np
import pytest
import torch

from gradsketch.linalg.frequent_directions import FrequentDirections, fd_shrink, low_rank_inverse_root


def random_stream(n=600, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, d, dtype=torch.float64)  # decaying spectrum
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales


def planted_stream(n=500, d=30, r=4, noise=0.05, seed=1):
    """Rank-r signal with large singular values plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.tensor([8.0, 5.0, 3.0, 2.0][:r],
                                                                              dtype=torch.float64)
    return coef @ Q.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


def tail_mass(A, k):
    s2 = torch.linalg.svdvals(A) ** 2
    return float(s2[k:].sum())


def check_guarantee(fd, A, rtol=1e-9):
    """0 ≼ AᵀA − BᵀB ≼ ρ I and ρ ≤ ‖A − A_k‖_F²/(ℓ − k) for every k < ℓ (and /(ℓ+1−k) for k ≤ ℓ)."""
    B = fd.sketch
    assert B.shape == (fd.ell, fd.d)
    w = torch.linalg.eigvalsh((A.T @ A - B.T @ B).double())
    scale = float((A.double() ** 2).sum())
    rho = fd.escaped_mass
    assert float(w.min()) >= -rtol * scale
    assert float(w.max()) <= rho + rtol * scale
    for k in range(fd.ell):
        assert rho <= tail_mass(A.double(), k) / (fd.ell - k) * (1 + rtol) + rtol * scale
    for k in range(fd.ell + 1):
        assert rho <= tail_mass(A.double(), k) / (fd.ell + 1 - k) * (1 + rtol) + rtol * scale
    return float(w.max())


@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("make", [random_stream, planted_stream])
@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_guarantee_streaming_in_blocks(make, chunk, method):
    A = make()
    fd = FrequentDirections(10, A.shape[1], method=method)
    for i in range(0, A.shape[0], chunk):
        fd.update(A[i: i + chunk])
    assert fd.n_seen == A.shape[0]
    assert fd.squared_frobenius == pytest.approx(float((A * A).sum()))
    err = check_guarantee(fd, A)
    assert err < 0.05 * float(torch.linalg.matrix_norm(A, 2) ** 2)  # useful, not just valid
    v_true = torch.linalg.svd(A, full_matrices=False)[2][0]
    v_fd = torch.linalg.svd(fd.sketch, full_matrices=False)[2][0]
    assert float((v_true @ v_fd).abs()) > 0.99


def test_planted_low_rank_is_recovered_with_small_escaped_mass():
    A = planted_stream(noise=0.01)
    fd = FrequentDirections(6, A.shape[1]).update(A)
    check_guarantee(fd, A)
    # the planted rank-4 subspace is inside the sketch's span up to the noise level
    U_true = torch.linalg.svd(A, full_matrices=False)[2][:4].T
    vals, U = fd.eigh()
    resid = U_true - U @ (U.T @ U_true)
    assert float(torch.linalg.matrix_norm(resid, 2)) < 0.05
    assert fd.escaped_mass <= tail_mass(A, 4) / 2 * (1 + 1e-9)


def test_one_svd_per_block_not_per_row(monkeypatch):
    calls = []
    real = torch.linalg.svd

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    A = random_stream(n=500, d=20)
    FrequentDirections(5, 20).update(A)  # one block of 500 rows
    assert len(calls) == 1 and calls[0] == (500, 20)
    calls.clear()
    fd2 = FrequentDirections(5, 20)
    for row in A[:60]:  # single rows are buffered: one SVD per ℓ + 1 rows
        fd2.update(row)
    assert len(calls) == 10


def test_exact_regimes():
    A = random_stream(n=50, d=8, seed=1)
    few = FrequentDirections(5, 8).update(A[:4])  # fewer rows than ℓ
    assert few.escaped_mass == 0.0
    assert torch.allclose(few.covariance(), A[:4].T @ A[:4], atol=1e-12)
    full = FrequentDirections(8, 8)  # ℓ = d
    for i in range(0, 50, 6):
        full.update(A[i:i + 6], compress=True)
    assert full.escaped_mass == 0.0
    assert torch.allclose(full.covariance(), A.T @ A, atol=1e-10)


def test_decay_matches_weighted_stream():
    A = planted_stream(n=300, d=25, seed=3)
    beta = 0.9
    fd = FrequentDirections(7, 25, decay=beta)
    blocks = list(torch.split(A, 20))
    T = len(blocks)
    for blk in blocks:
        fd.update(blk)
    W = torch.cat([blk * beta ** ((T - 1 - t) / 2) for t, blk in enumerate(blocks)])
    check_guarantee(fd, W)
    assert fd.squared_frobenius == pytest.approx(float((W * W).sum()))
    # ℓ = d with decay is exactly the exponential moving statistics
    ex = FrequentDirections(25, 25, decay=beta)
    for blk in blocks:
        ex.update(blk, compress=True)
    assert torch.allclose(ex.covariance(), W.T @ W, atol=1e-9)


def test_merge_two_and_four_ways():
    A = random_stream(seed=2)
    left = FrequentDirections(10, 40).update(A[:300])
    right = FrequentDirections(10, 40).update(A[300:])
    left.merge(right)
    assert left.n_seen == 600
    check_guarantee(left, A)
    parts = [FrequentDirections(10, 40).update(c) for c in torch.split(A, 150)]
    for p in parts[1:]:
        parts[0].merge(p)
    check_guarantee(parts[0], A)
    C, Cr = left.covariance(), left.covariance(robust=True)
    assert torch.allclose(Cr - C, 0.5 * left.escaped_mass * torch.eye(40, dtype=torch.float64))
    w = torch.linalg.eigvalsh(A.T @ A - Cr)  # the robust estimate errs by at most half the escaped mass
    assert float(w.abs().max()) <= 0.5 * left.escaped_mass * (1 + 1e-9) + 1e-8


@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("make", [random_stream, planted_stream])
def test_float32(make, method):
    A = make().float()
    fd = FrequentDirections(10, A.shape[1], dtype=torch.float32, method=method)
    for blk in torch.split(A, 50):
        fd.update(blk)
    assert fd.sketch.dtype == torch.float32
    # float32 rounding: allow 1e-5 of ‖A‖_F² on top of the exact-arithmetic guarantee
    check_guarantee(fd, A.double(), rtol=1e-5)


def test_low_rank_inverse_root_against_eigh():
    g = torch.Generator().manual_seed(4)
    d, k = 9, 3
    U = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    lam = torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
    tau = 0.3
    M = (U * lam) @ U.T + tau * torch.eye(d, dtype=torch.float64)
    w, Q = torch.linalg.eigh(M)
    X = torch.randn(d, 4, generator=g, dtype=torch.float64)
    for p in (1, 2, 4, 6):
        ref = (Q * w ** (-1.0 / p)) @ Q.T @ X
        assert torch.allclose(low_rank_inverse_root(U, lam, tau, X, p), ref, atol=1e-12)
        assert torch.allclose(low_rank_inverse_root(U, lam, tau, X[:, 0], p), ref[:, 0], atol=1e-12)
    # the sketch object applies the same operator with its escaped mass plus a ridge
    A = random_stream(n=80, d=9, seed=5)
    fd = FrequentDirections(3, 9).update(A)
    vals, vecs = fd.eigh()
    M = fd.covariance() + (fd.escaped_mass + 0.1) * torch.eye(9, dtype=torch.float64)
    w, Q = torch.linalg.eigh(M)
    assert torch.allclose(fd.inverse_root(X, 4, ridge=0.1), (Q * w ** -0.25) @ Q.T @ X, atol=1e-10)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_fd_shrink_values(method):
    M = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    vals, vecs, delta = fd_shrink(M, 2, method)
    assert vals.tolist() == [12.0, 5.0] and float(delta) == 4.0
    assert torch.allclose(vecs.abs(), torch.eye(4, dtype=torch.float64)[:, :2])


def _shrink_cases(dtype):
    """(M, ℓ): tall and wide blocks (both Gram sides), fewer rows than ℓ, ℓ = d, a rank-deficient block
    with zero rows (an unfilled sketch on top of new rows), a decaying spectrum."""
    g = torch.Generator().manual_seed(11)
    def rnd(r, d):
        return torch.randn(r, d, generator=g, dtype=torch.float64)
    low = rnd(30, 3) @ rnd(3, 50)
    cases = [(rnd(40, 12), 5), (rnd(12, 40), 5), (rnd(3, 20), 5), (rnd(9, 6), 6),
             (torch.cat([torch.zeros(5, 50, dtype=torch.float64), low]), 5),
             (random_stream(n=70, d=30, seed=12), 8), (random_stream(n=20, d=60, seed=13), 8)]
    return [(M.to(dtype), ell) for M, ell in cases]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_gram_shrink_equals_svd_shrink(dtype, tol):
    """The Gram path returns the SVD path's sketch: the same λ, δ and U diag(λ) Uᵀ, orthonormal live vectors
    (to ``tol`` times σ₁², the float rounding of each dtype)."""
    for M, ell in _shrink_cases(dtype):
        a = fd_shrink(M, ell, "svd")
        b = fd_shrink(M, ell, "gram")
        scale = float(torch.linalg.matrix_norm(M.double(), 2) ** 2)
        assert b[0].dtype == dtype and b[1].shape == a[1].shape == (M.shape[1], ell)
        assert torch.allclose(b[0].double(), a[0].double(), atol=tol * scale, rtol=0)
        assert abs(float(b[2]) - float(a[2])) <= tol * scale
        cov_a = (a[1].double() * a[0].double()) @ a[1].double().T
        cov_b = (b[1].double() * b[0].double()) @ b[1].double().T
        assert torch.allclose(cov_b, cov_a, atol=tol * scale, rtol=0)
        V = b[1].double()[:, b[0] > tol * scale]
        assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=torch.float64), atol=10 * tol)
        # the guarantee of one shrink: 0 ≼ MᵀM − U diag(λ) Uᵀ ≼ δ I
        w = torch.linalg.eigvalsh(M.double().T @ M.double() - cov_b)
        assert float(w.min()) >= -tol * scale and float(w.max()) <= float(b[2]) + tol * scale
    # the test can fail: the Gram of a different matrix gives a different sketch
    M, ell = _shrink_cases(torch.float64)[0]
    assert not torch.allclose(fd_shrink(M, ell, "gram")[0], fd_shrink(M * 1.01, ell, "svd")[0], atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_batched_shrink_equals_one_at_a_time(method):
    g = torch.Generator().manual_seed(14)
    for r, d in ((30, 12), (12, 30)):
        Ms = torch.randn(4, r, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
        vals, vecs, delta = fd_shrink(Ms, 6, method)
        assert vals.shape == (4, 6) and vecs.shape == (4, d, 6) and delta.shape == (4,)
        for i in range(4):
            v1, u1, d1 = fd_shrink(Ms[i], 6, method)
            assert torch.allclose(vals[i], v1, atol=1e-12, rtol=0) and abs(float(delta[i] - d1)) <= 1e-12
            assert torch.allclose(vecs[i] * vals[i] @ vecs[i].T, u1 * v1 @ u1.T, atol=1e-12, rtol=0)


def test_state_dict_round_trip():
    A = random_stream(n=120, d=12, seed=6)
    a = FrequentDirections(4, 12, decay=0.95).update(A[:60])
    b = FrequentDirections(4, 12, decay=0.95).load_state_dict(a.state_dict())
    a.update(A[60:])
    b.update(A[60:])
    assert torch.equal(a.sketch, b.sketch) and a.escaped_mass == b.escaped_mass


def test_errors():
    with pytest.raises(ValueError, match="ell"):
        FrequentDirections(0, 3)
    with pytest.raises(ValueError, match="ell: expected at most d = 3"):
        FrequentDirections(4, 3)
    with pytest.raises(TypeError, match="d: expected an integer"):
        FrequentDirections(2, 3.0)
    with pytest.raises(ValueError, match="decay"):
        FrequentDirections(2, 3, decay=1.5)
    with pytest.raises(ValueError, match="method: expected one of \\('svd', 'gram'\\), got 'qr'"):
        FrequentDirections(2, 3, method="qr")
    with pytest.raises(ValueError, match="method: expected one of"):
        fd_shrink(torch.ones(3, 3), 2, "eig")
    with pytest.raises(ValueError, match="decay"):
        FrequentDirections(2, 3, decay=float("nan"))
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
    with pytest.raises(ValueError, match="tail"):
        low_rank_inverse_root(torch.zeros(3, 1), torch.zeros(1), 0.0, torch.ones(3), 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.all_merge()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_sketch_equals_cpu_sketch(dtype):
    """The FD sketch built on CUDA from the same blocks of rows keeps the guarantee and matches the CPU
    sketch's Gram matrix (the sketch itself is unique only up to rotation)."""
    A = planted_stream().to(dtype)
    cpu, gpu = FrequentDirections(10, A.shape[1], dtype=dtype), FrequentDirections(10, A.shape[1], dtype=dtype,
                                                                                 device="cuda")
    for i in range(0, A.shape[0], 37):
        cpu.update(A[i: i + 37])
        gpu.update(A[i: i + 37].cuda())
    assert gpu.sketch.device.type == "cuda"
    G_cpu, G_gpu = cpu.sketch.T @ cpu.sketch, (gpu.sketch.T @ gpu.sketch).cpu()
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert float((G_cpu - G_gpu).abs().max()) <= tol * float(G_cpu.abs().max())
    assert gpu.escaped_mass == pytest.approx(cpu.escaped_mass, rel=tol, abs=tol * float(G_cpu.abs().max()))
    on_host = types.SimpleNamespace(sketch=gpu.sketch.cpu().double(), ell=gpu.ell, d=gpu.d,
                                    escaped_mass=gpu.escaped_mass)
    check_guarantee(on_host, A.double(), rtol=1e-9 if dtype == torch.float64 else 1e-4)
