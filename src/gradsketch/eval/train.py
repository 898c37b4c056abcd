"""Vectorised retraining harness: many small models trained at once with ``torch.func`` on the CPU.

``train_models`` stacks M independently initialised copies of a model (``torch.func.stack_module_state``)
and trains them together: one ``vmap(functional_call)`` forward over all models, one backward of the sum of
their (independent) losses, and a ``torch.optim`` Adam / SGD step (elementwise, hence per model), or
L-BFGS on the joint, separable objective.
Model m minimises Σ_i w_mi ℓ(f_m(x_i), y_i) / Σ_i w_mi + (wd/2)‖θ_m‖² with w = ``masks``
(training subsets), which is what leave-one-out and LDS ground truth need.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap


def init_models(model_fn: Callable[[], nn.Module], seeds: Sequence[int]) -> list[nn.Module]:
    """``model_fn()`` called under ``torch.manual_seed(seed)`` for each seed (global RNG restored)."""
    out = []
    for s in seeds:
        with torch.random.fork_rng():
            torch.manual_seed(int(s))
            out.append(model_fn())
    return out


def _forward_all(base: nn.Module, params: dict, buffers: dict, X: Tensor) -> Tensor:
    def f(p, b, x):
        return functional_call(base, (p, b), (x,))

    return vmap(f, in_dims=(0, 0, None))(params, buffers, X)


def train_models(model_fn: Callable[[], nn.Module], X: Tensor, y: Tensor, masks: Tensor | None = None, *,
                 seeds: Sequence[int] = (0,), steps: int = 300, lr: float = 1e-2, weight_decay: float = 0.0,
                 optimizer: str = "adam", batch_size: int | None = None, data_seed: int = 0,
                 progress: bool = False) -> dict[str, Tensor]:
    """Train ``M = len(seeds)`` models at once; returns stacked parameters ``name -> [M, *shape]``.

    ``masks [M, n]`` (bool or float weights; default all ones) selects model m's training examples.
    ``optimizer``: ``"adam"`` or ``"sgd"`` for ``steps`` steps (full batch, or minibatches of ``batch_size``
    in an order fixed by ``data_seed`` and shared by all models), or ``"lbfgs"`` (full batch, ``steps``
    iterations, strong-Wolfe line search; for convex models such as logistic regression this reaches the
    optimum, which makes leave-one-out exact). Cross-entropy loss; deterministic for fixed seeds.
    """
    if optimizer not in ("adam", "sgd", "lbfgs"):
        raise ValueError(f"optimizer: expected 'adam', 'sgd' or 'lbfgs', got {optimizer!r}")
    M, n = len(seeds), X.shape[0]
    if M < 1:
        raise ValueError("seeds: expected at least one seed, got none")
    if y.shape[0] != n:
        raise ValueError(f"y: expected {n} labels (rows of X), got {y.shape[0]}")
    W = torch.ones(M, n, dtype=X.dtype) if masks is None else masks.to(X.dtype)
    if W.shape != (M, n):
        raise ValueError(f"masks: expected shape [{M}, {n}] (len(seeds), n), got {tuple(W.shape)}")
    models = init_models(model_fn, seeds)
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def objective(idx: Tensor | None) -> Tensor:
        Xb, yb, Wb = (X, y, W) if idx is None else (X[idx], y[idx], W[:, idx])
        logits = _forward_all(base, params, buffers, Xb)
        C = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, C), yb.repeat(M), reduction="none").reshape(M, -1)
        per = (ce * Wb).sum(1) / Wb.sum(1).clamp_min(1e-12)
        if weight_decay:
            per = per + 0.5 * weight_decay * sum((p.reshape(M, -1) ** 2).sum(1) for p in params.values())
        return per.sum()

    from tqdm.auto import tqdm

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=steps, tolerance_grad=1e-12,
                                tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective(None)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        g = torch.Generator().manual_seed(int(data_seed))
        # torch.optim's Adam/SGD are elementwise, so one optimiser over the stacked [M, ...] tensors updates
        # every model exactly as if each had its own (the summed loss gives each model its own gradient)
        plist = list(params.values())
        opt2: torch.optim.Optimizer = (torch.optim.SGD(plist, lr=lr) if optimizer == "sgd"
                                       else torch.optim.Adam(plist, lr=lr, betas=(0.9, 0.999), eps=1e-8))
        order: list[Tensor] = []
        for _ in tqdm(range(1, steps + 1), desc="train models", disable=not progress, leave=False):
            idx = None
            if batch_size is not None and batch_size < n:
                if not order:
                    perm = torch.randperm(n, generator=g)
                    order = list(perm.split(batch_size))
                idx = order.pop(0)
            opt2.zero_grad(set_to_none=True)
            objective(idx).backward()
            opt2.step()
    return {k: v.detach() for k, v in params.items()}


def load_model(model_fn: Callable[[], nn.Module], params: dict[str, Tensor], i: int = 0) -> nn.Module:
    """Model number ``i`` of stacked ``params`` as an ordinary module."""
    m = model_fn()
    m.load_state_dict({k: v[i].clone() for k, v in params.items()}, strict=False)
    return m


def load_models(model_fn: Callable[[], nn.Module], params: dict[str, Tensor]) -> list[nn.Module]:
    """All ``M`` stacked models as ordinary modules, e.g. the ensemble for
    ``Attributor(task, "trak", models=load_models(mf, train_models(mf, X, y, seeds=range(5))))``."""
    M = next(iter(params.values())).shape[0]
    return [load_model(model_fn, params, i) for i in range(M)]


def model_outputs(model_fn: Callable[[], nn.Module], params: dict[str, Tensor], X: Tensor, y: Tensor,
                  output: str = "margin") -> Tensor:
    """``[M, n]`` outputs of the stacked models on ``(X, y)``: ``"margin"`` z_y − logsumexp_{j≠y} z_j
    (TRAK's output function), ``"loss"`` the cross-entropy, ``"logprob"`` log p_y."""
    if output not in ("margin", "loss", "logprob"):
        raise ValueError(f"output: expected 'margin', 'loss' or 'logprob', got {output!r}")
    base = copy.deepcopy(model_fn()).to("meta")
    M = next(iter(params.values())).shape[0]
    buffers: dict[str, Any] = {k: v.unsqueeze(0).expand(M, *v.shape) for k, v in model_fn().named_buffers()}
    with torch.no_grad():
        z = _forward_all(base, params, buffers, X)
    zy = z.gather(2, y.view(1, -1, 1).expand(M, -1, 1))[..., 0]
    if output == "margin":
        hit = torch.zeros_like(z).scatter(2, y.view(1, -1, 1).expand(M, -1, 1), 1.0) > 0
        return zy - torch.logsumexp(z.masked_fill(hit, float("-inf")), dim=2)
    lp = zy - torch.logsumexp(z, dim=2)
    return -lp if output == "loss" else lp
