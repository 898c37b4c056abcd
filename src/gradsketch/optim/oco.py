"""Online convex optimisation learners: S-AdaGrad and its baselines, plus an online logistic-regression regret run.

Every learner holds ``x [d]`` (float64) and takes ``step(g)`` with the gradient of the round's loss at the
current ``x``. Update rules (``H_t`` the running gradient statistics, ``δ > 0`` the initial ridge):

- :class:`OGD`: ``x ← x − η g / √t`` (Zinkevich 2003).
- :class:`DiagonalAdaGrad`: ``h ← h + g²``, ``x ← x − η g / √(h + δ)`` (Duchi, Hazan, Singer 2011).
- :class:`FullMatrixAdaGrad`: ``H ← H + g gᵀ``, ``x ← x − η (H + δ I)^(−1/2) g`` (Duchi et al. 2011).
- :class:`SAdaGrad`: ``H ≈ BᵀB + ρ I`` by Frequent Directions of rank ``k`` with escaped mass ``ρ``;
  ``x ← x − η (BᵀB + (ρ + δ) I)^(−1/2) g`` (Feinberg et al. 2023, Alg. 2).
- :class:`AdaFD`: ``x ← x − η (δ I + (BᵀB)^(1/2))^(−1) g`` (Wan & Zhang, IJCAI 2018).
- :class:`FDSON`: online Newton step with a sketch of ``Σ g gᵀ / (η √s)``:
  ``x ← x − (δ I + BᵀB)^(−1) g`` (Luo, Agarwal, Cesa-Bianchi, Langford 2016, with the learning-rate
  parameterisation of the Sketchy authors' OCO code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..linalg.frequent_directions import fd_shrink, low_rank_inverse_root

__all__ = ["OGD", "DiagonalAdaGrad", "FullMatrixAdaGrad", "SAdaGrad", "AdaFD", "FDSON", "OnlineLearner",
           "RegretResult", "online_logistic_regret"]


def _pos(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


class OnlineLearner:
    """Base class: ``x [d]`` float64 starting at zero, ``step(g [d])`` updates it. ``t`` counts rounds."""

    def __init__(self, d: int, lr: float, delta: float = 1e-6) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d: expected an integer >= 1, got {d!r}")
        self.d, self.lr, self.delta = d, _pos(lr, "lr"), _pos(delta, "delta")
        self.x = torch.zeros(d, dtype=torch.float64)
        self.t = 0

    def _check(self, g: Any) -> Tensor:
        if not isinstance(g, Tensor):
            raise TypeError(f"g: expected a torch.Tensor, got {type(g).__name__}")
        if g.shape != (self.d,):
            raise ValueError(f"g: expected shape [{self.d}], got {tuple(g.shape)}")
        g = g.to(torch.float64)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("g: expected finite values, got NaN or Inf")
        self.t += 1
        return g

    def step(self, g: Tensor) -> None:
        """Take one round's gradient ``g [d]`` at the current ``x``."""
        raise NotImplementedError


class OGD(OnlineLearner):
    """Online gradient descent ``x ← x − η g/√t``.

    Example:
        >>> L = OGD(2, lr=1.0); L.step(torch.tensor([1.0, 0.0])); L.x.tolist()
        [-1.0, 0.0]
    """

    def step(self, g: Tensor) -> None:
        g = self._check(g)
        self.x -= self.lr * g / math.sqrt(self.t)


class DiagonalAdaGrad(OnlineLearner):
    """Diagonal AdaGrad ``h ← h + g²``, ``x ← x − η g/√(h + δ)``.

    Example:
        >>> L = DiagonalAdaGrad(2, lr=1.0, delta=1e-12); L.step(torch.tensor([2.0, 0.0]))
        >>> [round(v, 6) for v in L.x.tolist()]
        [-1.0, 0.0]
    """

    def __init__(self, d: int, lr: float, delta: float = 1e-6) -> None:
        super().__init__(d, lr, delta)
        self.h = torch.zeros(d, dtype=torch.float64)

    def step(self, g: Tensor) -> None:
        g = self._check(g)
        self.h += g * g
        self.x -= self.lr * g / (self.h + self.delta).sqrt()


class FullMatrixAdaGrad(OnlineLearner):
    """Full-matrix AdaGrad ``H ← H + g gᵀ``, ``x ← x − η (H + δI)^(−1/2) g`` (one ``eigh`` per round).

    Example:
        >>> L = FullMatrixAdaGrad(2, lr=1.0, delta=1e-12); L.step(torch.tensor([3.0, 4.0]))
        >>> [round(v, 6) for v in L.x.tolist()]
        [-0.6, -0.8]
    """

    def __init__(self, d: int, lr: float, delta: float = 1e-6) -> None:
        super().__init__(d, lr, delta)
        self.H = torch.zeros(d, d, dtype=torch.float64)

    def step(self, g: Tensor) -> None:
        g = self._check(g)
        self.H += torch.outer(g, g)
        lam, Q = torch.linalg.eigh(self.H)
        self.x -= self.lr * (Q @ ((Q.T @ g) * (lam.clamp_min(0) + self.delta) ** -0.5))


class _Sketched(OnlineLearner):
    def __init__(self, d: int, rank: int, lr: float, delta: float = 1e-6) -> None:
        super().__init__(d, lr, delta)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected an integer >= 1, got {rank!r}")
        if rank >= d:
            raise ValueError(f"rank: expected an integer < d = {d} (a sketch of rank >= d is full-matrix "
                             f"AdaGrad; use FullMatrixAdaGrad), got {rank}")
        self.rank = rank
        self.vals = torch.zeros(rank, dtype=torch.float64)
        self.vecs = torch.zeros(d, rank, dtype=torch.float64)
        self.rho = 0.0

    def _sketch(self, row: Tensor) -> None:
        B = self.vals.sqrt()[:, None] * self.vecs.T
        self.vals, self.vecs, delta = fd_shrink(torch.cat([B, row[None]]), self.rank)
        self.rho += float(delta)


class SAdaGrad(_Sketched):
    """S-AdaGrad: ``x ← x − η (BᵀB + (ρ + δ) I)^(−1/2) g`` with a rank-``k`` FD sketch ``B`` of ``Σ g gᵀ``.

    Memory ``O(k d)``; one ``(k+1) × d`` SVD per round (Feinberg et al. 2023, Alg. 2).

    Example:
        >>> L = SAdaGrad(3, rank=1, lr=1.0, delta=1e-12); L.step(torch.tensor([3.0, 4.0, 0.0]))
        >>> [round(v, 6) for v in L.x.tolist()]
        [-0.6, -0.8, 0.0]
    """

    def step(self, g: Tensor) -> None:
        g = self._check(g)
        self._sketch(g)
        self.x -= self.lr * low_rank_inverse_root(self.vecs, self.vals, self.rho + self.delta, g, 2)


class AdaFD(_Sketched):
    """Ada-FD: ``x ← x − η (δ I + (BᵀB)^(1/2))^(−1) g`` (Wan & Zhang 2018; escaped mass not used).

    Example:
        >>> L = AdaFD(3, rank=1, lr=1.0, delta=1.0); L.step(torch.tensor([3.0, 4.0, 0.0]))
        >>> [round(v, 6) for v in L.x.tolist()]  # −g/(δ + ‖g‖)
        [-0.5, -0.666667, 0.0]
    """

    def step(self, g: Tensor) -> None:
        g = self._check(g)
        self._sketch(g)
        c = self.vecs.T @ g
        inside = self.vecs @ (c / (self.delta + self.vals.sqrt()))
        self.x -= self.lr * (inside + (g - self.vecs @ c) / self.delta)


class FDSON(_Sketched):
    """FD-SON: online Newton step ``x ← x − (δ I + BᵀB)^(−1) g``, ``B`` sketching rows ``g_s/√(η √s)``.

    Example:
        >>> L = FDSON(3, rank=1, lr=1.0, delta=1e-12); L.step(torch.tensor([1.0, 0.0, 0.0]))
        >>> [round(v, 6) for v in L.x.tolist()]
        [-1.0, 0.0, 0.0]
    """

    def step(self, g: Tensor) -> None:
        g = self._check(g)
        self._sketch(g / math.sqrt(self.lr * math.sqrt(self.t)))
        self.x -= low_rank_inverse_root(self.vecs, self.vals, self.delta, g, 1)


@dataclass
class RegretResult:
    """``cumulative_loss [T]`` of the learner, ``comparator_loss [T]`` of the best fixed ``w*`` in
    hindsight, and ``regret [T] = cumulative_loss − comparator_loss``."""

    cumulative_loss: np.ndarray
    comparator_loss: np.ndarray

    @property
    def regret(self) -> np.ndarray:
        return self.cumulative_loss - self.comparator_loss


def _logloss(z: Tensor) -> Tensor:
    return torch.nn.functional.softplus(-z)


def online_logistic_regret(learner: OnlineLearner, X: Tensor, y: Tensor, w_star: Tensor) -> RegretResult:
    """Play rounds ``t = 1..T`` of online logistic regression, ``ℓ_t(w) = log(1 + exp(−y_t wᵀx_t))``.

    Args:
        learner: a fresh learner with ``d`` matching ``X``.
        X: ``[T, d]`` features; y: ``[T]`` labels in ``{−1, +1}``; w_star: ``[d]`` the comparator
        (e.g. the minimiser of ``Σ_t ℓ_t``, computed offline).

    Returns:
        :class:`RegretResult` with running sums over rounds.

    Example:
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64); y = torch.tensor([1.0, -1.0])
        >>> r = online_logistic_regret(OGD(2, lr=0.5), X, y, torch.zeros(2, dtype=torch.float64))
        >>> [round(v, 6) for v in r.regret.tolist()]
        [0.0, 0.0]
    """
    X, y, w_star = X.to(torch.float64), y.to(torch.float64), w_star.to(torch.float64)
    if X.ndim != 2 or X.shape[1] != learner.d:
        raise ValueError(f"X: expected shape [T, {learner.d}], got {tuple(X.shape)}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y: expected shape [{X.shape[0]}], got {tuple(y.shape)}")
    losses = np.empty(X.shape[0])
    for t in range(X.shape[0]):
        z = y[t] * (X[t] @ learner.x)
        losses[t] = float(_logloss(z))
        learner.step(-y[t] * torch.sigmoid(-z) * X[t])
    comp = _logloss(y * (X @ w_star)).numpy()
    return RegretResult(np.cumsum(losses), np.cumsum(comp))
