"""Online CMD: fix modes and references after a warm-up, then update every weight's (a, b) recursively.

After ``warmup`` snapshots, post-hoc :func:`~gradsketch.dynamics.cmd` on those snapshots fixes each weight's
mode and the M references. From then on each new snapshot updates, per weight, the running mean of
``w_i`` and the co-moment ``Σ_t (w_i(t) - mean w_i)(w_r(t) - mean w_r)`` (Welford's recursion), and per mode
the running mean and second moment of the reference. The least-squares fit over all snapshots so far
is then ``a_i = C_i / M2_r``, ``b_i = mean w_i - a_i · mean w_r``: exactly the post-hoc fit with the same
modes on the same snapshots, with state ``O(N)`` (two float64 vectors) plus the ``M × E`` reference
history. This equals the authors' recursion ``Ã ← (Ã_old G_old + w w̃ᵀ) G⁻¹`` (Brokman et al. 2024, §4.1),
in a numerically centred form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._layout import Layout, model_with_weights
from .posthoc import CONSTANT, KEPT, CMDResult, cmd


class OnlineCMD:
    """Online CMD beside a training loop; call :meth:`update` with the model after every epoch.

    ``warmup`` F (≥ 3) snapshots are buffered in memory (``F × N`` float32) until the modes are fixed;
    afterwards the state is ``O(M·E + N)``. :meth:`weights` gives the CMD weights ``a ⊙ w_r(t)[modes] + b``
    at the latest snapshot (the training weights themselves during the warm-up), :meth:`model` a copy of a
    model carrying them; the training model is never modified. Weights constant during the warm-up are
    modelled as constants afterwards (``a = 0``, ``b`` = their running mean); with ``bn="keep"`` buffers
    follow the training values. Other arguments go to :func:`cmd`.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(4, 2)
    >>> online = OnlineCMD(net, n_modes=2, warmup=3, n_samples=10)
    >>> for epoch in range(5):
    ...     with torch.no_grad():
    ...         _ = net.weight.mul_(0.9).add_(0.1)
    ...     online.update(net)
    >>> online.ready, online.weights().shape
    (True, torch.Size([10]))
    """

    def __init__(self, model: nn.Module, n_modes: int = 10, warmup: int = 20, *, n_samples: int = 1000,
                 sampling: str = "layer", seed: int = 0, bn: str = "model",
                 params: Iterable[str] | Callable[[str], bool] | None = None, buffers: bool = True):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 3:
            raise ValueError(f"warmup: expected an int >= 3 (correlations need 3 snapshots), got {warmup!r}")
        self.layout = Layout.from_model(model, params=params, buffers=buffers)
        self.warmup = warmup
        self.cmd_kwargs: dict[str, Any] = {"n_modes": n_modes, "n_samples": n_samples, "sampling": sampling,
                                           "seed": seed, "bn": bn}
        self._buffer: list[np.ndarray] = []
        self.result: CMDResult | None = None
        self.count = 0
        self._last: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        """True once the warm-up is over and the modes are fixed."""
        return self.result is not None

    def update(self, model: nn.Module) -> None:
        """Add the model's current weights as the next snapshot."""
        self.update_vector(self.layout.flatten(model, dtype=torch.float64).numpy())

    def update_vector(self, w) -> None:
        """Add a snapshot given as a flat vector ``[N]`` (layout order)."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.layout.n,):
            raise ValueError(f"w: expected shape [{self.layout.n}], got {tuple(w.shape)}")
        if not np.isfinite(w).all():
            raise ValueError("w: non-finite weights; online CMD would propagate them")
        self.count += 1
        self._last = w
        if self.result is None:
            self._buffer.append(w.copy())
            if len(self._buffer) == self.warmup:
                self._start()
            return
        self._step(w)

    def _start(self) -> None:
        x = np.stack(self._buffer, axis=1)      # [N, F] float64
        self._buffer = []
        res = cmd(x, layout=self.layout, **self.cmd_kwargs)
        self.result = res
        self.modes = res.modes
        self._mi = np.maximum(res.modes, 0)
        ref = x[res.ref_index]                   # [M, F]
        self.ref_hist = [ref[:, k].copy() for k in range(ref.shape[1])]
        self.n_seen = x.shape[1]
        self.mean_r = ref.mean(axis=1)
        self.m2_r = ((ref - self.mean_r[:, None]) ** 2).sum(axis=1)
        self.mean_w = x.mean(axis=1)
        rc = ref - self.mean_r[:, None]
        self.c_wr = ((x - self.mean_w[:, None]) * rc[self._mi]).sum(axis=1)
        self._free = (res.modes != CONSTANT) & (res.modes != KEPT)
        self._ref_index = res.ref_index

    def _step(self, w: np.ndarray) -> None:
        r = w[self._ref_index]
        self.ref_hist.append(r.copy())
        self.n_seen += 1
        dr = r - self.mean_r
        self.mean_r = self.mean_r + dr / self.n_seen
        self.m2_r = self.m2_r + dr * (r - self.mean_r)
        dw = w - self.mean_w
        self.mean_w = self.mean_w + dw / self.n_seen
        self.c_wr = self.c_wr + dw * (r - self.mean_r)[self._mi]

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """Current ``(a [N], b [N])`` (float64): the least-squares fit over all snapshots seen."""
        if self.result is None:
            raise RuntimeError(f"online CMD is still warming up ({self.count}/{self.warmup} snapshots)")
        a = np.where(self._free, self.c_wr / self.m2_r[self._mi], 0.0)
        b = self.mean_w - a * self.mean_r[self._mi]
        return a, b

    def reference_trajectories(self) -> np.ndarray:
        """``[M, E]`` reference values at every snapshot seen."""
        if self.result is None:
            raise RuntimeError("online CMD is still warming up")
        return np.stack(self.ref_hist, axis=1)

    def weights(self) -> torch.Tensor:
        """CMD weights ``[N]`` (float64) at the latest snapshot (training weights during the warm-up)."""
        if self._last is None:
            raise RuntimeError("online CMD has seen no snapshot yet; call update(model) first")
        if self.result is None:
            return torch.from_numpy(self._last.copy())
        a, b = self.coefficients()
        w = a * self.ref_hist[-1][self._mi] + b
        kept = self.modes == KEPT
        w[kept] = self._last[kept]
        return torch.from_numpy(w)

    def model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the current CMD weights (``model`` itself is not modified)."""
        return model_with_weights(model, self.layout, self.weights())
