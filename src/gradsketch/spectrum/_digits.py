"""Built-in example task: an MLP on scikit-learn's digits (8×8, 1,797 images; ships with scikit-learn)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def digits_data(n: int | None = None, batch_size: int = 256, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Standardised digits ``(x [B, 64], y [B])`` batches: the first ``n`` examples of a seeded permutation."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float64)
    y = torch.tensor(ds.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x = ((x - x.mean(0)) / x.std(0).clamp_min(1e-3)).to(dtype)
    if n is not None:
        x, y = x[:n], y[:n]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def digits_mlp(hidden: tuple[int, ...] = (256, 256), dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """``64 -> hidden... -> 10`` MLP with tanh (smooth, so the Hessian is well defined everywhere)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.01))
    return model.to(dtype).eval()


def train(model: nn.Module, data: list, epochs: int = 5, lr: float = 1e-2, seed: int = 0) -> list[dict]:
    """A few epochs of Adam on cross-entropy; returns a ``state_dict`` copy after each epoch."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    states = []
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def digits_task(hidden: tuple[int, ...] = (256, 256), n: int | None = None, epochs: int = 5,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Any, list, list[dict]]:
    """``(Task, data, checkpoints)``: a trained digits MLP as a ``Task.from_classifier`` task, its batches,
    and the per-epoch state_dicts."""
    from ..model import Task

    data = digits_data(n, dtype=dtype, seed=seed)
    model = digits_mlp(hidden, dtype=dtype, seed=seed)
    states = train(model, data, epochs=epochs, seed=seed) if epochs else []
    return Task.from_classifier(model), data, states
