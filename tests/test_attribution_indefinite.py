"""The explicit influence solver says so when the damped curvature is indefinite (issue 19): below
|λ_min| of an indefinite Hessian the inverse amplifies near-singular directions and the scores can be
meaningless (benchmarks/results/influence_damping.md: exact influence LDS 0.72 -> 0.11)."""

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


def test_explicit_influence_warns_below_the_most_negative_eigenvalue():
    task, data, lam_min = _setup()
    attr = gradsketch.Attributor(task, "influence", damping=0.5 * -lam_min)
    with pytest.warns(RuntimeWarning, match=r"^damping: the curvature plus damping .* is indefinite"):
        attr.fit(data, progress=False)


def test_explicit_influence_is_quiet_when_the_damped_curvature_is_positive_definite():
    task, data, lam_min = _setup()
    attr = gradsketch.Attributor(task, "influence", damping=2.0 * -lam_min)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        attr.fit(data, progress=False)
    H = task.hessian(data).to_dense()
    G_train = torch.cat([task.grads(b) for b in data])
    G_test = task.grads(next(iter(data)))
    exact = G_test @ torch.linalg.solve(H + 2.0 * -lam_min * torch.eye(H.shape[0], dtype=H.dtype), G_train.T)
    assert torch.allclose(attr.score([next(iter(data))], progress=False).double(), exact, rtol=1e-6, atol=1e-9)
