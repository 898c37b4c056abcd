"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

Sources: G. H. Golub & G. Meurant, *Matrices, Moments and Quadrature* (1994/2010): ``vᵀ f(A) v ≈
Σ_k (Y[0,k])² f(θ_k)`` for the Lanczos tridiagonal ``T_m = Y Θ Yᵀ`` started at ``v``; S. Ubaru, J. Chen,
Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIMAX 2017; B. Ghorbani,
S. Krishnan, Y. Xiao, "An investigation into neural net optimization via Hessian eigenvalue density",
ICML 2019 (Gaussian smoothing of the node/weight measure for Hessian spectra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validate import (
    apply,
    batches,
    check_choice,
    check_int,
    check_operator,
    check_real,
    check_tensor,
    make_generator,
    progress_bar,
    random_probes,
    work_dtype,
)
from .lanczos import check_symmetry, tridiag_eig
from .operator import LinearOperator


@dataclass
class SLQResult:
    """Nodes and weights of the SLQ estimate of the spectral measure ``μ = (1/n) Σᵢ δ(λ − λᵢ)``.

    ``μ ≈ (1/P) Σ_p Σ_k w_pk δ(λ − θ_pk)``. Each probe's weights sum to 1; a probe whose Krylov space
    became invariant before ``n_steps`` has exact quadrature and zero-weight padding.

    Attributes:
        nodes: ``[P, m]`` Ritz values ``θ_pk`` per probe (float64, CPU).
        weights: ``[P, m]`` ``(Y[0,k])²`` per probe (float64, CPU).
        n: dimension of the operator.
        n_matvec: operator products spent.
    """

    nodes: Tensor
    weights: Tensor
    n: int
    n_matvec: int

    def __repr__(self) -> str:
        lo, hi = self.spectral_range
        return (f"SLQResult(n_probes={self.nodes.shape[0]}, n_steps={self.nodes.shape[1]}, n={self.n}, "
                f"range=[{lo:.6g}, {hi:.6g}], n_matvec={self.n_matvec})")

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        P = self.nodes.shape[0]
        w = self.weights.numpy().ravel() / P
        x = self.nodes.numpy().ravel()
        keep = w > 0
        return x[keep], w[keep]

    @property
    def spectral_range(self) -> tuple[float, float]:
        """``(min θ, max θ)`` over nodes of positive weight (the Ritz values bracket the spectrum)."""
        x, _ = self._flat()
        return float(x.min()), float(x.max())

    def default_sigma(self, rel_sigma: float = 0.01) -> float:
        lo, hi = self.spectral_range
        width = hi - lo
        return rel_sigma * (width if width > 0 else max(abs(hi), 1.0))

    def density(self, grid: Tensor | np.ndarray | None = None, sigma: float | None = None,
                kernel: str = "gaussian", rel_sigma: float = 0.01, n_grid: int = 1000
                ) -> tuple[Tensor, Tensor]:
        """Smoothed spectral density ``φ(x) = (1/P) Σ_p Σ_k w_pk K_σ(x − θ_pk)``.

        Kernel width convention: ``sigma`` is an absolute width in eigenvalue units: the standard
        deviation of the Gaussian ``K_σ(t) = exp(−t²/2σ²)/(σ√(2π))``, or the half-width at half-maximum of
        the Lorentzian ``K_σ(t) = σ/(π(t² + σ²))``. Default ``sigma = rel_sigma · (max θ − min θ)`` with
        ``rel_sigma = 0.01`` (1% of the estimated spectral range). Both kernels integrate to 1 over ℝ, so
        ``φ`` integrates to ~1 on the default grid ``[min θ − 6σ, max θ + 6σ]`` (Gaussian).

        Args:
            grid: points ``x`` (1-D); default ``n_grid`` equispaced points over the range above.
            sigma: absolute kernel width ``> 0``; overrides ``rel_sigma``.
            kernel: ``"gaussian"`` or ``"lorentzian"``.
            rel_sigma: width as a fraction of the spectral range, used when ``sigma`` is None.
            n_grid: number of default grid points.

        Returns:
            ``(grid [G], density [G])``, float64 CPU tensors.
        """
        kernel = check_choice(kernel, "kernel", ("gaussian", "lorentzian"))
        rel_sigma = check_real(rel_sigma, "rel_sigma", minimum=0.0, min_inclusive=False)
        sigma = check_real(sigma, "sigma", minimum=0.0, min_inclusive=False, allow_none=True)
        if sigma is None:
            sigma = self.default_sigma(rel_sigma)
        x, w = self._flat()
        if grid is None:
            n_grid = check_int(n_grid, "n_grid", minimum=2)
            lo, hi = self.spectral_range
            g = np.linspace(lo - 6 * sigma, hi + 6 * sigma, n_grid)
        else:
            if not isinstance(grid, (Tensor, np.ndarray)):
                raise TypeError("grid: expected a 1-D torch.Tensor or numpy array, got "
                                f"{type(grid).__name__}")
            g = np.asarray(grid.detach().cpu() if isinstance(grid, Tensor) else grid, dtype=np.float64)
            if g.ndim != 1 or g.size == 0 or not np.all(np.isfinite(g)):
                raise ValueError(f"grid: expected a non-empty finite 1-D array, got shape {g.shape}")
        t = g[:, None] - x[None, :]
        if kernel == "gaussian":
            K = np.exp(-0.5 * (t / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        else:
            K = sigma / (math.pi * (t * t + sigma * sigma))
        return torch.from_numpy(g), torch.from_numpy(K @ w)

    def cdf(self, x: Tensor | np.ndarray | float) -> Tensor:
        """Unsmoothed estimate of the eigenvalue CDF ``F(x) = #{λᵢ ≤ x}/n`` at the points ``x``."""
        xs = np.atleast_1d(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64))
        nodes, w = self._flat()
        order = np.argsort(nodes)
        cum = np.concatenate([[0.0], np.cumsum(w[order])])
        pos = np.searchsorted(nodes[order], xs, side="right")
        return torch.from_numpy(cum[pos])

    def moment(self, p: int) -> float:
        """``(1/P) Σ_p Σ_k w_pk θ_pk^p ≈ tr(A^p)/n`` (exact per probe in expectation for ``p ≤ 2m − 1``)."""
        p = check_int(p, "p", minimum=0)
        x, w = self._flat()
        return float(np.sum(w * x**p))

    def trace(self) -> float:
        """``n · moment(1)``: an estimate of ``tr(A)``."""
        return self.n * self.moment(1)


def slq(op: LinearOperator, n_probes: int = 10, n_steps: int = 80, seed: Any = 0, dist: str = "rademacher",
        batch_size: int | None = None, check_symmetric: bool | float = True,
        progress: bool = False) -> SLQResult:
    """Stochastic Lanczos quadrature: for each probe ``v = z/‖z‖``, ``m`` Lanczos steps with full
    re-orthogonalisation give ``T_m = Y Θ Yᵀ``; nodes ``θ_k``, weights ``Y[0,k]²``.

    Source: Golub & Meurant (1994); Ubaru, Chen & Saad, SIMAX 2017; Ghorbani et al., ICML 2019.

    Args:
        op: symmetric :class:`LinearOperator` ``[n, n]``.
        n_probes: ``P ≥ 1`` random probes.
        n_steps: Lanczos steps ``m ≥ 1`` per probe (clamped to ``n``); a probe stops early when its
            Krylov space becomes invariant (then its quadrature is exact).
        seed: int or CPU ``torch.Generator``.
        dist: ``"rademacher"`` or ``"gaussian"`` probes.
        batch_size: probes run together as one block of independent Lanczos recurrences (one ``matmat``
            per step); default all ``P``. Memory: ``batch_size · (m+1) · n`` numbers.
        check_symmetric: as in :func:`gradsketch.linalg.lanczos`.
        progress: tqdm progress bar over steps.

    Returns:
        :class:`SLQResult` with ``.density()``, ``.cdf()``, ``.moment()``, ``.trace()``.
    """
    op = check_operator(op)
    n = op.shape[0]
    P = check_int(n_probes, "n_probes", minimum=1)
    m = min(n, check_int(n_steps, "n_steps", minimum=1))
    dist = check_choice(dist, "dist", ("rademacher", "gaussian"))
    bs = check_int(batch_size, "batch_size", minimum=1, allow_none=True) or P
    gen = make_generator(seed)
    dtype, dev = work_dtype(op), op.device
    n_matvec = check_symmetry(op, check_symmetric, gen, "slq()")
    V0 = torch.cat([random_probes(n, 1, dist, gen, dtype, dev) for _ in range(P)], dim=1)
    nodes = np.zeros((P, m))
    weights = np.zeros((P, m))
    bar = progress_bar(progress, P * m, "slq")
    try:
        for a, b in batches(P, bs):
            alpha, beta, length, used = block_lanczos_tridiag(op, V0[:, a:b], m, bar)
            n_matvec += used
            for i in range(b - a):
                L = int(length[i])
                theta, Y = tridiag_eig(list(alpha[i, :L]), list(beta[i, : L - 1]))
                nodes[a + i, :L] = theta
                weights[a + i, :L] = Y[0] ** 2
    finally:
        bar.close()
    return SLQResult(torch.from_numpy(nodes), torch.from_numpy(weights), n, n_matvec)


def block_lanczos_tridiag(op: LinearOperator, V0: Tensor, m: int, bar: Any = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``b`` independent Lanczos recurrences (full re-orthogonalisation, each against its own basis)
    started at the columns of ``V0 [n, b]``, sharing one ``matmat`` per step.

    Returns ``(alpha [b, m], beta [b, m], length [b], n_matvec)``: the tridiagonal of probe ``i`` is
    ``alpha[i, :L]``, ``beta[i, :L-1]`` with ``L = length[i]`` (``< m`` after a breakdown).
    """
    dtype, dev = work_dtype(op), op.device
    n, b = V0.shape
    V0 = check_tensor(V0, "V0", n, dtype, dev, ndims=(2,))
    norms = V0.norm(dim=0)
    if bool((norms == 0).any()):
        raise ValueError("V0: expected non-zero start vectors, got a zero column")
    eps = float(torch.finfo(dtype).eps)
    Q = torch.zeros(b, m, n, dtype=dtype, device=dev)
    Q[:, 0] = (V0 / norms).T
    alpha = np.zeros((b, m))
    beta = np.zeros((b, m))
    length = np.zeros(b, dtype=np.int64)
    anorm = torch.zeros(b, dtype=dtype, device=dev)
    active = torch.arange(b, device=dev)
    n_matvec = 0
    for j in range(m):
        full = active.numel() == b
        Qa = Q[:, : j + 1] if full else Q[active, : j + 1]
        W = apply(op, Qa[:, j].T.contiguous(), dtype, f"SLQ step {j + 1}").T
        n_matvec += active.numel()
        anorm[active] = torch.maximum(anorm[active], W.norm(dim=1))
        coef = torch.zeros(active.numel(), j + 1, dtype=dtype, device=dev)
        for _ in range(2):
            C = torch.einsum("ajn,an->aj", Qa, W)
            W = W - torch.einsum("ajn,aj->an", Qa, C)
            coef += C
        idx = active.cpu().numpy()
        alpha[idx, j] = coef[:, j].double().cpu().numpy()
        length[idx] = j + 1
        if bar is not None:
            bar.update(active.numel())
        if j + 1 == m:
            break
        bn = W.norm(dim=1)
        ok = bn > 100 * eps * anorm[active]
        beta[idx, j] = torch.where(ok, bn, torch.zeros_like(bn)).double().cpu().numpy()
        Q[active[ok], j + 1] = W[ok] / bn[ok, None]
        active = active[ok]
        if active.numel() == 0:
            break
    return alpha, beta, length, n_matvec
