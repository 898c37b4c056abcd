"""Stochastic trace estimation: Hutchinson and Hutch++.

Sources: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines" (1989); R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal
Stochastic Trace Estimation", SOSA 2021 (arXiv 2010.09649).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validate import (
    apply,
    batches,
    check_choice,
    check_int,
    check_operator,
    make_generator,
    progress_bar,
    random_probes,
    work_dtype,
)
from .operator import LinearOperator

DISTS = ("rademacher", "gaussian")


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr(A)``.
        std_error: standard error of the stochastic part (sample standard deviation of the per-probe
            values / √(number of probes)); ``nan`` when only one probe was used, ``0`` when exact.
        n_matvec: operator products spent.
        samples: ``[n_probes]`` per-probe values ``zᵢᵀ A zᵢ`` of the stochastic part (float64, CPU).
    """

    estimate: float
    std_error: float
    n_matvec: int
    samples: Tensor

    def __float__(self) -> float:
        return self.estimate


def _probes(n: int, count: int, dist: str, gen: torch.Generator, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """``count`` probes drawn one at a time, so the values do not depend on batching."""
    return torch.cat([random_probes(n, 1, dist, gen, dtype, device) for _ in range(count)], dim=1)


def _std_error(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.nan
    return float(samples.std(unbiased=True)) / math.sqrt(samples.numel())


def hutchinson(op: LinearOperator, n_probes: int, seed: Any = 0, dist: str = "rademacher",
               batch_size: int | None = None, progress: bool = False) -> TraceResult:
    """Hutchinson's estimator ``tr(A) ≈ (1/N) Σᵢ zᵢᵀ A zᵢ`` with ``E[z zᵀ] = I``.

    Source: Hutchinson (1989). Variance per probe: Rademacher ``2(‖A‖_F² − Σ A_ii²)``, Gaussian
    ``2‖A‖_F²`` (symmetric ``A``).

    Args:
        op: square :class:`LinearOperator` ``[n, n]``.
        n_probes: ``N ≥ 1`` probes (= products).
        seed: int or CPU ``torch.Generator``.
        dist: ``"rademacher"`` (±1) or ``"gaussian"``.
        batch_size: probes per ``matmat`` (default all); results do not depend on it.
        progress: tqdm progress bar over batches.

    Returns:
        :class:`TraceResult`.
    """
    op = check_operator(op)
    n = op.shape[0]
    n_probes = check_int(n_probes, "n_probes", minimum=1)
    dist = check_choice(dist, "dist", DISTS)
    bs = check_int(batch_size, "batch_size", minimum=1, allow_none=True) or n_probes
    gen = make_generator(seed)
    dtype, dev = work_dtype(op), op.device
    vals = []
    bar = progress_bar(progress, n_probes, "hutchinson")
    try:
        for a, b in batches(n_probes, bs):
            Z = _probes(n, b - a, dist, gen, dtype, dev)
            AZ = apply(op, Z, dtype, "hutchinson")
            vals.append((Z.double() * AZ.double()).sum(0).cpu())
            bar.update(b - a)
    finally:
        bar.close()
    samples = torch.cat(vals)
    return TraceResult(float(samples.mean()), _std_error(samples), n_probes, samples)


def hutchpp(op: LinearOperator, n_matvecs: int, seed: Any = 0, dist: str = "rademacher",
            progress: bool = False) -> TraceResult:
    """Hutch++: ``tr(A) ≈ tr(Qᵀ A Q) + (1/g) Σᵢ gᵢᵀ (I − QQᵀ) A (I − QQᵀ) gᵢ`` with ``Q = orth(A S)``.

    Source: Meyer, Musco, Musco & Woodruff, SOSA 2021 (Algorithm 1). The budget is split ``s = ⌊M/3⌋``
    columns of ``S`` (``s`` products for ``AS``, ``s`` for ``AQ``) and ``g = M − 2s`` Hutchinson probes on
    the deflated operator; relative error ``O(1/M)`` for PSD ``A`` versus ``O(1/√M)`` for Hutchinson.
    When ``s ≥ n`` the low-rank part is the whole space and the result is exact (``g = 0``).

    Args:
        op: square :class:`LinearOperator` ``[n, n]`` (the estimator is unbiased for any square ``A``; the
            error bound needs symmetric PSD).
        n_matvecs: total products ``M ≥ 3``.
        seed: int or CPU ``torch.Generator``.
        dist: probe distribution for ``S`` and ``G``.
        progress: tqdm progress bar over the three phases.

    Returns:
        :class:`TraceResult`; ``std_error`` is that of the deflated Hutchinson part.
    """
    op = check_operator(op)
    n = op.shape[0]
    M = check_int(n_matvecs, "n_matvecs", minimum=3)
    dist = check_choice(dist, "dist", DISTS)
    gen = make_generator(seed)
    dtype, dev = work_dtype(op), op.device
    s = min(M // 3, n)
    g = 0 if s == n else M - 2 * s
    bar = progress_bar(progress, 3, "hutch++")
    try:
        S = _probes(n, s, dist, gen, dtype, dev)
        Y = apply(op, S, dtype, "hutch++ sketch A S")
        bar.update()
        Q, _ = torch.linalg.qr(Y)
        AQ = apply(op, Q, dtype, "hutch++ A Q")
        bar.update()
        low = float((Q.double() * AQ.double()).sum())
        if g:
            G = _probes(n, g, dist, gen, dtype, dev)
            G = G - Q @ (Q.T @ G)
            AG = apply(op, G, dtype, "hutch++ deflated probes")
            samples = (G.double() * AG.double()).sum(0).cpu()
            rest, se = float(samples.mean()), _std_error(samples)
        else:
            samples = torch.zeros(0, dtype=torch.float64)
            rest, se = 0.0, 0.0
        bar.update()
    finally:
        bar.close()
    return TraceResult(low + rest, se, 2 * s + g, samples)
