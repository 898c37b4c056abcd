"""Influence on an indefinite Hessian (issue 19, issue 11's one damping rule): below |λ_min| the textbook
(H + δI)⁻¹ amplifies near-singular directions and the scores collapse (benchmarks/results/damping_rule.md:
exact influence LDS 0.74 -> 0.10). Every influence-type method inverts (|K| + δI)⁻¹ instead: well posed at every
damping, equal to the closed form from the eigendecomposition, and quiet."""

import warnings

import pytest
import torch
from torch import nn

import gradsketch
from gradsketch.attribution import batches


def _setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    task = gradsketch.Task.from_classifier(model)
    data = batches(x, y, batch_size=12)
    lam_min = float(torch.linalg.eigvalsh(task.hessian(data).to_dense())[0])
    assert lam_min < -1e-3, lam_min  # the set-up must really be indefinite for the test to mean anything
    return task, data, lam_min


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_explicit_influence_applies_the_absolute_value_rule_below_and_above_the_most_negative_eigenvalue(factor):
    task, data, lam_min = _setup()
    damping = factor * -lam_min
    attr = gradsketch.Attributor(task, "influence", damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        attr.fit(data, progress=False)
    H = task.hessian(data).to_dense()
    w, V = torch.linalg.eigh((H + H.T) / 2)
    G_train = torch.cat([task.grads(b) for b in data])
    G_test = task.grads(next(iter(data)))
    exact = (G_test @ V) / (w.abs() + damping) @ (G_train @ V).T
    assert torch.allclose(attr.score([next(iter(data))], progress=False).double(), exact, rtol=1e-6, atol=1e-9)
    assert bool((attr.self_influence(progress=False) > 0).all())  # a positive definite kernel
