"""Arnoldi iteration with full re-orthogonalisation, and the "distill" step of Arnoldi influence.

Sources: W. E. Arnoldi (1951); Golub & Van Loan §10.5 (``A Q_m = Q_{m+1} H̃_m``); A. Schioppa, P. Zablotskaia,
D. Vilar, A. Sokolov, "Scaling Up Influence Functions", AAAI 2022 (run Arnoldi on the Hessian-vector
product, symmetrise the Hessenberg matrix, keep the top eigenpairs by |λ|, map them back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._krylov_checkpoint import ArnoldiCheckpoint
from ._validate import (
    apply,
    check_bool,
    check_choice,
    check_int,
    check_operator,
    check_tensor,
    make_generator,
    progress_bar,
    random_probes,
    work_dtype,
)
from .lanczos import EigResult, check_tol, orthogonalise, random_unit, select_indices, symmetry_defect
from .operator import LinearOperator


@dataclass
class ArnoldiResult:
    """Output of :func:`arnoldi`.

    Attributes:
        Q: ``[n, m+1]`` orthonormal Krylov basis (on the operator's device, or on the CPU for
            ``store="host"``). The last column is zero only when the whole space was exhausted.
        H: ``[m+1, m]`` upper Hessenberg with ``A Q[:, :m] = Q H`` (same device and dtype as ``Q``).
        n_matvec: operator products spent.
        n_restarts: breakdowns (``H[j+1, j] ≈ 0``, an invariant subspace) continued from a fresh random
            vector orthogonal to the basis; ``H[j+1, j]`` is then exactly 0.
    """

    Q: Tensor
    H: Tensor
    n_matvec: int
    n_restarts: int = 0

    def __iter__(self):  # ``Q, H = arnoldi(op, m)``
        return iter((self.Q, self.H))


class Distilled(NamedTuple):
    """``eigenvalues [k]`` and ``eigenvectors [n, k]`` from :func:`distill`."""

    eigenvalues: Tensor
    eigenvectors: Tensor


BASIS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_basis_dtype(basis_dtype: Any, work: torch.dtype) -> torch.dtype:
    """``None`` → the working dtype; else a floating dtype no wider than the working one."""
    if basis_dtype is None:
        return work
    if basis_dtype not in BASIS_DTYPES:
        raise TypeError(f"basis_dtype: expected None or one of torch.float16, torch.bfloat16, torch.float32, "
                        f"torch.float64, got {basis_dtype!r}")
    if torch.finfo(basis_dtype).bits > torch.finfo(work).bits:
        raise ValueError(f"basis_dtype: expected a dtype no wider than the operator's working dtype {work}, got "
                         f"{basis_dtype} (a wider basis stores nothing the arithmetic keeps)")
    return basis_dtype


def arnoldi(op: LinearOperator, n_iter: int, v0: Tensor | None = None, seed: Any = 0,
            store: str = "device", progress: bool = False, basis_dtype: torch.dtype | None = None,
            checkpoint: Any = None, checkpoint_every: int = 25) -> ArnoldiResult:
    """``m = n_iter`` Arnoldi steps with full re-orthogonalisation: ``A Q_m = Q_{m+1} H̃_m``,
    ``Q [n, m+1]`` orthonormal, ``H̃ [m+1, m]`` upper Hessenberg.

    Source: Arnoldi (1951); Golub & Van Loan §10.5; classical Gram–Schmidt twice (Parlett §6.9).
    Works for non-symmetric operators too (no symmetry check).

    Args:
        op: square :class:`LinearOperator` ``[n, n]``.
        n_iter: number of steps ``m ≥ 1``; clamped to ``n`` (the whole space).
        v0: optional start vector ``[n]``; default a Gaussian vector from ``seed``.
        seed: int or CPU ``torch.Generator``.
        store: ``"device"`` keeps ``Q`` next to the operator; ``"host"`` keeps it in CPU memory (each step
            moves one vector to the device for the product and back; orthogonalisation runs on the CPU),
            as Schioppa et al. do for large models.
        progress: tqdm progress bar.
        basis_dtype: the dtype ``Q`` is stored in (default: the operator's working dtype). ``torch.float16``
            halves the memory of a float32 basis (a compressed-basis Krylov method): every product and
            every Gram–Schmidt pass still runs in the working dtype against the stored (rounded) vectors,
            so ``H`` is exact for the stored basis up to the rounding of each new vector, and Ritz values
            move by about ``ε_basis · ‖A‖`` (ε = 2^-11 for float16: about 5e-4 of the largest |λ|).
            bfloat16 (ε = 2^-8) is accepted but an order of magnitude coarser.
        checkpoint: a directory that makes a long run resumable. Every ``checkpoint_every`` steps (and when
            the run is interrupted by an exception) the new Krylov vectors are appended to it and the
            Hessenberg matrix and the generator state are saved; a later call with the same operator and
            settings continues from the last saved step and returns what an uninterrupted run returns. A
            checkpoint of a longer run serves a shorter one (its first ``m`` steps). Before continuing, one
            product checks that the saved relation ``A q_j = Q h_j`` still holds, so a checkpoint of another
            model or data is refused, as are other start vectors, dimensions and dtypes, and damaged files.
        checkpoint_every: steps between saves (each save writes only the new vectors).

    Returns:
        :class:`ArnoldiResult`; unpacks as ``Q, H = arnoldi(op, m)`` (``Q`` in ``basis_dtype``).
        ``n_matvec`` counts the products of this call (a resumed run spends fewer).

    >>> from gradsketch.linalg import MatrixOperator
    >>> A = torch.diag(torch.linspace(1.0, 2.0, 50))
    >>> Q, H = arnoldi(MatrixOperator(A), 50, basis_dtype=torch.float16)
    >>> (Q.dtype, round(float(distill(Q, H, 1).eigenvalues[0]), 2))
    (torch.float16, 2.0)
    """
    op = check_operator(op)
    n = op.shape[0]
    m = min(n, check_int(n_iter, "n_iter", minimum=1))
    store = check_choice(store, "store", ("device", "host"))
    dtype, dev = work_dtype(op), op.device
    qdev = torch.device("cpu") if store == "host" else dev
    bdtype = check_basis_dtype(basis_dtype, dtype)
    gen = make_generator(seed)
    eps = float(torch.finfo(dtype).eps)

    ckpt = None
    if checkpoint is not None:
        every = check_int(checkpoint_every, "checkpoint_every", minimum=1)
        ckpt = ArnoldiCheckpoint(checkpoint, n, m, dtype, bdtype)

    q = (check_tensor(v0, "v0", n, dtype, qdev, nonzero=True) if v0 is not None
         else random_probes(n, 1, "gaussian", gen, dtype, qdev)[:, 0])
    Qr = torch.zeros(m + 1, n, dtype=bdtype, device=qdev)  # rows = Krylov vectors
    H = torch.zeros(m + 1, m, dtype=dtype, device=qdev)
    Qr[0] = q / q.norm()
    anorm, restarts, start, n_matvec = 0.0, 0, 0, 0
    if ckpt is not None:
        q0 = Qr[0].clone()
        if (saved := ckpt.load(into=Qr)) is not None:  # the saved rows are read straight into Qr
            start, n_matvec = saved["steps"], 1
            anorm, restarts = _resume(op, ckpt, saved, q0, Qr, H, gen, dtype, dev, qdev)
        del q0, saved
    done = saved_steps = start
    bar = progress_bar(progress, m, "arnoldi")
    bar.update(start)
    try:
        for j in range(start, m):
            w = apply(op, Qr[j].to(dev)[:, None], dtype, f"Arnoldi step {j + 1}")[:, 0].to(qdev)
            n_matvec += 1
            anorm = max(anorm, float(w.norm()))
            w, coef = orthogonalise(Qr[: j + 1], w)
            H[: j + 1, j] = coef
            h = float(w.norm())
            bar.update()
            if h > 100 * eps * anorm:
                H[j + 1, j] = h
                Qr[j + 1] = w / h
            elif j + 1 < n:
                fresh, _ = orthogonalise(Qr[: j + 1], random_unit(n, gen, dtype, qdev))
                Qr[j + 1] = fresh / fresh.norm()
                restarts += 1
            done = j + 1
            if ckpt is not None and (done % every == 0 or done == m):
                ckpt.save(Qr, H, done, saved_steps + 1 if saved_steps else 0, anorm, restarts, gen)
                saved_steps = done
            if h <= 100 * eps * anorm and j + 1 == n:  # space exhausted: the last column stays zero
                break
    except BaseException:
        if ckpt is not None and done > saved_steps:  # keep what was computed, then re-raise
            try:
                ckpt.save(Qr, H, done, saved_steps + 1 if saved_steps else 0, anorm, restarts, gen)
            except Exception:  # noqa: BLE001 - the original error matters more than a failed save
                pass
        raise
    finally:
        bar.close()
    return ArnoldiResult(Q=Qr.T, H=H, n_matvec=n_matvec, n_restarts=restarts)


def _resume(op: LinearOperator, ckpt: ArnoldiCheckpoint, saved: dict, q0: Tensor, Qr: Tensor, H: Tensor,
            gen: torch.Generator, dtype: torch.dtype, dev: torch.device, qdev: torch.device) -> tuple[float, int]:
    """Check that the checkpoint whose rows were just read into ``Qr`` belongs to this run (start vector
    ``q0``, and one product against the saved Arnoldi relation), fill ``H``; returns ``(anorm, restarts)``."""
    where = f"checkpoint {str(ckpt.dir)!r}"
    k = saved["steps"]
    if not torch.equal(Qr[0], q0):
        raise ValueError(f"{where}: it was written by a run with another start vector (v0 or seed); use the "
                         "same v0/seed or another directory")
    H[: k + 1, :k] = saved["H"][: k + 1, :k].to(dtype=dtype, device=qdev)
    w = apply(op, Qr[k - 1].to(dev)[:, None], dtype, "checkpoint check")[:, 0].to(qdev)
    w_norm = float(w.norm())
    h, rows_per = H[: k + 1, k - 1], max(1, (1 << 22) // Qr.shape[1])  # combine ≤ 4M entries at a time
    for i in range(0, k + 1, rows_per):
        w = w - Qr[i: min(i + rows_per, k + 1)].to(dtype).T @ h[i: i + rows_per]
    rel = float(w.norm()) / max(w_norm, saved["anorm"], 1e-300)  # anorm: q may lie near A's null space
    tol = 100 * max(float(torch.finfo(Qr.dtype).eps), float(torch.finfo(dtype).eps))
    if not rel <= tol:
        raise ValueError(f"{where}: the operator does not reproduce the saved step {k} (relative mismatch "
                         f"{rel:.2e} > {tol:.1e}): the checkpoint belongs to another model, data or operator; "
                         "use another directory")
    if saved["generator"] is not None:
        gen.set_state(saved["generator"])
    return saved["anorm"], saved["restarts"]


def distill(Q: Tensor, H: Tensor, top_k: int, positive_only: bool = False, which: str = "LM") -> Distilled:
    """Top eigenpairs from an Arnoldi decomposition: ``S = (H_m + H_mᵀ)/2 = Y Λ Yᵀ`` with
    ``H_m = H[:m, :m]``; keep ``top_k`` by ``which`` (default ``"LM"``: by ``|λ|``; or the largest positive
    ones with ``positive_only``); eigenvectors ``Q_m Y``. The one eigenpair step of every Arnoldi user
    (:func:`arnoldi_eigs`, ``gradsketch.spectrum``, Arnoldi influence).

    Source: Schioppa et al., "Scaling Up Influence Functions", AAAI 2022 (the "distill" step).

    Args:
        Q: ``[n, m+1]`` (or ``[n, m]``) Krylov basis from :func:`arnoldi`.
        H: ``[m+1, m]`` (or ``[m, m]``) Hessenberg matrix.
        top_k: ``1 ≤ top_k ≤ m``.
        positive_only: keep only ``λ > 0``, largest first (may return fewer than ``top_k``).
        which: ``"LM"`` (largest |λ|), ``"LA"`` (largest), ``"SA"`` (smallest), ``"BE"`` (both ends); ignored
            with ``positive_only``.

    Returns:
        :class:`Distilled` ``(eigenvalues [k], eigenvectors [n, k])``: in ``which`` order (descending ``|λ|``
        for ``"LM"``; descending ``λ`` with ``positive_only``), same dtype/device as ``Q``.

    >>> from gradsketch.linalg import MatrixOperator
    >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64))
    >>> Q, H = arnoldi(MatrixOperator(A), 3)
    >>> distill(Q, H, 2).eigenvalues.round(decimals=8).tolist()
    [-5.0, 3.0]
    """
    if not isinstance(Q, Tensor):
        raise TypeError(f"Q: expected a torch.Tensor, got {type(Q).__name__}")
    if not isinstance(H, Tensor):
        raise TypeError(f"H: expected a torch.Tensor, got {type(H).__name__}")
    if H.ndim != 2 or H.shape[0] not in (H.shape[1], H.shape[1] + 1) or H.shape[1] < 1:
        raise ValueError(f"H: expected shape [m+1, m] or [m, m], got {tuple(H.shape)}")
    m = H.shape[1]
    if Q.ndim != 2 or Q.shape[1] not in (m, m + 1):
        raise ValueError(f"Q: expected shape [n, {m + 1}] or [n, {m}] to match H of shape "
                         f"{tuple(H.shape)}, got {tuple(Q.shape)}")
    top_k = check_int(top_k, "top_k", minimum=1)
    if top_k > m:
        raise ValueError(f"top_k: expected at most m = {m} (the Krylov dimension), got {top_k}")
    check_bool(positive_only, "positive_only")
    which = check_choice(which, "which", ("LA", "SA", "LM", "BE"))
    Hm = H[:m, :m].detach().to("cpu", torch.float64).numpy()
    if not np.all(np.isfinite(Hm)):
        raise ValueError("H: expected finite values, got NaN or Inf")
    lam, Y = np.linalg.eigh((Hm + Hm.T) / 2)
    if positive_only:
        pos = np.flatnonzero(lam > 0)
        idx = pos[np.argsort(-lam[pos], kind="stable")][:top_k]
    else:
        idx = select_indices(lam, which, top_k)
    dtype = Q.dtype if Q.is_floating_point() else torch.float64
    if dtype in (torch.float16, torch.bfloat16):  # a compressed basis: combine in float32, a block of rows at a time
        dtype = torch.float32
        Yk = torch.as_tensor(np.ascontiguousarray(Y[:, idx]), dtype=dtype, device=Q.device)
        rows = max(1, (1 << 26) // (4 * m))
        vecs = torch.cat([Q[i:i + rows, :m].to(dtype) @ Yk for i in range(0, Q.shape[0], rows)])
        return Distilled(torch.as_tensor(lam[idx], dtype=dtype, device=Q.device), vecs)
    Yk = torch.as_tensor(np.ascontiguousarray(Y[:, idx]), dtype=dtype, device=Q.device)
    vecs = Q[:, :m].to(dtype) @ Yk
    return Distilled(torch.as_tensor(lam[idx], dtype=dtype, device=Q.device), vecs)


def arnoldi_eigs(op: LinearOperator, top_k: int, n_iter: int | None = None, seed: Any = 0,
                 v0: Tensor | None = None, positive_only: bool = False, store: str = "device",
                 tol: float | None = None, progress: bool = False, which: str = "LM",
                 check_symmetric: bool = False, residuals: bool = True,
                 basis_dtype: torch.dtype | None = None, checkpoint: Any = None,
                 checkpoint_every: int = 25) -> EigResult:
    """:func:`arnoldi` + :func:`distill` + true residuals ``‖A v − λ v‖`` (one ``matmat`` of ``top_k``
    columns), as an :class:`EigResult` (``which``, or ``"LA"`` with ``positive_only``).

    Source: Schioppa et al., AAAI 2022. Default ``n_iter = min(n, max(3·top_k, top_k + 60))``; ``tol``
    only sets the ``converged`` flags (``residual ≤ tol·|λ| + 100·ε·‖A‖_est``; default 1e-6 in float64,
    1e-4 in float32): there is no early stop. ``check_symmetric`` first measures the operator's asymmetry
    with random probes (2 products) and refuses a non-symmetric one (the symmetrised Hessenberg matrix would
    be meaningless). ``residuals=False`` skips the residual product (residuals are then NaN and
    ``converged`` all False): Arnoldi influence, whose every product is a pass over the training set, does.
    Eigenvectors are normalised to unit length. ``basis_dtype``: see :func:`arnoldi` (a float16 basis halves
    the Krylov memory; the eigenvectors come back in the working dtype). ``checkpoint``/``checkpoint_every``: a
    resumable run, see :func:`arnoldi`.

    >>> from gradsketch.linalg import MatrixOperator
    >>> A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    >>> arnoldi_eigs(MatrixOperator(A), 2, n_iter=20).eigenvalues.round(decimals=6).tolist()
    [20.0, 19.0]
    """
    op = check_operator(op)
    n = op.shape[0]
    top_k = check_int(top_k, "top_k", minimum=1)
    if top_k > n:
        raise ValueError(f"top_k: expected at most n = {n} for an operator of shape {op.shape}, got {top_k}")
    n_iter = check_int(n_iter, "n_iter", minimum=1, allow_none=True)
    m = min(n, max(3 * top_k, top_k + 60)) if n_iter is None else min(n, n_iter)
    if m < top_k:
        raise ValueError(f"n_iter: expected at least top_k = {top_k} steps, got {n_iter}")
    which = check_choice(which, "which", ("LA", "SA", "LM", "BE"))
    check_bool(check_symmetric, "check_symmetric")
    check_bool(residuals, "residuals")
    dtype, dev = work_dtype(op), op.device
    tol = check_tol(tol, dtype)
    used = 0
    if check_symmetric:
        defect, used = symmetry_defect(op, seed=seed + 1 if isinstance(seed, int) else 1)
        if defect > (1e-8 if dtype == torch.float64 else 1e-4):
            raise ValueError(f"op: Arnoldi eigenpairs need a symmetric operator, but random probes give a "
                             f"relative asymmetry {defect:.3g}; the symmetrised Hessenberg matrix would be "
                             "meaningless")
    res = arnoldi(op, m, v0=v0, seed=seed, store=store, progress=progress, basis_dtype=basis_dtype,
                  checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    lam, V = distill(res.Q, res.H, min(top_k, res.H.shape[1]), positive_only=positive_only, which=which)
    lam, V = lam.to(dev, dtype), V.to(dev, dtype)
    V = V / V.norm(dim=0, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)
    if residuals:
        AV = apply(op, V.to(dtype), dtype, "residual check")
        r = (AV - V.to(dtype) * lam.to(dtype)).norm(dim=0)
        eps = float(torch.finfo(dtype).eps)
        anorm = float(res.H.abs().max()) if res.H.numel() else 0.0
        conv = r <= tol * lam.abs().to(dtype) + 100 * eps * anorm
        extra = lam.numel()
    else:
        r = torch.full((lam.numel(),), float("nan"), dtype=lam.dtype, device=lam.device)
        conv = torch.zeros(lam.numel(), dtype=torch.bool)
        extra = 0
    return EigResult(eigenvalues=lam, eigenvectors=V, residuals=r, converged=conv.cpu(),
                     n_matvec=res.n_matvec + extra + used, n_iter=res.H.shape[1],
                     which="LA" if positive_only else which)
