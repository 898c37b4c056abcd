"""Ground truth by retraining: leave-one-out effects and LDS subset outputs (cached, resumable).

Both use :func:`gradsketch.eval.train_models`, which trains many small models at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor, nn

from .train import model_outputs, train_models


def subset_masks(n: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> Tensor:
    """``[n_subsets, n]`` bool, each row a uniformly random subset of exactly ``round(alpha · n)`` examples."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha: expected a fraction in (0, 1], got {alpha!r}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets: expected >= 1, got {n_subsets}")
    g = torch.Generator().manual_seed(int(seed))
    k = max(1, int(round(alpha * n)))
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for s in range(n_subsets):
        masks[s, torch.randperm(n, generator=g)[:k]] = True
    return masks


class LDSData(NamedTuple):
    masks: Tensor    # [S, n_train] bool
    outputs: Tensor  # [S, n_test] float64, averaged over runs


def lds_ground_truth(model_fn: Callable[[], nn.Module], train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                     *, n_subsets: int = 64, alpha: float = 0.5, n_runs: int = 2, output: str = "margin",
                     seed: int = 0, group: int = 16, cache: Any = None, progress: bool = True,
                     **train_kw: Any) -> LDSData:
    """Train ``n_runs`` models (different initialisations) on each of ``n_subsets`` random ``alpha``-subsets
    and record ``output`` (see :func:`model_outputs`) on the test set, averaged over runs.

    ``group`` subsets (× n_runs models) are trained together in one vectorised call; with ``cache`` (a
    directory) each finished group is saved atomically and a rerun loads what is there (resumable). The cache
    remembers its configuration and refuses a different one. ``train_kw`` go to :func:`train_models`.
    """
    Xtr, ytr = train
    Xte, yte = test
    masks = subset_masks(Xtr.shape[0], n_subsets, alpha, seed)
    config = {"n_train": int(Xtr.shape[0]), "n_test": int(Xte.shape[0]), "n_subsets": n_subsets, "alpha": alpha,
              "n_runs": n_runs, "output": output, "seed": seed, "group": group,
              "train": {k: v for k, v in sorted(train_kw.items()) if k != "progress"},
              "model": repr(model_fn()), "data": float(Xtr.double().sum() + ytr.double().sum())}
    cdir = None
    if cache is not None:
        cdir = Path(cache)
        cdir.mkdir(parents=True, exist_ok=True)
        cfg_path = cdir / "config.json"
        text = json.dumps(config, sort_keys=True, default=str)
        if cfg_path.exists():
            if cfg_path.read_text() != text:
                raise ValueError(f"cache: {str(cdir)!r} holds ground truth for another configuration "
                                 f"(found {cfg_path.read_text()[:300]}..., expected {text[:300]}...); use another "
                                 "directory")
        else:
            cfg_path.write_text(text)
    from tqdm.auto import tqdm

    outs = []
    groups = list(range(0, n_subsets, group))
    for g0 in tqdm(groups, desc="LDS ground truth", disable=not progress, leave=False):
        g1 = min(g0 + group, n_subsets)
        f = None if cdir is None else cdir / f"group_{g0:05d}.npy"
        if f is not None and f.exists():
            outs.append(torch.from_numpy(np.load(f)))
            continue
        mk = masks[g0:g1].repeat_interleave(n_runs, 0)
        seeds = [1_000_003 * (seed + 1) + s * n_runs + r for s in range(g0, g1) for r in range(n_runs)]
        params = train_models(model_fn, Xtr, ytr, mk, seeds=seeds, **train_kw)
        o = model_outputs(model_fn, params, Xte, yte, output).double()
        o = o.reshape(g1 - g0, n_runs, -1).mean(1)
        if f is not None:
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, o.numpy())
            os.replace(tmp, f)
        outs.append(o)
    return LDSData(masks, torch.cat(outs, 0))


def loo_effects(model_fn: Callable[[], nn.Module], train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                indices: Sequence[int], *, output: str = "loss", seeds: Sequence[int] = (0,),
                **train_kw: Any) -> Tensor:
    """Leave-one-out effects ``[len(indices), n_test]``: the change of the test ``output`` caused by
    *including* training example i, oriented so that positive = i supports the test prediction:
    ``loss(without i) − loss(all)`` for ``output="loss"``, ``out(all) − out(without i)`` for "margin"/"logprob".

    Each model is retrained from the same initialisation(s) (``seeds``; averaged) with the same
    deterministic schedule, so the difference is due to example i alone (exact for a convex model trained
    to its optimum, e.g. ``optimizer="lbfgs"`` on logistic regression with weight decay)."""
    Xtr, ytr = train
    n = Xtr.shape[0]
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices: expected at least one training index, got none")
    if min(idx) < 0 or max(idx) >= n:
        raise ValueError(f"indices: expected values in [0, {n}), got {idx}")
    masks = torch.ones(len(idx) + 1, n, dtype=torch.bool)
    for r, i in enumerate(idx):
        masks[r + 1, i] = False
    acc: Tensor | int = 0
    for s in seeds:
        params = train_models(model_fn, Xtr, ytr, masks, seeds=[s] * (len(idx) + 1), **train_kw)
        o = model_outputs(model_fn, params, test[0], test[1], output).double()
        acc = acc + (o[1:] - o[:1] if output == "loss" else o[:1] - o[1:])
    return cast(Tensor, acc / len(seeds))
