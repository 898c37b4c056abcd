"""One meaning per option name (issue 11): ``mode`` is the gradient mode only, the curvature's data choice is
``sampling`` (the old keyword is refused naming the new one); ``n_iters`` is accepted by ``spectrum`` as the
alias of ``n_iter``."""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_data, tiny_model

import gradsketch
from gradsketch.curvature import HessianOperator
from gradsketch.model import Task
from gradsketch.spectrum.pipeline import SpectrumConfig


def test_curvature_sampling_replaces_mode():
    data = tiny_data(16, 8)
    task = Task.from_classifier(tiny_model(steps=0))
    v = torch.randn(task.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    H1 = task.hessian(data[:1])  # the first batch only
    torch.testing.assert_close(task.hessian(data, sampling="batch") @ v, H1 @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(HessianOperator(task, data, "batch") @ v, H1 @ v, rtol=1e-12, atol=1e-12)
    for call in (lambda: task.hessian(data, mode="batch"), lambda: task.ggn(data, mode="full"),
                 lambda: HessianOperator(task, data, mode="batch"),
                 lambda: gradsketch.spectrum(task, data, k=2, mode="full", progress=False)):
        with pytest.raises(TypeError, match=r"^mode: the curvature's data sampling is now called sampling= .*"
                                            r"Expected sampling='(batch|full)', got mode='(batch|full)'"):
            call()
    with pytest.raises(ValueError, match=r"^sampling: expected one of \('full', 'batch', 'stochastic'\), got 'all'"):
        task.hessian(data, sampling="all")
    assert SpectrumConfig(sampling="batch").sampling == "batch"
    with pytest.raises(TypeError):
        SpectrumConfig(mode="batch")  # type: ignore[call-arg]


def test_spectrum_accepts_n_iters_as_the_alias_of_n_iter():
    data = tiny_data(16, 8)
    task = Task.from_classifier(tiny_model(steps=0))
    a = gradsketch.spectrum(task, data, k=3, n_iter=20, progress=False)
    b = gradsketch.spectrum(task, data, k=3, n_iters=20, progress=False)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^n_iters: expected one of n_iters / n_iter .* got n_iters=20 and n_iter=30"):
        gradsketch.spectrum(task, data, k=3, n_iters=20, n_iter=30, progress=False)
