"""Local-ensemble extrapolation scores against an explicit float64 eigendecomposition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsketch
from gradsketch import Task
from gradsketch.curvature import GGNOperator, HessianOperator
from gradsketch.spectrum.local_ensembles import LocalEnsemble

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(30, 2, dtype=DT), torch.randint(0, 3, (30,))
    Xt, yt = 2.0 * torch.randn(6, 2, dtype=DT), torch.randint(0, 3, (6,))
    return model, Task.from_classifier(model), [(X, y)], (Xt, yt)


def _explicit_grads(model, Xt, yt, which):
    """Prediction gradients one example at a time with torch.autograd."""
    rows = []
    for i in range(Xt.shape[0]):
        z = model(Xt[i:i + 1])[0]
        if which == "logprob":
            outs = [F.log_softmax(z, 0)[int(z.argmax())]]
        elif which == "loss":
            outs = [F.cross_entropy(z[None], yt[i:i + 1])]
        else:
            outs = list(z)
        rows.append([torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, list(model.parameters()),
                                                                           retain_graph=True)]) for o in outs])
    return rows


@pytest.mark.parametrize("curvature,output", [("ggn", "logprob"), ("ggn", "logits"), ("hessian", "loss")])
def test_score_is_the_gradient_norm_outside_the_top_m_eigenspace(curvature, output):
    model, task, train, (Xt, yt) = _setup()
    Op = GGNOperator if curvature == "ggn" else HessianOperator
    w, V = torch.linalg.eigh(Op(task, train).to_dense())
    m = 6
    assert float(w[-m] - w[-m - 1]) > 1e-3 * float(w[-1])   # the top-m eigenspace is well defined
    U = V[:, -m:]
    P = torch.eye(U.shape[0], dtype=DT) - U @ U.T
    grads = _explicit_grads(model, Xt, yt, output)
    want = torch.stack([sum((P @ g).square().sum() for g in gs).sqrt() for gs in grads])
    test = [(Xt[:4], yt[:4]), (Xt[4:], yt[4:])]
    if output == "logprob":   # the one-call form
        got = gradsketch.local_ensemble_score(task, train, test, m=m, n_iter=task.n_params, tol=0)
    else:
        le = LocalEnsemble(task, train, m=m, curvature=curvature, output=output, n_iter=task.n_params, tol=0).fit()
        torch.testing.assert_close(le.eigenvalues_, w[-m:].flip(0), rtol=1e-8, atol=1e-12)
        got = le.score(test)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    full = torch.stack([sum(g.square().sum() for g in gs).sqrt() for gs in grads])
    assert bool((got < full).all())   # the projection removed something from every test gradient


def test_local_ensemble_refuses_bad_arguments():
    model, task, train, _ = _setup()
    with pytest.raises(ValueError, match="m"):
        LocalEnsemble(task, train, m=task.n_params)
    with pytest.raises(ValueError, match="curvature"):
        LocalEnsemble(task, train, m=2, curvature="fisher")
    with pytest.raises(ValueError, match="output"):
        LocalEnsemble(task, train, m=2, output="margin")
    plain = Task(model, lambda mo, b: F.cross_entropy(mo(b[0]), b[1], reduction="none"))
    with pytest.raises(ValueError, match="output_fn"):
        LocalEnsemble(plain, train, m=2)
    with pytest.raises(RuntimeError, match="fit"):
        LocalEnsemble(task, train, m=2).score(train)
