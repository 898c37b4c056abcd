"""Curvature operators against explicitly built float64 matrices on tiny models."""

from __future__ import annotations

import pytest
import torch
from _helpers import batches, digits, gpt2, token_batch

from gradsketch.curvature import sketched
from gradsketch.linalg import LinearOperator
from gradsketch.model import Task, causal_lm_loss, classifier_loss
from gradsketch.sketch import sketch

TOL = 1e-10


def tiny(hidden: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    lin1, lin2 = torch.nn.Linear(64, hidden), torch.nn.Linear(hidden, 3)
    return torch.nn.Sequential(lin1, torch.nn.Tanh(), lin2).double()


def data3(n: int = 18):
    X, y = digits(n)
    return X, y % 3


def explicit_hessian(task: Task, X, y) -> torch.Tensor:
    p0 = task.params_dict()

    def mean_loss(flat):
        return task.losses_at(task.unflatten(flat), (X, y), len(X)).mean()

    return torch.func.hessian(mean_loss)(task.flatten(p0))


@pytest.mark.parametrize("method", ["fwd_rev", "fwd_ad", "double_backward", "auto"])
def test_hvp_equals_torch_func_hessian_and_finite_difference(method):
    X, y = data3()
    task = Task(tiny(), classifier_loss())
    H = task.hessian([(X, y)], method=method)
    assert isinstance(H, LinearOperator) and H.symmetric and H.shape == (task.n_params,) * 2
    Hx = explicit_hessian(task, X, y)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(task.n_params, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(H @ V, Hx @ V, atol=TOL, rtol=0)
    torch.testing.assert_close(H @ V[:, 0], Hx @ V[:, 0], atol=TOL, rtol=0)
    # central finite difference of the gradient of the mean loss
    v, eps = V[:, 0], 1e-5
    flat = task.flatten(task.params_dict())

    def gmean(f):
        return torch.func.grad(lambda q: task.losses_at(task.unflatten(q), (X, y), len(X)).mean())(f)

    fd = (gmean(flat + eps * v) - gmean(flat - eps * v)) / (2 * eps)
    torch.testing.assert_close(H @ v, fd, atol=1e-7, rtol=0)


def test_full_mode_is_weighted_mean_equal_to_one_big_batch_and_damping():
    X, y = data3(20)
    task = Task.from_classifier(tiny())
    v = torch.randn(task.n_params, dtype=torch.float64)
    big = task.hessian([(X, y)]) @ v
    uneven = task.hessian(batches(X, y, 7)) @ v  # batches 7, 7, 6
    torch.testing.assert_close(uneven, big, atol=TOL, rtol=0)
    damped = task.hessian(batches(X, y, 7), damping=0.5) @ v
    torch.testing.assert_close(damped, big + 0.5 * v, atol=TOL, rtol=0)
    for op in (task.ggn, task.fisher):
        torch.testing.assert_close(op(batches(X, y, 7)) @ v, op([(X, y)]) @ v, atol=TOL, rtol=0)


def test_batch_and_stochastic_modes():
    X, y = data3(12)
    task = Task(tiny(), classifier_loss())
    data = batches(X, y, 4)
    v = torch.randn(task.n_params, dtype=torch.float64)
    per = [task.hessian([b]) @ v for b in data]
    Hb = task.hessian(data, sampling="batch")
    torch.testing.assert_close(Hb @ v, per[0], atol=TOL, rtol=0)
    torch.testing.assert_close(Hb @ v, per[0], atol=TOL, rtol=0)
    Hs = task.hessian(data, sampling="stochastic")
    got = [Hs @ v for _ in range(4)]  # cycles: batch 0, 1, 2, then 0 again
    for a, b in zip(got, per + per[:1]):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_ggn_equals_explicit_jt_hl_j():
    X, y = data3(10)
    model = tiny()
    task = Task.from_classifier(model)
    G = task.ggn([(X, y)]).to_dense()
    p0 = task.params_dict()
    flat = task.flatten(p0)

    def out(f):
        return torch.func.functional_call(model, task.unflatten(f), (X,))

    J = torch.func.jacrev(out)(flat)                       # [B, C, N]
    z = out(flat)
    ref = torch.zeros_like(G)
    for i in range(len(X)):
        HL = torch.func.hessian(lambda zi, t=y[i:i + 1]: torch.nn.functional.cross_entropy(zi[None], t))(z[i])
        ref += J[i].T @ HL @ J[i]
    torch.testing.assert_close(G, ref / len(X), atol=TOL, rtol=0)
    # MSE head, the mean of the C = 3 squared errors (mse_per_example's default reduction): H_L = (2/C) I, so
    # the GGN is (2/(C n)) Σ J_iᵀ J_i
    tm = Task.from_classifier(model, loss="mse")
    Y = torch.nn.functional.one_hot(y, 3).double()
    Gm = tm.ggn([(X, Y)]).to_dense()
    torch.testing.assert_close(Gm, 2 / 3 * torch.einsum("bcn,bcm->nm", J, J) / len(X), atol=TOL, rtol=0)


def test_fisher_equals_mean_outer_product_of_per_example_grads():
    X, y = data3(9)
    task = Task(tiny(), classifier_loss())
    Fm = task.fisher(batches(X, y, 4)).to_dense()
    Gr = task.grads((X, y))
    torch.testing.assert_close(Fm, Gr.T @ Gr / len(X), atol=TOL, rtol=0)


def test_sketched_operator_equals_phi_h_phit_and_to_scipy():
    X, y = data3(10)
    task = Task(tiny(), classifier_loss())
    H = task.hessian([(X, y)])
    Hx = explicit_hessian(task, X, y)
    for S in (task.block_sketch(16, kind="sjlt", seed=1), sketch("dense", task.n_params, 16, seed=2),
              task.factored_sketch(16, seed=3)):
        SH = sketched(H, S)
        assert SH.shape == (16, 16) and SH.symmetric
        Phi = S(torch.split(torch.eye(task.n_params, dtype=torch.float64), task.param_sizes, dim=1)).T \
            if not hasattr(S, "matrix") else S.matrix()
        torch.testing.assert_close(SH.to_dense(), Phi @ Hx @ Phi.T, atol=1e-9, rtol=0)
    SH2 = task.sketched_hessian([(X, y)], task.block_sketch(16, kind="sjlt", seed=1))
    import numpy as np

    v = np.random.default_rng(0).standard_normal(16)
    np.testing.assert_allclose(SH2.to_scipy() @ v, (SH2 @ torch.tensor(v)).numpy(), atol=1e-12)


def test_curvature_on_gpt2_with_sdpa_attention_falls_back_to_math_kernel():
    # CPU flash attention has neither forward-mode nor double-backward rules; products use the math kernel
    model = gpt2(attn="sdpa")
    task = Task(model, causal_lm_loss(), params=["transformer.h.1.mlp.*"])
    ref_task = Task(gpt2(attn="eager"), causal_lm_loss(), params=["transformer.h.1.mlp.*"])
    data = [token_batch(2, 8, pad_rows={0: 5})]
    v = torch.randn(task.n_params, dtype=torch.float64)
    for name in ("hessian", "fisher"):
        torch.testing.assert_close(getattr(task, name)(data) @ v, getattr(ref_task, name)(data) @ v,
                                   atol=1e-9, rtol=0)


def test_ggn_and_fisher_batch_stochastic_modes_and_damping():
    """The three modes and damping are shared by every curvature operator: GGN and Fisher against their
    one-batch full-mode products (each exact, checked above)."""
    X, y = data3(12)
    task = Task.from_classifier(tiny())
    data = batches(X, y, 4)
    v = torch.randn(task.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for make in (task.ggn, task.fisher):
        per = [make([b]) @ v for b in data]
        assert not torch.allclose(per[0], per[1])  # the batches differ, so the cycling below is visible
        torch.testing.assert_close(make(data, sampling="batch") @ v, per[0], atol=TOL, rtol=0)
        op = make(data, sampling="stochastic", damping=0.25)
        for a, b in zip([op @ v for _ in range(4)], per + per[:1]):
            torch.testing.assert_close(a, b + 0.25 * v, atol=TOL, rtol=0)
        torch.testing.assert_close(make(data, damping=0.25) @ v, make(data) @ v + 0.25 * v, atol=TOL, rtol=0)


def test_to_scipy_eigsh_and_cg_agree_with_the_dense_hessian():
    import numpy as np
    from scipy.sparse.linalg import cg, eigsh

    X, y = data3(10)
    task = Task(tiny(), classifier_loss())
    Hx = explicit_hessian(task, X, y)
    A = task.hessian([(X, y)], damping=0.1).to_scipy()
    assert A.shape == Hx.shape and A.dtype == np.float64
    top = np.sort(eigsh(A, k=3, which="LA", tol=1e-12)[0])
    np.testing.assert_allclose(top, torch.linalg.eigvalsh(Hx)[-3:].numpy() + 0.1, atol=1e-9, rtol=0)
    b = np.random.default_rng(1).standard_normal(task.n_params)
    x, info = cg(A, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    ref = torch.linalg.solve(Hx + 0.1 * torch.eye(task.n_params, dtype=torch.float64), torch.tensor(b))
    np.testing.assert_allclose(x, ref.numpy(), atol=1e-7, rtol=0)
