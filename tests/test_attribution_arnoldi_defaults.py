"""Arnoldi influence defaults of session 7 (issue 20): the Krylov start block made of random combinations of
the per-example loss gradients, the Krylov dimension tied to top_k, and the width of the vectorised block
products set by the model's activation size. Exact answers on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from test_attribution import tiny
from torch import nn

from gradsketch.attribution import ArnoldiOptions, Attributor, batches
from gradsketch.attribution.methods import activation_floats, block_batch_columns, gradient_start
from gradsketch.model import Task


def _explicit_start(task, data, columns, seed):
    """Σ_batches Γ_bᵀ R_b with the per-example gradients Γ_b formed explicitly and R_b drawn in the same order."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(task.n_params, columns, dtype=torch.float64)
    for X, y in data:
        R = torch.randn(X.shape[0], columns, generator=gen, dtype=torch.float64)
        out += task.grads((X, y)).T @ R
    return out


def test_gradient_start_is_random_combinations_of_the_per_example_gradients():
    task, (X, y), _ = tiny()
    data = batches(X, y, batch_size=4)
    want = _explicit_start(task, data, 3, seed=7)
    torch.testing.assert_close(gradient_start(task, data, 3, 7), want, rtol=1e-12, atol=1e-14)
    # pieces of one example per vectorised call (max_batch_columns = columns): the same sum
    torch.testing.assert_close(gradient_start(task, data, 3, 7, max_batch_columns=3), want, rtol=1e-12,
                               atol=1e-14)


def test_default_krylov_dimension_is_one_and_a_half_top_k_rounded_up_to_the_block():
    task, _, _ = tiny()  # 27 parameters: the tail is on, so top_k defaults to 40

    def dim(**opts):
        return Attributor(task, "arnoldi", **opts).krylov_dim()

    assert dim() == 64  # 1.5·40 = 60 → 4 blocks of 16
    assert dim(top_k=50) == 80  # 75 → 5 blocks
    assert dim(tail=False) == 160  # top 100 → 150 → 10 blocks
    assert dim(top_k=42) == 64 and dim(top_k=43) == 80
    assert dim(top_k=4) == 16  # at least one block
    assert dim(top_k=50, block_size=32) == 96 and dim(top_k=7, block_size=1) == 11
    assert dim(n_iters=12) == 12 and dim(n_iters=12, top_k=3) == 12


def test_default_fit_builds_at_most_the_default_dimension():
    """A classifier with N = 210 > 64 parameters and 60 examples: the default fit builds at most
    64 = 1.5·40 rounded up to blocks of 16; its 40 Ritz values lie below the explicit GGN's top 40 (Cauchy
    interlacing, exact for any Rayleigh–Ritz step), and the whole space (n_iters = N) gives them exactly."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (60,), generator=g)
    torch.manual_seed(0)
    task = Task.from_classifier(nn.Linear(20, 10).double())
    data = batches(X, y, batch_size=20)
    a = Attributor(task, "arnoldi").fit(data, progress=False)
    assert a.krylov_["dim"] <= 64 and a.krylov_["passes"] <= 4
    assert a.eigenvalues_.numel() == 40
    # explicit GGN (1/n) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i of a linear softmax model, z = W x + b
    with torch.no_grad():
        p = torch.softmax(task.model(X), 1)
    G = torch.zeros(210, 210, dtype=torch.float64)
    for i in range(60):
        H = torch.diag(p[i]) - torch.outer(p[i], p[i])
        J = torch.cat([torch.kron(torch.eye(10, dtype=X.dtype), X[i][None]), torch.eye(10, dtype=X.dtype)], 1)
        G += J.T @ H @ J / 60
    lam = torch.linalg.eigvalsh(G).flip(0)[:40]
    assert bool((a.eigenvalues_ <= lam + 1e-12).all())
    full = Attributor(task, "arnoldi", n_iters=210).fit(data, progress=False)
    torch.testing.assert_close(full.eigenvalues_, lam, rtol=0, atol=1e-10)


def test_zero_gradients_fall_back_to_a_random_start():
    """At an exact fit every per-example gradient is 0 (so is the gradient start block); the Hessian 2xxᵀ is
    not, and the fit must still find it exactly."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).double()
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        yv = model(X)[:, 0]
    task = Task(model, lambda m, b: (m(b[0])[:, 0] - b[1]) ** 2)
    data = [(X, yv)]
    assert float(gradient_start(task, data, 2, 0).abs().max()) == 0.0
    a = Attributor(task, "arnoldi", top_k=2, damping=0.0).fit(data, progress=False)
    want = torch.linalg.eigvalsh(2 * X.T @ X / 3).flip(0)
    torch.testing.assert_close(a.eigenvalues_, want, rtol=1e-10, atol=1e-12)


def test_random_start_is_still_available_and_gives_the_same_converged_pairs():
    task, (X, y), _ = tiny()
    tr = batches(X, y, batch_size=4)
    N = task.n_params
    a = Attributor(task, "arnoldi", n_iters=N, top_k=5, tol=None).fit(tr, progress=False)
    b = Attributor(task, "arnoldi", n_iters=N, top_k=5, tol=None, krylov_start="random").fit(tr, progress=False)
    torch.testing.assert_close(a.eigenvalues_, b.eigenvalues_, rtol=1e-9, atol=1e-12)  # the whole space: exact


def test_options_are_checked():
    assert ArnoldiOptions().n_iters is None and ArnoldiOptions().krylov_start == "gradients"
    with pytest.raises(ValueError, match="krylov_start"):
        ArnoldiOptions(krylov_start="gaussian")
    with pytest.raises(ValueError, match="top_k"):
        ArnoldiOptions(n_iters=10, top_k=20)
    with pytest.raises(ValueError, match="n_iters"):
        ArnoldiOptions(n_iters=0)


def test_activation_size_and_block_product_width():
    """y = ‖W x‖² per example: autograd keeps x (3 floats, for ∂/∂W) and W x (2 floats, for the square):
    5 per example. The product width is 2^23 / 5, capped at 65,536; a layer of 5,000 outputs (5,003 floats
    per example) gets the floor, 4,096."""
    X = torch.randn(10, 3, dtype=torch.float64)
    small = Task(nn.Linear(3, 2, bias=False).double(), lambda m, b: (m(b[0]) ** 2).sum(1))
    assert activation_floats(small, (X,)) == 5.0
    assert block_batch_columns(small, (X,)) == 65536
    wide = Task(nn.Linear(3, 5000, bias=False).double(), lambda m, b: (m(b[0]) ** 2).sum(1))
    assert activation_floats(wide, (X,)) == 5003.0
    assert block_batch_columns(wide, (X,)) == 4096
    mid = Task(nn.Linear(3, 997, bias=False).double(), lambda m, b: (m(b[0]) ** 2).sum(1))
    assert block_batch_columns(mid, (X,)) == (1 << 23) // 1000


def test_residual_stop_from_the_gradient_start_returns_the_long_runs_top_k():
    """The default start block and frozen GGN with the residual test: the run stops converged before the whole
    space, and its top 4 agree with a run over the whole space within the residual bound (Bauer–Fike)."""
    task, (X, y), _ = tiny()
    tr = batches(X, y, batch_size=4)
    N = task.n_params
    short = Attributor(task, "arnoldi", n_iters=N, top_k=4, block_size=2, tol=1e-6).fit(tr, progress=False)
    long = Attributor(task, "arnoldi", n_iters=N, top_k=4, block_size=2, tol=None).fit(tr, progress=False)
    assert short.krylov_["stop"] == "converged" and short.krylov_["dim"] < N
    assert long.krylov_["stop"] == "exhausted"
    scale = float(long.eigenvalues_.abs().max())
    torch.testing.assert_close(short.eigenvalues_, long.eigenvalues_, rtol=0, atol=1e-6 * scale)
