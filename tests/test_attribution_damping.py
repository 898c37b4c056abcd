"""The one damping rule of influence-type attribution, kernel (|K| + δI)⁻¹ (gradsketch.attribution.damping):
closed forms on explicit float64 matrices, a PSD Arnoldi kernel by default on an indefinite Hessian, sketched
influence at d = N with an orthogonal sketch equal to exact influence, and the CG/LiSSA curvature default."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import indefinite_tanh_task

import gradsketch
from gradsketch.attribution import (
    DEFAULT_DAMPING,
    ArnoldiInfluence,
    Influence,
    damped_inverse,
    damped_reciprocal,
)
from gradsketch.attribution._features import ProjectionSketch
from gradsketch.attribution.options import ArnoldiOptions, InfluenceOptions


def test_rule_on_explicit_matrices_against_the_closed_form():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.0, 0.2, -0.05, -0.5, -2.0], dtype=torch.float64)  # indefinite
    K = Q @ torch.diag(lam) @ Q.T
    for delta in (0.0, 0.01, 0.3, 1.0):  # below, between and above the negative eigenvalues
        M = damped_inverse(K, delta).to_dense()
        torch.testing.assert_close(M, Q @ torch.diag(1.0 / (lam.abs() + delta)) @ Q.T, rtol=1e-12, atol=1e-12)
        assert float(torch.linalg.eigvalsh(M)[0]) > 0
    torch.testing.assert_close(damped_reciprocal(lam, 0.5), 1.0 / (lam.abs() + 0.5), rtol=0, atol=0)
    # positive definite K: the textbook (K + δI)⁻¹ (through the Cholesky path)
    P = Q @ torch.diag(lam.abs()) @ Q.T
    torch.testing.assert_close(damped_inverse(P, 0.1).to_dense(),
                               torch.linalg.inv(P + 0.1 * torch.eye(6, dtype=P.dtype)), rtol=1e-10, atol=1e-12)
    # singular PSD K with δ = 0: the pseudo-inverse on the range, 0 on the null space
    S = Q[:, :2] @ torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64)) @ Q[:, :2].T
    torch.testing.assert_close(damped_inverse(S, 0.0).to_dense(), torch.linalg.pinv(S, hermitian=True),
                               rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="damping: expected a number >= 0.0, got -0.1"):
        damped_inverse(K, -0.1)


def test_every_influence_type_method_has_the_same_damping_default():
    assert ArnoldiOptions().damping == InfluenceOptions().damping == DEFAULT_DAMPING > 0


def _indefinite():
    return indefinite_tanh_task()


def test_arnoldi_default_gives_a_psd_kernel_on_an_indefinite_hessian():
    task, data, H = _indefinite()
    N = H.shape[0]
    # the Hessian (Arnoldi's default curvature "auto" would take the PSD GGN here), default damping
    a = ArnoldiInfluence(task, n_iters=N, top_k=N, curvature="hessian", block_size=1).fit(data, progress=False)
    assert bool((a.eigenvalues_ < -1e-3).any())  # Arnoldi kept negative eigenvalues...
    M = a.kernels_[0].to_dense()
    assert float(torch.linalg.eigvalsh((M + M.T) / 2)[0]) > 0  # ...and the kernel is positive definite
    w, V = torch.linalg.eigh(H)
    G = torch.cat([task.grads(b) for b in data])
    ref = (G @ V) ** 2 @ (1.0 / (w.abs() + DEFAULT_DAMPING))
    torch.testing.assert_close(a.self_influence(progress=False), ref, rtol=1e-6, atol=1e-9)


def test_sketched_influence_at_d_equal_n_with_an_orthogonal_sketch_is_exact_influence():
    task, data, H = _indefinite()
    N = H.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    sk = ProjectionSketch(Q, tag="orthogonal")  # φ = Qᵀg: an orthogonal Φ with d = N
    test = [data[0]]
    exact = Influence(task).fit(data, progress=False).score(test, progress=False)
    sketched = Influence(task, sketch=sk).fit(data, progress=False).score(test, progress=False)
    torch.testing.assert_close(sketched, exact, rtol=1e-8, atol=1e-10)
    # and both are the closed form with the default damping
    w, V = torch.linalg.eigh(H)
    G, Gt = torch.cat([task.grads(b) for b in data]), task.grads(data[0])
    torch.testing.assert_close(exact, (Gt @ V) / (w.abs() + DEFAULT_DAMPING) @ (G @ V).T, rtol=1e-8, atol=1e-10)


def test_cg_uses_the_ggn_when_the_task_declares_one_and_the_rule_on_the_hessian():
    task, data, H = _indefinite()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cg = Influence(task, solver="cg", tol=1e-12).fit(data, progress=False)
    explicit = Influence(task, curvature="ggn").fit(data, progress=False)
    torch.testing.assert_close(cg.score(data, progress=False), explicit.score(data, progress=False),
                               rtol=1e-7, atol=1e-10)
    # no GGN declared: the Hessian, which is indefinite here, so CG applies the rule (|H| + δI)⁻¹ as explicit does
    plain = gradsketch.Task(task.model, task.loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        a = Influence(plain, solver="cg").fit(data, progress=False)
    assert a.kernel_info_["curvature"] == "hessian" and a.kernel_info_["indefinite"]
    torch.testing.assert_close(a.score(data, progress=False),
                               Influence(plain).fit(data, progress=False).score(data, progress=False),
                               rtol=1e-10, atol=1e-12)
