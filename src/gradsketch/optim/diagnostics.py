"""The motivating diagnostic: how much of each Kronecker factor's mass sits in its top-``k`` eigenvalues.

Feinberg et al. (NeurIPS 2023, §2) observe that Shampoo's factors ``L = Σ G Gᵀ``, ``R = Σ Gᵀ G`` keep
most of their trace in a few eigenvalues during training, which is what makes a rank-``k`` sketch enough.
:class:`FactorSpectrumTracker` records ``share_k = Σ_{i≤k} λ_i / Σ_i λ_i`` for every factor of a
:class:`~gradsketch.optim.Shampoo` optimiser over training and draws it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .shampoo import Shampoo

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FactorSpectrumTracker", "top_k_share"]


def top_k_share(eigvals: torch.Tensor, k: int) -> float:
    """``Σ_{i≤k} λ_i / Σ_i λ_i`` of non-negative eigenvalues (any order); 1.0 when all are zero.

    Example:
        >>> top_k_share(torch.tensor([1.0, 3.0, 0.0, 4.0]), 2)
        0.875
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    lam = eigvals.detach().double().clamp_min(0).sort(descending=True).values
    total = float(lam.sum())
    return 1.0 if total == 0 else float(lam[:k].sum()) / total


class FactorSpectrumTracker:
    """Record the top-``k`` mass share of every Kronecker factor of a :class:`Shampoo` optimiser.

    Factors are named ``"<param>[block b].L"`` / ``".R"`` (``<param>`` is the name from
    ``names`` — e.g. ``dict(model.named_parameters())`` — or the index). Each :meth:`record` call runs one
    ``eigvalsh`` per factor on the current statistics.

    Args:
        optimizer: a :class:`Shampoo` (exact factors; a sketch cannot see its own bottom spectrum).
        ks: ranks to report, e.g. ``(16, 64)``.
        names: optional ``{name: parameter}`` for labels.

    Example:
        >>> torch.manual_seed(0) and None
        >>> lin = torch.nn.Linear(8, 6, dtype=torch.float64)
        >>> opt = Shampoo(lin.parameters(), lr=0.01, update_freq=1)
        >>> tr = FactorSpectrumTracker(opt, ks=(1, 2), names=dict(lin.named_parameters()))
        >>> for s in range(3):
        ...     opt.zero_grad(); lin(torch.randn(4, 8, dtype=torch.float64)).pow(2).sum().backward(); opt.step()
        ...     _ = tr.record(s + 1)
        >>> sorted(tr.history)[:2], len(tr.history["weight[block 0].L"])
        (['bias[block 0].R', 'weight[block 0].L'], 3)
        >>> fig = tr.figure(); type(fig).__name__
        'Figure'
    """

    def __init__(self, optimizer: Any, ks: tuple[int, ...] = (16, 64), names: dict[str, Any] | None = None) -> None:
        if not isinstance(optimizer, Shampoo):
            raise TypeError(f"optimizer: expected a gradsketch.optim.Shampoo, got {type(optimizer).__name__}")
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks: expected a non-empty tuple of integers >= 1, got {ks!r}")
        self.optimizer, self.ks = optimizer, tuple(ks)
        self._names = {id(p): n for n, p in (names or {}).items()}
        self.history: dict[str, list[tuple[int, dict[int, float]]]] = {}
        self.dims: dict[str, int] = {}

    def record(self, step: int) -> dict[str, dict[int, float]]:
        """Compute the shares now; returns ``{factor: {k: share}}`` and appends it to :attr:`history`."""
        out: dict[str, dict[int, float]] = {}
        idx = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(id(p), f"param{idx}")
                idx += 1
                st = self.optimizer.state.get(p)
                if not st:
                    continue
                for b, blk in enumerate(st["blocks"]):
                    for side, f in blk.items():
                        lam = torch.linalg.eigvalsh(f["stat"].double())
                        key = f"{name}[block {b}].{side}"
                        out[key] = {k: top_k_share(lam, k) for k in self.ks}
                        self.dims[key] = lam.numel()
                        self.history.setdefault(key, []).append((step, out[key]))
        return out

    def figure(self, max_factors: int = 8) -> Figure:
        """A matplotlib ``Figure`` (Agg canvas): one panel per ``k``, share against step for the
        ``max_factors`` largest factors (by side length)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        by_size = sorted(self.history, key=lambda n: -self.dims[n])[:max_factors]
        fig = Figure(figsize=(4.2 * len(self.ks), 3.4))
        FigureCanvasAgg(fig)
        for j, k in enumerate(self.ks):
            ax = fig.add_subplot(1, len(self.ks), j + 1)
            for name in by_size:
                steps = [s for s, _ in self.history[name]]
                ax.plot(steps, [v[k] for _, v in self.history[name]], label=f"{name} ({self.dims[name]})")
            ax.set_xlabel("step")
            ax.set_ylabel(f"share of trace in top {k} eigenvalues")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        if self.history:
            fig.axes[0].legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        return fig
