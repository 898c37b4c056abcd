"""Every figure of gradsketch, on ``matplotlib.figure.Figure`` (no pyplot state, no global backend).

Each function returns the Figure; with ``path`` it also writes a PNG there. Spectra: eigenvalues (top and
bottom ends labelled), density (log scale), evolution over checkpoints. Attribution: ROC curves of
mislabel detection. Intrinsic dimension: metric against d with the confirming run and the deciding point.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import new_figure

__all__ = ["plot_eigenvalues", "plot_density", "plot_evolution", "plot_roc", "plot_intrinsic", "ends_of"]


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110, bbox_inches="tight")
    return fig


def ends_of(result: Any) -> np.ndarray:
    """Per computed eigenvalue (descending order) ``"top"`` or ``"bottom"``: which end of the spectrum
    the search took it from (``which="BE"``: the last ``k // 2`` are bottom ones; ``"SA"``: all).

    >>> class R: eigenvalues = np.array([3.0, 2.0, -1.0, -2.0]); info = {"which": "BE"}
    >>> ends_of(R()).tolist()
    ['top', 'top', 'bottom', 'bottom']
    """
    lam = np.asarray(result.eigenvalues, dtype=float)
    k = lam.size
    which = result.info.get("ends", result.info.get("which"))
    out = np.array(["top"] * k, dtype=object)
    if which == "SA":
        out[:] = "bottom"
    elif which == "BE":
        out[k - k // 2:] = "bottom"
    elif which == "LA+SA":
        out[lam < 0] = "bottom"
    return out


def plot_eigenvalues(results: Any, path: str | os.PathLike | None = None, labels: list[str] | None = None,
                     threshold: float | None = 0.2, title: str | None = None) -> Any:
    """Computed eigenvalues by position (descending), top-end ones in blue and bottom-end ones (``which="BE"``
    / ``"SA"``) in red, each named in the legend; a dashed line at ``threshold · λ_1`` marks the outlier
    cut of :meth:`SpectrumResult.outliers`. Several results (e.g. exact vs sketched) are drawn as markers.

    Args:
        results: a :class:`SpectrumResult` or a list of them.
        path: PNG path (``None``: only return the figure).
        labels: legend entries for several results.
    Returns:
        the matplotlib Figure.
    """
    rs = results if isinstance(results, (list, tuple)) else [results]
    labels = labels or [_label(r) for r in rs]
    fig = new_figure((6.4, 3.8))
    ax = fig.add_subplot()
    for j, (r, lab) in enumerate(zip(rs, labels)):
        lam = np.asarray(r.eigenvalues, dtype=float)
        pos = np.arange(1, lam.size + 1)
        ends = ends_of(r)
        if len(rs) == 1:
            for end, color in (("top", "C0"), ("bottom", "C3")):
                sel = ends == end
                if sel.any():
                    name = "top eigenvalues (largest)" if end == "top" else "bottom eigenvalues (smallest)"
                    ax.bar(pos[sel], lam[sel], width=0.6, color=color, label=name)
            for x, v in zip(pos, lam):  # bars too short to read get their value written next to them
                if abs(v) < 0.05 * np.abs(lam).max():
                    ax.annotate(f"{v:.3g}", (x, v), xytext=(0, -10 if v < 0 else 3), textcoords="offset points",
                                ha="center", fontsize=7, color="C3" if v < 0 else "C0")
        else:
            ax.plot(pos + 0.12 * (j - (len(rs) - 1) / 2), lam, "o", ms=5, label=lab)
    if threshold is not None and rs and float(np.max(np.asarray(rs[0].eigenvalues))) > 0:
        ax.axhline(threshold * float(np.max(np.asarray(rs[0].eigenvalues))), ls="--", color="gray", lw=1,
                   label=f"outlier cut {threshold:g}·λ₁")
    ax.axhline(0, color="black", lw=0.6)
    k = max(np.asarray(r.eigenvalues).size for r in rs)
    ax.set_xticks(np.arange(1, k + 1))
    ax.set_xlabel("position among the computed eigenvalues (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title or "computed eigenvalues")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_density(dens: Any, path: str | os.PathLike | None = None, log: bool = True,
                 exact: Any = None, title: str | None = None, floor: float = 1e-8) -> Any:
    """Smoothed spectral density ``φ(x)`` on a log y-axis (clipped at ``floor``), optionally with the
    histogram of exact eigenvalues ``exact`` (1-D array) for comparison."""
    fig = new_figure((6.4, 3.8))
    ax = fig.add_subplot()
    g, v = np.asarray(dens.grid, dtype=float), np.asarray(dens.values, dtype=float)
    ax.plot(g, np.maximum(v, floor) if log else v, lw=1.2, label=f"SLQ ({dens.kernel}, σ={dens.sigma:.2g})")
    if exact is not None:
        ax.hist(np.asarray(exact, dtype=float), bins=80, density=True, alpha=0.35, color="C1",
                label="exact eigenvalues")
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
    E = np.asarray(series.eigenvalues(), dtype=float)
    top = E.shape[1] if top is None else min(top, E.shape[1])
    fig = new_figure((6.4, 3.8))
    ax = fig.add_subplot()
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


def plot_roc(results: dict[str, Any], path: str | os.PathLike | None = None,
             title: str = "Mislabel detection by self-influence") -> Any:
    """ROC curves ``{name: MislabelResult}`` (fields ``fpr``, ``tpr``, ``auc``, ``ap``) with the chance line."""
    fig = new_figure((5.0, 4.4))
    ax = fig.add_subplot()
    for name, r in results.items():
        ax.plot(r.fpr, r.tpr, label=f"{name} (AUC {r.auc:.3f}, AP {r.ap:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="gray", label="chance (AUC 0.5)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (flipped labels found)")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, path)


def plot_intrinsic(res: Any, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
    """Metric against the subspace dimension d (log2 axis) for an :class:`IntrinsicDimResult`: the search
    (or grid) curve, the confirming run at D*/2 drawn as its own marker, the threshold and full fine-tuning
    lines, and the D_int line through the point that decided it (the first d reaching the threshold, or
    the confirming run when it reached it too)."""
    fig = new_figure((6.6, 4.2))
    ax = fig.add_subplot()
    ds = [r["d"] for r in res.table]
    ms = [r["metric"] for r in res.table]
    ax.plot(ds, ms, "o-", color="C0", label=f"{res.method} ({res.kind}): best metric at each d")
    conf = res.confirm
    if conf is not None:
        ax.plot([conf["d"]], [conf["metric"]], marker="s", ms=9, ls="none", mfc="none", mec="C1", mew=2,
                label=f"confirming run at d={conf['d']} ({'reached' if conf['reached'] else 'not reached'})")
    ax.set_xscale("log", base=2)
    ax.axhline(res.threshold, color="r", ls="--", lw=1,
               label=f"threshold {int(round(100 * res.fraction))}% of full = {res.threshold:.3g}")
    ax.axhline(res.full_metric, color="k", ls=":", lw=1, label=f"full fine-tuning = {res.full_metric:.3g}")
    if res.estimate is not None:
        if conf is not None and conf["reached"] and conf["d"] == res.estimate:
            y = conf["metric"]
        else:
            hit = [r for r in res.table if r["d"] == res.estimate]
            y = hit[0]["metric"] if hit else res.threshold
        ax.axvline(res.estimate, color="g", ls="-.", lw=1)
        ax.plot([res.estimate], [y], marker="*", ms=16, color="g", ls="none",
                label=f"D_int = {res.estimate} (deciding point)")
    elif res.lower_bound is not None:
        ax.axvline(res.lower_bound, color="gray", ls="-.", lw=1, label=f"not reached: D_int > {res.lower_bound}")
    ax.set_xlabel("subspace dimension d (log2 axis)")
    ax.set_ylabel("metric")
    ax.set_title(title or f"D_int{int(round(100 * res.fraction))} = {res.estimate_str} ({res.method}, {res.kind})")
    ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, path)


def _label(r: Any) -> str:
    if r.sketch_spec:
        return f"{r.sketch_spec.get('inner_kind') or r.sketch_spec.get('kind', 'sketch')} d={r.sketch_spec.get('d')}"
    return f"{r.info.get('operator', '')} (exact)"
