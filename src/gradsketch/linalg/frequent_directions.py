"""Frequent Directions: a deterministic, mergeable streaming sketch of ``AᵀA``.

Sources: E. Liberty, "Simple and deterministic matrix sketching", KDD 2013; M. Ghashami, E. Liberty,
J. M. Phillips, D. P. Woodruff, "Frequent Directions: simple and deterministic matrix sketching",
SIAM J. Comput. 2016 (the fast 2ℓ-buffer variant and the bound below); L. Luo, C. Chen, Z. Zhang, W.-J. Li,
T. Zhang, "Robust Frequent Directions with application in online learning", JMLR 2019 (escaped mass).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._validate import check_bool, check_int


class FrequentDirections:
    """Streaming sketch ``B [ℓ, d]`` of the rows ``a_i ∈ ℝ^d`` of ``A`` with
    ``0 ≼ AᵀA − BᵀB ≼ ρ I`` and ``ρ ≤ ‖A − A_k‖_F² / (ℓ + 1 − k)`` for every ``k ≤ ℓ``.

    Fast variant (Ghashami et al. 2016, Alg. 2): rows fill a ``2ℓ × d`` buffer; when it is full,
    ``B = U Σ Vᵀ``, ``δ = σ_{ℓ+1}²``, ``B ← sqrt(max(Σ² − δ, 0)) Vᵀ`` (ℓ rows survive, ℓ are freed). The
    escaped mass ``ρ = Σ δ`` (robust FD, Luo et al. 2019) bounds the error; ``BᵀB + (ρ/2) I`` is the robust
    estimate. Amortised cost ``O(d ℓ)`` per row. Sketches with the same ``(ℓ, d)`` merge (Agarwal et al.,
    "Mergeable summaries", 2012): the merged sketch obeys the same bound for the stacked rows.

    Args:
        ell: sketch rows ``ℓ ≥ 1``.
        d: row dimension ``d ≥ 1``.
        dtype: ``torch.float32`` or ``torch.float64`` (default).
        device: where the buffer lives.
    """

    def __init__(self, ell: int, d: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> None:
        self.ell = check_int(ell, "ell", minimum=1)
        self.d = check_int(d, "d", minimum=1)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        self._buf = torch.zeros(2 * self.ell, self.d, dtype=dtype, device=self.device)
        self._filled = 0
        self._rho = 0.0
        self.n_seen = 0
        self.squared_frobenius = 0.0  # ‖A‖_F² of everything seen

    # -----------------------------------------------------------------------------------------------
    def _shrink(self, rows: Tensor) -> tuple[Tensor, float]:
        """SVD-shrink ``rows [r, d]`` to at most ``ℓ`` non-zero rows; returns ``(rows [ℓ, d], δ)``."""
        _, S, Vh = torch.linalg.svd(rows, full_matrices=False)
        delta = float(S[self.ell] ** 2) if S.numel() > self.ell else 0.0
        keep = min(self.ell, S.numel())
        s = (S[:keep] ** 2 - delta).clamp_min(0).sqrt()
        out = torch.zeros(self.ell, self.d, dtype=self.dtype, device=self.device)
        out[:keep] = s[:, None] * Vh[:keep]
        return out, delta

    def update(self, rows: Tensor) -> FrequentDirections:
        """Add rows ``[b, d]`` (or one row ``[d]``); returns ``self``."""
        if not isinstance(rows, Tensor):
            raise TypeError(f"rows: expected a torch.Tensor, got {type(rows).__name__}")
        if rows.ndim == 1:
            rows = rows[None]
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"rows: expected shape [b, {self.d}] or [{self.d}], got {tuple(rows.shape)}")
        if rows.is_complex() or not rows.is_floating_point():
            raise TypeError(f"rows: expected a real floating-point tensor, got dtype {rows.dtype}")
        rows = rows.detach().to(self.device, self.dtype)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("rows: expected finite values, got NaN or Inf")
        self.n_seen += rows.shape[0]
        self.squared_frobenius += float((rows.double() ** 2).sum())
        start = 0
        while start < rows.shape[0]:
            if self._filled == 2 * self.ell:
                shrunk, delta = self._shrink(self._buf)
                self._buf.zero_()
                self._buf[: self.ell] = shrunk
                self._filled = self.ell
                self._rho += delta
            take = min(2 * self.ell - self._filled, rows.shape[0] - start)
            self._buf[self._filled: self._filled + take] = rows[start: start + take]
            self._filled += take
            start += take
        return self

    def _compact(self) -> tuple[Tensor, float]:
        if self._filled <= self.ell:
            return self._buf[: self.ell].clone(), 0.0
        return self._shrink(self._buf[: self._filled])

    @property
    def sketch(self) -> Tensor:
        """``B [ℓ, d]`` (the buffer compacted to ℓ rows; the stream state is not changed)."""
        return self._compact()[0]

    @property
    def escaped_mass(self) -> float:
        """``ρ = Σ δ``: ``‖AᵀA − BᵀB‖₂ ≤ ρ`` for ``B = self.sketch``."""
        return self._rho + self._compact()[1]

    def covariance(self, robust: bool = False) -> Tensor:
        """``BᵀB [d, d]`` (``+ (ρ/2) I`` when ``robust``), an estimate of ``AᵀA`` (small ``d`` only)."""
        check_bool(robust, "robust")
        B, delta = self._compact()
        C = B.T @ B
        if robust:
            C = C + 0.5 * (self._rho + delta) * torch.eye(self.d, dtype=self.dtype, device=self.device)
        return C

    def merge(self, other: Any) -> FrequentDirections:
        """Fold another sketch with the same ``(ℓ, d)`` into this one; returns ``self``."""
        if not isinstance(other, FrequentDirections):
            raise TypeError(f"other: expected a FrequentDirections, got {type(other).__name__}")
        if (other.ell, other.d) != (self.ell, self.d):
            raise ValueError(f"other: expected a sketch with (ell, d) = {(self.ell, self.d)}, "
                             f"got {(other.ell, other.d)}")
        B, delta = other._compact()
        n_seen, fro = self.n_seen + other.n_seen, self.squared_frobenius + other.squared_frobenius
        self.update(B)
        self._rho += other._rho + delta
        self.n_seen, self.squared_frobenius = n_seen, fro
        return self

    def __repr__(self) -> str:
        return (f"FrequentDirections(ell={self.ell}, d={self.d}, n_seen={self.n_seen}, "
                f"escaped_mass={self.escaped_mass:.4g})")
