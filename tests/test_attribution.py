"""Attributor: exact answers on tiny float64 models, blocked top-k, stores, sign convention, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsketch.attribution import Attributor, batches, classification_margin
from gradsketch.model import Task

N_TRAIN, N_TEST = 14, 5


def tiny(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N_TRAIN, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN,), generator=g)
    Xt = torch.randn(N_TEST, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (N_TEST,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    task = Task.from_classifier(model)
    return task, (X, y), (Xt, yt)


@pytest.fixture
def setup():
    task, (X, y), (Xt, yt) = tiny()
    return task, (X, y), (Xt, yt), batches(X, y, batch_size=4), batches(Xt, yt, batch_size=2)


def full_hessian(task, X, y):
    theta0 = task.flatten(task.params_dict())

    def mean_loss(theta):
        return task.losses_at(task.unflatten(theta), (X, y), X.shape[0]).mean()

    return torch.autograd.functional.hessian(mean_loss, theta0)


def test_grad_dot_and_cos_exact(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    G, Gt = task.grads((X, y)), task.grads((Xt, yt))
    S = Attributor(task, "grad-dot").fit(tr, progress=False).score(te, progress=False)
    torch.testing.assert_close(S, Gt @ G.T, rtol=1e-12, atol=1e-14)
    Gn, Gtn = G / G.norm(dim=1, keepdim=True), Gt / Gt.norm(dim=1, keepdim=True)
    a = Attributor(task, "grad-cos").fit(tr, progress=False)
    torch.testing.assert_close(a.score(te, progress=False), Gtn @ Gn.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.self_influence(progress=False), torch.ones(N_TRAIN, dtype=torch.float64))


def test_tracin_sums_checkpoints_with_learning_rates(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    sd0 = copy.deepcopy(task.model.state_dict())
    sd1 = {k: v + 0.1 * torch.randn_like(v) for k, v in sd0.items()}
    ref = 0
    for sd, lr in ((sd0, 0.5), (sd1, 0.25)):
        task.model.load_state_dict(sd)
        ref = ref + lr * task.grads((Xt, yt)) @ task.grads((X, y)).T
    task.model.load_state_dict(sd0)
    a = Attributor(task, "tracin", checkpoints=[(sd0, 0.5), (sd1, 0.25)]).fit(tr, progress=False)
    torch.testing.assert_close(a.score(te, progress=False), ref, rtol=1e-12, atol=1e-14)
    # the model is left as it was
    assert all(torch.equal(v, sd0[k]) for k, v in task.model.state_dict().items())


def test_trak_unsketched_equals_closed_form(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    G, Gt = task.grads((X, y)), task.grads((Xt, yt))
    N = task.n_params
    K = G.T @ G
    lam = 0.05 * torch.trace(K) / min(N_TRAIN, N)  # ridge in units of the mean non-zero eigenvalue
    ref = Gt @ torch.linalg.solve(K + lam * torch.eye(N, dtype=K.dtype), G.T)
    a = Attributor(task, "trak", kernel="features", ridge=0.05).fit(tr, progress=False)
    assert a.ridge_ == pytest.approx(float(lam))
    torch.testing.assert_close(a.score(te, progress=False), ref, rtol=1e-9, atol=1e-12)


def test_trak_margin_features_and_q(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    fn = classification_margin()
    mt = Task(task.model, lambda m, b: fn(m, b))
    F, Ft = mt.grads((X, y)), mt.grads((Xt, yt))
    with torch.no_grad():
        q = torch.sigmoid(-fn(task.model, (X, y)))
    N = task.n_params
    K = F.T @ F
    lam = 0.1 * torch.trace(K) / min(N_TRAIN, N)
    ref = Ft @ torch.linalg.solve(K + lam * torch.eye(N, dtype=K.dtype), F.T) * q
    S = Attributor(task, "trak", kernel="features", margin_fn=fn, ridge=0.1).fit(tr, progress=False).score(
        te, progress=False)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)
    # margin identity: f = log p_y / (1 - p_y), so q = 1 - p_y
    with torch.no_grad():
        p = torch.softmax(task.model(X), 1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(q, 1 - p)


def test_influence_explicit_cg_lissa(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    G, Gt = task.grads((X, y)), task.grads((Xt, yt))
    H = full_hessian(task, X, y)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    damping = max(0.3, -lam_min + 0.2)  # H + δI positive definite (CG and LiSSA need it)
    ref = Gt @ torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), G.T)
    # the explicit solver applies the one damping rule (|H| + δI)⁻¹ (attribution/damping.py)
    w, V = torch.linalg.eigh(H)
    ref_abs = (Gt @ V) / (w.abs() + damping) @ (G @ V).T
    S = Attributor(task, "influence", damping=damping).fit(tr, progress=False).score(te, progress=False)
    torch.testing.assert_close(S, ref_abs, rtol=1e-9, atol=1e-12)
    # CG and LiSSA apply the same rule (issue 19): on this indefinite Hessian they find λ_min < 0 and compute the
    # kernel by eigendecomposition, as explicit does; on a PSD system they solve (K + δI)x = g
    assert lam_min < 0
    S = Attributor(task, "influence", solver="cg", damping=damping, tol=1e-12, curvature="hessian",
                   hessian_data=[(X, y)]).fit(tr, progress=False)
    assert S.kernel_info_["solver_used"] == "explicit" and S.kernel_info_["indefinite"]
    torch.testing.assert_close(S.score(te, progress=False), ref_abs, rtol=1e-9, atol=1e-12)
    S = Attributor(task, "influence", solver="lissa", damping=damping, depth=3000, tol=1e-11,
                   curvature="hessian", hessian_data=[(X, y)]).fit(tr, progress=False)
    torch.testing.assert_close(S.score(te, progress=False), ref_abs, rtol=1e-9, atol=1e-12)
    # on the PSD GGN, CG and LiSSA iterate, and agree with the explicit (G + δI)⁻¹ (LiSSA contracts by
    # 1 - (λ_min + δ)/scale per step: a larger damping keeps the test short)
    damping = 1.5
    ref = Attributor(task, "influence", curvature="ggn", damping=damping).fit(tr, progress=False).score(
        te, progress=False)
    for solver, kw in (("cg", {"tol": 1e-12}), ("lissa", {"depth": 3000, "tol": 1e-11})):
        a = Attributor(task, "influence", solver=solver, damping=damping, curvature="ggn", **kw).fit(tr, progress=False)
        assert a.kernel_info_["solver_used"] == solver
        torch.testing.assert_close(a.score(te, progress=False), ref, rtol=1e-6, atol=1e-8)


def test_arnoldi_full_krylov_equals_exact_influence(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    G, Gt = task.grads((X, y)), task.grads((Xt, yt))
    H = full_hessian(task, X, y)
    N = H.shape[0]
    damping = 0.7
    assert float(torch.linalg.eigvalsh(H + damping * torch.eye(N, dtype=H.dtype)).abs().min()) > 0.05
    w, V = torch.linalg.eigh(H)  # the one damping rule: (|H| + δI)⁻¹
    ref = (Gt @ V) / (w.abs() + damping) @ (G @ V).T
    a = Attributor(task, "arnoldi", n_iters=N, top_k=N, damping=damping, curvature="hessian").fit(tr, progress=False)
    torch.testing.assert_close(a.score(te, progress=False), ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.sort(a.eigenvalues_).values, torch.linalg.eigvalsh(H), rtol=1e-8, atol=1e-10)
    # self-influence = diag of the train-vs-train scores = Σ p_i(z)² / (λ_i + δ)
    S_tt = a.score(tr, progress=False)
    torch.testing.assert_close(a.self_influence(progress=False), torch.diagonal(S_tt), rtol=1e-9, atol=1e-12)


def test_arnoldi_top_k_truncation(setup):
    """top_k < N keeps the k largest |λ|: influence = Σ_{i ≤ k} p_i(x)p_i(z)/|λ_i| with exact eigenpairs
    (damping 0)."""
    task, (X, y), (Xt, yt), tr, te = setup
    G, Gt = task.grads((X, y)), task.grads((Xt, yt))
    H = full_hessian(task, X, y)
    w, V = torch.linalg.eigh(H)
    idx = torch.argsort(-w.abs())[:4]
    ref = (Gt @ V[:, idx]) / w[idx].abs() @ (G @ V[:, idx]).T
    a = Attributor(task, "arnoldi", n_iters=H.shape[0], top_k=4, damping=0.0, curvature="hessian",
                   tail=False).fit(tr, progress=False)
    assert a.tail_ is None
    torch.testing.assert_close(a.score(te, progress=False), ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_arnoldi_tail_keeps_the_complement(setup, damping):
    """tail=True (the default on small models): influence = g(x)ᵀ [U diag(1/(|λ_i|+δ)) Uᵀ + (I − UUᵀ)/(|λ_k|+δ)] g(z)
    with the k largest |λ| and exact eigenpairs; self-influence is its diagonal and non-negative."""
    task, (X, y), (Xt, yt), tr, te = setup
    G, Gt = task.grads((X, y)), task.grads((Xt, yt))
    H = full_hessian(task, X, y)
    w, V = torch.linalg.eigh(H)
    idx = torch.argsort(-w.abs())[:4]
    U, lam = V[:, idx], w[idx].abs()
    t = 1.0 / (lam.min() + damping)
    M = U @ torch.diag(1.0 / (lam + damping)) @ U.T + t * (torch.eye(H.shape[0], dtype=H.dtype) - U @ U.T)
    a = Attributor(task, "arnoldi", n_iters=H.shape[0], top_k=4, damping=damping, curvature="hessian").fit(
        tr, progress=False)
    assert a.tail_ == pytest.approx(float(t), rel=1e-9)
    torch.testing.assert_close(a.score(te, progress=False), Gt @ M @ G.T, rtol=1e-7, atol=1e-10)
    s = a.self_influence(progress=False)
    torch.testing.assert_close(s, torch.einsum("ij,jk,ik->i", G, M, G), rtol=1e-7, atol=1e-10)
    assert bool((s >= 0).all())
    # the whole space kept: the complement is empty and the tail changes nothing
    full = Attributor(task, "arnoldi", n_iters=H.shape[0], top_k=H.shape[0], damping=damping,
                      curvature="hessian").fit(tr, progress=False)
    ref = Gt @ V @ torch.diag(1.0 / (w.abs() + damping)) @ V.T @ G.T
    torch.testing.assert_close(full.score(te, progress=False), ref, rtol=1e-6, atol=1e-9)


def test_arnoldi_sketched_equals_sketched_influence(setup):
    task, (X, y), (Xt, yt), tr, te = setup
    d = 8
    sk = dict(kind="dense", d=d, seed=3)
    Phi = task.block_sketch(d, kind="dense", seed=3).matrix()
    G, Gt = task.grads((X, y)) @ Phi.T, task.grads((Xt, yt)) @ Phi.T
    H = Phi @ full_hessian(task, X, y) @ Phi.T
    w, V = torch.linalg.eigh((H + H.T) / 2)  # the one damping rule on the sketched Hessian: (|ΦHΦᵀ| + δI)⁻¹
    ref = (Gt @ V) / (w.abs() + 2.0) @ (G @ V).T
    a = Attributor(task, "arnoldi", sketch=sk, n_iters=d, top_k=d, damping=2.0, curvature="hessian").fit(
        tr, progress=False)
    torch.testing.assert_close(a.score(te, progress=False), ref, rtol=1e-7, atol=1e-10)
    b = Attributor(task, "influence", sketch=sk, damping=2.0).fit(tr, progress=False)
    torch.testing.assert_close(b.score(te, progress=False), ref, rtol=1e-7, atol=1e-10)


def test_arnoldi_sketched_tail(setup):
    """With a sketch the tail is free (the features are Φg): M = U diag(c) Uᵀ + t (I − UUᵀ) in sketch space, with
    the top-3 |λ| eigenpairs of ΦHΦᵀ, c_i = 1/(|λ_i| + δ) and t = 1/(|λ_3| + δ)."""
    task, (X, y), (Xt, yt), tr, te = setup
    d, k, delta = 8, 3, 0.1
    sk = dict(kind="dense", d=d, seed=3)
    Phi = task.block_sketch(d, kind="dense", seed=3).matrix()
    G, Gt = task.grads((X, y)) @ Phi.T, task.grads((Xt, yt)) @ Phi.T
    H = Phi @ full_hessian(task, X, y) @ Phi.T
    w, V = torch.linalg.eigh((H + H.T) / 2)
    idx = torch.argsort(-w.abs())[:k]
    U, lam = V[:, idx], w[idx].abs()
    M = U @ torch.diag(1.0 / (lam + delta)) @ U.T + (torch.eye(d, dtype=H.dtype) - U @ U.T) / (lam.min() + delta)
    a = Attributor(task, "arnoldi", sketch=sk, n_iters=d, top_k=k, damping=delta, curvature="hessian").fit(
        tr, progress=False)
    torch.testing.assert_close(a.score(te, progress=False), Gt @ M @ G.T, rtol=1e-7, atol=1e-10)
    off = Attributor(task, "arnoldi", sketch=sk, n_iters=d, top_k=k, damping=delta, curvature="hessian",
                     tail=False).fit(tr, progress=False)
    torch.testing.assert_close(off.score(te, progress=False),
                               Gt @ U @ torch.diag(1.0 / (lam + delta)) @ U.T @ G.T, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="tail"):
        Attributor(task, "arnoldi", tail="yes")


@pytest.mark.parametrize("method,opts", [("grad-dot", {}), ("trak", {}), ("arnoldi", dict(n_iters=12, top_k=6)),
                                         ("grad-cos", {})])
def test_topk_equals_argsort_of_full_matrix(setup, method, opts, tmp_path):
    task, _, _, tr, te = setup
    for store in (None, tmp_path / method):
        a = Attributor(task, method, sketch=dict(kind="sjlt", d=16, seed=1), store=store, block_rows=3,
                       test_block_rows=2, store_dtype="float32", chunk_rows=4, **opts).fit(tr, progress=False)
        S = a.score(te, progress=False)
        vals, idx, ovals, oidx = a.topk(te, k=4, progress=False)
        ref_v, ref_i = torch.topk(S, 4, dim=1)
        torch.testing.assert_close(vals, ref_v, rtol=1e-5, atol=1e-6)
        assert torch.equal(idx, ref_i)
        ref_v, ref_i = torch.topk(S, 4, dim=1, largest=False)
        torch.testing.assert_close(ovals, ref_v, rtol=1e-5, atol=1e-6)
        assert torch.equal(oidx, ref_i)


def test_store_equals_memory_and_reopens(setup, tmp_path):
    task, _, _, tr, te = setup
    sk = dict(kind="affd", d=16, seed=2)
    mem = Attributor(task, "trak", sketch=sk).fit(tr, progress=False).score(te, progress=False)
    a = Attributor(task, "trak", sketch=sk, store=tmp_path / "s", store_dtype="float32", chunk_rows=3)
    disk = a.fit(tr, progress=False).score(te, progress=False)
    torch.testing.assert_close(disk.double(), mem, rtol=1e-4, atol=1e-5)
    # a second fit on the complete store computes nothing and gives the same answer
    b = Attributor(task, "trak", sketch=sk, store=tmp_path / "s", store_dtype="float32", chunk_rows=3)
    torch.testing.assert_close(b.fit(tr, progress=False).score(te, progress=False), disk)


def test_duplicate_of_test_example_supports_it():
    """Sign convention on a known case: a trained logistic regression whose training set contains an exact
    copy of the test example: the copy's score g(x)ᵀ M g(x) is positive for every method (M PSD), and
    it is the top proponent for grad-cos. (The LOO test in test_eval.py checks sign and scale of influence
    against actual retraining.)"""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    y = (X @ w).argmax(1)
    y[:6] = 1 - y[:6]  # some noise so that nothing is perfectly fit
    model = nn.Linear(3, 2).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y) + 0.05 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    task = Task.from_classifier(model)
    tr = batches(X, y, batch_size=16)
    te = [(X[7:8].clone(), y[7:8].clone())]  # training example 7 duplicates the test example
    for method, opts in [("influence", dict(damping=0.1)), ("arnoldi", dict(n_iters=8, top_k=8, damping=0.1)),
                         ("grad-dot", {}), ("grad-cos", {}), ("trak", {}),
                         ("trak", dict(margin_fn=classification_margin()))]:
        S = Attributor(task, method, **opts).fit(tr, progress=False).score(te, progress=False)[0]
        assert S[7] > 0, method
        if method == "grad-cos":  # cosine 1 is the maximum (Cauchy-Schwarz)
            assert int(S.argmax()) == 7, method


def test_checkpoints_never_write_the_callers_model(setup):
    """Checkpoint ensembles evaluate copies of the model: the caller's parameters are not written at all
    (their version counters, bumped by any in-place write such as load_state_dict, stay put)."""
    task, _, _, tr, te = setup
    sd0 = {k: v.clone() for k, v in task.model.state_dict().items()}
    sd1 = {k: v + 0.01 for k, v in sd0.items()}
    before = {n: (p._version, p.detach().clone()) for n, p in task.model.named_parameters()}
    for method, opts in [("tracin", dict(checkpoints=[(sd0, 0.5), (sd1, 0.25)])),
                         ("influence", dict(checkpoints=None, damping=0.1)),
                         ("trak", dict(checkpoints=[sd0, sd1]))]:
        opts = {k: v for k, v in opts.items() if v is not None}
        a = Attributor(task, method, **opts).fit(tr, progress=False)
        a.score(te, progress=False)
        a.self_influence(progress=False)
    for n, p in task.model.named_parameters():
        assert p._version == before[n][0], n
        assert torch.equal(p.detach(), before[n][1]), n


def test_arnoldi_through_the_factored_path_equals_the_explicit_one():
    """Issue 20: on a large model the training gradients reach Arnoldi through the factored path (per-layer
    Kronecker sketches of the hooks' inputs and output gradients; the per-example gradient is never formed). With
    the same FactoredSketch, its scores equal those of the explicit path, which sketches the formed gradients."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    task = Task.from_classifier(m)
    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    tr, te = batches(X, y, batch_size=10), batches(X[:6], y[:6], batch_size=6)
    FS = task.factored_sketch(16, seed=1)
    fact = Attributor(task, "arnoldi", sketch=FS, mode="factored", top_k=5, n_iters=16).fit(tr, progress=False)
    expl = Attributor(task, "arnoldi", sketch=FS, mode="explicit", top_k=5, n_iters=16).fit(tr, progress=False)
    assert fact.tail_ is not None and fact.tail_ == pytest.approx(expl.tail_, rel=1e-12)
    torch.testing.assert_close(fact.score(te, progress=False), expl.score(te, progress=False), rtol=1e-10,
                               atol=1e-12)
