"""Attribution methods "ekfac" and "kfac" against explicit float64 formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsketch
from gradsketch import Attributor, Task
from gradsketch.attribution import EKFACInfluence, KFACInfluence, registered_methods
from gradsketch.curvature import GGNOperator, KFACOperator

DT = torch.float64


def _grads(task, data):
    return torch.cat([task.grads(b) for b in data])


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 3, (12,))
    return Task.from_classifier(model), [(X[:7], y[:7]), (X[7:], y[7:])], [(torch.randn(5, 3, dtype=DT),
                                                                           torch.randint(0, 3, (5,)))]


def test_ekfac_on_a_one_layer_linear_model_is_ggn_influence():
    # squared error on a linear layer: the GGN is exactly Kronecker (see test_kfac.py), so EK-FAC influence
    # equals influence with the exact GGN under the one damping rule at the same damping, δ = 0 included
    torch.manual_seed(1)
    task = Task.from_classifier(nn.Linear(4, 3).to(DT), loss="mse")
    X, T = torch.randn(10, 4, dtype=DT), torch.randn(10, 3, dtype=DT)
    train, test = [(X[:6], T[:6]), (X[6:], T[6:])], [(torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT))]
    G = GGNOperator(task, train).to_dense()
    assert float(torch.linalg.eigvalsh(G)[0]) > 1e-3   # 10 examples, 5 inputs with the bias: non-singular
    gx, gz = _grads(task, test), _grads(task, train)
    for delta in (0.05, 0.0):
        a = Attributor(task, method="ekfac", damping=delta).fit(train, progress=False)
        assert isinstance(a, EKFACInfluence) and a.method == "ekfac"
        assert a.damping_ == delta   # absolute, as Influence and Arnoldi take it
        K = torch.linalg.inv(G + delta * torch.eye(G.shape[0], dtype=DT))
        torch.testing.assert_close(a.score(test, progress=False), gx @ K @ gz.T, rtol=1e-8, atol=1e-10)
        inf = Attributor(task, method="influence", curvature="ggn", damping=delta).fit(train, progress=False)
        torch.testing.assert_close(a.score(test, progress=False), inf.score(test, progress=False), rtol=1e-8,
                                   atol=1e-10)


def test_ekfac_and_kfac_default_to_the_one_damping_rule():
    from gradsketch.attribution.options import DEFAULT_DAMPING

    task, train, test = _mlp()
    for method in ("ekfac", "kfac"):
        a = Attributor(task, method=method).fit(train, progress=False)
        inf = Attributor(task, method="influence", curvature="ggn")
        assert a.damping_ == DEFAULT_DAMPING == inf.config_.damping
        op = a.curvature_
        D = op.to_dense()
        K = torch.linalg.inv(D + DEFAULT_DAMPING * torch.eye(D.shape[0], dtype=DT))
        gx, gz = _grads(task, test), _grads(task, train)
        torch.testing.assert_close(a.score(test, progress=False), gx @ K @ gz.T, rtol=1e-8, atol=1e-10)
    # softmax cross-entropy: the output Hessian has rank C - 1, so the K-FAC curvature is singular and δ = 0
    # cannot invert it; the refusal names the damping
    assert float(Attributor(task, method="kfac").fit(train, progress=False).curvature_.eigenvalues()[0]) < 1e-12
    with pytest.raises(ValueError, match="damping"):
        Attributor(task, method="kfac", damping=0.0).fit(train, progress=False)


@pytest.mark.parametrize("cls", [EKFACInfluence, KFACInfluence])
def test_scores_self_influence_and_topk_follow_the_fitted_operator(cls):
    task, train, test = _mlp()
    delta = 0.2
    a = cls(task, damping=delta).fit(train, progress=False)
    op = KFACOperator.fit(task, train, kind=cls.kfac_kind)
    D = op.to_dense()
    K = torch.linalg.inv(D + delta * torch.eye(D.shape[0], dtype=DT))
    gx, gz = _grads(task, test), _grads(task, train)
    S = a.score(test, progress=False)
    torch.testing.assert_close(S, gx @ K @ gz.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.self_influence(progress=False), ((gz @ K) * gz).sum(1), rtol=1e-8, atol=1e-10)
    tk = a.topk(test, k=3, progress=False)
    torch.testing.assert_close(tk.values, S.topk(3, dim=1).values)


def test_sketched_ekfac_compresses_the_curvature_and_saves_its_factors(tmp_path):
    task, train, test = _mlp()
    S = gradsketch.sketch("dense", n=task.n_params, d=20, seed=3)
    a = Attributor(task, method="ekfac", sketch=S, store=tmp_path / "s", store_dtype="float32").fit(
        train, progress=False)
    op = KFACOperator.fit(task, train)
    delta = a.damping_   # the default of the one damping rule
    assert delta == 3e-3
    Phi = S.matrix()
    Ks = Phi @ op.to_dense() @ Phi.T
    fx, fz = _grads(task, test) @ Phi.T, _grads(task, train) @ Phi.T
    want = fx @ torch.linalg.inv(Ks + delta * torch.eye(20, dtype=DT)) @ fz.T
    torch.testing.assert_close(a.score(test, progress=False).double(), want, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "s" / "ekfac_0.pt").exists()   # the factors are saved with the store ...
    b = Attributor(task, method="ekfac", sketch=S, store=tmp_path / "s", store_dtype="float32").fit(
        train, progress=False)
    torch.testing.assert_close(b.score(test, progress=False), a.score(test, progress=False))
    # ... and grad-dot reads the same rows from the same store (Φ∇ℓ): its scores are fx @ fz.T
    g = Attributor(task, method="grad-dot", sketch=S, store=tmp_path / "s", store_dtype="float32").fit(
        train, progress=False)
    torch.testing.assert_close(g.score(test, progress=False).double(), fx @ fz.T, rtol=1e-4, atol=1e-6)


def test_options_are_validated_and_registered():
    task, train, _ = _mlp()
    assert {"ekfac", "kfac"} <= set(registered_methods())
    with pytest.raises(ValueError, match="damping"):
        Attributor(task, method="ekfac", damping=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        Attributor(task, method="kfac", damping=float("nan"))
    with pytest.raises(ValueError, match="fisher"):
        Attributor(task, method="kfac", fisher="true")
    with pytest.raises(TypeError, match="ridge"):
        Attributor(task, method="ekfac", ridge=1.0)
