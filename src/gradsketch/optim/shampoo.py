"""Shampoo (full Kronecker factors) and Sketchy (Frequent Directions factors) as ``torch.optim`` optimisers.

Sources: V. Gupta, T. Koren, Y. Singer, "Shampoo: preconditioned stochastic tensor optimization", ICML 2018;
R. Anil et al., "Scalable second order optimization for deep learning", 2021 (grafting, blocking,
relative ridge, infrequent roots); V. Feinberg, X. Chen, Y. J. Sun, R. Anil, E. Hazan, "Sketchy:
memory-efficient adaptive regularization with Frequent Directions", NeurIPS 2023 (arXiv 2302.03764).

For a weight viewed as a matrix ``G [a, b]`` (conv kernels as ``[out, in·kh·kw]``, 1-D parameters as
``[1, n]``), cut into blocks of at most ``block_size × block_size``, each block keeps
``L ← β₂ L + G Gᵀ`` and ``R ← β₂ R + Gᵀ G`` and steps along ``L^(−1/p) G R^(−1/p)``, where ``p`` is twice the
number of factored sides (4 for a matrix, 2 for a vector; a side of length 1 has no factor). Shampoo
keeps ``L, R`` exactly (``O(a² + b²)`` memory) and recomputes the roots by ``eigh`` every ``update_freq``
steps; Sketchy keeps rank-``k`` Frequent Directions sketches ``U diag(λ) Uᵀ`` plus escaped mass ``ρ``
(``O(k(a + b) + k²)`` memory: every step's statistics accumulate in the sketch's basis, and one FD step
with the current gradient refreshes the sketch every ``update_freq`` steps), and applies
``U diag((λ + τ)^(−1/p)) Uᵀ x + τ^(−1/p)(I − U Uᵀ) x`` with ``τ = ρ + ridge``, never a dense matrix.
Both add a relative ridge ``eps · λ_max`` before the root.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..linalg.frequent_directions import _SHRINK_METHODS, fd_shrink

__all__ = ["Shampoo", "Sketchy"]

_GRAFTS = ("adam", "adagrad", "sgd", "none")


def _number(value: Any, name: str, low: float, high: float, *, open_low: bool = False,
            open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not ok:
        lo, hi = ("(" if open_low else "[") + f"{low}", f"{high}" + (")" if open_high else "]")
        raise ValueError(f"{name}: expected a finite number in {lo}, {hi}, got {value!r}")
    return v


def _integer(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def _matrix_shape(shape: torch.Size, precondition_1d: bool) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return (1, shape[0]) if precondition_1d else (1, 1)
    return shape[0], math.prod(shape[1:])


def _blocks(a: int, b: int, size: int) -> list[tuple[int, int, int, int]]:
    return [(r, min(r + size, a), c, min(c + size, b)) for r in range(0, a, size) for c in range(0, b, size)]


class _KroneckerOptimizer(torch.optim.Optimizer):
    """Shared step logic; subclasses define how a factor is stored, updated, refreshed and applied."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 update_freq: int, start_step: int, graft: str, graft_eps: float, block_size: int,
                 precondition_1d: bool) -> None:
        _number(lr, "lr", 0.0, math.inf)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        _number(betas[0], "betas[0]", 0.0, 1.0, open_high=True)
        _number(betas[1], "betas[1]", 0.0, 1.0, open_low=True)
        _number(eps, "eps", 0.0, math.inf, open_low=True)
        _number(weight_decay, "weight_decay", 0.0, math.inf)
        _integer(update_freq, "update_freq", 1)
        _integer(start_step, "start_step", 1)
        if graft not in _GRAFTS:
            raise ValueError(f"graft: expected one of {_GRAFTS}, got {graft!r}")
        if graft == "adam" and betas[1] == 1.0:
            raise ValueError("graft: 'adam' needs betas[1] < 1 for its moving average; got betas[1] = 1.0 "
                             "(use graft='adagrad' with summed statistics)")
        _number(graft_eps, "graft_eps", 0.0, math.inf, open_low=True)
        _integer(block_size, "block_size", 1)
        if not isinstance(precondition_1d, bool):
            raise TypeError(f"precondition_1d: expected a bool, got {type(precondition_1d).__name__}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, update_freq=update_freq,
                        start_step=start_step, graft=graft, graft_eps=graft_eps, block_size=block_size,
                        precondition_1d=precondition_1d)
        super().__init__(params, defaults)

    # -- subclass interface ---------------------------------------------------------------------------
    def _new_factor(self, d: int, like: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _update_block(self, blk: dict[str, Any], Gb: Tensor, beta2: float, refresh: bool, root: int,
                      eps: float) -> Any:
        """Fold the block's gradient into its factors' statistics (and, where ``refresh``, recompute or queue
        the roots). Returns whatever :meth:`_apply_block` can reuse this step (``None``: nothing)."""
        raise NotImplementedError

    def _finish_refreshes(self) -> None:
        """Run the refresh work queued by :meth:`_update_block` (called once per group, before any apply)."""

    def _apply_block(self, blk: dict[str, Any], Gb: Tensor, ctx: Any, root: int,
                     eps: float) -> tuple[Tensor, Tensor | None]:
        """``(P, s)`` with ``s · P = L^(−1/p) Gb R^(−1/p)`` for the block's current factors (``s``: a positive
        0-d tensor, or ``None`` for 1); ``P`` is a new tensor the caller may modify."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _name(group: dict[str, Any], gi: int, i: int, p: Tensor) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"{names[i]!r}"
        return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"

    def _layout(self, p: Tensor, group: dict[str, Any]) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
        a, b = _matrix_shape(p.shape, group["precondition_1d"])
        if (a, b) == (1, 1) and p.numel() != 1:  # 1-D parameter left to the graft
            return (1, p.numel()), [(0, 1, 0, p.numel())]
        return (a, b), _blocks(a, b, group["block_size"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        (a, b), blocks = self._layout(p, group)
        factored = not (p.ndim == 1 and not group["precondition_1d"])
        state: dict[str, Any] = {"step": 0, "blocks": []}
        for r0, r1, c0, c1 in blocks:
            blk: dict[str, Any] = {}
            if factored and r1 - r0 > 1:
                blk["L"] = self._new_factor(r1 - r0, p)
            if factored and c1 - c0 > 1:
                blk["R"] = self._new_factor(c1 - c0, p)
            state["blocks"].append(blk)
        if group["graft"] in ("adam", "adagrad"):
            state["graft_v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["betas"][0] > 0:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # -- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step; ``closure`` re-evaluates the loss (optional). Returns the loss or ``None``.

        Per group, in three passes: every parameter's graft direction and factor statistics (refresh work
        queued), the queued refreshes (batched where the subclass can), then every parameter's update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            live = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            for i, p in live:
                if p.grad.is_sparse:
                    raise TypeError(f"gradient of parameter {self._name(group, gi, i, p)}: sparse gradients are "
                                    "not supported (use nn.Embedding(sparse=False))")
            if live:  # one host synchronisation per group, then name the first offender
                # min and max are NaN or ±Inf exactly when g holds a NaN or an Inf (one fast pass, no overflow)
                dev = live[0][1].device
                finite = torch.isfinite(torch.stack([
                    (torch.stack(torch.aminmax(p.grad)) if p.grad.numel() else p.grad.new_zeros(2)).to(dev)
                    for _, p in live])).all(1)
                if not bool(finite.all()):
                    i, p = live[int((~finite).nonzero()[0, 0])]
                    raise ValueError(f"gradient of parameter {self._name(group, gi, i, p)}: expected finite "
                                     f"values, got NaN or Inf")
            work = []
            for _, p in live:
                g = p.grad
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                state["step"] += 1
                t = state["step"]
                (a, b), blocks = self._layout(p, group)
                G = g.reshape(a, b)
                # grafting direction D (its per-block norm sets the step length)
                graft = group["graft"]
                if graft == "adam":
                    v = state["graft_v"]
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    D = v.sqrt().mul_(1 / math.sqrt(1 - beta2 ** t)).add_(group["graft_eps"])
                    D = torch.div(g, D, out=D).reshape(a, b)  # g / (√v̂ + graft_eps), one buffer
                elif graft == "adagrad":
                    v = state["graft_v"]
                    v.addcmul_(g, g)
                    D = v.sqrt().add_(group["graft_eps"])
                    D = torch.div(g, D, out=D).reshape(a, b)
                else:
                    D = G
                refresh = (t - 1) % group["update_freq"] == 0
                ctxs = [self._update_block(blk, G[r0:r1, c0:c1], beta2, refresh, 2 * len(blk), eps) if blk else None
                        for (r0, r1, c0, c1), blk in zip(blocks, state["blocks"])]
                work.append((p, state, G, D, blocks, ctxs))
            self._finish_refreshes()
            for p, state, G, D, blocks, ctxs in work:
                t = state["step"]
                use = t >= group["start_step"]
                graft = group["graft"]
                U = D if len(blocks) == 1 else torch.empty_like(G)
                for (r0, r1, c0, c1), blk, ctx in zip(blocks, state["blocks"], ctxs):
                    if not blk or not use:
                        if U is not D:
                            U[r0:r1, c0:c1] = D[r0:r1, c0:c1]
                        continue
                    Pb, scale = self._apply_block(blk, G[r0:r1, c0:c1], ctx, 2 * len(blk), eps)
                    if graft != "none":  # the graft's norm replaces Pb's, so a positive ``scale`` drops out
                        pn = torch.linalg.vector_norm(Pb)
                        dn = torch.linalg.vector_norm(D[r0:r1, c0:c1])
                        Pb.mul_(torch.where(pn > 0, dn / pn.clamp_min(torch.finfo(pn.dtype).tiny),
                                            torch.zeros_like(pn)))
                    elif scale is not None:
                        Pb.mul_(scale)
                    if U is D:
                        U = Pb
                    else:
                        U[r0:r1, c0:c1] = Pb
                upd = U.reshape(p.shape)
                step_size = lr
                if beta1 > 0:
                    upd = state["momentum"].lerp_(upd, 1 - beta1)  # m ← β₁ m + (1 − β₁) u
                    step_size = lr / (1 - beta1 ** t)  # bias correction
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(upd, alpha=-step_size)
        return loss

    def preconditioner_bytes(self) -> int:
        """Bytes held by the Kronecker-factor statistics and roots (grafting and momentum excluded)."""
        total = 0
        for st in self.state.values():
            for blk in st.get("blocks", []):
                for f in blk.values():
                    total += sum(v.numel() * v.element_size() for v in f.values() if isinstance(v, Tensor))
        return total


class Shampoo(_KroneckerOptimizer):
    """Blocked Shampoo with full Kronecker factors: the reference that :class:`Sketchy` approximates.

    Per block ``G [a, b]``: ``L ← β₂ L + G Gᵀ``, ``R ← β₂ R + Gᵀ G`` every step; every ``update_freq``
    steps ``L^(−1/p) = Q diag((λ + eps·λ_max)^(−1/p)) Qᵀ`` from ``eigh`` (computed in float64); the step
    is ``L^(−1/p) G R^(−1/p)`` rescaled per block to the norm of the graft direction (Adam:
    ``g/(√v̂ + graft_eps)``; AdaGrad: ``g/(√Σg² + graft_eps)``; SGD: ``g``; ``'none'``: no rescaling), then
    momentum ``m ← β₁ m + (1 − β₁) u`` with bias correction, decoupled weight decay
    ``w ← w (1 − lr·weight_decay)`` and ``w ← w − lr · m̂`` (Gupta et al. 2018; Anil et al. 2021).

    Args:
        params: parameters or parameter groups (``named_parameters()`` also accepted: errors then name them).
        lr: learning rate ``≥ 0``.
        betas: ``(β₁, β₂)``: momentum ``[0, 1)`` and the statistics' decay ``(0, 1]`` (1 = sums).
        eps: relative ridge ``> 0`` added as ``eps · λ_max`` before the root.
        weight_decay: decoupled weight decay ``≥ 0``.
        update_freq: steps between root recomputations (statistics accumulate every step).
        start_step: the first step that uses the preconditioner; earlier steps follow the graft direction.
        graft: ``'adam'``, ``'adagrad'``, ``'sgd'`` or ``'none'``.
        graft_eps: the graft's denominator epsilon.
        block_size: largest side of a preconditioned block.
        precondition_1d: give 1-D parameters (biases, norm scales) a factor (``p = 2``); else graft only.

    Memory per ``[a, b]`` block: ``2(a² + b²)`` numbers (statistics and roots) plus ``a + b`` eigenvalues.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 3, dtype=torch.float64)
        >>> opt = Shampoo(model.parameters(), lr=0.1, update_freq=1)
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
        >>> losses = []
        >>> for _ in range(20):
        ...     opt.zero_grad(); loss = ((model(x) - y) ** 2).mean(); loss.backward(); opt.step()
        ...     losses.append(loss.item())
        >>> losses[-1] < losses[0]
        True
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, update_freq: int = 10, start_step: int = 1, graft: str = "adam",
                 graft_eps: float = 1e-8, block_size: int = 1024, precondition_1d: bool = True) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, update_freq, start_step, graft, graft_eps,
                         block_size, precondition_1d)

    def _new_factor(self, d: int, like: Tensor) -> dict[str, Tensor]:
        z = torch.zeros(d, d, dtype=like.dtype, device=like.device)
        return {"stat": z, "root": torch.zeros_like(z), "eigvals": torch.zeros(d, dtype=like.dtype,
                                                                                device=like.device)}

    def _update_block(self, blk: dict[str, Any], Gb: Tensor, beta2: float, refresh: bool, root: int,
                      eps: float) -> None:
        for side, rows in (("L", Gb.T), ("R", Gb)):
            if side in blk:
                blk[side]["stat"].mul_(beta2).addmm_(rows.T, rows)
                if refresh:
                    self._refresh_factor(blk[side], root, eps)

    def _apply_block(self, blk: dict[str, Any], Gb: Tensor, ctx: Any, root: int,
                     eps: float) -> tuple[Tensor, None]:
        Pb = blk["L"]["root"] @ Gb if "L" in blk else Gb
        return ((blk["R"]["root"] @ Pb.T).T if "R" in blk else Pb), None

    def _refresh_factor(self, f: dict[str, Tensor], p: int, eps: float) -> None:
        S = f["stat"].double()
        lam, Q = torch.linalg.eigh(0.5 * (S + S.T))
        lam = lam.clamp_min(0)
        ridge = eps * float(lam[-1]) if float(lam[-1]) > 0 else 1.0
        f["root"].copy_((Q * (lam + ridge) ** (-1.0 / p)) @ Q.T)
        f["eigvals"].copy_(lam.flip(0))


class Sketchy(_KroneckerOptimizer):
    """Shampoo whose Kronecker factors are rank-``k`` Frequent Directions sketches (Feinberg et al. 2023).

    Each factor keeps a sketch ``U diag(λ) Uᵀ`` (``U [d, k]`` orthonormal) and its escaped mass ``ρ``.
    Every step, the statistics the sketch can represent are accumulated exactly in its basis,
    ``C ← β₂ C + (Uᵀ X)(Uᵀ X)ᵀ`` (a ``k × k`` matrix; ``X`` is ``G`` for ``L`` and ``Gᵀ`` for ``R``). Every
    ``update_freq`` steps the sketch is refreshed by one FD step: ``β₂ C = W diag(μ) Wᵀ``,
    ``M = [diag(√μ) (U W)ᵀ ; rows]``, one decomposition (``shrink``), ``δ = σ_{k+1}²``, ``λ ← σ² − δ`` (top ``k``),
    ``ρ ← β₂^s ρ + δ`` (:func:`~gradsketch.linalg.frequent_directions.fd_shrink`), where ``rows`` are the
    columns of the current ``G`` for ``L`` and its rows for ``R``. So no gradient's in-sketch part is lost
    between refreshes, while new directions enter at refreshes (``accumulate=False`` gives the reference
    implementation's semantics instead: the sketch sees only the gradients of refresh steps). The step
    direction applies, per side, ``U diag((λ + τ)^(−1/p)) Uᵀ x + τ^(−1/p)(I − U Uᵀ) x`` with
    ``τ = ρ + eps·(λ₁ + ρ)``, never a dense matrix; grafting, momentum and weight decay are those of
    :class:`Shampoo`. With ``rank ≥`` every block side it equals :class:`Shampoo` with the same
    ``update_freq`` step for step (with ``accumulate=False``: only at ``update_freq=1``).

    Args:
        rank: sketch rank ``k ≥ 1``; a side of length ``d ≤ k`` keeps its factor exactly (rank ``d``).
        accumulate: accumulate every step's statistics in the sketch's basis (default) or only refresh
            from the gradients of every ``update_freq``-th step (Feinberg et al.'s JAX code).
        shrink: how a refresh decomposes ``M [k + n, d]``: ``'gram'`` (one eigendecomposition of the smaller
            Gram matrix, 2–3× faster on the CPU for transformer-sized blocks), ``'svd'`` (one thin SVD) or
            ``'auto'`` (the default: Gram when ``min(k + n, d) > 2k``, else SVD). Both give the same sketch
            up to rounding, except for the vectors of zero singular values, which are arbitrary in both and
            chosen differently; as they receive statistics between refreshes, they change later steps.
            Small blocks (a 1-D parameter's single row per step, a 2-row head) are rank-deficient for many
            refreshes and cheap to decompose, so ``'auto'`` keeps the SVD's choice there
            (:func:`~gradsketch.linalg.frequent_directions.fd_shrink`). Factors of equal shape refresh in
            one batched call.
        others: as :class:`Shampoo` (``update_freq``: steps between FD refreshes of the sketch).

    Memory per ``[a, b]`` block: ``k(a + b) + 2k² + 2k + 4`` numbers instead of Shampoo's
    ``2(a² + b²) + a + b`` (without ``accumulate``: ``k(a + b) + 2k + 2``).

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(6, 5, dtype=torch.float64)
        >>> opt = Sketchy(model.parameters(), lr=0.1, rank=2, update_freq=1)
        >>> x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
        >>> losses = []
        >>> for _ in range(20):
        ...     opt.zero_grad(); loss = ((model(x) - y) ** 2).mean(); loss.backward(); opt.step()
        ...     losses.append(loss.item())
        >>> losses[-1] < losses[0], tuple(opt.state[model.weight]["blocks"][0]["L"]["vecs"].shape)
        (True, (5, 2))
    """

    def __init__(self, params: Any, lr: float = 1e-3, rank: int = 64, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, update_freq: int = 10, start_step: int = 1,
                 graft: str = "adam", graft_eps: float = 1e-8, block_size: int = 1024,
                 precondition_1d: bool = True, accumulate: bool = True, shrink: str = "auto") -> None:
        self.rank = _integer(rank, "rank", 1)
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate: expected a bool, got {type(accumulate).__name__}")
        if shrink not in ("auto", *_SHRINK_METHODS):
            raise ValueError(f"shrink: expected one of {('auto', *_SHRINK_METHODS)}, got {shrink!r}")
        self.accumulate, self.shrink = accumulate, shrink
        self._queue: list[tuple[dict[str, Tensor], Tensor, float]] = []
        super().__init__(params, lr, betas, eps, weight_decay, update_freq, start_step, graft, graft_eps,
                         block_size, precondition_1d)

    def _new_factor(self, d: int, like: Tensor) -> dict[str, Tensor]:
        k = min(self.rank, d)
        kw = dict(dtype=like.dtype, device=like.device)
        f = {"vals": torch.zeros(k, **kw), "vecs": torch.eye(d, k, **kw), "rho": torch.zeros((), **kw)}
        if self.accumulate:
            # C: the statistics in the basis U since the last refresh; decay: β₂^(steps since it)
            f["acc"] = torch.zeros(k, k, **kw)
            f["decay"] = torch.ones((), **kw)
        return f

    def _update_block(self, blk: dict[str, Any], Gb: Tensor, beta2: float, refresh: bool, root: int,
                      eps: float) -> tuple[Tensor | None, Tensor | None] | None:
        if refresh:  # queued: _finish_refreshes shrinks all factors of a group, batched by shape
            for side, rows in (("L", Gb.T), ("R", Gb)):
                if side in blk:
                    self._queue.append((blk[side], rows, beta2))
            return None
        # the projections on the sketches' bases serve both the statistics and this step's direction
        A = blk["L"]["vecs"].T @ Gb if "L" in blk else None  # [k_L, b]
        Bm = Gb @ blk["R"]["vecs"] if "R" in blk else None  # [a, k_R]
        if self.accumulate:
            if A is not None:
                blk["L"]["acc"].mul_(beta2).addmm_(A, A.T)
                blk["L"]["decay"].mul_(beta2)
            if Bm is not None:
                blk["R"]["acc"].mul_(beta2).addmm_(Bm.T, Bm)
                blk["R"]["decay"].mul_(beta2)
        return A, Bm

    def _finish_refreshes(self) -> None:
        """One FD step for every queued factor; factors of equal shape share one batched decomposition."""
        jobs, self._queue = self._queue, []
        groups: dict[tuple[Any, ...], list[tuple[dict[str, Tensor], Tensor, float]]] = {}
        for f, rows, beta2 in jobs:
            key = (tuple(f["vecs"].shape), tuple(rows.shape), f["vecs"].dtype, f["vecs"].device, beta2)
            groups.setdefault(key, []).append((f, rows, beta2))
        for (_, _, dtype, _, beta2), items in groups.items():
            fs = [f for f, _, _ in items]
            k = fs[0]["vals"].numel()
            rows = torch.stack([r for _, r, _ in items]).to(dtype)  # [n_b, n, d]
            vecs = torch.stack([f["vecs"] for f in fs])  # [n_b, d, k]
            if self.accumulate:
                # β₂ C = W diag(μ) Wᵀ in the old basis; its rows diag(√μ)(U W)ᵀ carry the statistics kept since
                C = (beta2 * torch.stack([f["acc"] for f in fs])).double()
                mu, W = torch.linalg.eigh(0.5 * (C + C.mT))
                basis = (vecs.double() @ W).to(dtype)
                B = mu.clamp_min(0).sqrt().to(dtype)[..., :, None] * basis.mT
            else:
                vals = torch.stack([f["vals"] for f in fs])
                B = (beta2 * vals).clamp_min(0).sqrt()[..., :, None] * vecs.mT
            M = torch.cat([B, rows], dim=-2)
            method = self.shrink
            if method == "auto":
                method = "gram" if min(M.shape[-2:]) > 2 * k else "svd"
            vals, vecs, delta = fd_shrink(M, k, method)
            for i, f in enumerate(fs):
                f["vals"].copy_(vals[i])
                f["vecs"].copy_(vecs[i])
                if self.accumulate:
                    f["rho"].mul_(beta2 * f["decay"]).add_(delta[i])
                    f["acc"].copy_(torch.diag(vals[i]))
                    f["decay"].fill_(1.0)
                else:
                    f["rho"].mul_(beta2).add_(delta[i])

    @staticmethod
    def _root_weights(f: dict[str, Tensor], root: int, eps: float) -> tuple[Tensor, Tensor]:
        """``(w, w_τ)`` with ``(U diag(λ) Uᵀ + τ I)^(−1/p) = U diag(w) Uᵀ + w_τ I``, ``τ = ρ + eps·(λ₁ + ρ)``."""
        top = f["vals"][0] + f["rho"]
        tail = f["rho"] + torch.where(top > 0, eps * top, torch.ones_like(top))  # > 0, no host sync
        w_tail = tail ** (-1.0 / root)
        return (f["vals"] + tail) ** (-1.0 / root) - w_tail, w_tail

    def _apply_block(self, blk: dict[str, Any], Gb: Tensor, ctx: Any, root: int,
                     eps: float) -> tuple[Tensor, Tensor]:
        """``L' Gb R'`` with ``L' = U_L diag(w_L) U_Lᵀ + t_L I`` and ``R'`` alike, as ``t_L t_R`` times
        ``Gb + U_L [diag(w_L/t_L) K diag(w_R/t_R) U_Rᵀ + diag(w_L/t_L) A] + (Bm diag(w_R/t_R)) U_Rᵀ`` with
        ``A = U_Lᵀ Gb``, ``Bm = Gb U_R``, ``K = A U_R``: two rank-``k`` products added to ``Gb`` (four
        ``a·b·k`` products in all with the statistics' projections, instead of six), no dense ``d × d``."""
        fL: Any = blk.get("L")
        fR: Any = blk.get("R")
        A: Any
        Bm: Any
        if ctx is None:  # a refresh step: project on the new bases
            A = fL["vecs"].T @ Gb if fL is not None else None
            Bm = Gb @ fR["vecs"] if fR is not None else None
        else:
            A, Bm = ctx
        if fL is not None and fR is not None:
            wL, tL = self._root_weights(fL, root, eps)
            wR, tR = self._root_weights(fR, root, eps)
            wL, wR = wL / tL, wR / tR
            UR = fR["vecs"]
            inner = torch.addmm(A * wL[:, None], wL[:, None] * (A @ UR) * wR, UR.T)  # [k_L, b]
            return torch.addmm(Gb, fL["vecs"], inner).addmm_(Bm * wR, UR.T), tL * tR
        if fL is not None:
            wL, tL = self._root_weights(fL, root, eps)
            return torch.addmm(Gb, fL["vecs"], (wL / tL)[:, None] * A), tL
        wR, tR = self._root_weights(fR, root, eps)
        return torch.addmm(Gb, Bm * (wR / tR), fR["vecs"].T), tR
