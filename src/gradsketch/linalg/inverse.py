"""Inverse operators ``(A + λI)⁻¹``: :func:`inverse` chooses a dense factorisation (Cholesky/eigh,
:func:`~gradsketch.linalg.operator.dense_inverse`) or an iterative solver per product
(:class:`CGInverse`, :class:`LiSSAInverse`); all take the same damping λ ≥ 0, the ridge actually added.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from .._validation import check_choice, check_real
from .lanczos import lanczos
from .operator import LinearOperator, MatrixOperator, _square, dense_inverse
from .solvers import cg, lissa

INVERSE_METHODS = ("auto", "cholesky", "eigh", "cg", "lissa")


class CGInverse(LinearOperator):
    """``(A + λI)⁻¹`` applied by conjugate gradients (:func:`gradsketch.linalg.cg`): needs ``A + λI``
    symmetric positive definite (an indefinite system raises ``ValueError`` naming ``damping``).

    >>> import torch
    >>> from gradsketch.linalg import MatrixOperator
    >>> A = MatrixOperator(torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    >>> (CGInverse(A, 0.0) @ torch.tensor([2.0, 4.0], dtype=torch.float64)).tolist()
    [1.0, 1.0]
    """

    def __init__(self, op: LinearOperator, damping: float = 0.0, tol: float | None = None,
                 maxiter: int | None = None) -> None:
        _square(op)
        super().__init__(op.shape, op.dtype, op.device, symmetric=True)
        self.op, self.damping, self.tol, self.maxiter = op, check_real(damping, "damping", minimum=0.0), tol, maxiter

    def _matmat(self, V: Tensor) -> Tensor:
        r = cg(self.op, V.to(self.op.dtype), damping=self.damping, tol=self.tol, maxiter=self.maxiter)
        if not bool(r.converged.all()):
            warnings.warn(f"maxiter: CG did not converge in {r.n_iter} iterations (damping = {self.damping:g}; "
                          f"relative residual up to {float(r.residual_norms.max()):.3g}); expected a larger maxiter "
                          "or damping", RuntimeWarning, stacklevel=3)
        return r.x


class LiSSAInverse(LinearOperator):
    """``(A + λI)⁻¹`` applied by LiSSA (:func:`gradsketch.linalg.lissa`) with the requested damping λ:
    LiSSA solves ``(A + d·s·I) x = b``, so ``d = λ / s`` for the scale ``s`` (default
    ``1.1·|λ|_max(A) + λ`` from 20 Lanczos steps, computed once).

    >>> import torch
    >>> from gradsketch.linalg import MatrixOperator
    >>> A = MatrixOperator(torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    >>> (LiSSAInverse(A, 0.0, depth=5000) @ torch.tensor([2.0, 4.0], dtype=torch.float64)).round(decimals=4).tolist()
    [1.0, 1.0]
    """

    def __init__(self, op: LinearOperator, damping: float = 0.0, scale: float | None = None, depth: int = 1000,
                 tol: float | None = None) -> None:
        _square(op)
        super().__init__(op.shape, op.dtype, op.device, symmetric=True)
        self.op, self.damping = op, check_real(damping, "damping", minimum=0.0)
        self.scale = None if scale is None else check_real(scale, "scale", minimum=0.0, min_inclusive=False)
        self.depth, self.tol = depth, tol

    def _scale(self) -> float:
        if self.scale is None:
            r = lanczos(self.op, 1, "LM", n_iter=min(self.op.shape[0], 20), tol=0.0, seed=0,
                        check_symmetric=False, exact_residuals=False)
            self.scale = 1.1 * float(r.eigenvalues.abs()[0]) + self.damping
            if self.scale == 0.0:
                self.scale = 1.0
        return self.scale

    def _matmat(self, V: Tensor) -> Tensor:
        s = self._scale()
        try:
            r = lissa(self.op, V.to(self.op.dtype), damping=self.damping / s, scale=s, depth=self.depth, tol=self.tol)
        except ValueError as e:  # reported with the damping that was passed, not LiSSA's normalised d = λ/s
            raise ValueError(
                f"damping: LiSSA diverges with damping = {self.damping:g} (the ridge added; LiSSA's normalised "
                f"d = damping/scale = {self.damping / s:.3g}) and scale = {s:g}: it converges only when every "
                f"eigenvalue of A lies in (-{self.damping:g}, {2 * s - self.damping:g}), and A has one outside. "
                "Expected a positive semi-definite A (e.g. the GGN) with a larger damping, or a larger scale") from e
        if self.tol != 0 and not bool(r.converged.all()):
            warnings.warn(f"depth: LiSSA did not converge in depth = {self.depth} steps (damping = {self.damping:g}, "
                          f"scale = {s:g}; relative residual up to {float(r.residual_norms.max()):.3g}); it contracts "
                          "by about 1 - (lambda_min + damping)/scale per step: expected a larger depth or damping, or "
                          "method='cg'", RuntimeWarning, stacklevel=3)
        return r.x


def inverse(op: LinearOperator, damping: float = 0.0, method: str = "auto", **options: Any) -> LinearOperator:
    """``(A + λI)⁻¹`` as an operator.

    ``method``: ``"cholesky"`` / ``"eigh"`` / ``"auto"`` build the dense matrix (n products; n ≤ 8192) and
    factorise it (:func:`dense_inverse`); ``"cg"`` (options ``tol``, ``maxiter``) and ``"lissa"``
    (``scale``, ``depth``, ``tol``) apply an iterative solver per product (:class:`CGInverse`,
    :class:`LiSSAInverse`). All take the same ``damping`` λ ≥ 0, the ridge actually added.

    >>> import torch
    >>> from gradsketch.linalg import MatrixOperator
    >>> A = MatrixOperator(torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    >>> x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> torch.allclose(inverse(A, 0.5, "cg") @ x, inverse(A, 0.5, "cholesky") @ x)
    True
    """
    _square(op)
    method = check_choice(method, "method", INVERSE_METHODS)
    damping = check_real(damping, "damping", minimum=0.0)
    if method == "cg":
        unknown = sorted(set(options) - {"tol", "maxiter"})
        if unknown:
            raise TypeError(f"options: expected some of ['maxiter', 'tol'] for method='cg', got {unknown}")
        return CGInverse(op, damping, **options)
    if method == "lissa":
        unknown = sorted(set(options) - {"scale", "depth", "tol"})
        if unknown:
            raise TypeError(f"options: expected some of ['depth', 'scale', 'tol'] for method='lissa', got {unknown}")
        return LiSSAInverse(op, damping, **options)
    if options:
        raise TypeError(f"options: method={method!r} takes no options, got {sorted(options)}")
    if op.shape[0] > 8192:
        raise ValueError(f"method: {method!r} builds a {op.shape[0]}×{op.shape[0]} matrix; expected at most 8192 "
                         "rows: use a sketch or method='cg'")
    if isinstance(op, MatrixOperator):
        K = op.A
    else:
        K = op.to_dense()
    return dense_inverse(K, damping, method)
