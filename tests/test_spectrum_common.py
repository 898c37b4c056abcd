"""Shared fixtures for the spectrum tests: a tiny float64 digits MLP and its exact curvature matrices."""

from __future__ import annotations

import torch
from torch import nn

from gradsketch.model import Task

N_EX = 40


def tiny_data(n: int = N_EX, batch: int = 16):
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data[:n], dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1.0)
    y = torch.tensor(ds.target[:n], dtype=torch.long)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def tiny_model(hidden: int = 4, seed: int = 0, steps: int = 30, data=None) -> nn.Module:
    """64 -> hidden -> 10 tanh MLP in float64 (310 parameters for hidden=4), briefly trained."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    if steps:
        data = data or tiny_data()
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        for _ in range(steps):
            for x, y in data:
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
    return m.eval()


def tiny_task(**kw):
    data = tiny_data()
    return Task.from_classifier(tiny_model(data=data, **kw)), data


def _xy(data):
    return torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])


def exact_matrix(task: Task, data, operator: str) -> torch.Tensor:
    """The explicit [N, N] float64 Hessian / GGN / empirical Fisher of the mean cross-entropy."""
    X, y = _xy(data)
    n = len(X)
    p0 = task.flatten(task.params_dict())

    def logits(flat):
        return torch.func.functional_call(task.model, task.unflatten(flat), (X,))

    def losses(flat):
        return nn.functional.cross_entropy(logits(flat), y, reduction="none")

    if operator == "hessian":
        return torch.func.hessian(lambda f: losses(f).mean())(p0)
    if operator == "fisher":
        G = torch.func.jacrev(losses)(p0)  # [n, N]
        return G.T @ G / n
    J = torch.func.jacrev(logits)(p0)  # [n, C, N]
    p = torch.softmax(logits(p0), -1)
    HL = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bcn,bcd,bdm->nm", J, HL, J) / n


def exact_eigh(M: torch.Tensor):
    lam, V = torch.linalg.eigh((M + M.T) / 2)
    return lam.flip(0), V.flip(1)  # descending
