"""TRAK with the Gauss-Newton kernels (``kernel="ggn"`` and ``kernel="ggn_trace"``): scores against closed forms
built from explicit per-example Jacobians and output Hessians (float64), unsketched and sketched, with a truncated
rank, for cross-entropy and MSE, with ``margin_fn`` features; and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from gradsketch.attribution import Attributor, batches, classification_margin
from gradsketch.attribution.methods import TRAK
from gradsketch.model import Task

C = 3


def setup(seed: int = 0, n: int = 13, n_test: int = 5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    Xt = torch.randn(n_test, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, C, (n_test,), generator=g)
    return model, (X, y), (Xt, yt)


def jacobians(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Per-example output Jacobians ``[n, C, N]`` in the task's parameter order."""
    P = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x[None],))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(P, X)
    return torch.cat([J[k].reshape(X.shape[0], C, -1) for k in P], -1)


def ce_parts(model, X, y):
    """(J, output Hessians H_i = diag(p) − ppᵀ, loss gradients (p − e_y)ᵀJ) of cross-entropy."""
    J = jacobians(model, X)
    p = model(X).softmax(-1).detach()
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("nc,ncp->np", p - nn.functional.one_hot(y, C).double(), J)
    return J, H, G


def truncate(H: torch.Tensor, k: int) -> torch.Tensor:
    """Each H_i restricted to its top-k eigenpairs."""
    w, U = torch.linalg.eigh(H)
    w, U = w[:, -k:], U[:, :, -k:]
    return torch.einsum("nck,nk,ndk->ncd", U, w, U)


def closed_form(Gte, Gtr, K, ridge=1.0):
    n, N = Gtr.shape[0], K.shape[0]
    lam = ridge * float(torch.trace(K)) / min(n, N)
    return Gte @ torch.linalg.solve(K + lam * torch.eye(N, dtype=K.dtype), Gtr.T), lam


@pytest.mark.parametrize("rank", [None, 1])
def test_ggn_kernel_unsketched_equals_closed_form(rank):
    model, (X, y), (Xt, yt) = setup()
    Jtr, H, Gtr = ce_parts(model, X, y)
    _, _, Gte = ce_parts(model, Xt, yt)
    Hk = H if rank is None else truncate(H, rank)
    K = torch.einsum("ncp,ncd,ndq->pq", Jtr, Hk, Jtr)
    ref, lam = closed_form(Gte, Gtr, K)
    task = Task.from_classifier(model)
    a = Attributor(task, "trak", kernel="ggn", ggn_rank=rank).fit(batches(X, y, batch_size=6), progress=False)
    S = a.score(batches(Xt, yt, batch_size=4), progress=False)
    assert a.ridge_ == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)
    # self-influence is the diagonal of the train × train scores
    torch.testing.assert_close(a.self_influence(progress=False),
                               torch.einsum("np,pq,nq->n", Gtr,
                                            torch.linalg.inv(K + lam * torch.eye(K.shape[0], dtype=K.dtype)), Gtr),
                               rtol=1e-9, atol=1e-12)


def test_ggn_kernel_differs_from_feature_kernel():
    """The two kernels are different matrices (the GGN is not the empirical Fisher), so the option matters."""
    model, (X, y), (Xt, yt) = setup(seed=1)
    task = Task.from_classifier(model)
    data, test = batches(X, y, batch_size=13), batches(Xt, yt, batch_size=5)
    S_f = Attributor(task, "trak", kernel="features").fit(data, progress=False).score(test, progress=False)
    S_g = Attributor(task, "trak", kernel="ggn").fit(data, progress=False).score(test, progress=False)
    assert (S_f - S_g).abs().max() > 1e-3 * S_f.abs().max()


def test_ggn_kernel_sketched_equals_compressed_closed_form():
    model, (X, y), (Xt, yt) = setup(seed=2)
    Jtr, H, Gtr = ce_parts(model, X, y)
    _, _, Gte = ce_parts(model, Xt, yt)
    task = Task.from_classifier(model)
    d = 6
    sk = task.block_sketch(d, kind="dense", seed=3)
    N = sum(task.param_sizes)
    eye = torch.eye(N, dtype=torch.float64)
    Phi = sk.apply_blocks(list(torch.split(eye, task.param_sizes, dim=-1))).T.to(torch.float64)   # [d, N]
    K = Phi @ torch.einsum("ncp,ncd,ndq->pq", Jtr, H, Jtr) @ Phi.T
    ref, lam = closed_form(Gte @ Phi.T, Gtr @ Phi.T, K, ridge=0.5)
    a = Attributor(task, "trak", kernel="ggn", ridge=0.5, sketch=sk, mode="explicit")
    S = a.fit(batches(X, y, batch_size=5), progress=False).score(batches(Xt, yt, batch_size=5), progress=False)
    assert a.ridge_ == pytest.approx(lam, rel=1e-10)
    torch.testing.assert_close(S.double(), ref, rtol=1e-8, atol=1e-10)


def test_ggn_kernel_mse():
    """MSE over C outputs, mean_j (o_j − t_j)²: H_i = (2/C) I, so K = (2/C) Σ J_iᵀ J_i."""
    model, (X, _), (Xt, _) = setup(seed=4)
    g = torch.Generator().manual_seed(5)
    T, Tt = torch.randn(X.shape[0], C, generator=g, dtype=torch.float64), torch.randn(Xt.shape[0], C, generator=g,
                                                                                      dtype=torch.float64)
    Jtr, Jte = jacobians(model, X), jacobians(model, Xt)
    K = (2.0 / C) * torch.einsum("ncp,ncq->pq", Jtr, Jtr)
    def grad(J, O, TT):
        return torch.einsum("nc,ncp->np", (2.0 / C) * (O - TT), J)

    Gtr, Gte = grad(Jtr, model(X).detach(), T), grad(Jte, model(Xt).detach(), Tt)
    ref, _ = closed_form(Gte, Gtr, K)
    task = Task.from_classifier(model, loss="mse")
    S = Attributor(task, "trak", kernel="ggn").fit([(X, T)], progress=False).score([(Xt, Tt)], progress=False)
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)


def test_ggn_kernel_with_margin_features():
    """With ``margin_fn`` the rows are margin gradients and the kernel is still the loss's GGN."""
    model, (X, y), (Xt, yt) = setup(seed=6)
    Jtr, H, _ = ce_parts(model, X, y)
    K = torch.einsum("ncp,ncd,ndq->pq", Jtr, H, Jtr)
    task = Task.from_classifier(model)
    m = classification_margin()

    def margin_grads(Xs, ys):
        rows = []
        for i in range(Xs.shape[0]):
            model.zero_grad()
            m(model, (Xs[i:i + 1], ys[i:i + 1])).sum().backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        model.zero_grad()
        return torch.stack(rows)

    Ftr, Fte = margin_grads(X, y), margin_grads(Xt, yt)
    ref, _ = closed_form(Fte, Ftr, K)
    with torch.no_grad():
        q = torch.sigmoid(-m(model, (X, y)))
    a = Attributor(task, "trak", kernel="ggn", margin_fn=m).fit([(X, y)], progress=False)
    torch.testing.assert_close(a.score([(Xt, yt)], progress=False), ref * q, rtol=1e-9, atol=1e-12)


def test_ggn_kernel_errors():
    model, (X, y), _ = setup()
    task = Task.from_classifier(model)
    with pytest.raises(ValueError, match="kernel"):
        Attributor(task, "trak", kernel="hessian")
    with pytest.raises(ValueError, match="ggn_rank"):
        Attributor(task, "trak", kernel="ggn", ggn_rank=0)
    with pytest.raises(ValueError, match=r"ggn_rank: only kernel='ggn' uses it .*; got ggn_rank=2 with kernel='auto'"):
        Attributor(task, "trak", ggn_rank=2)   # would be ignored silently
    plain = Task(model, lambda mod, b: nn.functional.cross_entropy(mod(b[0]), b[1], reduction="none"))
    wide = nn.Linear(4, 300).double()
    Xw, yw = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    # a loss on outputs without closed-form derivatives: ggn_trace too needs one backward pass per output
    custom = Task(wide, output_fn=lambda mod, b: mod(b[0]),
                  loss_on_output=lambda z, b: nn.functional.cross_entropy(z, b[1], reduction="none"))
    for kernel in ("ggn", "ggn_trace"):   # both need the output derivatives
        with pytest.raises(ValueError, match=f"kernel: '{kernel}' needs a task that declares output_fn"):
            Attributor(plain, "trak", kernel=kernel).fit([(X, y)], progress=False)
        with pytest.raises(ValueError, match=f"kernel: '{kernel}' needs each example's output Hessian"):
            Attributor(Task.from_classifier(wide) if kernel == "ggn" else custom, "trak", kernel=kernel,
                       sketch=dict(kind="dense", d=8), mode="explicit").fit([(Xw, yw)], progress=False)
    big = nn.Linear(200, 160).double()   # 32,160 parameters: unsketched, K would be 32,160 × 32,160
    Xb, yb = torch.randn(3, 200, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="kernel: 'ggn' builds a d × d matrix and d = 32160"):
        Attributor(Task.from_classifier(big), "trak", kernel="ggn").fit([(Xb, yb)], progress=False)


def test_ggn_kernel_cached_next_to_the_store(tmp_path):
    """With a store, K is saved next to it and a refit reads it back; a cached value that is not a finite
    float64 [d, d] matrix is refused (warning), recomputed and replaced."""
    from gradsketch.store.cache import save_cached

    model, (X, y), (Xt, yt) = setup(seed=7)
    task = Task.from_classifier(model)
    data, test = batches(X, y, batch_size=5), batches(Xt, yt, batch_size=5)

    def fit_score():
        a = Attributor(task, "trak", kernel="ggn", store=tmp_path / "s", store_dtype="float32")
        return a.fit(data, progress=False).score(test, progress=False)

    S1 = fit_score()
    f = tmp_path / "s" / "ggn_kernel_0.pt"
    blob = torch.load(f, weights_only=True)
    K = blob["value"]
    assert K.dtype == torch.float64 and K.shape[0] == K.shape[1] == sum(task.param_sizes)
    # a refit on the complete store reads K back without computing an output Hessian (not even to count passes)
    derivs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TRAK, "_output_derivatives", lambda self, b: derivs.append(1) or pytest.fail("recomputed"))
        torch.testing.assert_close(fit_score(), S1, rtol=0, atol=0)
    assert not derivs
    # the cached kernel is used as it is: 2K (and with it the relative ridge, 2λ) halves every score
    save_cached(f, blob["config"], 2 * K)
    torch.testing.assert_close(fit_score(), S1 / 2)
    for bad in (K[:-1], K.float(), torch.full_like(K, float("nan"))):
        save_cached(f, blob["config"], bad)
        with pytest.warns(RuntimeWarning, match="not what this fit expects"):
            torch.testing.assert_close(fit_score(), S1)
        torch.testing.assert_close(torch.load(f, weights_only=True)["value"], K)


def test_ggn_kernel_passes_skip_the_zero_direction():
    """Softmax cross-entropy over C classes has C − 1 positive output-Hessian eigenvalues: C − 1 passes over the
    data for the kernel (plus one to count them), not C."""
    model, (X, y), _ = setup(seed=8)

    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    data = Counted(batches(X, y, batch_size=13))
    a = Attributor(Task.from_classifier(model), "trak", kernel="ggn")
    a.fit(data, progress=False)
    total = Counted.passes
    Counted.passes = 0
    Attributor(Task.from_classifier(model), "trak", kernel="features").fit(data, progress=False)
    assert total - Counted.passes == 1 + (C - 1)


@pytest.mark.parametrize("kernel", ["ggn", "ggn_trace"])
def test_ggn_kernel_ensemble_is_the_mean_of_the_models(kernel):
    """models=[m1, m2]: each model gets the kernel (and the ggn_trace weights) of its own weights; the scores are
    the mean."""
    m1, (X, y), (Xt, yt) = setup(seed=9)
    m2, _, _ = setup(seed=10)
    data, test = batches(X, y, batch_size=7), batches(Xt, yt, batch_size=5)
    single = [Attributor(Task.from_classifier(m), "trak", kernel=kernel).fit(data, progress=False)
              .score(test, progress=False) for m in (m1, m2)]
    both = Attributor(Task.from_classifier(m1), "trak", kernel=kernel, models=[m1, m2]).fit(data, progress=False)
    torch.testing.assert_close(both.score(test, progress=False), (single[0] + single[1]) / 2, rtol=1e-9, atol=1e-12)
    assert (single[0] - single[1]).abs().max() > 1e-3   # the two models differ, so the test can fail


# ---- kernel="ggn_trace": ΦᵀΦ with row i weighted by ω_i = tr(H_i)/‖e_i‖² (loss-gradient rows) ----------------

def trace_weights(model, X, y):
    """ω_i = tr(H_i)/‖p_i − e_{y_i}‖² of softmax cross-entropy, from the explicit probabilities."""
    p = model(X).softmax(-1).detach()
    e = p - nn.functional.one_hot(y, C).double()
    return (1 - (p * p).sum(1)) / (e * e).sum(1)


@pytest.mark.parametrize("n", [13, 60])   # d = 43 parameters: the n × n Gram form (13) and the d × d form (60)
def test_ggn_trace_kernel_equals_closed_form(n):
    model, (X, y), (Xt, yt) = setup(seed=11, n=n)
    _, _, Gtr = ce_parts(model, X, y)
    _, _, Gte = ce_parts(model, Xt, yt)
    w = trace_weights(model, X, y)
    K = Gtr.T @ (Gtr * w[:, None])
    ref, lam = closed_form(Gte, Gtr, K)
    # block_rows=7: the d × d form sums several row blocks, each with its own slice of the weights
    a = Attributor(Task.from_classifier(model), "trak", kernel="ggn_trace", block_rows=7).fit(
        batches(X, y, batch_size=6), progress=False)
    assert a.ridge_ == pytest.approx(lam, rel=1e-12)
    torch.testing.assert_close(a.score(batches(Xt, yt, batch_size=4), progress=False), ref, rtol=1e-9, atol=1e-12)
    Minv = torch.linalg.inv(K + lam * torch.eye(K.shape[0], dtype=K.dtype))
    torch.testing.assert_close(a.self_influence(progress=False), torch.einsum("np,pq,nq->n", Gtr, Minv, Gtr),
                               rtol=1e-9, atol=1e-12)
    # the weights are not all equal, so the kernel is not ΦᵀΦ up to a scale (which the relative ridge would undo)
    S_f = Attributor(Task.from_classifier(model), "trak", kernel="features").fit(
        batches(X, y, batch_size=6), progress=False).score(batches(Xt, yt, batch_size=4), progress=False)
    assert w.max() > 2 * w.min() and (S_f / S_f.abs().max() - ref / ref.abs().max()).abs().max() > 1e-3


def test_ggn_trace_kernel_with_margin_features_and_a_sketch():
    """Margin rows φ_i (g_i = −q_i φ_i) get ω_i q_i²; in the coordinates of an explicit dense sketch Φ."""
    model, (X, y), (Xt, yt) = setup(seed=12, n=30)
    task = Task.from_classifier(model)
    m = classification_margin()
    sk = task.block_sketch(8, kind="dense", seed=1)
    N = sum(task.param_sizes)
    Phi = sk.apply_blocks(list(torch.split(torch.eye(N, dtype=torch.float64), task.param_sizes, dim=-1))).T
    Phi = Phi.to(torch.float64)   # [d, N]
    def margin_grads(Xs, ys):
        J = jacobians(model, Xs)
        with torch.no_grad():
            p = model(Xs).softmax(-1)
        # f = z_y − log Σ_{c≠y} exp z_c: ∂f/∂z = e_y − p_{−y}/(1 − p_y)
        dz = -p / (1 - p.gather(1, ys[:, None]))
        dz[torch.arange(len(ys)), ys] = 1.0
        return torch.einsum("nc,ncp->np", dz, J)
    Ftr, Fte = margin_grads(X, y) @ Phi.T, margin_grads(Xt, yt) @ Phi.T
    with torch.no_grad():
        q = torch.sigmoid(-m(model, (X, y)))
    w = trace_weights(model, X, y) * q ** 2
    K = Ftr.T @ (Ftr * w[:, None])
    ref, lam = closed_form(Fte, Ftr, K, ridge=0.5)
    a = Attributor(task, "trak", kernel="ggn_trace", margin_fn=m, ridge=0.5, sketch=sk, mode="explicit")
    S = a.fit(batches(X, y, batch_size=7), progress=False).score([(Xt, yt)], progress=False)
    assert a.ridge_ == pytest.approx(lam, rel=1e-10)
    torch.testing.assert_close(S.double(), ref * q, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["two-class cross-entropy", "one-output mse"])
def test_ggn_trace_kernel_is_the_ggn_when_the_output_hessian_has_rank_one(case):
    """With a rank-one output Hessian along the output gradient (two softmax classes: H ∝ (1, −1)(1, −1)ᵀ and
    e ∝ (1, −1); one output under MSE) the weighted row is exactly the Gauss-Newton term: both kernels agree."""
    g = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    k = 2 if case.startswith("two") else 1
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, k)).double()
    X, Xt = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    if k == 2:
        y, yt = torch.randint(0, 2, (20,), generator=g), torch.randint(0, 2, (6,), generator=g)
        task = Task.from_classifier(model)
    else:
        y, yt = torch.randn(20, 1, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g,
                                                                                 dtype=torch.float64)
        task = Task.from_classifier(model, loss="mse")
    data, test = batches(X, y, batch_size=8), batches(Xt, yt, batch_size=6)
    S_t = Attributor(task, "trak", kernel="ggn_trace").fit(data, progress=False).score(test, progress=False)
    S_g = Attributor(task, "trak", kernel="ggn").fit(data, progress=False).score(test, progress=False)
    torch.testing.assert_close(S_t, S_g, rtol=1e-8, atol=1e-11)
    S_f = Attributor(task, "trak", kernel="features").fit(data, progress=False).score(test, progress=False)
    assert (S_f / S_f.abs().max() - S_t / S_t.abs().max()).abs().max() > 1e-3   # and differ from ΦᵀΦ


def test_ggn_trace_kernel_mse_with_an_exactly_fitted_example():
    """MSE over C outputs: H_i = (2/C) I, e_i = (2/C)(o_i − t_i), so ω_i = 2/‖e_i‖²; an example fitted exactly
    (e_i = 0) gets ω_i = 0, and nothing is NaN."""
    model, (X, _), (Xt, _) = setup(seed=14)
    g = torch.Generator().manual_seed(15)
    with torch.no_grad():
        O = model(X)
    T = torch.randn(X.shape[0], C, generator=g, dtype=torch.float64)
    T[0] = O[0]
    Tt = torch.randn(Xt.shape[0], C, generator=g, dtype=torch.float64)
    Jtr, Jte = jacobians(model, X), jacobians(model, Xt)
    E = (2.0 / C) * (O - T)
    Gtr, Gte = torch.einsum("nc,ncp->np", E, Jtr), torch.einsum("nc,ncp->np", (2.0 / C) * (model(Xt).detach() - Tt),
                                                                  Jte)
    ee = (E * E).sum(1)
    w = torch.where(ee > 0, 2.0 / ee.clamp_min(1e-300), 0.0)
    assert w[0] == 0 and bool(torch.isfinite(w).all())
    ref, _ = closed_form(Gte, Gtr, Gtr.T @ (Gtr * w[:, None]))
    task = Task.from_classifier(model, loss="mse")
    S = Attributor(task, "trak", kernel="ggn_trace").fit([(X, T)], progress=False).score([(Xt, Tt)], progress=False)
    assert bool(torch.isfinite(S).all())
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12)


def test_ggn_trace_kernel_saved_and_loaded(tmp_path, monkeypatch):
    """A saved fit (the n × n Gram form, whose kernel holds the weighted rows) scores the same after loading."""
    model, (X, y), (Xt, yt) = setup(seed=16)
    task = Task.from_classifier(model)
    a = Attributor(task, "trak", kernel="ggn_trace").fit(batches(X, y, batch_size=6), progress=False)
    a.save(tmp_path / "a")
    b = Attributor.load(tmp_path / "a", task)
    test = batches(Xt, yt, batch_size=5)
    S = a.score(test, progress=False)
    torch.testing.assert_close(b.score(test, progress=False), S, rtol=1e-12, atol=1e-13)
    # the row scales are saved, so the loaded fit takes the scoring shortcut too (not the base class's operator)
    torch.testing.assert_close(b._components[0].info["row_scale"], a._components[0].info["row_scale"], rtol=0,
                               atol=0)
    with monkeypatch.context() as mp:
        mp.setattr(Attributor, "score", lambda *args, **kw: pytest.fail("the operator path was taken"))
        torch.testing.assert_close(b.score(test, progress=False), S, rtol=0, atol=0)



@pytest.mark.parametrize("n", [13, 60])
def test_ggn_trace_kernel_from_a_store(tmp_path, n):
    """The weights follow the rows when the features are read back from a (float32) store in several blocks."""
    model, (X, y), (Xt, yt) = setup(seed=17, n=n)
    _, _, Gtr = ce_parts(model, X, y)
    _, _, Gte = ce_parts(model, Xt, yt)
    w = trace_weights(model, X, y)
    ref, _ = closed_form(Gte, Gtr, Gtr.T @ (Gtr * w[:, None]))
    a = Attributor(Task.from_classifier(model), "trak", kernel="ggn_trace", block_rows=4, store=tmp_path / "s",
                   store_dtype="float32").fit(batches(X, y, batch_size=5), progress=False)
    S = a.score(batches(Xt, yt, batch_size=5), progress=False).double()
    torch.testing.assert_close(S, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kernel", ["features", "ggn", "ggn_trace"])
def test_trak_kernels_skip_a_non_finite_example(kernel):
    """nan_policy='skip': an example with a NaN input has a zero row and adds nothing to the kernel (the
    output-Hessian eigendecomposition does not fail on it); the scores are the closed form without it."""
    model, (X, y), (Xt, yt) = setup(seed=18)
    X = X.clone()
    X[3] = float("nan")
    ok = torch.arange(X.shape[0]) != 3
    Jtr, H, Gtr = ce_parts(model, X[ok], y[ok])
    _, _, Gte = ce_parts(model, Xt, yt)
    if kernel == "ggn":
        K = torch.einsum("ncp,ncd,ndq->pq", Jtr, H, Jtr)
    elif kernel == "features":
        K = Gtr.T @ Gtr
    else:
        K = Gtr.T @ (Gtr * trace_weights(model, X[ok], y[ok])[:, None])
    G_all = torch.zeros(X.shape[0], Gtr.shape[1], dtype=torch.float64)
    G_all[ok] = Gtr
    ref, _ = closed_form(Gte, G_all, K)   # λ counts the zero row, as the fit's n does
    a = Attributor(Task.from_classifier(model), "trak", kernel=kernel, nan_policy="skip").fit(
        batches(X, y, batch_size=5), progress=False)
    assert a.skipped_indices_ == [3]
    torch.testing.assert_close(a.score([(Xt, yt)], progress=False), ref, rtol=1e-9, atol=1e-12)
    # with margin features the skipped example's margin is NaN too: its q and weight are 0, not NaN, and so are
    # its scores (as in every other method)
    m = Attributor(Task.from_classifier(model), "trak", kernel=kernel, nan_policy="skip",
                   margin_fn=classification_margin()).fit(batches(X, y, batch_size=5), progress=False)
    S = m.score([(Xt, yt)], progress=False)
    assert bool(torch.isfinite(S).all()) and bool((S[:, ok] != 0).all()) and bool((S[:, 3] == 0).all())
    assert m.self_influence(progress=False)[3] == 0


def test_ggn_trace_weights_of_non_finite_loss_derivatives():
    """Margin features can be finite where the loss's output derivatives are not (here ℓ = ‖z‖ at z = 0):
    'raise' names the example, 'skip' gives it weight 0."""
    model = nn.Linear(4, C, bias=False).double()
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    X[2] = 0.0   # z = 0: ∂‖z‖/∂z = z/‖z‖ is NaN
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    task = Task(model, None, output_fn=lambda m, b: m(b[0]), loss_on_output=lambda z, b: (z * z).sum(1).sqrt())
    kw = dict(kernel="ggn_trace", margin_fn=classification_margin())
    with pytest.raises(FloatingPointError, match=r"training example index\(es\) \[2\]"):
        Attributor(task, "trak", **kw).fit([(X, y)], progress=False)
    S = Attributor(task, "trak", nan_policy="skip", **kw).fit([(X, y)], progress=False).score([(X, y)],
                                                                                              progress=False)
    assert bool(torch.isfinite(S).all())


def test_kfac_ggn_fisher_names_non_finite_outputs():
    from gradsketch.curvature import KFACOperator

    model, (X, y), _ = setup(seed=20)
    X = X.clone()
    X[4] = float("nan")
    with pytest.raises(FloatingPointError, match="fisher: 1 example"):
        KFACOperator.fit(Task.from_classifier(model), [(X, y)], kind="kfac", fisher="ggn", progress=False)


def test_auto_kernel_is_ggn_trace_when_the_task_declares_its_outputs():
    """The default ``kernel="auto"``: ``"ggn_trace"`` for a task with outputs and a loss on them (closed-form
    derivatives from Task.from_classifier, or autograd's for a loss of one's own with few outputs), ``"features"``
    for a task with a loss_fn only; the scores are those of the kernel it resolves to."""
    model, (X, y), (Xt, yt) = setup(seed=20)
    data, test = batches(X, y, batch_size=6), batches(Xt, yt, batch_size=4)

    def run(task, **kw):
        a = Attributor(task, "trak", **kw).fit(data, progress=False)
        return a, a.score(test, progress=False)

    a, S = run(Task.from_classifier(model))
    assert a.kernel_ == "ggn_trace" and "closed-form" in a.kernel_reason_
    torch.testing.assert_close(S, run(Task.from_classifier(model), kernel="ggn_trace")[1], rtol=0, atol=0)
    plain = Task(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    a, S_plain = run(plain)
    assert a.kernel_ == "features" and "loss_fn only" in a.kernel_reason_
    torch.testing.assert_close(S_plain, run(plain, kernel="features")[1], rtol=0, atol=0)
    own = Task(model, output_fn=lambda m, b: m(b[0]),
               loss_on_output=lambda z, b: nn.functional.cross_entropy(z, b[1], reduction="none"))
    a, S_own = run(own)   # no closed form: the traces from C = 3 backward passes, the same weights
    assert a.kernel_ == "ggn_trace" and "3 per example" in a.kernel_reason_
    torch.testing.assert_close(S_own, S, rtol=1e-9, atol=1e-12)
    assert (S - S_plain).abs().max() > 1e-3 * S.abs().max()   # the two kernels differ here


def test_auto_kernel_with_many_outputs():
    """300 classes: with Task.from_classifier the closed form gives ggn_trace (against the explicit kernel
    Σ ω_i g_i g_iᵀ of a linear model, g_i = (p_i − e_{y_i}) ⊗ (x_i, 1)); a loss on outputs of one's own, without
    closed-form derivatives, resolves to the features kernel and says why."""
    torch.manual_seed(21)
    g = torch.Generator().manual_seed(21)
    wide = nn.Linear(4, 300).double()
    X, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 300, (9,), generator=g)
    Xt, yt = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randint(0, 300, (3,), generator=g)

    def grads(X, y):
        p = wide(X).softmax(-1).detach()
        e = p - nn.functional.one_hot(y, 300).double()
        xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        G = torch.cat([torch.einsum("nc,nk->nck", e, X).reshape(len(X), -1), e], 1)   # weight [300, 4], bias
        return G, (1 - (p * p).sum(1)) / (e * e).sum(1), xa

    Gtr, w, _ = grads(X, y)
    Gte, _, _ = grads(Xt, yt)
    K = Gtr.T @ (Gtr * w[:, None])
    ref, lam = closed_form(Gte, Gtr, K)   # d = 1,500 > n: the library takes the n × n Gram form
    a = Attributor(Task.from_classifier(wide), "trak").fit(batches(X, y, batch_size=4), progress=False)
    assert a.kernel_ == "ggn_trace" and a.ridge_ == pytest.approx(lam, rel=1e-10)
    torch.testing.assert_close(a.score(batches(Xt, yt, batch_size=3), progress=False), ref, rtol=1e-8, atol=1e-12)
    own = Task(wide, output_fn=lambda m, b: m(b[0]),
               loss_on_output=lambda z, b: nn.functional.cross_entropy(z, b[1], reduction="none"))
    b = Attributor(own, "trak").fit(batches(X, y, batch_size=4), progress=False)
    assert b.kernel_ == "features" and "300 outputs per example" in b.kernel_reason_


def test_auto_kernel_saved_and_loaded(tmp_path):
    """The resolved kernel is saved with the fit (a loaded ggn_trace fit must not take the features kernel's
    scoring shortcut, whose rows would be the weighted ones); a value that names no kernel is refused."""
    model, (X, y), (Xt, yt) = setup(seed=22)
    task = Task.from_classifier(model)
    a = Attributor(task, "trak").fit(batches(X, y, batch_size=6), progress=False)
    a.save(tmp_path / "a")
    b = Attributor.load(tmp_path / "a", task)
    assert b.kernel_ == "ggn_trace"
    test = batches(Xt, yt, batch_size=5)
    torch.testing.assert_close(b.score(test, progress=False), a.score(test, progress=False), rtol=1e-12, atol=1e-13)
    b.kernel_ = "hessian"   # (a saved record cannot be edited: the manifest carries its checksum)
    with pytest.raises(ValueError, match="kernel_: expected one of"):
        b.score(test, progress=False)


def test_ggn_trace_weights_cached_next_to_the_store(tmp_path):
    """With a store the weights are saved next to it and a refit on the complete store reads them back without a
    pass over the data (the output function is not called); a cached value that is not a finite, non-negative
    float64 [n] vector is refused (warning), recomputed and replaced."""
    from gradsketch.model.losses import OutputLoss
    from gradsketch.store.cache import save_cached

    model, (X, y), (Xt, yt) = setup(seed=23)
    calls = []

    def output_fn(m, b):
        calls.append(len(b[0]))
        return m(b[0])

    task = Task(model, output_fn=output_fn, loss_on_output=OutputLoss())
    data, test = batches(X, y, batch_size=5), batches(Xt, yt, batch_size=5)

    def fit_score():
        a = Attributor(task, "trak", store=tmp_path / "s", store_dtype="float32")
        a.fit(data, progress=False)
        n_calls = len(calls)
        S = a.score(test, progress=False)
        return S, n_calls

    S1, _ = fit_score()
    f = tmp_path / "s" / "ggn_trace_weights_0.pt"
    blob = torch.load(f, weights_only=True)
    w = blob["value"]
    torch.testing.assert_close(w, trace_weights(model, X, y), rtol=1e-10, atol=0)
    calls.clear()
    S2, n_calls = fit_score()
    assert n_calls == 0   # the store is complete and the weights are cached: no pass over the training data
    torch.testing.assert_close(S2, S1, rtol=0, atol=0)
    # the cached weights are used as they are: 2ω (and with it the relative ridge, 2λ) halves every score
    save_cached(f, blob["config"], 2 * w)
    torch.testing.assert_close(fit_score()[0], S1 / 2)
    for bad in (w[:-1], w.float(), -w, torch.full_like(w, float("nan"))):
        save_cached(f, blob["config"], bad)
        with pytest.warns(RuntimeWarning, match="not what this fit expects"):
            torch.testing.assert_close(fit_score()[0], S1)
        torch.testing.assert_close(torch.load(f, weights_only=True)["value"], w)


class _NoDoubleBackward(torch.autograd.Function):
    """Squared error whose backward cannot be differentiated again (as a custom kernel's might be)."""

    @staticmethod
    def forward(ctx, z, t):
        ctx.save_for_backward(z, t)
        return (z - t).pow(2).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        return 2 * (z - t) * g[:, None], None


@pytest.mark.parametrize("loss", ["l1", "no double backward"])
def test_auto_kernel_falls_back_where_the_gauss_newton_kernel_does_not_exist(loss):
    """A loss that is piecewise linear in the outputs has a zero Gauss-Newton kernel (every ggn_trace or ggn
    score would be 0): the explicit kernels refuse it, "auto" falls back to the features kernel with a warning;
    so does "auto" when the traces cannot be computed (a loss without second derivatives)."""
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, Y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    fn = (lambda z, b: (z - b[1]).abs().sum(1)) if loss == "l1" else (lambda z, b: _NoDoubleBackward.apply(z, b[1]))
    task = Task(model, output_fn=lambda m, b: m(b[0]), loss_on_output=fn)
    data, test = batches(X, Y, batch_size=4), batches(X[:3], Y[:3], batch_size=3)
    with pytest.warns(RuntimeWarning, match="kernel: 'auto' fell back to 'features'"):
        a = Attributor(task, "trak").fit(data, progress=False)
    assert a.kernel_ == "features" and ("zero" in a.kernel_reason_ if loss == "l1" else "RuntimeError" in
                                        a.kernel_reason_)
    S = a.score(test, progress=False)
    torch.testing.assert_close(S, Attributor(task, "trak", kernel="features").fit(data, progress=False).score(
        test, progress=False), rtol=0, atol=0)
    assert float(S.abs().max()) > 0
    kernels = ("ggn_trace", "ggn") if loss == "l1" else ("ggn_trace",)
    for kernel in kernels:
        with pytest.raises((ValueError, RuntimeError),
                           match="Gauss-Newton kernel is 0" if loss == "l1" else "needs the second derivatives"):
            Attributor(task, "trak", kernel=kernel).fit(data, progress=False)


def test_closed_form_traces_non_finite_and_malformed():
    """The closed-form path (Task.from_classifier) gives a skipped example (non-finite outputs) weight 0, so the
    scores stay finite; a loss_on_output whose gradient_and_hessian_trace returns other shapes is refused."""
    model, (X, y), (Xt, yt) = setup(seed=25)
    X = X.clone()
    X[3] = float("nan")
    a = Attributor(Task.from_classifier(model, nan_policy="skip"), "trak", nan_policy="skip").fit(
        [(X, y)], progress=False)
    assert a.kernel_ == "ggn_trace" and bool(torch.isfinite(a.score([(Xt, yt)], progress=False)).all())

    class Bad:
        def __call__(self, z, b):
            return nn.functional.cross_entropy(z, b[1], reduction="none")

        def gradient_and_hessian_trace(self, z, b):
            return torch.zeros(z.shape[0], C), torch.zeros(z.shape[0] + 1)

    bad = Task(model, output_fn=lambda m, b: m(b[0]), loss_on_output=Bad())
    with pytest.raises(ValueError, match=r"gradient_and_hessian_trace: expected tensors \[13, C\] and \[13\], got "
                                         r"\(13, 3\) and \(14,\)"):
        Attributor(bad, "trak").fit([(X.nan_to_num(), y)], progress=False)


def test_trak_q_cached_next_to_the_store(tmp_path):
    """TRAK's q = 1 − σ(f) of the training examples is cached next to the store too: a refit on the complete store
    does not call the margin function on the training data, and the cached value is what the scores use."""
    from gradsketch.store.cache import save_cached

    model, (X, y), (Xt, yt) = setup(seed=26)
    calls = []
    margin = classification_margin()

    def fn(m, b):
        calls.append(len(b[0]))
        return margin(m, b)

    task = Task.from_classifier(model, margin_fn=fn)
    data, test = batches(X, y, batch_size=5), batches(Xt, yt, batch_size=5)

    def fit_score():
        a = Attributor(task, "trak", kernel="features", store=tmp_path / "s", store_dtype="float32")
        calls.clear()
        a.fit(data, progress=False)
        fit_calls = len(calls)
        return a.score(test, progress=False), fit_calls

    S1, _ = fit_score()
    f = tmp_path / "s" / "trak_q_0.pt"
    blob = torch.load(f, weights_only=True)
    q = blob["value"]
    torch.testing.assert_close(q, torch.sigmoid(-margin(model, (X, y))).detach(), rtol=1e-12, atol=0)
    S2, fit_calls = fit_score()
    assert fit_calls == 0   # the store is complete and q is cached: the margin function never ran in the fit
    torch.testing.assert_close(S2, S1, rtol=0, atol=0)
    save_cached(f, blob["config"], q / 2)   # the cached q is the one the scores are weighted with
    torch.testing.assert_close(fit_score()[0], S1 / 2)
    for bad in (q[:-1], q + 2):
        save_cached(f, blob["config"], bad)
        with pytest.warns(RuntimeWarning, match="not what this fit expects"):
            torch.testing.assert_close(fit_score()[0], S1)
