"""Arnoldi with a sketch starts from Φz, z the unsketched run's start vector: with an orthogonal Φ (d = N)
sketched and unsketched Arnoldi influence agree exactly (float64), so a gap between them is sketch error,
not start-vector randomness; start="sketch" (a Gaussian in R^d) does not agree at n_iters < N."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsketch.attribution import Attributor, batches
from gradsketch.attribution._features import ProjectionSketch
from gradsketch.model import Task


def setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    Xt = torch.randn(6, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    return Task.from_classifier(model), batches(X, y, batch_size=10), batches(Xt, yt, batch_size=3)


def test_orthogonal_sketch_same_start_equals_unsketched():
    task, tr, te = setup()
    N = task.n_params
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    rot = ProjectionSketch(Q)  # x ↦ xQ: an orthogonal Φ with d = N
    opts = dict(n_iters=12, top_k=6, damping=0.1, seed=3)
    ref = Attributor(task, "arnoldi", **opts).fit(tr, progress=False)
    a = Attributor(task, "arnoldi", sketch=rot, **opts).fit(tr, progress=False)
    torch.testing.assert_close(a.eigenvalues_, ref.eigenvalues_, rtol=1e-8, atol=1e-10)
    S_ref = ref.score(te, progress=False)
    torch.testing.assert_close(a.score(te, progress=False), S_ref, rtol=1e-6, atol=1e-9)
    # the old behaviour (a start vector drawn in R^d) gives a different Krylov space at n_iters < N
    b = Attributor(task, "arnoldi", sketch=rot, start="sketch", **opts).fit(tr, progress=False)
    assert not torch.allclose(b.score(te, progress=False), S_ref, rtol=1e-3, atol=1e-6)


def test_start_bad_value_names_argument():
    task, tr, _ = setup()
    with pytest.raises(ValueError, match="start"):
        Attributor(task, "arnoldi", sketch=dict(d=8), start="middle", n_iters=10, top_k=4).fit(tr, progress=False)
