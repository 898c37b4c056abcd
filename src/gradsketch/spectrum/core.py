"""Top eigenpairs of a model's curvature (Hessian, GGN, empirical Fisher), exact or sketched, and the
diagnostics of Schioppa (2024, §5): outliers, negative-to-positive eigenvalue ratio, gradient alignment.

Math. For the mean loss L(θ) = (1/n) Σ_i ℓ_i(θ), θ ∈ R^N, and a curvature matrix C (H = ∇²L, the GGN
G = (1/n) Σ J_iᵀ H_{L,i} J_i, or the empirical Fisher F = (1/n) Σ g_i g_iᵀ), :func:`spectrum` returns
k eigenpairs C v = λ v by Lanczos (full re-orthogonalisation) or Arnoldi + symmetrised Hessenberg
(``method="arnoldi"``, Schioppa et al., AAAI 2022). With a sketch Φ: R^N → R^d it works on the d × d
operator Φ C Φᵀ instead (Schioppa, "Efficient Sketches for Training Data Attribution and Studying the
Loss Landscape", NeurIPS 2024, §3/§5). Every gradsketch sketch has E‖Φx‖² = ‖x‖², i.e. E[ΦᵀΦ] = I, so for
C = Σ λ_j v_j v_jᵀ, Φ C Φᵀ = Σ λ_j (Φv_j)(Φv_j)ᵀ with ‖Φ v_j‖ ≈ 1 and ⟨Φv_i, Φv_j⟩ ≈ 0: its top
eigenvalues approximate C's top ones (no rescaling is needed or applied); its eigenvectors live in R^d.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast, overload

import numpy as np
import torch
from torch import Tensor

from ..linalg import LinearOperator, arnoldi_eigs, lanczos

OPERATORS = ("hessian", "ggn", "fisher")
METHODS = ("lanczos", "arnoldi")
WHICH = ("LA", "LM", "SA", "BE")
MODES = ("full", "batch", "stochastic")


# ------------------------------------------------------------------------------------------------
# small validation helpers
# ------------------------------------------------------------------------------------------------
def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


@overload
def _int(value: Any, name: str, minimum: int = ..., allow_none: Literal[False] = ...) -> int: ...
@overload
def _int(value: Any, name: str, minimum: int = ..., allow_none: bool = ...) -> int | None: ...
def _int(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(value)}")
    return int(value)


def _is_task(obj: Any) -> bool:
    from ..model import Task

    return isinstance(obj, Task)


def sketch_spec(sketch: Any) -> dict | None:
    """JSON-serialisable spec of a sketch (``None`` for no sketch)."""
    if sketch is None:
        return None
    spec = getattr(sketch, "spec", None)
    return json.loads(json.dumps(spec, default=str)) if spec is not None else {"type": type(sketch).__name__}


def curvature_operator(task: Any, data: Any = None, operator: str = "hessian", sampling: str = "full",
                       sketch: Any = None, damping: float = 0.0, progress: bool = False) -> LinearOperator:
    """The symmetric operator a spectrum is computed on: ``C`` ``[N, N]`` or ``Φ C Φᵀ`` ``[d, d]``.

    Args:
        task: a :class:`gradsketch.Task` (then ``data`` is required), or a square
            :class:`gradsketch.linalg.LinearOperator` used as ``C`` directly (``data``/``operator``/``sampling``
            ignored).
        data: re-iterable of batches (``sampling="batch"`` accepts a one-shot iterable).
        operator: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        sampling: ``"full"`` (exact mean over all of ``data``), ``"batch"`` (first batch), ``"stochastic"``
            (formerly ``mode``).
        sketch: ``None`` or a sketch / BlockSketch with ``n = N``.

    Under ``torch.distributed`` (an initialised process group, e.g. ``torchrun``) every rank passes the same
    ``data`` and computes on its contiguous shard of the batches; each product is all-reduced
    (:func:`gradsketch.curvature.sharded`), so every Krylov method sees the dataset-level operator.
    """
    from ..curvature import sharded, sketched
    from ..linalg.distributed import check_same, is_distributed

    if isinstance(task, LinearOperator):
        op = task
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"task: expected a square operator, got shape {op.shape}")
    elif _is_task(task):
        operator = _choice(operator, "operator", OPERATORS)
        sampling = _choice(sampling, "sampling", MODES)
        if data is None:
            raise ValueError("data: expected an iterable of batches for a Task, got None")
        if is_distributed():  # under torchrun: this rank's shard of the batches, all-reduced per product
            if sampling != "full":
                raise ValueError(f"sampling: expected 'full' under torch.distributed (every rank must apply the "
                                 f"same operator), got {sampling!r}")
            check_same(sketch_spec(sketch), "sketch (its spec)")
            op = sharded(operator, task, data, damping=damping)
        else:
            op = getattr(task, operator)(data, sampling, damping=damping, progress=False)
    else:
        raise TypeError("task: expected a gradsketch.Task or a gradsketch.linalg.LinearOperator, got "
                        f"{type(task).__name__}")
    if sketch is not None:
        n = op.shape[1]
        if getattr(sketch, "n", None) != n or not hasattr(sketch, "T"):
            raise ValueError(f"sketch: expected a gradsketch sketch or BlockSketch with n = {n} (the number of "
                             f"parameters), got {type(sketch).__name__} with n = {getattr(sketch, 'n', None)}")
        op = sketched(op, sketch)
    return op


# ------------------------------------------------------------------------------------------------
@dataclass
class SpectrumResult:
    """Eigenpairs of a curvature operator and the diagnostics of Schioppa (2024).

    Attributes:
        eigenvalues: ``[k]`` float64 CPU, descending.
        eigenvectors: ``[dim, k]`` orthonormal columns in the working dtype, same order (``dim = d`` in
            sketch space when a sketch was used, else ``N``); ``None`` after ``load(..., vectors=False)``.
        residuals: ``[k]`` true residual norms ``‖A v − λ v‖`` of the operator actually used.
        converged: ``[k]`` bool (``residual ≤ tol·|λ| + rounding floor``; see :func:`gradsketch.linalg.lanczos`).
        n_hvp: operator products spent (each is one Hessian/GGN/Fisher-vector product; symmetry probes and
            the residual check included).
        sketch_spec: the sketch's spec (rebuild with ``gradsketch.sketch_from_spec``) or ``None``.
        info: ``operator, method, which, sampling, n_params, dim, n_iter, seed, wall_s``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    n_hvp: int
    sketch_spec: dict | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        ev = ", ".join(f"{x:.5g}" for x in self.eigenvalues.tolist()[:6])
        more = ", ..." if self.eigenvalues.numel() > 6 else ""
        spec = self.sketch_spec or {}
        sk = f"{spec.get('inner_kind') or spec.get('kind', '?')}, d={spec.get('d', '?')}" if spec else "none"
        return (f"SpectrumResult(k={self.k}, operator={self.info.get('operator')!r}, eigenvalues=[{ev}{more}], "
                f"converged={int(self.converged.sum())}/{self.k}, n_hvp={self.n_hvp}, sketch={sk})")

    @property
    def k(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def sketched(self) -> bool:
        return self.sketch_spec is not None

    # -- diagnostics ---------------------------------------------------------------------------------
    def outliers(self, threshold: float = 0.2) -> Tensor:
        """Outlier eigenvalues ``λ_n`` with ``λ_n / λ_1 > threshold`` (λ_1 the largest), descending.

        Schioppa (2024, §5) calls an eigenvalue an outlier when ``λ_n/λ_1 > 20%``; with K classes the
        classical picture (Papyan 2019) predicts K − 1 outliers. Only the k computed eigenvalues are
        examined, so a count equal to ``k`` means "at least k". Raises ``ValueError`` when λ_1 ≤ 0.
        """
        t = float(threshold)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
        lam = self.eigenvalues
        top = float(lam.max())
        if top <= 0:
            raise ValueError(f"outliers: the largest computed eigenvalue is {top:.4g} <= 0; outliers are "
                             "defined relative to a positive top eigenvalue")
        return lam[lam / top > t]

    @property
    def negative_ratio(self) -> float:
        """``|λ_min| / λ_max`` for the most negative and the largest computed eigenvalues (0 when no
        computed eigenvalue is negative but the bottom of the spectrum was searched).

        Meaningful only if both ends were computed: ``which="BE"`` (k − k//2 from the top, k//2 from the
        bottom), or two runs (``which="LA"`` and ``which="SA"``) combined with :meth:`merge`. Returns
        ``nan`` for a result that did not look at the bottom (``which="LA"``). Raises ``ValueError`` when
        the largest eigenvalue is not positive.
        """
        ends = self.info.get("ends", self.info.get("which"))
        lam = self.eigenvalues
        top = float(lam.max())
        if top <= 0:
            raise ValueError(f"negative_ratio: the largest computed eigenvalue is {top:.4g} <= 0")
        low = float(lam.min())
        if low < 0:
            return -low / top
        if ends in ("BE", "SA", "LA+SA"):
            return 0.0
        return float("nan")

    def alignment(self, grads: Tensor, k: int | None = None, reduce: str = "none",
                  sketched: bool | None = None) -> float | Tensor:
        """Fraction of a gradient's squared norm in the span of the top-``k`` eigenvectors:
        ``a(g) = ‖V_kᵀ g‖² / ‖g‖²`` (Schioppa 2024, §5; Gur-Ari et al. 2018 "Gradient descent happens in a
        tiny subspace").

        Args:
            grads: ``[N]`` or ``[B, N]`` raw gradients (sketched with the result's sketch first when the
                spectrum is sketched: ``g̃ = Φ g``), or ``[d]`` / ``[B, d]`` gradients already in sketch space.
            k: use the ``k`` largest eigenvalues' vectors (default all computed ones).
            reduce: ``"none"``: one fraction per row (a float for 1-D input); ``"total"``:
                ``Σ_i ‖V_kᵀ g_i‖² / Σ_i ‖g_i‖²``; ``"mean"``: mean of the per-row fractions.
            sketched: force the interpretation of ``grads`` (``True``: already ``Φ g``; ``False``: raw);
                default by the last dimension (raw when it equals ``n_params``).

        Returns:
            a float (1-D input or a reduction) or a ``[B]`` float64 tensor.
        """
        if self.eigenvectors is None:
            raise ValueError("alignment: this result has no eigenvectors (loaded with vectors=False)")
        if not isinstance(grads, Tensor):
            raise TypeError(f"grads: expected a torch.Tensor [N] or [B, N], got {type(grads).__name__}")
        reduce = _choice(reduce, "reduce", ("none", "total", "mean"))
        one = grads.ndim == 1
        G = grads[None] if one else grads
        if G.ndim != 2:
            raise ValueError(f"grads: expected shape [N] or [B, N], got {tuple(grads.shape)}")
        V = self.eigenvectors
        dim = V.shape[0]
        n = int(self.info.get("n_params", dim))
        last = G.shape[1]
        if self.sketched:
            raw = (last == n) if sketched is None else not sketched
            if raw:
                if last != n:
                    raise ValueError(f"grads: expected raw gradients of length n_params = {n}, got {last}")
                G = self._sketch_rows(G)
            elif last != dim:
                raise ValueError(f"grads: expected sketched gradients of length d = {dim} or raw ones of "
                                 f"length n_params = {n}, got {last}")
        elif last != dim:
            raise ValueError(f"grads: expected last dimension n_params = {dim}, got {last}")
        kk = self.k if k is None else _int(k, "k")
        if kk > self.k:
            raise ValueError(f"k: expected at most {self.k} (the computed eigenpairs), got {kk}")
        order = torch.argsort(self.eigenvalues, descending=True)[:kk]
        Vk = V[:, order.to(V.device)].double()
        G = G.to(Vk.device).double()
        if not bool(torch.isfinite(G).all()):
            raise ValueError("grads: expected finite values, got NaN or Inf")
        num = ((G @ Vk) ** 2).sum(1)
        den = (G**2).sum(1)
        if bool((den == 0).any()) and reduce != "total":
            raise ValueError("grads: a gradient row is exactly zero; its alignment is undefined")
        if reduce == "total":
            return float(num.sum() / den.sum())
        frac = (num / den).cpu()
        if reduce == "mean":
            return float(frac.mean())
        return float(frac[0]) if one else frac

    def _sketch_rows(self, G: Tensor) -> Tensor:
        from ..sketch import sketch_from_spec

        # only reached for a sketched result that has eigenvectors (checked by the caller)
        assert self.eigenvectors is not None
        S = getattr(self, "_sketch", None) or sketch_from_spec(cast(dict, self.sketch_spec))
        if S.shape[1] != G.shape[1]:
            raise ValueError(f"grads: expected rows of length n = {S.shape[1]} (the sketch's input), got {G.shape[1]}")
        return (S @ G.to(self.eigenvectors.dtype).T).T

    # -- combining -----------------------------------------------------------------------------------
    def merge(self, other: SpectrumResult) -> SpectrumResult:
        """Union of two runs on the same operator (e.g. ``which="LA"`` and ``which="SA"``), descending,
        duplicates (eigenvalues equal to 1e-10 relative) kept once; products added. Lets
        :attr:`negative_ratio` see both ends."""
        if not isinstance(other, SpectrumResult):
            raise TypeError(f"other: expected a SpectrumResult, got {type(other).__name__}")
        if self.sketch_spec != other.sketch_spec:
            raise ValueError("other: expected a result computed with the same sketch, got a different sketch_spec")
        lam = torch.cat([self.eigenvalues, other.eigenvalues])
        res = torch.cat([self.residuals.double().cpu(), other.residuals.double().cpu()])
        conv = torch.cat([self.converged, other.converged])
        V = None
        if self.eigenvectors is not None and other.eigenvectors is not None:
            V = torch.cat([self.eigenvectors, other.eigenvectors.to(self.eigenvectors)], 1)
        order = torch.argsort(lam, descending=True)
        keep, last = [], None
        scale = float(lam.abs().max()) if lam.numel() else 1.0
        for i in order.tolist():
            if last is not None and abs(float(lam[i]) - last) <= 1e-10 * max(scale, 1e-300):
                continue
            keep.append(i)
            last = float(lam[i])
        idx = torch.tensor(keep)
        info = dict(self.info)
        ends = {self.info.get("ends", self.info.get("which")), other.info.get("ends", other.info.get("which"))}
        info["ends"] = "BE" if "BE" in ends else ("LA+SA" if {"SA"} & ends and ends & {"LA", "LM"} else
                                                  "+".join(sorted(str(e) for e in ends)))
        out = SpectrumResult(lam[idx], None if V is None else V[:, idx.to(V.device)], res[idx], conv[idx],
                             self.n_hvp + other.n_hvp, self.sketch_spec, info)
        cast(Any, out)._sketch = getattr(self, "_sketch", None)
        return out

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable summary (no eigenvectors)."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.double().cpu().tolist(),
            "converged": [bool(c) for c in self.converged.tolist()],
            "n_hvp": int(self.n_hvp),
            "sketch_spec": self.sketch_spec,
            "info": self.info,
        }

    def save(self, path: str | os.PathLike, vectors: bool = True) -> tuple[str, str | None]:
        """Write ``path`` (JSON from :meth:`to_dict`) and, with ``vectors``, the eigenvectors to ``path``
        with the suffix ``.npz`` (``res.json`` -> ``res.npz``). Returns the two paths."""
        path = os.fspath(path)
        base = path[:-5] if path.endswith(".json") else path
        jpath = base + ".json"
        with open(jpath, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        npath = None
        if vectors and self.eigenvectors is not None:
            npath = base + ".npz"
            V = self.eigenvectors.detach().cpu()
            np.savez(npath, eigenvectors=V.numpy(), dtype=str(V.dtype))
        return jpath, npath

    @classmethod
    def load(cls, path: str | os.PathLike, vectors: bool = True) -> SpectrumResult:
        """Read a result written by :meth:`save` (eigenvectors when the ``.npz`` exists and ``vectors``)."""
        path = os.fspath(path)
        base = path[:-5] if path.endswith(".json") else path
        with open(base + ".json") as f:
            d = json.load(f)
        V = None
        if vectors and os.path.exists(base + ".npz"):
            with np.load(base + ".npz") as z:
                V = torch.from_numpy(z["eigenvectors"].copy())
        return cls(torch.tensor(d["eigenvalues"], dtype=torch.float64), V,
                   torch.tensor(d["residuals"], dtype=torch.float64),
                   torch.tensor(d["converged"], dtype=torch.bool), int(d["n_hvp"]), d["sketch_spec"], d["info"])


# ------------------------------------------------------------------------------------------------
def spectrum(task: Any, data: Any = None, k: int = 10, sketch: Any = None, operator: str = "hessian",
             method: str = "lanczos", which: str = "LA", n_iter: int | None = None, sampling: str = "full",
             seed: int = 0, progress: bool = True, tol: float | None = None, damping: float = 0.0,
             store: str = "device", restart_on_breakdown: bool = True, *, n_iters: int | None = None,
             mode: Any = None) -> SpectrumResult:
    """``k`` eigenpairs of the Hessian / GGN / empirical Fisher of ``task``'s mean loss on ``data``,
    optionally of the sketched operator ``Φ C Φᵀ`` (Schioppa 2024).

    Args:
        task: :class:`gradsketch.Task`, or a symmetric :class:`gradsketch.linalg.LinearOperator` ``[N, N]``
            (then ``data``, ``operator``, ``sampling`` are ignored).
        data: re-iterable of batches (list of tuples/dicts of tensors, DataLoader).
        k: number of eigenpairs, ``1 ≤ k ≤ dim`` (``dim = d`` with a sketch, else ``N``).
        sketch: ``None``, a :func:`gradsketch.sketch` or a :class:`gradsketch.BlockSketch`
            (``task.block_sketch(d, kind, seed)``) with ``n = N``. E‖Φx‖² = ‖x‖², so Φ C Φᵀ's top
            eigenvalues estimate C's directly (no rescaling).
        operator: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        method: ``"lanczos"`` (symmetric Lanczos, full re-orthogonalisation, early stop at ``tol``) or
            ``"arnoldi"`` (``n_iter`` Arnoldi steps, no early stop, then the eigenpairs of the symmetrised
            Hessenberg matrix ``(H_m + H_mᵀ)/2``; Schioppa et al. 2022; ``store="host"`` keeps the Krylov
            basis in CPU memory).
        which: ``"LA"`` largest, ``"SA"`` smallest (most negative), ``"LM"`` largest magnitude, ``"BE"``
            both ends (``k − k//2`` top, ``k//2`` bottom; needed by :attr:`SpectrumResult.negative_ratio`).
        n_iter: Krylov dimension (Lanczos: maximum; default ``min(dim, max(3k, k + 60))``). ``n_iters`` is an
            accepted alias: the spelling of ``Attributor``, ``SpectrumConfig`` and the CLI's ``--n-iters``.
        sampling: ``"full"`` (exact mean over ``data``), ``"batch"`` (first batch) or ``"stochastic"``
            (a new batch per product: not a fixed matrix; use with care). Formerly ``mode``: ``mode=`` raises
            a TypeError naming ``sampling`` (``mode`` means only the gradient mode).
        seed: start vector and symmetry probes.
        progress: tqdm progress bar over Krylov steps.
        tol: Lanczos stopping / convergence tolerance (relative); default 1e-6 (float64) / 1e-4 (float32).
        damping: adds ``damping · I`` to C.
        store: Arnoldi only: ``"device"`` or ``"host"``.
        restart_on_breakdown: Lanczos only: on an invariant Krylov space continue from a fresh vector
            (``True``) or return what was found (``False``, with a ``RuntimeWarning`` when fewer than ``k``).

    Returns:
        :class:`SpectrumResult` (eigenvalues descending).

    Raises:
        TypeError / ValueError: bad arguments (naming the argument), ``k`` larger than the problem,
        a non-symmetric operator (from :func:`gradsketch.linalg.lanczos`), NaN/Inf in a product.
    """
    from ..curvature.operators import renamed_mode

    renamed_mode(mode)
    if n_iters is not None:  # the applications' spelling (Attributor, the configs, the CLI's --n-iters)
        if n_iter is not None and n_iter != n_iters:
            raise ValueError(f"n_iters: expected one of n_iters / n_iter (the same option), got n_iters={n_iters!r} "
                             f"and n_iter={n_iter!r}")
        n_iter = n_iters
    k = _int(k, "k")
    method = _choice(method, "method", METHODS)
    which = _choice(which, "which", WHICH)
    n_iter = _int(n_iter, "n_iter", allow_none=True)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    if _is_task(task):
        operator = _choice(operator, "operator", OPERATORS)
        sampling = _choice(sampling, "sampling", MODES)
    op = curvature_operator(task, data, operator, sampling, sketch, damping)
    dim = op.shape[0]
    n_params = task.n_params if _is_task(task) else (sketch.n if sketch is not None else dim)
    if k > dim:
        where = f"the sketch dimension d = {dim}" if sketch is not None else f"the number of parameters N = {dim}"
        raise ValueError(f"k: expected at most {where}, got k = {k}")
    t0 = time.perf_counter()
    try:
        if method == "lanczos":
            r = lanczos(op, k, which=which, n_iter=n_iter, tol=tol, seed=seed,
                        restart_on_breakdown=restart_on_breakdown, progress=progress)
            lam, V, res, conv, n_mv, m = r.eigenvalues, r.eigenvectors, r.residuals, r.converged, r.n_matvec, r.n_iter
        else:
            lam, V, res, conv, n_mv, m = _arnoldi_eigs(op, k, which, n_iter, tol, seed, store, progress)
    except ValueError as e:
        if "NaN or Inf" in str(e) and _is_task(task):
            raise ValueError(f"{e}. The {operator}-vector product of the model returned non-finite values: "
                             "check the loss and parameters (a NaN/Inf loss or weight on some batch), or "
                             "use a smaller learning rate / float64") from e
        raise
    wall = time.perf_counter() - t0
    order = torch.argsort(lam.detach().double().cpu(), descending=True)
    lam64 = lam.detach().double().cpu()[order]
    info = {"operator": operator if _is_task(task) else "operator", "method": method, "which": which,
            "sampling": sampling if _is_task(task) else None, "n_params": int(n_params), "dim": int(dim),
            "n_iter": int(m), "seed": seed if isinstance(seed, int) else None, "wall_s": wall,
            "damping": float(damping)}
    out = SpectrumResult(lam64, V[:, order.to(V.device)], res.detach()[order.to(res.device)].double().cpu(),
                         conv.cpu()[order], int(n_mv), sketch_spec(sketch), info)
    cast(Any, out)._sketch = sketch
    return out


def _arnoldi_eigs(op: LinearOperator, k: int, which: str, n_iter: int | None, tol: float | None, seed: int,
                  store: str, progress: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
    """Arnoldi + eigenpairs of ``(H_m + H_mᵀ)/2`` selected by ``which``, with true residuals: the one
    routine :func:`gradsketch.linalg.arnoldi_eigs`, after a symmetry check."""
    dim = op.shape[0]
    if n_iter is not None and min(dim, n_iter) < k:
        raise ValueError(f"n_iter: expected at least k = {k} Arnoldi steps, got {n_iter}")
    r = arnoldi_eigs(op, k, n_iter=n_iter, seed=seed, store=store, tol=tol, progress=progress, which=which,
                     check_symmetric=True)
    return r.eigenvalues, r.eigenvectors, r.residuals, r.converged, r.n_matvec, r.n_iter
