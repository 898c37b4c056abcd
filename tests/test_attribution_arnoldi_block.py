"""Arnoldi influence through block Lanczos (issue 20): same answers as single-vector Arnoldi and as explicit
float64 matrices, subsampled Hessian data, the reported Krylov work, option checks."""

from __future__ import annotations

import pytest
import torch
from test_attribution import full_hessian, tiny

from gradsketch.attribution import ArnoldiOptions, Attributor, batches
from gradsketch.model import Task


@pytest.fixture
def setup():
    task, (X, y), (Xt, yt) = tiny()
    return task, (X, y), (Xt, yt), batches(X, y, batch_size=4), batches(Xt, yt, batch_size=2)


def test_block_and_single_vector_agree_on_top_eigenpairs(setup):
    """Both converge the top 4 of N = 27 fully (the whole space is built), so eigenvalues agree to rounding and
    the truncated influence scores (exact eigenpairs, same k) agree."""
    task, _, _, tr, te = setup
    N = task.n_params
    one = Attributor(task, "arnoldi", n_iters=N, top_k=4, block_size=1).fit(tr, progress=False)
    blk = Attributor(task, "arnoldi", n_iters=N, top_k=4, block_size=5, tol=None).fit(tr, progress=False)
    torch.testing.assert_close(blk.eigenvalues_, one.eigenvalues_, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(blk.score(te, progress=False), one.score(te, progress=False), rtol=1e-7, atol=1e-10)
    assert one.krylov_ == {"dim": N, "passes": N, "stop": "max_dim"}
    assert blk.krylov_ == {"dim": N, "passes": -(-N // 5), "stop": "exhausted"}


def test_residual_stop_reports_the_work_and_keeps_the_top_pairs(setup):
    task, (X, y), _, tr, _ = setup
    lam = torch.linalg.eigvalsh(full_hessian(task, X, y))
    top = lam[torch.argsort(-lam.abs())][:1]
    a = Attributor(task, "arnoldi", n_iters=task.n_params, top_k=1, block_size=2, tol=1e-3,
                   curvature="hessian").fit(tr, progress=False)
    assert a.krylov_["stop"] == "converged" and a.krylov_["dim"] < task.n_params
    assert a.krylov_["passes"] == a.krylov_["dim"] // 2
    # residual ≤ 1e-3·|θ_max| bounds the Ritz value's distance to an eigenvalue (Bauer–Fike); |θ_max| ≤ |λ_max|
    torch.testing.assert_close(a.eigenvalues_, top, rtol=0, atol=1e-3 * float(top.abs().max()))


@pytest.mark.filterwarnings("ignore:damping.*numerically zero:RuntimeWarning")  # top_k = N: rank < N
def test_hessian_subsample_uses_the_explicit_sub_mean(setup):
    task, (X, y), _, tr, _ = setup
    N = task.n_params
    a = Attributor(task, "arnoldi", n_iters=N, top_k=N, hessian_subsample=6, seed=2,
                   curvature="hessian").fit(tr, progress=False)
    chosen = torch.sort(torch.randperm(len(X), generator=torch.Generator().manual_seed(2))[:6]).values
    exact = torch.linalg.eigvalsh(full_hessian(task, X[chosen], y[chosen]))
    torch.testing.assert_close(torch.sort(a.eigenvalues_).values, exact, rtol=0, atol=1e-10)
    full = torch.linalg.eigvalsh(full_hessian(task, X, y))
    assert float((exact - full).abs().max()) > 1e-3  # the subsample is a different operator


@pytest.mark.filterwarnings("ignore:damping.*numerically zero:RuntimeWarning")  # top_k = N: rank < N
def test_default_curvature_is_the_ggn_for_classifiers_and_all_of_a_small_training_set(setup):
    """curvature="auto": the GGN when the task declares outputs (Task.from_classifier), else the Hessian; the
    default hessian_subsample=1000 keeps every example of a smaller training set."""
    task, (X, y), _, tr, _ = setup
    N = task.n_params
    auto = Attributor(task, "arnoldi", n_iters=N, top_k=N).fit(tr, progress=False)
    ggn = Attributor(task, "arnoldi", n_iters=N, top_k=N, curvature="ggn", hessian_subsample=None).fit(
        tr, progress=False)
    torch.testing.assert_close(auto.eigenvalues_, ggn.eigenvalues_, rtol=0, atol=1e-10)
    assert float(ggn.eigenvalues_.min()) > -1e-10  # the GGN of the cross-entropy is PSD; the Hessian here is not
    assert float(torch.linalg.eigvalsh(full_hessian(task, X, y)).min()) < -1e-3
    plain = Task(task.model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    a = Attributor(plain, "arnoldi", n_iters=N, top_k=N).fit(tr, progress=False)
    torch.testing.assert_close(torch.sort(a.eigenvalues_).values, torch.linalg.eigvalsh(full_hessian(task, X, y)),
                               rtol=0, atol=1e-10)


def test_warns_when_kept_eigenvalues_are_numerically_zero(setup):
    """One curvature example: its GGN has rank ≤ 2 (3 classes), so top_k = 6 keeps numerically zero eigenvalues
    whose 1/λ weights are noise; damping above them (or fewer pairs) is quiet."""
    import warnings

    task, _, _, tr, _ = setup
    N = task.n_params
    with pytest.warns(RuntimeWarning, match="numerically zero"):  # no damping (the default 3e-3 bounds them)
        Attributor(task, "arnoldi", n_iters=N, top_k=6, hessian_subsample=1, damping=0.0).fit(tr, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Attributor(task, "arnoldi", n_iters=N, top_k=6, hessian_subsample=1, damping=0.1).fit(tr, progress=False)
        Attributor(task, "arnoldi", n_iters=N, top_k=6, hessian_subsample=1).fit(tr, progress=False)
        Attributor(task, "arnoldi", n_iters=N, top_k=2, hessian_subsample=1).fit(tr, progress=False)


def test_options_are_checked():
    assert ArnoldiOptions().curvature == "auto" and ArnoldiOptions(curvature="ggn").curvature == "ggn"
    with pytest.raises(ValueError, match="curvature"):
        ArnoldiOptions(curvature="fisher")
    with pytest.raises(ValueError, match="block_size"):
        ArnoldiOptions(block_size=0)
    with pytest.raises(ValueError, match="krylov_store"):
        ArnoldiOptions(krylov_store="host")
    assert ArnoldiOptions(krylov_store="host", block_size=1).block_size == 1
    with pytest.raises(ValueError, match="tol"):
        ArnoldiOptions(tol=-1.0)
    with pytest.raises(ValueError, match="hessian_subsample"):
        ArnoldiOptions(hessian_subsample=1.5)
    with pytest.raises(ValueError, match="hessian_subsample"):
        ArnoldiOptions(hessian_subsample=0)
    with pytest.raises(TypeError, match="hessian_subsample"):
        ArnoldiOptions(hessian_subsample="half")
