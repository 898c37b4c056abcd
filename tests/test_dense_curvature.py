"""dense_curvature: batched torch.func Hessian / GGN matrices against the matrix-free operators (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsketch import Task
from gradsketch.curvature import GGNOperator, HessianOperator
from gradsketch.curvature.dense import dense_curvature

DT = torch.float64


def _mlp_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    X, y = torch.randn(11, 3, dtype=DT), torch.randint(0, 4, (11,))
    return Task.from_classifier(model), [(X[:6], y[:6]), (X[6:], y[6:])]


@pytest.mark.parametrize("chunk", [7, 512])
def test_dense_hessian_equals_the_operator_columns(chunk):
    task, data = _mlp_task()
    H = dense_curvature(task, data, chunk_size=chunk)
    torch.testing.assert_close(H, HessianOperator(task, data).to_dense(), rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(H)[0]) < 0   # an indefinite Hessian: the second-order term is in


def test_dense_ggn_equals_the_operator_on_mlp_and_cnn():
    task, data = _mlp_task()
    G = dense_curvature(task, data, kind="ggn")
    torch.testing.assert_close(G, GGNOperator(task, data).to_dense(), rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(G)[0]) > -1e-12
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    t2 = Task.from_classifier(cnn)
    d2 = [(torch.randn(5, 1, 4, 4, dtype=DT), torch.randint(0, 3, (5,)))]
    torch.testing.assert_close(dense_curvature(t2, d2, kind="ggn"), GGNOperator(t2, d2).to_dense(),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense_curvature(t2, d2), HessianOperator(t2, d2).to_dense(), rtol=1e-10,
                               atol=1e-12)


def test_dense_curvature_refuses_bad_input():
    task, data = _mlp_task()
    with pytest.raises(ValueError, match="kind"):
        dense_curvature(task, data, kind="fisher")
    with pytest.raises(ValueError, match="chunk_size"):
        dense_curvature(task, data, chunk_size=0)
    with pytest.raises(ValueError, match="data"):
        dense_curvature(task, [])
    plain = Task(task.model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(ValueError, match="output_fn"):
        dense_curvature(plain, data, kind="ggn")
