"""TRAK: closed forms (float64) for the Gram (d > n) and d × d kernel paths, the ridge rule, ensembles over
models (paper/traker convention: mean of per-model scores times the mean out-to-loss weight), and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsketch.attribution import Attributor, batches, classification_margin
from gradsketch.linalg import CholeskyInverse as CholKernel
from gradsketch.linalg import EigenOperator as EigKernel
from gradsketch.linalg import WoodburyInverse as GramKernel
from gradsketch.linalg import ridge_inverse as trak_kernel
from gradsketch.model import Task

N_TRAIN, N_TEST = 14, 5


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N_TRAIN, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN,), generator=g)
    Xt = torch.randn(N_TEST, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (N_TEST,), generator=g)
    return (X, y), (Xt, yt)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()


def closed_form(m: nn.Module, train, test, ridge: float, sketch=None):
    """(Φ_t (ΦᵀΦ + λI)⁻¹ Φᵀ, q) of one model from explicit margin gradients, λ = ridge · tr / min(n, d)."""
    fn = classification_margin()
    mt = Task(m, fn)
    F, Ft = mt.grads(train), mt.grads(test)
    if sketch is not None:
        P = sketch.matrix()  # [d, N]
        F, Ft = F @ P.T, Ft @ P.T
    n, d = F.shape
    K = F.T @ F
    lam = ridge * torch.trace(K) / min(n, d)
    S = Ft @ torch.linalg.solve(K + lam * torch.eye(d, dtype=K.dtype), F.T)
    with torch.no_grad():
        q = torch.sigmoid(-fn(m, train))
    return S, q, float(lam)


@pytest.mark.parametrize("ridge", [1.0, 0.01])
def test_gram_path_d_greater_than_n_closed_form(ridge):
    train, test = data()
    m = model(0)
    task = Task.from_classifier(m)
    assert task.n_params > N_TRAIN  # d = N = 27 > n = 14: the Gram (Woodbury) form
    a = Attributor(task, "trak", kernel="features", margin_fn=classification_margin(), ridge=ridge)
    a.fit(batches(*train, batch_size=4), progress=False)
    assert isinstance(a.kernels_[0], GramKernel)
    S, q, lam = closed_form(m, train, test, ridge)
    assert a.ridge_ == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(a.score(batches(*test, batch_size=2), progress=False), S * q, rtol=1e-8, atol=1e-11)
    # self-influence: the diagonal of the train × train score matrix
    Str, _, _ = closed_form(m, train, train, ridge)
    torch.testing.assert_close(a.self_influence(progress=False), torch.diagonal(Str) * q, rtol=1e-8, atol=1e-11)


def test_sketched_path_d_less_than_n_closed_form():
    train, test = data()
    m = model(0)
    task = Task.from_classifier(m)
    from gradsketch import sketch as make_sketch

    S_ = make_sketch("dense", task.n_params, 8, seed=3)
    a = Attributor(task, "trak", kernel="features", sketch=S_, margin_fn=classification_margin(), ridge=0.5)
    a.fit(batches(*train, batch_size=4), progress=False)
    assert isinstance(a.kernels_[0], CholKernel)  # d = 8 < n = 14: d × d Cholesky
    S, q, lam = closed_form(m, train, test, 0.5, sketch=S_)
    assert a.ridge_ == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(a.score(batches(*test, batch_size=2), progress=False), S * q, rtol=1e-8, atol=1e-11)


def test_gram_kernel_equals_dense_inverse():
    g = torch.Generator().manual_seed(1)
    F = torch.randn(6, 11, generator=g, dtype=torch.float64)
    phi = torch.randn(3, 11, generator=g, dtype=torch.float64)
    M = torch.linalg.inv(F.T @ F + 0.3 * torch.eye(11, dtype=torch.float64))
    k = GramKernel(F, 0.3)
    torch.testing.assert_close(k(phi), phi @ M, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.quadratic(phi), ((phi @ M) * phi).sum(1), rtol=1e-10, atol=1e-12)
    # tiny ridge: trak_kernel falls back to the d × d factorisation rather than losing accuracy
    assert isinstance(trak_kernel(F, 1e-12), (CholKernel, EigKernel))
    assert isinstance(trak_kernel(F, 0.3), GramKernel)
    assert isinstance(trak_kernel(F.T.contiguous(), 0.3), CholKernel)  # d < n


def test_ensemble_of_identical_models_equals_single_model():
    train, test = data()
    m = model(0)
    task = Task.from_classifier(m)
    tr, te = batches(*train, batch_size=4), batches(*test, batch_size=2)
    fn = classification_margin()
    one = Attributor(task, "trak", margin_fn=fn).fit(tr, progress=False)
    three = Attributor(task, "trak", margin_fn=fn, models=[copy.deepcopy(m) for _ in range(3)]).fit(tr, progress=False)
    torch.testing.assert_close(three.score(te, progress=False), one.score(te, progress=False), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(three.self_influence(progress=False), one.self_influence(progress=False),
                               rtol=1e-12, atol=1e-14)


def test_ensemble_of_different_models_is_paper_average():
    """τ = [(1/M) Σ_m S_m] ⊙ q̄ with q̄ the mean of the per-model out-to-loss weights (not Σ_m S_m ⊙ q_m)."""
    train, test = data()
    ms = [model(s) for s in (0, 1, 2)]
    task = Task.from_classifier(model(7))  # the task's own weights are not used when models= is given
    before = copy.deepcopy(task.model.state_dict())
    a = Attributor(task, "trak", kernel="features", margin_fn=classification_margin(), models=ms, ridge=0.3)
    S = a.fit(batches(*train, batch_size=4), progress=False).score(batches(*test, batch_size=2), progress=False)
    parts = [closed_form(m, train, test, 0.3) for m in ms]
    qbar = sum(p[1] for p in parts) / 3
    ref = sum(p[0] for p in parts) / 3 * qbar
    torch.testing.assert_close(S, ref, rtol=1e-8, atol=1e-11)
    per_model_q = sum(p[0] * p[1] for p in parts) / 3
    assert not torch.allclose(S, per_model_q, rtol=1e-3)  # the convention is observable
    assert a.ridges_ == pytest.approx([p[2] for p in parts], rel=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())


def test_models_accepts_state_dicts_and_matches_checkpoints():
    train, test = data()
    ms = [model(s) for s in (0, 1)]
    task = Task.from_classifier(model(0))
    tr, te = batches(*train, batch_size=4), batches(*test, batch_size=2)
    a = Attributor(task, "grad-dot", models=ms).fit(tr, progress=False).score(te, progress=False)
    b = Attributor(task, "grad-dot", checkpoints=[m.state_dict() for m in ms]).fit(tr, progress=False)
    torch.testing.assert_close(a, b.score(te, progress=False), rtol=0, atol=0)


def test_trak_bad_input_names_argument():
    train, _ = data()
    task = Task.from_classifier(model(0))
    tr = batches(*train, batch_size=4)
    with pytest.raises(ValueError, match="ridge"):
        Attributor(task, "trak", ridge=-1.0).fit(tr, progress=False)
    with pytest.raises(ValueError, match="ridge"):
        Attributor(task, "trak", ridge=float("nan")).fit(tr, progress=False)
    with pytest.raises(ValueError, match="models"):
        Attributor(task, "trak", models=[model(1)], checkpoints=[model(1).state_dict()]).fit(tr, progress=False)
    with pytest.raises(ValueError, match="models"):
        Attributor(task, "trak", models=[]).fit(tr, progress=False)
    with pytest.raises(TypeError, match=r"models\[1\]"):
        Attributor(task, "trak", models=[model(1), "x"]).fit(tr, progress=False)
    wrong = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="checkpoints/models"):
        Attributor(task, "trak", models=[wrong]).fit(tr, progress=False)
    with pytest.raises(TypeError, match="models"):
        Attributor(task, "tracin", models=[model(1)])


def test_gram_path_float32_features_close_to_float64():
    """float32 features: the Gram matrix is a float32 GEMM (factorised in float64); the scores stay within
    float32 accuracy of the float64 closed form (bound: relative error ≤ 1e-4 · max|S| at these sizes)."""
    train, test = data()
    m = model(0)
    S64, q, _ = closed_form(m, train, test, 1.0)
    m32 = copy.deepcopy(m).float()
    task = Task.from_classifier(m32)
    tr = batches(train[0].float(), train[1], batch_size=4)
    te = batches(test[0].float(), test[1], batch_size=2)
    a = Attributor(task, "trak", kernel="features", margin_fn=classification_margin()).fit(tr, progress=False)
    assert isinstance(a.kernels_[0], GramKernel)
    S = a.score(te, progress=False).double()
    ref = S64 * q
    assert float((S - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_gram_path_score_shortcut_equals_kernel_then_rows(tmp_path):
    """TRAK.score on the Gram form computes φFᵀ(G + λI)⁻¹ directly; it equals the general path (the kernel
    (FᵀF + λI)⁻¹ applied to φ, then the products with the training rows) for an ensemble with q weights, in
    float64, and stays within float32 accuracy of it for float32 features read back from a store in blocks."""
    train, test = data()
    fn = classification_margin()
    ms = [model(0), model(1)]
    task = Task.from_classifier(model(0))
    tr, te = batches(*train, batch_size=4), batches(*test, batch_size=2)
    a = Attributor(task, "trak", margin_fn=fn, models=ms, ridge=0.3).fit(tr, progress=False)
    assert all(isinstance(k, GramKernel) for k in a.kernels_)
    general = Attributor.score(a, te, progress=False)   # the base class's path: ψ = Mφ, then ψ Fᵀ
    torch.testing.assert_close(a.score(te, progress=False), general, rtol=1e-10, atol=1e-13)
    m32 = copy.deepcopy(model(0)).float()
    tr32 = batches(train[0].float(), train[1], batch_size=4)
    te32 = batches(test[0].float(), test[1], batch_size=2)
    b = Attributor(Task.from_classifier(m32), "trak", margin_fn=fn, store=tmp_path / "s", store_dtype="float32",
                   block_rows=4).fit(tr32, progress=False)
    got, ref = b.score(te32, progress=False), Attributor.score(b, te32, progress=False)
    assert got.dtype == ref.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("block_rows", [4, 4096])
def test_sketched_path_float32_features_close_to_float64(block_rows):
    """d ≤ n with float32 features: ΦᵀΦ is summed over row blocks of float32 GEMMs into float64; the scores
    stay within float32 accuracy of the float64 closed form (relative error ≤ 1e-4 · max|S|)."""
    from gradsketch import sketch as make_sketch

    train, test = data()
    m = model(0)
    S_ = make_sketch("dense", Task.from_classifier(m).n_params, 8, seed=3)
    S64, q, lam = closed_form(m, train, test, 0.5, sketch=S_)
    task = Task.from_classifier(copy.deepcopy(m).float())
    tr = batches(train[0].float(), train[1], batch_size=4)
    a = Attributor(task, "trak", kernel="features", sketch=S_, margin_fn=classification_margin(), ridge=0.5,
                   block_rows=block_rows)
    a.fit(tr, progress=False)
    assert isinstance(a.kernels_[0], CholKernel)
    assert a.ridge_ == pytest.approx(lam, rel=1e-5)
    S = a.score(batches(test[0].float(), test[1], batch_size=2), progress=False).double()
    ref = S64 * q
    assert float((S - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("block_rows", [4, 4096])
def test_gram_path_from_store_matches_memory(tmp_path, block_rows):
    """Features read back from a float32 GradientStore (several blocks) give the in-memory scores up to float32
    rounding of the stored features."""
    train, test = data()
    task = Task.from_classifier(model(0))
    tr, te = batches(*train, batch_size=4), batches(*test, batch_size=2)
    fn = classification_margin()
    mem = Attributor(task, "trak", margin_fn=fn).fit(tr, progress=False)
    st = Attributor(task, "trak", margin_fn=fn, store=tmp_path / f"s{block_rows}", store_dtype="float32",
                    block_rows=block_rows).fit(tr, progress=False)
    assert isinstance(st.kernels_[0], GramKernel)
    ref = mem.score(te, progress=False)
    got = st.score(te, progress=False).double()
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    si = st.self_influence(progress=False)
    assert float((si - mem.self_influence(progress=False)).abs().max()) <= 1e-4 * float(si.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_by_lower_blocks_equals_the_full_product(dtype):
    from gradsketch.linalg.operator import gram

    g = torch.Generator().manual_seed(0)
    F = torch.randn(1300, 37, generator=g, dtype=torch.float64)   # 1300 rows: blocks of 512, a ragged last one
    want = F @ F.T
    G = gram(F.to(dtype), block=512)
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(G, want, **tol)
    torch.testing.assert_close(gram(F.to(dtype), block=4096), G, rtol=0, atol=tol["atol"])   # one block: same
    # ΦᵀΦ of a row block (TRAK's d × d kernel): the transposed view, 1300 columns in lower blocks of 512
    B = F.T.contiguous().to(dtype)   # [37, 1300]: 37 rows, d = 1300
    K = gram(B.T, block=512)
    assert K.dtype == torch.float64 and torch.equal(K, K.T)
    torch.testing.assert_close(K, want, **tol)
