"""mode="auto" (the default, issue 19): the factored path where it pays and the layers allow it, explicit
otherwise; the choice and its reason are logged by fit and shown by the CLI; a weight the hooks cannot see
makes auto fall back to explicit with a warning instead of returning wrong rows."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gradsketch import Attributor, Task
from gradsketch.attribution import batches
from gradsketch.attribution.base import AUTO_FACTORED_MIN_PARAMS

DT = torch.float64


def _data(n=24, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, dim, generator=g, dtype=DT), torch.randint(0, 10, (n,), generator=g)
    return batches(X, y, batch_size=8), [(torch.randn(4, dim, generator=g, dtype=DT), torch.randint(0, 10, (4,)))]


def _mlp(hidden=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(DT)


def test_auto_picks_factored_on_a_large_enough_linear_model_and_equals_asking_for_it(caplog):
    task = Task.from_classifier(_mlp(32))
    assert task.n_params >= AUTO_FACTORED_MIN_PARAMS
    train, test = _data()
    sk = dict(d=64, seed=3)
    with caplog.at_level(logging.INFO, logger="gradsketch.attribution"):
        a = Attributor(task, "grad-dot", sketch=sk).fit(train, progress=False)
    assert a.mode == "factored" and "100% of the 2410 parameters" in a.mode_reason_
    assert any("gradients by mode='factored' (100% of the 2410 parameters" in r.getMessage() for r in caplog.records)
    b = Attributor(task, "grad-dot", sketch=sk, mode="factored").fit(train, progress=False)
    torch.testing.assert_close(a.score(test, progress=False), b.score(test, progress=False), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["small", "no-sketch", "object", "influence", "arnoldi"])
def test_auto_stays_explicit_where_factored_does_not_apply(case):
    task = Task.from_classifier(_mlp(4) if case == "small" else _mlp(32))
    sketch = None if case == "no-sketch" else task.block_sketch(16) if case == "object" else dict(d=16)
    method = case if case in ("influence", "arnoldi") else "grad-dot"
    a = Attributor(task, method, sketch=sketch)
    why = {"small": "below 2000", "no-sketch": "sketch=None", "object": "the sketch is a BlockSketch",
           "influence": "sketches its curvature", "arnoldi": "sketches its curvature"}[case]
    assert a.mode == "explicit" and why in a.mode_reason_


def test_auto_checks_the_factored_rows_and_falls_back_to_explicit_when_they_are_wrong(monkeypatch):
    task = Task.from_classifier(_mlp(32))
    train, test = _data()
    a = Attributor(task, "grad-dot", sketch=dict(d=64))
    sk = a._build_sketch()
    assert a._check_factored(train, sk)  # the hooks' rows equal the exact gradients, sketched
    real = Task.sketch_grads

    def off(self, data, sketch, mode="explicit", **kw):  # a weight the hooks would not see: wrong rows
        rows = real(self, data, sketch, mode=mode, **kw)
        return rows * 1.01 if mode == "factored" else rows

    monkeypatch.setattr(Task, "sketch_grads", off)
    assert not a._check_factored(train, sk)
    with pytest.warns(RuntimeWarning, match="mode: 'auto' fell back to 'explicit': the factored rows"):
        a.fit(train, progress=False)
    assert a.mode == "explicit"
    b = Attributor(task, "grad-dot", sketch=dict(d=64), mode="explicit").fit(train, progress=False)
    torch.testing.assert_close(a.score(test, progress=False), b.score(test, progress=False), rtol=0, atol=0)
