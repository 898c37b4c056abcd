"""Issue 12 item 4: a non-finite gradient with a finite loss (sqrt of a weight at 0, used directly in the
loss) is raised naming the example on every path, or skipped and recorded with its index in the pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsketch.attribution import Attributor
from gradsketch.model import Task

BAD = [10, 11, 13, 14]


class M(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.lin(x)


def loss(m, b):
    x, y = b
    ce = nn.functional.cross_entropy(m(x), y, reduction="none")
    return ce + torch.sqrt(m.w[(x[:, 0] > 1.0).long()].abs())  # d/dw sqrt(|w|) at w = 0: not finite


def data():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    X[:, 0] = -2.0
    X[BAD, 0] = 2.0
    return [(X[:7], y[:7]), (X[7:], y[7:])]


def sketches(task):
    return [("explicit", task.block_sketch(8, kind="sjlt", seed=0)),
            ("implicit", task.block_sketch(8, kind="sjlt", seed=0)),
            ("factored", task.factored_sketch(8, kind="sjlt", seed=0))]


def test_every_path_raises_naming_the_example():
    task = Task(M(), loss)
    b = data()
    with pytest.raises(FloatingPointError, match=r"example index 10 \(loss = [0-9.]+\)"):
        task.grads(tuple(torch.cat(t) for t in zip(*b, strict=True)))
    for mode, S in sketches(task):
        with pytest.raises(FloatingPointError, match=r"example index 10 "):
            task.sketch_grads(b, S, mode=mode, progress=False)
        with pytest.raises(FloatingPointError, match=r"example index 10 "):
            list(task.iter_sketch_grads(b, S, mode=mode, progress=False))
    for mode in ("explicit", "factored"):
        with pytest.raises(FloatingPointError, match=r"train_data: .*example index\(es\) 10, 11, 13, 14"):
            Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=8), mode=mode).fit(b, progress=False)


def test_skip_zeroes_and_records_the_examples_of_this_pass():
    task = Task(M(), loss, nan_policy="skip")
    b = data()
    for mode, S in sketches(task):
        rows = task.sketch_grads(b, S, mode=mode, progress=False)
        assert task.skipped_indices_ == BAD, mode
        assert torch.isfinite(rows).all() and (rows[BAD] == 0).all() and (rows.abs().sum(1) > 0).sum() == 16
        for _ in range(2):  # a second pass records its own examples, not both passes'
            it = torch.cat(list(task.iter_sketch_grads(b, S, mode=mode, progress=False)))
            assert task.skipped_indices_ == BAD, mode
            torch.testing.assert_close(it, rows)
