"""Block Lanczos with full re-orthogonalisation and a residual-based stop, for operators whose every product is
expensive (a pass over a data set): ``b`` Krylov vectors per product, and no more products than the wanted
eigenpairs need.

Source: G. Golub & R. Underwood, "The block Lanczos method for computing eigenvalues" (1977); Golub & Van Loan,
*Matrix Computations*, §10.3.6 (``A Q_m = Q_m T_m + Q_{m+1} R_{m+1} E_mᵀ``, so the Ritz pair ``(θ, Q_m s)`` has
residual ``‖R_{m+1} s_last‖``, where ``s_last`` are the last ``b`` entries of ``s``); Y. Saad, *Numerical
Methods for Large Eigenvalue Problems*, §6.7 (block Krylov, deflation of rank-deficient blocks). As in
:func:`gradsketch.linalg.arnoldi`, every new block is orthogonalised against the whole basis (classical
Gram–Schmidt twice) and its coefficients fill a block Hessenberg matrix, which is symmetrised before the
Rayleigh–Ritz step (Schioppa et al., AAAI 2022, "distill").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validate import (
    apply,
    check_bool,
    check_int,
    check_operator,
    check_real,
    check_tensor,
    make_generator,
    progress_bar,
    random_probes,
    work_dtype,
)
from .lanczos import EigResult, check_which, select_indices
from .operator import LinearOperator


@dataclass(repr=False)
class BlockLanczosResult(EigResult):
    """:class:`~gradsketch.linalg.EigResult` of :func:`block_lanczos_eigs`, plus how the run ended.

    Extra attributes:
        n_passes: operator products (``matmat`` calls of up to ``block_size`` columns) spent; for a curvature
            operator over a data set, the number of passes over that data.
        stop: ``"converged"`` (the residual test held for the ``top_k`` wanted Ritz pairs), ``"max_dim"``
            (the Krylov dimension cap was reached first) or ``"exhausted"`` (the basis spans the whole space:
            the Ritz pairs are exact eigenpairs up to rounding).
        block_size: columns per product.

    ``residuals`` are the Ritz estimates ``‖R_{m+1} s_last‖`` (exact up to the basis' loss of
    orthogonality, which full re-orthogonalisation keeps at rounding level); ``n_iter`` is the Krylov
    dimension ``m`` reached.
    """

    n_passes: int = 0
    stop: str = ""
    block_size: int = 1

    def __repr__(self) -> str:
        base = super().__repr__()[len("EigResult"):-1]
        return (f"BlockLanczosResult{base}, n_passes={self.n_passes}, block_size={self.block_size}, "
                f"stop={self.stop!r})")


def _orth_block(Q: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram–Schmidt of the columns of ``W [n, b]`` against the orthonormal columns of ``Q [n, j]``,
    twice ("twice is enough", Parlett §6.9). Returns ``(W ⟂ Q, coefficients [j, b])``."""
    if Q.shape[1] == 0:
        return W, W.new_zeros(0, W.shape[1])
    C = Q.T @ W
    W = W - Q @ C
    C2 = Q.T @ W
    return W - Q @ C2, C + C2


def _new_block(Q: Tensor, W: Tensor, nb: int, drop: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Orthonormal ``P [n, nb]``, orthogonal to ``Q``, with ``W ≈ P R`` and ``R = Pᵀ W [nb, c]``, for ``W [n, c]``
    already orthogonal to ``Q``.

    ``P`` holds the leading left singular vectors of ``W`` (thin SVD in float64); directions with singular
    value ``≤ drop`` (and any beyond ``c``) are deflated: replaced by random unit vectors orthogonal to ``Q``
    and to the kept ones, so that the basis keeps growing by ``nb`` (Saad §6.7)."""
    n = W.shape[0]
    W64 = W.to(torch.float64)
    U, S, _ = torch.linalg.svd(W64, full_matrices=False)
    r = min(nb, U.shape[1])
    kept = int((S[:r] > drop).sum())  # singular values are sorted: the kept ones come first
    P = torch.empty(n, nb, dtype=W.dtype, device=W.device)
    P[:, :kept] = U[:, :kept].to(W.dtype)
    for i in range(kept, nb):
        z = random_probes(n, 1, "gaussian", gen, W.dtype, W.device)
        others = torch.cat([Q, P[:, :i]], 1)
        for _ in range(2):
            z = z - others @ (others.T @ z)
        P[:, i] = (z / z.norm())[:, 0]
    # one more pass against the old basis: U comes from W rounded to its dtype, which leaves components along Q
    # at the level of eps·‖W‖/s; remove them from the new directions
    P, _ = _orth_block(Q, P)
    P = P / P.norm(dim=0, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)
    R = P.T.to(torch.float64) @ W64
    return P, R


def block_lanczos_eigs(op: LinearOperator, top_k: int, block_size: int = 8, max_dim: int | None = None,
                       tol: float | None = 1e-2, which: str = "LM", seed: Any = 0, v0: Tensor | None = None,
                       positive_only: bool = False, min_dim: int | None = None,
                       progress: bool = False) -> BlockLanczosResult:
    """Top ``top_k`` eigenpairs of a symmetric ``op [n, n]`` by block Lanczos: each step multiplies ``op`` by
    a block of ``block_size`` orthonormal vectors (one ``matmat``: for a curvature operator, one pass over its
    data for all of them), orthogonalises the result against the whole basis and continues; it stops as soon
    as the ``top_k`` wanted Ritz pairs all pass the residual test

        ``‖A v − θ v‖ ≤ tol · max_i |θ_i|``   (relative to the largest Ritz value in magnitude),

    or when the basis reaches ``max_dim`` vectors, or the whole space.

    Source: Golub & Underwood (1977); Golub & Van Loan §10.3.6; Saad §6.7 (see the module docstring). The
    basis is kept in the operator's dtype (float32 for float32 models); the projected matrix, its
    eigendecomposition and the deflation SVD are float64.

    Args:
        op: symmetric :class:`LinearOperator` ``[n, n]`` (not checked: a non-symmetric one gives the
            eigenpairs of the symmetrised projection, as :func:`~gradsketch.linalg.distill` does).
        top_k: wanted eigenpairs, ``1 ≤ top_k ≤ n``.
        block_size: vectors per product ``b ≥ 1`` (``b = 1`` is single-vector Lanczos with full
            re-orthogonalisation, the same Krylov space as :func:`~gradsketch.linalg.arnoldi`).
        max_dim: cap on the Krylov dimension; default ``min(n, max(3·top_k, top_k + 60))`` rounded up to a
            multiple of ``b``; clamped to ``n``.
        tol: relative residual tolerance (above); ``None`` or ``0`` never stops early (runs to ``max_dim``).
        which: ``"LM"`` (largest ``|λ|``, the default: curvature is indefinite), ``"LA"``, ``"SA"``, ``"BE"``.
        seed: int or CPU ``torch.Generator`` for the random start block and deflation replacements.
        v0: optional start vector ``[n]`` or block ``[n, c]`` (``c ≤ b``; the rest of the first block is
            random).
        positive_only: keep only Ritz values ``> 0``, largest first (may return fewer than ``top_k``); the
            stopping test then looks at those.
        min_dim: do not stop before this Krylov dimension (default ``top_k``).
        progress: tqdm progress bar over block steps.

    Returns:
        :class:`BlockLanczosResult` (eigenvalues ``[k]``, eigenvectors ``[n, k]`` unit columns, residual
        estimates ``[k]``, converged flags, ``n_matvec = m``, ``n_iter = m``, ``n_passes``, ``stop``).

    >>> from gradsketch.linalg import MatrixOperator
    >>> lam = torch.cat([torch.tensor([10.0, -9.0, 8.0]), torch.linspace(-1, 1, 197)]).double()
    >>> r = block_lanczos_eigs(MatrixOperator(torch.diag(lam)), 3, block_size=4, tol=1e-8)
    >>> r.eigenvalues.round(decimals=6).tolist(), r.stop, r.n_iter < 200
    ([10.0, -9.0, 8.0], 'converged', True)
    """
    op = check_operator(op)
    n = op.shape[0]
    top_k = check_int(top_k, "top_k", minimum=1)
    if top_k > n:
        raise ValueError(f"top_k: expected at most n = {n} for an operator of shape {op.shape}, got {top_k}")
    b = check_int(block_size, "block_size", minimum=1)
    b = min(b, n)
    max_dim = check_int(max_dim, "max_dim", minimum=1, allow_none=True)
    if max_dim is None:
        want = max(3 * top_k, top_k + 60)
        max_dim = -(-want // b) * b
    if max_dim < top_k:
        raise ValueError(f"max_dim: expected at least top_k = {top_k}, got {max_dim}")
    max_dim = min(max_dim, n)
    tol = 0.0 if tol is None else check_real(tol, "tol", minimum=0.0)
    which = check_which(which)
    check_bool(positive_only, "positive_only")
    min_dim = check_int(min_dim, "min_dim", minimum=1, allow_none=True)
    min_dim = top_k if min_dim is None else min(max(min_dim, top_k), max_dim)
    dtype, dev = work_dtype(op), op.device
    gen = make_generator(seed)
    eps = float(torch.finfo(dtype).eps)

    v = None
    if v0 is not None:
        v = check_tensor(v0, "v0", n, dtype, dev, ndims=(1, 2), nonzero=True)
        v = v[:, None] if v.ndim == 1 else v
        if v.shape[1] > b:
            raise ValueError(f"v0: expected at most block_size = {b} columns, got {v.shape[1]}")
    if v is not None and v.shape[1] == b:
        X = v.clone()
    else:
        X = random_probes(n, b, "gaussian", gen, dtype, dev)
        if v is not None:
            X[:, : v.shape[1]] = v
    Q = torch.empty(n, 0, dtype=dtype, device=dev)
    P, _ = _new_block(Q, X, b, 0.0, gen)
    # H[:, cols of block j] = coefficients of A·P_j on the basis (block Hessenberg, float64 on the CPU)
    H = torch.zeros(max_dim + b, max_dim, dtype=torch.float64)  # on the CPU; torch (not numpy) linear algebra
    anorm, passes, stop = 0.0, 0, "max_dim"
    bar = progress_bar(progress, -(-max_dim // b), "block lanczos")
    lam = S = res = idx = None
    try:
        while True:
            m0 = Q.shape[1]
            cols = min(P.shape[1], max_dim - m0)
            P = P[:, :cols]
            W = apply(op, P, dtype, f"block Lanczos step {passes + 1}")
            passes += 1
            bar.update()
            Q = torch.cat([Q, P], 1)
            m = Q.shape[1]
            anorm = max(anorm, float(W.norm()))  # Frobenius: within √b of ‖A P‖₂, a scale for the deflation test
            W, C = _orth_block(Q, W)
            H[:m, m0:m] = C.to("cpu", torch.float64)
            done = m >= n
            last = not done and m >= max_dim  # no further block: the residuals come from W itself (‖R s‖ = ‖W s‖)
            if not done and not last:
                P, R = _new_block(Q, W, min(b, n - m), 100 * eps * max(anorm, 1e-300), gen)
                H[m:m + P.shape[1], m0:m] = R.cpu()
            if not done and m < max_dim and (tol <= 0 or m < min_dim):
                continue  # no stopping test can pass yet: skip the Rayleigh–Ritz step
            Hm = H[:m, :m]
            T = (Hm + Hm.T) / 2
            lam_t, S = torch.linalg.eigh(T)
            lam = lam_t.numpy()
            if positive_only:
                pos = np.flatnonzero(lam > 0)
                idx = pos[np.argsort(-lam[pos], kind="stable")][:top_k]
            else:
                idx = select_indices(lam, which, min(top_k, m))
            Sk = S[:, torch.as_tensor(idx, dtype=torch.long)]
            if last:
                below = W.to(torch.float64).cpu() @ Sk[m0:m]
            else:
                below = H[m:m + b, :m] @ Sk if not done else torch.zeros(1, idx.size, dtype=torch.float64)
            asym = (Hm - T) @ Sk
            res = ((below ** 2).sum(0) + (asym ** 2).sum(0)).sqrt().numpy()
            scale = float(np.abs(lam).max()) if lam.size else 0.0
            if done:
                stop = "exhausted"
                break
            if tol > 0 and m >= min_dim and idx.size == top_k and bool(np.all(res <= tol * scale)):
                stop = "converged"
                break
            if m >= max_dim:
                break
            bar.set_postfix(dim=m, worst=f"{float(res.max()) / max(scale, 1e-300):.2g}")
    finally:
        bar.close()
    assert lam is not None and S is not None and res is not None and idx is not None
    m = Q.shape[1]
    Y = S[:, torch.as_tensor(idx, dtype=torch.long)].to(dtype=dtype, device=dev)
    V = Q @ Y
    V = V / V.norm(dim=0, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    scale = float(np.abs(lam).max()) if lam.size else 0.0
    conv = torch.as_tensor(res <= max(tol, 0.0) * scale + 100 * eps * anorm)
    return BlockLanczosResult(
        eigenvalues=torch.as_tensor(lam[idx], dtype=dtype, device=dev), eigenvectors=V,
        residuals=torch.as_tensor(res, dtype=dtype, device=dev), converged=conv, n_matvec=m, n_iter=m,
        which="LA" if positive_only else which, n_passes=passes, stop=stop, block_size=b)
