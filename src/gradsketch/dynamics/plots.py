"""Figures for CMD: reference trajectories, mode membership per layer, reconstruction error against M,
accuracy curves. Every function returns a ``matplotlib.figure.Figure`` drawn on an Agg canvas (no pyplot,
no global backend change); save it with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .posthoc import CMDResult


def _figure(w: float = 6.4, h: float = 4.0) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def reference_trajectories(result: CMDResult, normalize: bool = True, max_modes: int = 10) -> Figure:
    """One line per mode: the reference weight ``w_r(t)`` over snapshots (z-scored with ``normalize``).

    >>> import torch
    >>> from gradsketch.dynamics import cmd
    >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> fig = reference_trajectories(cmd(torch.stack([t, t ** 2 + 1, -t]), n_modes=1, n_samples=3))
    >>> type(fig).__name__
    'Figure'
    """
    fig = _figure()
    ax = fig.add_subplot()
    ref = result.ref_traj[:max_modes]
    x = np.arange(ref.shape[1]) + result.start
    sizes = np.bincount(result.modes[result.modes >= 0], minlength=result.n_modes)
    for m, r in enumerate(ref):
        y = (r - r.mean()) / (r.std() or 1.0) if normalize else r
        ax.plot(x, y, label=f"mode {m} ({sizes[m]:,} weights)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("snapshot")
    ax.set_ylabel("reference weight" + (" (z-score)" if normalize else ""))
    ax.set_title("CMD reference trajectories")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def mode_membership(result: CMDResult, max_layers: int = 30) -> Figure:
    """Stacked bars: the fraction of each layer's weights in each mode."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    counts = result.layer_mode_counts[:max_layers].astype(float)
    names = [n for n, _, _ in result.layers][:max_layers]
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    bottom = np.zeros(len(names))
    for m in range(frac.shape[1]):
        ax.bar(np.arange(len(names)), frac[:, m], bottom=bottom, label=f"mode {m}")
        bottom += frac[:, m]
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of the layer's weights")
    ax.set_title("CMD mode membership per layer")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def reconstruction_error(n_modes: Sequence[int], errors: Mapping[str, Sequence[float]] | Sequence[float],
                         ylabel: str = "relative reconstruction error") -> Figure:
    """Error (or any metric) against the number of modes M; ``errors`` one series or ``{label: series}``."""
    fig = _figure()
    ax = fig.add_subplot()
    series = errors if isinstance(errors, Mapping) else {"": errors}
    for label, ys in series.items():
        ax.plot(list(n_modes), list(ys), marker="o", label=label or None)
    ax.set_xlabel("number of modes M")
    ax.set_ylabel(ylabel)
    if isinstance(errors, Mapping):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_curves(curves: Mapping[str, Sequence[float]], x: Sequence[float] | None = None,
                    ylabel: str = "test accuracy (%)", title: str = "") -> Figure:
    """One line per method (final iterate, EMA, SWA, CMD ...) against epochs."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, ys in curves.items():
        xs = list(x) if x is not None else list(range(1, len(ys) + 1))
        ax.plot(xs[-len(ys):], list(ys), label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
