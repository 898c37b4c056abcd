"""Linear solvers for inverse Hessian-vector products: conjugate gradients and LiSSA.

Sources: M. R. Hestenes & E. Stiefel, "Methods of conjugate gradients for solving linear systems" (1952);
N. Agarwal, B. Bullins, E. Hazan, "Second-order stochastic optimization for machine learning in linear
time", JMLR 2017 (LiSSA); P. W. Koh & P. Liang, "Understanding black-box predictions via influence
functions", ICML 2017 (the damped/scaled LiSSA recursion used for influence functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validate import (
    apply,
    check_int,
    check_operator,
    check_real,
    check_tensor,
    default_tol,
    progress_bar,
    work_dtype,
)
from .operator import LinearOperator


@dataclass
class SolveResult:
    """Solution of ``(A + λI) X = B``.

    Attributes:
        x: ``[n]`` or ``[n, k]`` (the shape of the right-hand side), operator's device, working dtype.
        residual_norms: ``[k]`` relative residuals ``‖b − (A + λI) x‖ / ‖b‖`` (CPU, float64; for LiSSA
            measured against the system LiSSA converges to, see :func:`lissa`).
        converged: ``[k]`` bool.
        n_iter: iterations run.
        n_matvec: operator products spent (column products).
    """

    x: Tensor
    residual_norms: Tensor
    converged: Tensor
    n_iter: int
    n_matvec: int


def _rhs(B: Any, n: int, dtype: torch.dtype, dev: torch.device, name: str) -> tuple[Tensor, bool]:
    B = check_tensor(B, name, n, dtype, dev, ndims=(1, 2))
    return (B[:, None], True) if B.ndim == 1 else (B, False)


def cg(op: LinearOperator, B: Tensor, damping: float = 0.0, tol: float | None = None,
       maxiter: int | None = None, x0: Tensor | None = None, progress: bool = False) -> SolveResult:
    """Conjugate gradients for ``(A + λI) X = B``, one independent CG run per column of ``B``
    (all active columns share one ``matmat`` per iteration; converged columns are frozen).

    Source: Hestenes & Stiefel (1952); Golub & Van Loan §11.3.

    Convergence: needs ``A + λI`` symmetric positive definite; the error in the ``(A+λI)``-norm falls at
    least like ``2((√κ − 1)/(√κ + 1))^t`` with ``κ`` its condition number, and in exact arithmetic CG ends
    in at most ``n`` steps. A direction with ``pᵀ(A + λI)p ≤ 0`` proves the matrix is not positive
    definite and raises ``ValueError`` (raise ``damping`` above ``−λ_min(A)``).

    Args:
        op: symmetric :class:`LinearOperator` ``[n, n]``.
        B: right-hand sides ``[n]`` or ``[n, k]``.
        damping: ``λ`` added to the diagonal.
        tol: stop a column when ``‖b − (A + λI)x‖ ≤ tol·‖b‖``; default 1e-8 (float64), 1e-5 (float32).
        maxiter: iterations (default ``10 n``).
        x0: initial guess, same shape as ``B`` (default zeros).
        progress: tqdm progress bar.

    Returns:
        :class:`SolveResult` (``x`` has the shape of ``B``).
    """
    op = check_operator(op)
    n = op.shape[0]
    dtype, dev = work_dtype(op), op.device
    Bm, vec = _rhs(B, n, dtype, dev, "B")
    lam = check_real(damping, "damping")
    tol = default_tol(dtype, 1e-8, 1e-5) if tol is None else check_real(tol, "tol", minimum=0.0)
    maxiter = check_int(maxiter, "maxiter", minimum=1, allow_none=True) or 10 * n
    k = Bm.shape[1]
    n_matvec = 0
    if x0 is None:
        X = torch.zeros_like(Bm)
        R = Bm.clone()
    else:
        X = check_tensor(x0, "x0", n, dtype, dev, ndims=(1, 2)).reshape(n, -1).clone()
        if X.shape != Bm.shape:
            raise ValueError(f"x0: expected the shape of B, {tuple(B.shape)}, got {tuple(x0.shape)}")
        R = Bm - (apply(op, X, dtype, "cg initial residual") + lam * X)
        n_matvec += k
    bnorm = Bm.norm(dim=0)
    target = tol * bnorm
    P = R.clone()
    rr = (R * R).sum(0)
    active = (rr.sqrt() > target).nonzero().flatten()
    it = 0
    bar = progress_bar(progress, maxiter, "cg")
    try:
        while active.numel() and it < maxiter:
            Pa = P[:, active]
            AP = apply(op, Pa, dtype, f"cg iteration {it + 1}") + lam * Pa
            n_matvec += active.numel()
            pAp = (Pa * AP).sum(0)
            bad = pAp <= 0
            if bool(bad.any()):
                c = int(active[bad.nonzero()[0, 0]])
                raise ValueError(
                    f"op: A + damping*I is not positive definite (p^T (A + {lam:g} I) p = "
                    f"{float(pAp[bad][0]):.3g} <= 0 in column {c} at iteration {it + 1}); CG needs a "
                    "symmetric positive definite system: increase damping above -lambda_min(A)")
            a = rr[active] / pAp
            X[:, active] += a * Pa
            Ra = R[:, active] - a * AP
            rr_new = (Ra * Ra).sum(0)
            P[:, active] = Ra + (rr_new / rr[active]) * Pa
            R[:, active] = Ra
            rr[active] = rr_new
            active = active[rr_new.sqrt() > target[active]]
            it += 1
            bar.update()
    finally:
        bar.close()
    res = (Bm - (apply(op, X, dtype, "cg final residual") + lam * X)).norm(dim=0)
    n_matvec += k
    rel = (res / bnorm.clamp_min(torch.finfo(dtype).tiny)).double().cpu()
    conv = (res <= target * 1.0001 + 10 * torch.finfo(dtype).eps * bnorm).cpu() | (bnorm == 0).cpu()
    return SolveResult(X[:, 0] if vec else X, rel, conv, it, n_matvec)


def lissa(op: LinearOperator, b: Tensor, damping: float = 0.0, scale: float | None = None,
          depth: int = 1000, tol: float | None = None, progress: bool = False) -> SolveResult:
    """LiSSA: ``x₀ = b``, ``x_{t+1} = b + (1 − d)·x_t − A x_t / s``; result ``x / s``.

    Source: Agarwal, Bullins & Hazan, JMLR 2017; the damped and scaled form of Koh & Liang, ICML 2017.

    What it solves: the fixed point satisfies ``(A + d·s·I) x/s = b``, so the result approximates
    ``(A + d·s I)⁻¹ b``: the effective damping is ``damping · scale``. The recursion is a Neumann series for
    ``M = d I + A/s`` and converges iff every eigenvalue ``μ`` of ``M`` lies in ``(0, 2)``, i.e.
    ``−d·s < λᵢ(A) < (2 − d)·s``; the error contracts by ``max |1 − d − λᵢ/s|`` per step, so about
    ``log(1/tol) / (d + λ_min/s)`` steps are needed. With the default ``scale`` (``1.1 · |λ|_max``, from a
    20-step Lanczos run) and ``0 < d < 0.9``, a positive semi-definite ``A`` always converges.

    Args:
        op: symmetric :class:`LinearOperator` ``[n, n]`` (each product is what a minibatch HVP would be
            in the stochastic version; here the operator is fixed).
        b: ``[n]`` or ``[n, k]`` (columns solved together).
        damping: ``d`` in ``[0, 1)``.
        scale: ``s > 0``; default ``1.1 · max|λ(A)|`` estimated by :func:`gradsketch.linalg.lanczos`
            (costs up to 22 products, counted in ``n_matvec``).
        depth: maximum number of recursion steps.
        tol: stop when ``‖x_{t+1} − x_t‖ ≤ tol·‖x_{t+1}‖`` for every column (``0`` runs ``depth`` steps);
            default 1e-10 (float64) / 1e-6 (float32).
        progress: tqdm progress bar.

    Returns:
        :class:`SolveResult` with ``residual_norms`` of ``(A + d·s I) x = b``; ``converged`` means the
        step criterion was met (the residual is then about ``tol / (d + λ_min/s)`` relative).

    Raises:
        ValueError: when the iterates blow up (the convergence condition above fails).
    """
    op = check_operator(op)
    n = op.shape[0]
    dtype, dev = work_dtype(op), op.device
    Bm, vec = _rhs(b, n, dtype, dev, "b")
    d = check_real(damping, "damping", minimum=0.0, maximum=1.0, max_inclusive=False)
    depth = check_int(depth, "depth", minimum=1)
    tol = default_tol(dtype, 1e-10, 1e-6) if tol is None else check_real(tol, "tol", minimum=0.0)
    n_matvec = 0
    if scale is None:
        from .lanczos import lanczos

        r = lanczos(op, 1, "LM", n_iter=min(n, 20), tol=0.0, seed=0, check_symmetric=False,
                    exact_residuals=False)
        n_matvec += r.n_matvec
        s = 1.1 * float(r.eigenvalues.abs()[0])
        if s == 0.0:
            s = 1.0
    else:
        s = check_real(scale, "scale", minimum=0.0, min_inclusive=False)
    X = Bm.clone()
    bnorm = Bm.norm(dim=0)
    done = torch.zeros(X.shape[1], dtype=torch.bool, device=dev)
    it = 0
    bar = progress_bar(progress, depth, "lissa")
    try:
        for it in range(1, depth + 1):
            AX = apply(op, X, dtype, f"lissa step {it}")
            n_matvec += X.shape[1]
            Xn = Bm + (1.0 - d) * X - AX / s
            xn = Xn.norm(dim=0)
            # x_t = sum_{i<=t} (I - M)^i b, so ||x_t|| <= (t+1)||b|| whenever the spectral radius of I - M is
            # <= 1; exceeding it proves an eigenvalue outside the convergence interval.
            if not bool(torch.isfinite(Xn).all()) or bool((xn > 1.01 * (it + 1) * bnorm + 1e-30).any()):
                raise ValueError(
                    f"scale: LiSSA diverges (step {it}, scale = {s:g}, damping = {d:g}); it converges only "
                    "when every eigenvalue of A lies in (-damping*scale, (2 - damping)*scale): "
                    "increase scale (or damping for negative eigenvalues)")
            done = (Xn - X).norm(dim=0) <= tol * xn
            X = Xn
            bar.update()
            if tol > 0 and bool(done.all()):
                break
    finally:
        bar.close()
    x = X / s
    res = (Bm - (apply(op, x, dtype, "lissa residual") + d * s * x)).norm(dim=0)
    n_matvec += x.shape[1]
    rel = (res / bnorm.clamp_min(torch.finfo(dtype).tiny)).double().cpu()
    conv = done.cpu() if tol > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    return SolveResult(x[:, 0] if vec else x, rel, conv.cpu(), it, n_matvec)
