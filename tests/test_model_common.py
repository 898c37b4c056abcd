"""Shared builders for the gradsketch.model tests (digits MLP/CNN, tiny GPT-2); holds no tests itself."""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y, dtype=torch.long)


def digits(n: int = 64, dtype: torch.dtype = torch.float64, image: bool = False, offset: int = 0):
    X, y = _digits()
    X, y = X[offset:offset + n].to(dtype), y[offset:offset + n]
    return (X.reshape(-1, 1, 8, 8) if image else X), y


def batches(X: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[i:i + size], y[i:i + size]) for i in range(0, len(X), size)]


def mlp(hidden: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)


def cnn(seed: int = 0, dtype: torch.dtype = torch.float64, inplace: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=1), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 2, 10),
    ).to(dtype)


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float64, attn: str = "eager"):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def token_batch(B: int = 4, T: int = 10, seed: int = 0, pad_rows: dict[int, int] | None = None):
    """Right-padded ``{"input_ids", "attention_mask"}``; ``pad_rows``: row -> true length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for r, length in (pad_rows or {}).items():
        mask[r, length:] = 0
        ids[r, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def loop_grads(model: nn.Module, loss_one, n: int, params=None) -> torch.Tensor:
    """Reference: one ordinary backward pass per example; ``loss_one(i) -> scalar``."""
    ps = [p for p in model.parameters() if p.requires_grad] if params is None else params
    rows = []
    for i in range(n):
        gs = torch.autograd.grad(loss_one(i), ps, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)
