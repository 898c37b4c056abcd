"""Symmetric Lanczos with full re-orthogonalisation, and a SciPy ``eigsh`` (ARPACK) bridge.

Source: C. Lanczos (1950); the re-orthogonalised variant and the Ritz residual bound
‖A Q y − θ Q y‖ = |β_m y_m| follow Golub & Van Loan, *Matrix Computations*, §10.1–10.3, and
B. Parlett, *The Symmetric Eigenvalue Problem*, ch. 13. "Twice is enough" (classical Gram–Schmidt
applied twice) is Kahan's argument as reported by Parlett, §6.9; a third pass is made when the second
one still removed most of the vector (Daniel–Gragg–Kaufman–Stewart criterion).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from ._validate import (
    apply,
    check_bool,
    check_choice,
    check_int,
    check_operator,
    check_real,
    check_tensor,
    default_tol,
    make_generator,
    progress_bar,
    random_probes,
    work_dtype,
)
from .operator import LinearOperator

WHICH = ("LA", "SA", "LM", "BE")


@dataclass
class EigResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``[k]``. Order: ``LA``, ``BE`` descending; ``SA`` ascending (most negative first);
            ``LM`` by descending ``|λ|``. Same order in every other field.
        eigenvectors: ``[n, k]`` orthonormal columns, on the operator's device, in its working dtype.
        residuals: ``[k]`` true residual norms ``‖A v − λ v‖`` (or the Ritz estimates ``|β_m y_m|`` when
            exact residuals were not requested).
        converged: ``[k]`` bool, ``residual ≤ tol·|λ| + 100·ε·‖A‖_est``.
        n_matvec: operator-vector products spent (symmetry probes and residual checks included).
        n_iter: dimension of the Krylov space that was built.
        which: the selection rule used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    n_matvec: int
    n_iter: int
    which: str = "LA"

    def __repr__(self) -> str:
        ev = ", ".join(f"{x:.6g}" for x in self.eigenvalues.tolist()[:6])
        more = ", ..." if self.eigenvalues.numel() > 6 else ""
        return (f"EigResult(k={self.eigenvalues.numel()}, which={self.which!r}, eigenvalues=[{ev}{more}], "
                f"converged={int(self.converged.sum())}/{self.converged.numel()}, "
                f"n_matvec={self.n_matvec}, n_iter={self.n_iter})")


# ------------------------------------------------------------------------------------------------
# helpers shared with arnoldi.py / slq.py
# ------------------------------------------------------------------------------------------------
def select_indices(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the ``k`` wanted values of ``theta`` in output order (see :class:`EigResult`)."""
    order = np.argsort(theta, kind="stable")
    if which == "LA":
        return order[::-1][:k]
    if which == "SA":
        return order[:k]
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    n_low = k // 2
    n_high = k - n_low
    idx = np.concatenate([order[::-1][:n_high], order[:n_low][::-1]]) if n_low else order[::-1][:n_high]
    return idx[np.argsort(-theta[idx], kind="stable")]


def symmetry_defect(op: LinearOperator, seed: Any = 0, n_pairs: int = 1) -> tuple[float, int]:
    """Relative asymmetry ``max |⟨u, Av⟩ − ⟨Au, v⟩| / (‖u‖‖Av‖ + ‖Au‖‖v‖)`` over random Gaussian pairs.

    Returns ``(defect, n_matvec)``; costs ``2·n_pairs`` products (one ``matmat``). ``0`` for an exactly
    symmetric operator, rounding level for a symmetric one, typically ``≳ 1/√n`` for a generic
    non-symmetric one. Source: the adjoint test (e.g. Claerbout's "dot-product test").
    """
    op = check_operator(op)
    n_pairs = check_int(n_pairs, "n_pairs", minimum=1)
    gen = make_generator(seed)
    dtype = work_dtype(op)
    U = random_probes(op.shape[0], 2 * n_pairs, "gaussian", gen, dtype, op.device)
    AU = apply(op, U, dtype, "symmetry check")
    worst = 0.0
    for p in range(n_pairs):
        u, v, Au, Av = U[:, 2 * p], U[:, 2 * p + 1], AU[:, 2 * p], AU[:, 2 * p + 1]
        a, b = float(u @ Av), float(Au @ v)
        scale = float(u.norm() * Av.norm() + Au.norm() * v.norm())
        if scale > 0:
            worst = max(worst, abs(a - b) / scale)
    return worst, 2 * n_pairs


def check_symmetry(op: LinearOperator, check: bool | float, gen: torch.Generator, who: str) -> int:
    """Raise ``ValueError`` when ``op`` fails the probe test; returns the products spent."""
    if check is False:
        return 0
    if isinstance(check, bool):
        tol = default_tol(work_dtype(op), 1e-8, 1e-4)
    else:
        tol = check_real(check, "check_symmetric", minimum=0.0, min_inclusive=False)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    defect, used = symmetry_defect(op, seed=seed, n_pairs=1 if op.symmetric else 2)
    if defect > tol:
        raise ValueError(
            f"op: {who} needs a symmetric operator, but random probes give a relative asymmetry "
            f"|<u, Av> - <Au, v>| / (|u||Av| + |Au||v|) = {defect:.3g} > {tol:.3g}"
            + (" although it is flagged symmetric=True" if op.symmetric else "")
            + ". Use arnoldi() for non-symmetric operators, or pass check_symmetric=False (or a larger "
            "tolerance as a float) if the asymmetry is rounding noise.")
    return used


def check_which(which: Any) -> str:
    return check_choice(which, "which", WHICH)


def check_tol(tol: Any, dtype: torch.dtype) -> float:
    if tol is None:
        return default_tol(dtype, 1e-6, 1e-4)
    return check_real(tol, "tol", minimum=0.0)


class _Basis:
    """Orthonormal rows ``[j, n]`` grown by doubling (memory proportional to what is used)."""

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 max_rows: int) -> None:
        self.max_rows = max_rows
        self.Q = torch.zeros(min(capacity, max_rows), n, dtype=dtype, device=device)
        self.size = 0

    def append(self, q: Tensor) -> None:
        if self.size == self.Q.shape[0]:
            new = torch.zeros(min(2 * self.size, self.max_rows), self.Q.shape[1],
                              dtype=self.Q.dtype, device=self.Q.device)
            new[: self.size] = self.Q
            self.Q = new
        self.Q[self.size] = q
        self.size += 1

    def view(self) -> Tensor:
        return self.Q[: self.size]


_UPCAST_BYTES = 1 << 26  # rows of a compressed basis are widened this many bytes at a time


def _project_out(Q: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """One classical Gram–Schmidt pass: ``c = Q w``, ``w − Qᵀ c``. A basis stored in a narrower dtype than
    ``w`` (a compressed Krylov basis) is widened a block of rows at a time, once per pass."""
    if Q.dtype == w.dtype:
        c = Q @ w
        return w - Q.T @ c, c
    rows = max(1, _UPCAST_BYTES // max(1, Q.shape[1] * w.element_size()))
    cs, delta = [], torch.zeros_like(w)
    for i in range(0, Q.shape[0], rows):
        Qc = Q[i:i + rows].to(w.dtype)
        c = Qc @ w
        delta += Qc.T @ c
        cs.append(c)
    return w - delta, torch.cat(cs)


def orthogonalise(Q: Tensor, w: Tensor, min_passes: int = 2) -> tuple[Tensor, Tensor]:
    """Classical Gram–Schmidt of ``w [n]`` against the rows of ``Q [j, n]``: twice, a third time if
    the second pass still removed most of the vector. Returns ``(w ⟂ Q, accumulated coefficients [j])``.
    ``Q`` may be stored in a narrower floating dtype than ``w`` (the arithmetic is in ``w``'s dtype)."""
    coef = torch.zeros(Q.shape[0], dtype=w.dtype, device=w.device)
    if Q.shape[0] == 0:
        return w, coef
    for p in range(3):
        before = w.norm()
        w, c = _project_out(Q, w)
        coef = coef + c
        if p + 1 >= min_passes and float(w.norm()) > 0.7 * float(before):
            break
    return w, coef


def tridiag_eig(alpha: list[float], beta: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal ``T`` (diagonal ``alpha``, off-diagonal ``beta``),
    float64, ascending."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.size == 1:
        return a.copy(), np.ones((1, 1))
    return eigh_tridiagonal(a, np.asarray(beta[: a.size - 1], dtype=np.float64))


def random_unit(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    v = random_probes(n, 1, "gaussian", gen, dtype, device)[:, 0]
    return v / v.norm()


# ------------------------------------------------------------------------------------------------
def lanczos(op: LinearOperator, k: int, which: str = "LA", n_iter: int | None = None,
            tol: float | None = None, seed: Any = 0, v0: Tensor | None = None,
            check_symmetric: bool | float = True, restart_on_breakdown: bool = True,
            exact_residuals: bool = True, progress: bool = False) -> EigResult:
    """``k`` extreme eigenpairs of a symmetric operator ``A [n, n]`` by Lanczos with full
    re-orthogonalisation: ``A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ``, Ritz pairs ``(θ, Q_m y)`` of ``T_m``.

    Source: Lanczos (1950); Golub & Van Loan §10.1–10.3 (Ritz residual ``|β_m y_m|``); Parlett §6.9
    (re-orthogonalise twice).

    Args:
        op: symmetric :class:`LinearOperator` ``[n, n]``.
        k: number of eigenpairs, ``1 ≤ k ≤ n`` (``k > n`` raises ``ValueError``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude,
            ``"BE"`` both ends (``k - k//2`` from the top, ``k//2`` from the bottom).
        n_iter: maximum Krylov dimension ``m``, ``k ≤ m``; default ``min(n, max(3k, k + 60))``. Values
            above ``n`` are clamped to ``n`` (the whole space, where Lanczos is exact).
        tol: stop once every wanted Ritz pair has ``|β_m y_m| ≤ tol·|θ| + 100·ε·‖A‖_est`` (ε the dtype's
            machine epsilon, ‖A‖_est the largest ‖A q_j‖ seen). Default ``1e-6`` in float64, ``1e-4``
            in float32. ``tol=0`` runs all ``n_iter`` steps.
        seed: int or CPU ``torch.Generator``: start vector and symmetry probes.
        v0: optional start vector ``[n]`` (non-zero, finite).
        check_symmetric: probe ``⟨u, Av⟩ = ⟨Au, v⟩`` first (2 products if ``op.symmetric`` else 4) and
            raise ``ValueError`` when the relative defect exceeds ``1e-8`` (float64) / ``1e-4``
            (float32); a float sets that tolerance; ``False`` skips the check.
        restart_on_breakdown: when ``β_j ≈ 0`` (``≤ 100·ε·‖A‖_est``) the Krylov space is invariant and its
            Ritz pairs are exact. ``True``: continue from a random vector orthogonal to the basis (this
            also finds further copies of repeated eigenvalues); convergence is checked again only after
            ``k`` more steps. ``False``: stop and return the pairs found, at most the invariant subspace's
            dimension (a ``RuntimeWarning`` says when fewer than ``k``).
        exact_residuals: compute ``‖A v − λ v‖`` with one extra ``matmat`` of ``k`` columns (else
            report the Ritz estimates).
        progress: tqdm progress bar.

    Returns:
        :class:`EigResult`.

    Raises:
        TypeError / ValueError: bad arguments, non-symmetric operator, NaN/Inf in an operator product.
    """
    op = check_operator(op)
    n = op.shape[0]
    k = check_int(k, "k", minimum=1)
    if k > n:
        raise ValueError(f"k: expected at most n = {n} eigenpairs of an operator of shape {op.shape}, "
                         f"got {k}")
    which = check_which(which)
    n_iter = check_int(n_iter, "n_iter", minimum=1, allow_none=True)
    m_max = min(n, max(3 * k, k + 60)) if n_iter is None else min(n, n_iter)
    if m_max < k:
        raise ValueError(f"n_iter: expected at least k = {k} Lanczos steps, got {n_iter}")
    dtype, dev = work_dtype(op), op.device
    tol = check_tol(tol, dtype)
    check_bool(restart_on_breakdown, "restart_on_breakdown")
    check_bool(exact_residuals, "exact_residuals")
    if not isinstance(check_symmetric, (bool, float, int)):
        raise TypeError("check_symmetric: expected a bool or a float tolerance, got "
                        f"{type(check_symmetric).__name__}")
    gen = make_generator(seed)
    eps = float(torch.finfo(dtype).eps)

    q = (check_tensor(v0, "v0", n, dtype, dev, nonzero=True) if v0 is not None
         else random_probes(n, 1, "gaussian", gen, dtype, dev)[:, 0])
    q = q / q.norm()
    n_matvec = check_symmetry(op, check_symmetric, gen, "lanczos()")

    basis = _Basis(n, capacity=max(2 * k + 2, 32), dtype=dtype, device=dev, max_rows=m_max)
    basis.append(q)
    alpha: list[float] = []
    beta: list[float] = []  # beta[j] couples q_j and q_{j+1}; 0 at a restart
    anorm = 0.0
    block_start = 0  # index where the current Krylov block (after a restart) began
    last_beta = 0.0  # β_m of the final step (residual estimates)
    bar = progress_bar(progress, m_max, "lanczos")
    try:
        for j in range(m_max):
            w = apply(op, q[:, None], dtype, f"Lanczos step {j + 1}")[:, 0]
            n_matvec += 1
            anorm = max(anorm, float(w.norm()))
            if j > block_start:
                w = w - beta[j - 1] * basis.Q[j - 1]
            w, coef = orthogonalise(basis.view(), w)
            alpha.append(float(coef[j]))
            b_j = float(w.norm())
            bar.update()
            m = j + 1
            breakdown = b_j <= 100 * eps * max(anorm, np.finfo(np.float64).tiny)
            if breakdown:
                b_j = 0.0
            last_beta = b_j
            if m == m_max:
                break
            if breakdown:
                if not restart_on_breakdown:
                    break
                fresh, _ = orthogonalise(basis.view(), random_unit(n, gen, dtype, dev))
                if float(fresh.norm()) <= 0.5:  # whole space spanned (cannot happen for m < n)
                    break
                q = fresh / fresh.norm()
                beta.append(0.0)
                block_start = m
                basis.append(q)
                continue
            # convergence test on the wanted Ritz pairs
            if tol > 0 and m >= k and m - block_start >= (k if block_start else 1) and _due(m):
                theta, Y = tridiag_eig(alpha, beta)
                idx = select_indices(theta, which, k)
                est = np.abs(b_j * Y[-1, idx])
                if np.all(est <= tol * np.abs(theta[idx]) + 100 * eps * anorm):
                    break
            q = w / b_j
            beta.append(b_j)
            basis.append(q)
    finally:
        bar.close()

    m = len(alpha)
    theta, Y = tridiag_eig(alpha, beta)
    kk = min(k, m)
    if kk < k:
        warnings.warn(f"lanczos(): the Krylov space became invariant after {m} steps; returning the {m} "
                      f"eigenpairs found instead of k = {k} (restart_on_breakdown=False)",
                      RuntimeWarning, stacklevel=2)
    idx = select_indices(theta, which, kk)
    Qm = basis.Q[:m]
    Yk = torch.as_tensor(np.ascontiguousarray(Y[:, idx]), dtype=dtype, device=dev)
    V = Qm.T @ Yk
    V = V / V.norm(dim=0, keepdim=True)
    lam64 = theta[idx]
    lam = torch.as_tensor(lam64, dtype=dtype, device=dev)
    if exact_residuals:
        AV = apply(op, V, dtype, "residual check")
        n_matvec += kk
        res = (AV - V * lam).norm(dim=0)
    else:
        res = torch.as_tensor(np.abs(last_beta * Y[-1, idx]), dtype=dtype, device=dev)
    conv = res <= tol * lam.abs() + 100 * eps * anorm
    return EigResult(eigenvalues=lam, eigenvectors=V, residuals=res, converged=conv.cpu(),
                     n_matvec=n_matvec, n_iter=m, which=which)


def _due(m: int) -> bool:
    """Convergence checks: every step up to 50, then every ~5% of the steps taken."""
    return m <= 50 or m % max(1, m // 20) == 0


# ------------------------------------------------------------------------------------------------
def eigsh(op: LinearOperator, k: int, which: str = "LA", tol: float = 0.0, maxiter: int | None = None,
          ncv: int | None = None, seed: Any = 0, v0: Tensor | None = None,
          check_symmetric: bool | float = True) -> EigResult:
    """``k`` eigenpairs of a symmetric operator via ARPACK's implicitly restarted Lanczos
    (``scipy.sparse.linalg.eigsh`` on ``op.to_scipy()``, computing in float64 on the host).

    Source: Lehoucq, Sorensen & Yang, *ARPACK Users' Guide* (1998); use it for many eigenvalues, where
    the restarts keep memory at ``ncv`` vectors.

    Args:
        op: symmetric :class:`LinearOperator` ``[n, n]``.
        k: ``1 ≤ k < n`` (ARPACK's limit).
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``; results ordered as in :class:`EigResult`.
        tol: ARPACK relative accuracy (``0`` = machine precision).
        maxiter: ARPACK restarts (default ``10 n``); ``ncv``: Lanczos vectors kept (default ARPACK's).
        seed, v0: start vector (ARPACK's own random start is not reproducible, so one is always passed).
        check_symmetric: as in :func:`lanczos`.

    Returns:
        :class:`EigResult` in the operator's dtype and device; ``converged`` uses ``max(tol, 1e-6)``
        relative to ``|λ|`` plus the rounding floor.
    """
    from scipy.sparse.linalg import LinearOperator as SciPyOp
    from scipy.sparse.linalg import eigsh as _eigsh

    op = check_operator(op)
    n = op.shape[0]
    k = check_int(k, "k", minimum=1)
    if k >= n:
        raise ValueError(f"k: ARPACK needs k < n = {n} for an operator of shape {op.shape}, got {k}; "
                         "use lanczos(op, k, n_iter=n) or op.to_dense() for the full spectrum")
    which = check_which(which)
    tol = check_real(tol, "tol", minimum=0.0)
    maxiter = check_int(maxiter, "maxiter", minimum=1, allow_none=True)
    ncv = check_int(ncv, "ncv", minimum=k + 1, maximum=n, allow_none=True)
    dtype, dev = work_dtype(op), op.device
    gen = make_generator(seed)
    start = (check_tensor(v0, "v0", n, torch.float64, torch.device("cpu"), nonzero=True) if v0 is not None
             else random_probes(n, 1, "gaussian", gen, torch.float64, torch.device("cpu"))[:, 0])
    n_matvec = check_symmetry(op, check_symmetric, gen, "eigsh()")
    counter = [0]
    base = op.to_scipy()

    def mm(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        counter[0] += 1 if X.ndim == 1 else X.shape[1]
        out = base.matmat(X.reshape(n, -1))
        if not np.all(np.isfinite(out)):
            raise ValueError("op: the operator product contains NaN or Inf (eigsh); the operator itself "
                             "produced non-finite values")
        return out[:, 0] if X.ndim == 1 else out

    sop = SciPyOp((n, n), matvec=mm, matmat=mm, rmatvec=mm, dtype=np.float64)
    w, V = _eigsh(sop, k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=start.numpy())
    idx = select_indices(w, which, k)
    lam = torch.as_tensor(w[idx], dtype=dtype, device=dev)
    Vt = torch.as_tensor(np.ascontiguousarray(V[:, idx]), dtype=dtype, device=dev)
    AV = apply(op, Vt, dtype, "residual check")
    n_matvec += counter[0] + k
    res = (AV - Vt * lam).norm(dim=0)
    anorm = float(AV.norm(dim=0).max()) if k else 0.0
    eps = float(torch.finfo(dtype).eps)
    conv = res <= max(tol, default_tol(dtype, 1e-6, 1e-4)) * lam.abs() + 100 * eps * max(anorm, math.ulp(0))
    return EigResult(eigenvalues=lam, eigenvectors=Vt, residuals=res, converged=conv.cpu(),
                     n_matvec=n_matvec, n_iter=counter[0], which=which)
