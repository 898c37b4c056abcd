"""Matplotlib (Agg) plots of spectra: eigenvalues, density (log scale), evolution over checkpoints."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110, bbox_inches="tight")
    return fig


def plot_eigenvalues(results: Any, path: str | os.PathLike | None = None, labels: list[str] | None = None,
                     threshold: float | None = 0.2, title: str | None = None) -> Any:
    """Eigenvalues against their rank (one marker series per result; negative ones in the same axes);
    a dashed line at ``threshold · λ_1`` marks the outlier cut of :meth:`SpectrumResult.outliers`.

    Args:
        results: a :class:`SpectrumResult` or a list of them (e.g. exact vs sketched).
        path: PNG path (``None``: only return the figure).
        labels: legend entries.
    Returns:
        the matplotlib figure (close it with ``plt.close(fig)``).
    """
    plt = _plt()
    rs = results if isinstance(results, (list, tuple)) else [results]
    labels = labels or [_label(r) for r in rs]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for j, (r, lab) in enumerate(zip(rs, labels)):
        lam = r.eigenvalues.numpy()
        x = np.arange(1, lam.size + 1) + 0.12 * (j - (len(rs) - 1) / 2)
        if len(rs) == 1:
            ax.bar(x, lam, width=0.6, color=np.where(lam >= 0, "C0", "C3"), label=lab)
        else:
            ax.plot(x, lam, "o", ms=5, label=lab)
    if threshold is not None and rs and float(rs[0].eigenvalues.max()) > 0:
        ax.axhline(threshold * float(rs[0].eigenvalues.max()), ls="--", color="gray", lw=1,
                   label=f"outlier cut {threshold:g}·λ₁")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("rank (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title or "top eigenvalues")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_density(dens: Any, path: str | os.PathLike | None = None, log: bool = True,
                 exact: Any = None, title: str | None = None, floor: float = 1e-8) -> Any:
    """Smoothed spectral density ``φ(x)`` on a log y-axis (clipped at ``floor``), optionally with the
    histogram of exact eigenvalues ``exact`` (1-D array) for comparison."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    g, v = dens.grid.numpy(), dens.values.numpy()
    ax.plot(g, np.maximum(v, floor) if log else v, lw=1.2, label=f"SLQ ({dens.kernel}, σ={dens.sigma:.2g})")
    if exact is not None:
        ev = np.asarray(exact, dtype=float)
        ax.hist(ev, bins=80, density=True, alpha=0.35, color="C1", label="exact eigenvalues")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"spectral density ({dens.info.get('operator', '')})")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_evolution(series: Any, path: str | os.PathLike | None = None, top: int | None = None,
                   title: str | None = None) -> Any:
    """Top eigenvalues (one line per rank) against the checkpoint, from a :class:`SpectrumSeries`."""
    plt = _plt()
    E = series.eigenvalues().numpy()
    top = E.shape[1] if top is None else min(top, E.shape[1])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(E.shape[0])
    for j in range(top):
        ax.plot(x, E[:, j], "o-", ms=3, lw=1, label=f"λ{j + 1}" if j < 10 else None)
    ax.set_xticks(x)
    ax.set_xticklabels(series.labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("eigenvalue")
    if np.all(E[np.isfinite(E)] > 0):
        ax.set_yscale("log")
    ax.set_title(title or "top eigenvalues over checkpoints")
    ax.legend(fontsize=7, ncol=2)
    return _finish(fig, path)


def _label(r: Any) -> str:
    if r.sketch_spec:
        return f"{r.sketch_spec.get('inner_kind') or r.sketch_spec.get('kind', 'sketch')} d={r.sketch_spec.get('d')}"
    return f"{r.info.get('operator', '')} (exact)"
