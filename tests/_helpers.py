"""Shared builders of the test suite (one copy): digits data, MLP/CNN/tiny GPT-2 builders, exact per-example
gradients, and the tiny float64 digits MLP of the spectrum tests with its exact curvature matrices.

Imported by the test modules (``from _helpers import ...``); no tests here, and no process-wide side effects
(the tiny GPT-2 is built from a config: nothing is downloaded, so no Hugging Face environment variables).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from gradsketch.model import Task


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


# ------------------------------------------------------------------ spectrum: tiny float64 digits MLP
N_EX = 40


def tiny_data(n: int = N_EX, batch: int = 16):
    """The first ``n`` digits, standardised (std clamped at 1), in float64 batches of ``batch``."""
    X, y = _digits()
    x = X[:n] * 16.0  # the raw pixel values
    x = (x - x.mean(0)) / x.std(0).clamp_min(1.0)
    y = y[:n]
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


def indefinite_tanh_task():
    """A float64 tanh MLP 3-4-2 with random weights whose Hessian (24 examples, 2 batches) is indefinite:
    ``(task, data, H)``, asserting λ_min < −1e-3 so that the tests using it mean something."""
    import gradsketch
    from gradsketch.attribution import batches as make_batches

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    task = gradsketch.Task.from_classifier(model)
    data = make_batches(x, y, batch_size=12)
    H = task.hessian(data).to_dense()
    assert float(torch.linalg.eigvalsh(H)[0]) < -1e-3  # indefinite, or the tests mean nothing
    return task, data, H


def count_featurised_rows(monkeypatch) -> list[int]:
    """Record the store rows that attribution featurises from now on (until ``monkeypatch.undo()``): the
    returned list grows with each row index computed."""
    from gradsketch.attribution import _features

    seen: list[int] = []
    real = _features._rows

    def counting(task_, batch, sketch, mode, nan_policy, offset, name, *a, **k):
        r = real(task_, batch, sketch, mode, nan_policy, offset, name, *a, **k)
        seen.extend(range(offset, offset + r.shape[0]))
        return r

    monkeypatch.setattr(_features, "_rows", counting)
    return seen


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block (oversubscribed threads on the 2 shared cores make tiny
    products ~50-100x slower), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spawn_ranks(worker: Callable, where: Path, world: int) -> list:
    """Run ``worker(rank, init_file, out_dir)`` on ``world`` spawned processes and load each rank's ``<rank>.pt``
    result (weights-only)."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(str(where / "init"), str(where)), nprocs=world, join=True)
    return [torch.load(where / f"{r}.pt", weights_only=True) for r in range(world)]
