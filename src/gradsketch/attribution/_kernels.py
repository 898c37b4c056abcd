"""Symmetric "kernels" M between feature rows: score(x, z) = φ(x)ᵀ M φ(z).

* :class:`EigKernel`: M = V diag(c) Vᵀ (V [d, r] orthonormal, or V = None for a diagonal M = diag(c));
  covers the TRAK inverse (ΦᵀΦ + λI)⁻¹, the explicit influence inverse (H + λI)⁻¹ and Arnoldi's
  Σ_i v_i v_iᵀ / λ_i.
* :class:`CholKernel`: M = (K + λI)⁻¹ from a Cholesky factor (positive definite K + λI).
* :class:`GramKernel`: M = (FᵀF + λI)⁻¹ for training features F [n, d] with d > n, through the n × n Gram
  matrix FFᵀ (Woodbury): O(n²d + n³) instead of O(d²n + d³).
* :class:`SolveKernel`: M = (A + λI)⁻¹ applied by CG or LiSSA (``gradsketch.linalg``).
* ``None``: the identity (gradient dot products).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EigKernel:
    """M = V diag(c) Vᵀ; ``V = None`` means M = diag(c) (features already in the eigenbasis)."""

    def __init__(self, c: Tensor, V: Tensor | None = None) -> None:
        self.c = c.to(torch.float64)
        self.V = None if V is None else V.to(torch.float64)

    @classmethod
    def inverse(cls, K: Tensor, damping: float) -> Any:
        """(K + λI)⁻¹ for a symmetric K [d, d]: a Cholesky factorisation when K + λI is positive definite
        (:class:`CholKernel`, ~30× faster than eigh at d = 2048), else eigh with a pseudo-inverse on exactly
        singular directions (indefinite Hessians)."""
        K = K.detach().to("cpu", torch.float64)
        A = K.clone()  # Cholesky reads only the lower triangle, which is symmetric by construction
        A.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
            return CholKernel(L)
        w, V = torch.linalg.eigh((K + K.T) / 2)
        w = w + damping
        tiny = float(w.abs().max()) * K.shape[0] * torch.finfo(torch.float64).eps if w.numel() else 0.0
        c = torch.where(w.abs() > tiny, 1.0 / w, torch.zeros_like(w))
        return cls(c, V)

    def apply(self, phi: Tensor) -> Tensor:
        """[m, d] -> [m, d] rows of M φ (float64)."""
        phi = phi.to(torch.float64)
        if self.V is None:
            return phi * self.c.to(phi.device)
        V = self.V.to(phi.device)
        return ((phi @ V) * self.c.to(phi.device)) @ V.T

    def quad(self, phi: Tensor) -> Tensor:
        """[m, d] -> [m]: φᵀ M φ per row."""
        phi = phi.to(torch.float64)
        if self.V is None:
            return (phi * phi * self.c.to(phi.device)).sum(1)
        p = phi @ self.V.to(phi.device)
        return (p * p * self.c.to(phi.device)).sum(1)


class CholKernel:
    """M = (L Lᵀ)⁻¹ from a Cholesky factor ``L [d, d]`` (float64)."""

    def __init__(self, L: Tensor) -> None:
        self.L = L

    def apply(self, phi: Tensor) -> Tensor:
        return torch.cholesky_solve(phi.to(torch.float64).T, self.L).T

    def quad(self, phi: Tensor) -> Tensor:
        z = torch.linalg.solve_triangular(self.L, phi.to(torch.float64).T, upper=False)
        return (z * z).sum(0)


class GramKernel:
    """M = (FᵀF + λI)⁻¹ (λ > 0) for features F [n, d], applied through the Gram matrix G = FFᵀ [n, n]:

        M φ = (φ − Fᵀ (G + λI)⁻¹ F φ) / λ                      (Woodbury)

    so that F M φ = (G + λI)⁻¹ F φ and φ_zᵀ M φ_z = [G (G + λI)⁻¹]_zz for a training row z. The large products
    (G, Fφ, Fᵀc) run in the features' own precision (float32 features: float32 GEMMs; they are stored in
    float16/float32 anyway), the n × n factorisation and solves in float64. The subtraction loses about
    eps · ‖G‖ / λ relative accuracy, which :func:`trak_kernel` bounds by using this form only for
    λ ≥ 1e-8 · tr(G)."""

    def __init__(self, F: Tensor, damping: float, G: Tensor | None = None) -> None:
        self.F = F.detach().to("cpu")
        if self.F.dtype not in (torch.float32, torch.float64):
            self.F = self.F.to(torch.float32)
        self.damping = float(damping)
        A = (self.F @ self.F.T if G is None else G).to(torch.float64)
        A.diagonal().add_(self.damping)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise FloatingPointError(f"ridge: the Gram matrix FFᵀ + λI (λ = {self.damping:.3g}) is not positive "
                                     "definite in float64; expected a positive ridge and finite features")
        self.L = L

    def _u(self, phi: Tensor) -> Tensor:
        return (self.F @ phi.to(self.F.dtype).T).to(torch.float64)  # [n, m]

    def apply(self, phi: Tensor) -> Tensor:
        c = torch.cholesky_solve(self._u(phi), self.L)  # [n, m] float64
        back = (self.F.T @ c.to(self.F.dtype)).T.to(torch.float64)
        return (phi.to(torch.float64) - back) / self.damping

    def quad(self, phi: Tensor) -> Tensor:
        z = torch.linalg.solve_triangular(self.L, self._u(phi), upper=False)
        p = phi.to(torch.float64)
        return ((p * p).sum(1) - (z * z).sum(0)) / self.damping


def gram(F: Tensor) -> Tensor:
    """FFᵀ [n, n] in float64, computed with a GEMM in F's precision (float32 or float64)."""
    F = F.detach().to("cpu")
    if F.dtype not in (torch.float32, torch.float64):
        F = F.to(torch.float32)
    return (F @ F.T).to(torch.float64)


def trak_kernel(F: Tensor, damping: float, G: Tensor | None = None) -> Any:
    """(FᵀF + λI)⁻¹ for training features F [n, d] (on the CPU; float32 or float64): the Gram form
    (:class:`GramKernel`; ``G`` = FFᵀ if already computed) when d > n and λ ≥ 1e-8 · tr(FᵀF), else a d × d
    Cholesky / eigh (:meth:`EigKernel.inverse`, float64)."""
    n, d = F.shape
    F = F.detach().to("cpu")
    if d > n and damping > 0:
        G = gram(F) if G is None else G
        if damping >= 1e-8 * float(torch.trace(G)):
            return GramKernel(F, damping, G)
    F = F.to(torch.float64)
    return EigKernel.inverse(F.T @ F, damping)


class SolveKernel:
    """M = (A + λI)⁻¹ by conjugate gradients or LiSSA on a LinearOperator A [d, d]."""

    def __init__(self, op: Any, damping: float, solver: str, options: dict) -> None:
        self.op, self.damping, self.solver, self.options = op, float(damping), solver, dict(options)

    def apply(self, phi: Tensor) -> Tensor:
        from ..linalg import cg, lissa

        B = phi.to(self.op.dtype).T.contiguous()
        if self.solver == "cg":
            res = cg(self.op, B, damping=self.damping, tol=self.options.get("tol"),
                     maxiter=self.options.get("maxiter"))
        else:
            # LiSSA solves (A + d·s·I) x = b: pick d = λ / s for the requested damping λ
            scale = self.options.get("scale")
            if scale is None:
                from ..linalg import lanczos

                r = lanczos(self.op, 1, "LM", n_iter=min(self.op.shape[0], 20), tol=0.0, seed=0,
                            check_symmetric=False, exact_residuals=False)
                scale = 1.1 * float(r.eigenvalues.abs()[0]) + self.damping
            d = self.damping / scale
            res = lissa(self.op, B, damping=d, scale=scale, depth=self.options.get("depth", 1000),
                        tol=self.options.get("tol"))
        return res.x.T.to(torch.float64)

    def quad(self, phi: Tensor) -> Tensor:
        return (self.apply(phi) * phi.to(torch.float64)).sum(1)


def apply_kernel(kernel: Any, phi: Tensor) -> Tensor:
    return phi.to(torch.float64) if kernel is None else kernel.apply(phi)


def quad_kernel(kernel: Any, phi: Tensor) -> Tensor:
    if kernel is None:
        p = phi.to(torch.float64)
        return (p * p).sum(1)
    return kernel.quad(phi)
