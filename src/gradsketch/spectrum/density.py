"""Spectral density (stochastic Lanczos quadrature) and trace (Hutchinson / Hutch++) of a model's curvature.

Sources: Golub & Meurant (1994); Ubaru, Chen & Saad, SIMAX 2017 and Ghorbani, Krishnan & Xiao, ICML 2019
(SLQ and Gaussian smoothing of Hessian spectra); Hutchinson (1989); Meyer, Musco, Musco & Woodruff, SOSA
2021 (Hutch++). The algorithms are :func:`gradsketch.linalg.slq`, :func:`~gradsketch.linalg.hutchinson`,
:func:`~gradsketch.linalg.hutchpp`; this module builds the operator from a task and keeps the metadata.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..linalg import SLQResult, TraceResult, hutchinson, hutchpp, slq
from .core import MODES, OPERATORS, _choice, _int, _is_task, curvature_operator, sketch_spec


@dataclass
class DensityResult:
    """A smoothed spectral density ``φ(x) = (1/P) Σ_p Σ_j w_pj K_σ(x − θ_pj)`` of a curvature operator.

    Attributes:
        grid: ``[G]`` float64 points ``x``.
        values: ``[G]`` float64 ``φ(x)`` (integrates to ~1; eigenvalue density of the ``dim × dim``
            operator, i.e. a normalised histogram of its ``dim`` eigenvalues).
        sigma: the kernel width used (absolute, eigenvalue units: Gaussian standard deviation).
        kernel: ``"gaussian"`` or ``"lorentzian"``.
        slq: the underlying :class:`gradsketch.linalg.SLQResult` (nodes, weights; ``.cdf``, ``.moment``).
        n_hvp: operator products spent.
        sketch_spec, info: as in :class:`SpectrumResult`.
    """

    grid: Tensor
    values: Tensor
    sigma: float
    kernel: str
    slq: SLQResult
    n_hvp: int
    sketch_spec: dict | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        lo, hi = self.slq.spectral_range
        return (f"DensityResult(operator={self.info.get('operator')!r}, range=[{lo:.5g}, {hi:.5g}], "
                f"sigma={self.sigma:.3g}, n_hvp={self.n_hvp})")

    def cdf(self, x: Any) -> Tensor:
        """Unsmoothed estimate of ``#{λ_i ≤ x} / dim``."""
        return self.slq.cdf(x)

    def to_dict(self) -> dict:
        return {"grid": self.grid.tolist(), "values": self.values.tolist(), "sigma": self.sigma,
                "kernel": self.kernel, "nodes": self.slq.nodes.tolist(), "weights": self.slq.weights.tolist(),
                "n": self.slq.n, "n_hvp": self.n_hvp, "sketch_spec": self.sketch_spec, "info": self.info}

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DensityResult:
        with open(os.fspath(path)) as f:
            d = json.load(f)
        s = SLQResult(torch.tensor(d["nodes"], dtype=torch.float64), torch.tensor(d["weights"], dtype=torch.float64),
                      int(d["n"]), int(d["n_hvp"]))
        return cls(torch.tensor(d["grid"], dtype=torch.float64), torch.tensor(d["values"], dtype=torch.float64),
                   float(d["sigma"]), d["kernel"], s, int(d["n_hvp"]), d["sketch_spec"], d["info"])


def density(task: Any, data: Any = None, operator: str = "hessian", n_probes: int = 10, n_steps: int = 80,
            sigma: float | None = None, sketch: Any = None, sampling: str = "full", seed: int = 0,
            kernel: str = "gaussian", rel_sigma: float = 0.01, grid: Any = None, n_grid: int = 1000,
            dist: str = "rademacher", batch_size: int | None = None, progress: bool = True) -> DensityResult:
    """Spectral density of the Hessian / GGN / Fisher (or of ``Φ C Φᵀ`` with a sketch) by SLQ.

    ``P = n_probes`` random probes, ``m = n_steps`` Lanczos steps each (``P·m`` products, plus 2 for the
    symmetry probe); Gaussian quadrature ``vᵀ f(C) v ≈ Σ_j Y[0,j]² f(θ_j)`` of the tridiagonal
    ``T_m = Y Θ Yᵀ``; the node/weight measure is smoothed with a kernel of width ``sigma``.

    Args:
        task, data, operator, sampling, sketch: as in :func:`gradsketch.spectrum.spectrum`.
        n_probes, n_steps: SLQ probes and Lanczos steps per probe.
        sigma: absolute kernel width (Gaussian standard deviation / Lorentzian HWHM). Default
            ``rel_sigma · (max θ − min θ)`` (1% of the estimated spectral range). Tools differ in this
            convention (some smooth a range-normalised spectrum); the value used is kept in ``.sigma``.
        kernel: ``"gaussian"`` or ``"lorentzian"``.
        grid, n_grid: evaluation points (default ``n_grid`` points over the range ± 6σ).
        dist: probe distribution, ``"rademacher"`` or ``"gaussian"``.
        batch_size: probes advanced together (one ``matmat`` per step); default all.

    Returns:
        :class:`DensityResult`.
    """
    n_probes = _int(n_probes, "n_probes")
    n_steps = _int(n_steps, "n_steps")
    if _is_task(task):
        operator = _choice(operator, "operator", OPERATORS)
        sampling = _choice(sampling, "sampling", MODES)
    op = curvature_operator(task, data, operator, sampling, sketch)
    t0 = time.perf_counter()
    s = slq(op, n_probes=n_probes, n_steps=n_steps, seed=seed, dist=dist, batch_size=batch_size,
            progress=progress)
    g, v = s.density(grid=grid, sigma=sigma, kernel=kernel, rel_sigma=rel_sigma, n_grid=n_grid)
    sig = float(sigma) if sigma is not None else s.default_sigma(rel_sigma)
    info = {"operator": operator if _is_task(task) else "operator", "sampling": sampling if _is_task(task) else None,
            "n_probes": n_probes, "n_steps": n_steps, "dim": op.shape[0], "seed": seed,
            "wall_s": time.perf_counter() - t0}
    return DensityResult(g, v, sig, kernel, s, s.n_matvec, sketch_spec(sketch), info)


def trace(task: Any, data: Any = None, operator: str = "hessian", method: str = "hutchpp",
          n_matvecs: int = 30, sketch: Any = None, sampling: str = "full", seed: int = 0, dist: str = "rademacher",
          progress: bool = True) -> TraceResult:
    """``tr(C)`` (or ``tr(Φ C Φᵀ)``) by Hutchinson or Hutch++.

    Hutchinson: ``tr(C) ≈ (1/M) Σ zᵢᵀ C zᵢ``, variance per Rademacher probe ``2(‖C‖_F² − Σ C_ii²)``.
    Hutch++: ``tr(Qᵀ C Q) + (1/g) Σ gᵢᵀ(I − QQᵀ) C (I − QQᵀ) gᵢ``, ``Q = orth(C S)``, ``M/3`` columns in
    ``S``; relative error O(1/M) for PSD C. Note ``E tr(Φ C Φᵀ) = tr(C)`` (E[ΦᵀΦ] = I).

    Args:
        method: ``"hutchpp"`` or ``"hutchinson"``.
        n_matvecs: total operator products ``M`` (``≥ 3`` for Hutch++).
        others: as in :func:`density`.

    Returns:
        :class:`gradsketch.linalg.TraceResult` (``estimate``, ``std_error``, ``n_matvec``, ``samples``).
    """
    method = _choice(method, "method", ("hutchpp", "hutchinson"))
    n_matvecs = _int(n_matvecs, "n_matvecs", minimum=3 if method == "hutchpp" else 1)
    if _is_task(task):
        operator = _choice(operator, "operator", OPERATORS)
        sampling = _choice(sampling, "sampling", MODES)
    op = curvature_operator(task, data, operator, sampling, sketch)
    if method == "hutchpp":
        return hutchpp(op, n_matvecs, seed=seed, dist=dist, progress=progress)
    return hutchinson(op, n_matvecs, seed=seed, dist=dist, progress=progress)
