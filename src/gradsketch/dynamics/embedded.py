"""Embedded CMD: while training, progressively freeze weights onto their affine path ``a · w_r + b``.

Mechanism (no patching of any optimiser or of the user's model): :class:`EmbeddedCMD` trains a deep copy
of the model. Its trainable weights live in ONE flat parameter ``free`` that holds only the weights not
yet frozen; the optimiser is built by the user's factory ``make_optimizer(params)`` over ``[free]``. The
forward pass assembles the full weight vector — ``free`` at the free positions, ``a_i · w_r(m_i) + b_i`` at
the frozen ones, with the reference ``w_r`` (always free, never frozen) taken from ``free`` and detached so
that frozen weights pass no gradient — and calls the copy through ``torch.func.functional_call``. At
every embedding the frozen weights leave the optimiser for real: a new ``free`` (smaller) and a new
optimiser from the factory are built, the old optimiser's per-element state (momentum, Adam moments)
restricted to the weights that stay free, its hyper-parameters (learning rate, ...) carried over.

Schedule (Brokman et al. 2024, §4.2): online CMD (:class:`~gradsketch.dynamics.OnlineCMD`) runs from the
start; after ``warmup`` epochs it fixes modes; then every ``every`` epochs the ``percent`` % of the
still-free weights (references excluded) whose ``(a, b)`` moved least since the previous embedding, in
Euclidean distance ``√(Δa² + Δb²)``, are frozen with their current ``(a, b)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ._layout import Layout, load_weights_
from .online import OnlineCMD


class EmbeddedCMD:
    """Train ``model`` (a copy) with embedded CMD. Loop: ``out = emb(x)``, ``loss.backward()``,
    ``emb.optimizer.step()``, ``emb.optimizer.zero_grad()``; :meth:`epoch_end` after every epoch.

    ``make_optimizer``: ``params -> torch.optim.Optimizer``, called with ``[free]`` at the start and after
    every embedding — fetch ``emb.optimizer`` afresh each epoch (learning-rate schedulers must be built on
    the current optimiser; hyper-parameters are carried over). The CMD model covers the trainable
    floating-point parameters; buffers (BatchNorm statistics) are trained as usual by the copy's forward.
    :meth:`model` returns the trained copy with the current weights written in.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> emb = EmbeddedCMD(nn.Linear(3, 1), lambda p: torch.optim.SGD(p, lr=0.1), n_modes=1, warmup=3,
    ...                   every=1, percent=50, n_samples=4)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> for epoch in range(5):
    ...     loss = ((emb(x) - y) ** 2).mean()
    ...     loss.backward(); emb.optimizer.step(); emb.optimizer.zero_grad()
    ...     _ = emb.epoch_end()
    >>> emb.n_frozen, emb.n_trainable
    (3, 1)
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                 n_modes: int = 10, warmup: int = 20, every: int = 5, percent: float = 10.0, *,
                 n_samples: int = 1000, sampling: str = "layer", seed: int = 0):
        if not callable(make_optimizer):
            raise TypeError(f"make_optimizer: expected a callable params -> Optimizer, got "
                            f"{type(make_optimizer).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int (epochs between embeddings), got {every!r}")
        if not (isinstance(percent, (int, float)) and 0 < percent <= 100):
            raise ValueError(f"percent: expected a number in (0, 100], got {percent!r}")
        self.module = copy.deepcopy(model)
        self.layout = Layout.from_model(self.module, buffers=False)
        self.online = OnlineCMD(self.module, n_modes=n_modes, warmup=warmup, n_samples=n_samples,
                                sampling=sampling, seed=seed, buffers=False,
                                params=[e.name for e in self.layout.entries])
        tensors = self.layout.check_model(self.module)
        first = next(iter(tensors.values()))
        self.dtype, self.device = first.dtype, first.device
        for t in tensors.values():
            t.requires_grad_(False)  # the copy's own tensors are placeholders; ``free`` is what trains
        self.every, self.percent = every, float(percent)
        self.make_optimizer = make_optimizer
        n = self.layout.n
        self.free_idx = torch.arange(n, device=self.device)
        self.frozen_idx = torch.zeros(0, dtype=torch.long, device=self.device)
        self.frozen_a = torch.zeros(0, dtype=self.dtype, device=self.device)
        self.frozen_b = torch.zeros(0, dtype=self.dtype, device=self.device)
        self.frozen_ref = torch.zeros(0, dtype=torch.long, device=self.device)  # position of the reference in free
        self.free = nn.Parameter(self.layout.flatten(self.module, dtype=self.dtype).to(self.device))
        self.optimizer = make_optimizer([self.free])
        self._ab_last: tuple[np.ndarray, np.ndarray] | None = None
        self.epoch = 0
        self.history: list[dict] = []

    # ----------------------------------------------------------------- weights
    @property
    def n_frozen(self) -> int:
        return int(self.frozen_idx.numel())

    @property
    def n_trainable(self) -> int:
        return int(self.free.numel())

    def full_vector(self) -> torch.Tensor:
        """All weights ``[N]``: free ones from ``free``, frozen ones ``a ⊙ w_r + b`` (gradient flows to ``free``
        only at the free positions)."""
        if self.n_frozen == 0:
            return self.free
        full = torch.zeros(self.layout.n, dtype=self.dtype, device=self.device)
        full = full.index_put((self.free_idx,), self.free)
        vals = self.frozen_a * self.free.detach()[self.frozen_ref] + self.frozen_b
        return full.index_put((self.frozen_idx,), vals)

    def weights(self) -> torch.Tensor:
        """Detached copy of all weights ``[N]``."""
        return self.full_vector().detach().clone()

    def __call__(self, *args, **kwargs):
        params = self.layout.unflatten(self.full_vector())
        return functional_call(self.module, params, args, kwargs)

    def train(self, mode: bool = True) -> EmbeddedCMD:
        self.module.train(mode)
        return self

    def eval(self) -> EmbeddedCMD:
        return self.train(False)

    def model(self) -> nn.Module:
        """A copy of the trained network carrying the current weights."""
        clone = copy.deepcopy(self.module)
        load_weights_(clone, self.layout, self.weights())
        for p in clone.parameters():
            p.requires_grad_(True)
        return clone

    # ----------------------------------------------------------------- schedule
    def epoch_end(self) -> bool:
        """Record the epoch's weights for online CMD; embed when due. Returns True if weights were frozen."""
        self.epoch += 1
        self.online.update_vector(self.weights().double().cpu().numpy())
        if not self.online.ready:
            return False
        if self._ab_last is None:
            self._ab_last = self.online.coefficients()
            return False
        if (self.epoch - self.online.warmup) % self.every:
            return False
        return self._embed()

    def _embed(self) -> bool:
        a, b = self.online.coefficients()
        a_old, b_old = self._ab_last  # type: ignore[misc]
        diff = np.hypot(a - a_old, b - b_old)
        eligible = np.ones(self.layout.n, dtype=bool)
        eligible[self.frozen_idx.cpu().numpy()] = False
        res = self.online.result
        assert res is not None
        eligible[res.ref_index] = False
        cand = np.flatnonzero(eligible)
        num = math.ceil(len(cand) * self.percent / 100.0)
        new = cand[np.argsort(diff[cand], kind="stable")[:num]]
        self._ab_last = (a, b)
        if num == 0:
            return False
        current = self.weights()
        frozen = np.union1d(self.frozen_idx.cpu().numpy(), new)
        free_np = np.setdiff1d(np.arange(self.layout.n), frozen)
        old_free = self.free_idx.cpu().numpy()
        keep_pos = torch.from_numpy(np.searchsorted(old_free, free_np)).to(self.device)
        # previously frozen weights keep their (a, b); new ones take the current fit
        fa = np.zeros(self.layout.n)
        fb = np.zeros(self.layout.n)
        fa[self.frozen_idx.cpu().numpy()] = self.frozen_a.double().cpu().numpy()
        fb[self.frozen_idx.cpu().numpy()] = self.frozen_b.double().cpu().numpy()
        fa[new], fb[new] = a[new], b[new]
        mode_of = np.maximum(res.modes, 0)
        ref_full = res.ref_index[mode_of[frozen]]
        dev, dt = self.device, self.dtype
        self.frozen_idx = torch.from_numpy(frozen).to(dev)
        self.free_idx = torch.from_numpy(free_np).to(dev)
        self.frozen_a = torch.from_numpy(fa[frozen]).to(dev, dt)
        self.frozen_b = torch.from_numpy(fb[frozen]).to(dev, dt)
        self.frozen_ref = torch.from_numpy(np.searchsorted(free_np, ref_full)).to(dev)
        old_param, old_opt = self.free, self.optimizer
        self.free = nn.Parameter(current[self.free_idx].clone())
        self.optimizer = self.make_optimizer([self.free])
        self._carry_state(old_opt, old_param, keep_pos)
        self.history.append({"epoch": self.epoch, "frozen": self.n_frozen, "trainable": self.n_trainable})
        return True

    def _carry_state(self, old_opt: torch.optim.Optimizer, old_param: torch.Tensor, keep: torch.Tensor) -> None:
        for g_new, g_old in zip(self.optimizer.param_groups, old_opt.param_groups):
            for key, val in g_old.items():
                if key != "params":
                    g_new[key] = val
        state = old_opt.state.get(old_param, {})
        new_state = {}
        for key, val in state.items():
            if torch.is_tensor(val) and val.shape == old_param.shape:
                new_state[key] = val[keep].clone()
            elif torch.is_tensor(val):
                new_state[key] = val.clone()
            else:
                new_state[key] = copy.deepcopy(val)
        if new_state:
            self.optimizer.state[self.free] = new_state
