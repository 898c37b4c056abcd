"""Influence on an indefinite Hessian (issue 19, issue 11's one damping rule): below |λ_min| the textbook
(H + δI)⁻¹ amplifies near-singular directions and the scores collapse (benchmarks/results/damping_rule.md:
exact influence LDS 0.74 -> 0.10). Every influence-type method inverts (|K| + δI)⁻¹ instead: well posed at every
damping, equal to the closed form from the eigendecomposition, and quiet."""

import warnings

import pytest
import torch
from _helpers import indefinite_tanh_task

import gradsketch


def _setup():
    task, data, H = indefinite_tanh_task()
    return task, data, float(torch.linalg.eigvalsh(H)[0])


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
