"""Curvature of the mean loss as linear operators over the flat parameter vector θ ∈ R^N.

For per-example losses ℓ_i over a dataset of n examples and L(θ) = (1/n) Σ_i ℓ_i(θ):

* Hessian  H = ∇²L = (1/n) Σ_i ∇²ℓ_i                          (:class:`HessianOperator`)
* GGN      G = (1/n) Σ_i J_iᵀ (∂²ℓ_i/∂z_i²) J_i, z_i = f(x_i; θ) (:class:`GGNOperator`; Schraudolph 2002)
* Fisher   F = (1/n) Σ_i g_i g_iᵀ, g_i = ∇ℓ_i (empirical Fisher)  (:class:`FisherOperator`)

``sampling="full"``: every product is the exact mean over all of ``data`` (Σ_batches of per-batch sums,
divided by n, i.e. the batch-size-weighted mean of per-batch means). ``sampling="batch"``: the first batch of
``data``, fixed. ``sampling="stochastic"``: each product uses the next batch, cycling through ``data``. (This
was ``mode=`` before; ``mode`` now only means the gradient mode explicit/implicit/factored, and ``mode=`` here
raises a TypeError naming ``sampling``.) ``damping`` λ adds
λ·I. Products run in the parameters' dtype on their device. Random layers (dropout) make the operator random;
use ``model.eval()`` for curvature. ``max_batch_columns``: a product with k columns splits each batch into
pieces of at most ``max_batch_columns // k`` examples (same result; bounds the memory of vectorised products,
whose activations are held k times, and keeps them cache-sized: 4096 was the fastest per column on a small
CNN, benchmarks/results/arnoldi_speed.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .._validation import check_count_or_fraction
from ..linalg.operator import LinearOperator
from ..model._batch import SplitBatch, check_batches, data_len, is_reiterable, progress_iter

if TYPE_CHECKING:
    from ..model.task import Task

SAMPLINGS = ("full", "batch", "stochastic")
MODES = SAMPLINGS  # the name used before


def renamed_mode(mode: Any) -> None:
    """Refuse the old keyword of the curvature data mode, now ``sampling``."""
    if mode is not None:
        raise TypeError(f"mode: the curvature's data sampling is now called sampling= (one of {SAMPLINGS}); "
                        "mode= only means the gradient mode (explicit, implicit, factored). Expected "
                        f"sampling={mode!r}, got mode={mode!r}")
HVP_METHODS = ("auto", "fwd_rev", "fwd_ad", "double_backward", "block")


class CurvatureOperator(LinearOperator):
    """Base class: subclasses implement ``_batch_sum(split, V [N, k]) -> Σ_{i in batch} C_i V`` [N, k]."""

    def __init__(self, task: Task, data: Iterable, sampling: str = "full", damping: float = 0.0,
                 progress: bool = False, *, max_batch_columns: int | None = None, mode: Any = None) -> None:
        renamed_mode(mode)
        from ..gradients.model_parallel import is_model_sharded

        if is_model_sharded(task):  # functional_call cannot swap FSDP2's gathered parameters: refuse, never guess
            raise ValueError("task: curvature products of a model sharded by FSDP2 (DTensor parameters) are not "
                             "supported; build the task on the unsharded model (the curvature shards the data "
                             "over ranks by itself: gradsketch.curvature.sharded)")
        if max_batch_columns is not None and (isinstance(max_batch_columns, bool)
                                              or not isinstance(max_batch_columns, int) or max_batch_columns < 1):
            raise ValueError(f"max_batch_columns: expected a positive int or None, got {max_batch_columns!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
        damping = float(damping)
        if damping < 0:
            raise ValueError(f"damping: expected a number >= 0, got {damping}")
        check_batches(data, "data")
        if sampling in ("full", "stochastic") and not is_reiterable(data):
            raise TypeError(f"data: sampling={sampling!r} iterates the data more than once; expected a re-iterable "
                            f"(list, DataLoader), got a one-shot {type(data).__name__}")
        super().__init__((task.n_params, task.n_params), task.dtype, task.device, symmetric=True)
        self.task, self.data, self.sampling, self.damping, self.progress = task, data, sampling, damping, progress
        self.max_batch_columns = max_batch_columns
        self._no_forward_ad = False
        self._fixed: SplitBatch | None = None
        self._iter: Any = None
        self.n_products = 0
        if sampling == "batch":
            try:
                first = next(iter(data))
            except StopIteration:
                raise ValueError("data: expected at least one batch, got an empty iterable") from None
            self._fixed = task.split(first)

    def _next_batch(self) -> SplitBatch:
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.data)
            try:
                return self.task.split(next(self._iter))
            except StopIteration:
                self._iter = None
        raise ValueError("data: expected at least one batch, got an empty iterable")

    #: subclasses whose ``_batch_sum`` takes a ``scale`` multiplying the loss (cheaper than scaling the result)
    _scales_loss = False

    def _batch_sum(self, split: SplitBatch, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        # fused attention kernels (CPU flash) lack double-backward and forward-mode rules: use the math one
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return self._matmat_impl(V)

    def _matmat_impl(self, V: Tensor) -> Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        self.n_products += V.shape[1]
        if self.sampling == "full":
            acc, total = None, 0
            for batch in progress_iter(self.data, self.progress, type(self).__name__, data_len(self.data)):
                split = self.task.split(batch)
                self.task.validate_batch(split)
                for part in self._chunk_sums(split, V):
                    acc = part if acc is None else acc + part
                total += split.size
            if acc is None:
                raise ValueError("data: expected at least one batch, got an empty iterable")
            out = acc / total
        else:
            if self.sampling == "batch":
                assert self._fixed is not None  # mode "batch" set it in __init__
                split = self._fixed
            else:
                split = self._next_batch()
            self.task.validate_batch(split)
            if self._scales_loss:  # 1/B folded into the loss: no pass over the [N, k] result
                parts = self._chunk_sums(split, V, 1.0 / split.size)
                out = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            else:
                parts = self._chunk_sums(split, V)
                out = (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)) / split.size
        return out + self.damping * V if self.damping else out

    def _chunk_sums(self, split: SplitBatch, V: Tensor, scale: float = 1.0) -> list[Tensor]:
        """``_batch_sum`` over pieces of the batch with at most ``max_batch_columns // k`` examples each (the
        vectorised products hold k copies of the activations: this bounds their memory)."""
        rows = split.size
        if self.max_batch_columns is not None:
            rows = max(1, self.max_batch_columns // V.shape[1])
        pieces = [split] if rows >= split.size else [c for _, c in split.chunks(rows)]
        if self._scales_loss:
            return [cast(Any, self)._batch_sum(c, V, scale) for c in pieces]
        return [self._batch_sum(c, V) * scale if scale != 1.0 else self._batch_sum(c, V) for c in pieces]

    def _columns(self, col: Any, V: Tensor) -> Tensor:
        """Apply a vector map ``[N] -> [N]`` to each column, vectorised with vmap when k > 1."""
        if V.shape[1] == 1:
            return col(V[:, 0])[:, None]
        return vmap(col, in_dims=1, out_dims=1, randomness="same")(V)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, sampling={self.sampling!r}, damping={self.damping}, "
                f"dtype={self.dtype})")


class HessianOperator(CurvatureOperator):
    """H = ∇²_θ (1/n) Σ_i ℓ_i(θ) (+ λI). ``method``: ``"fwd_rev"`` (forward-over-reverse, ``jvp`` of
    ``grad``, columns vectorised with vmap), ``"fwd_ad"`` (forward-over-reverse with
    ``torch.autograd.forward_ad``: dual parameters, one forward + backward per column), ``"double_backward"``
    (one forward + backward with ``create_graph``, then one backward per column, reusing the first
    backward), ``"auto"``: ``double_backward``: it needs no forward-mode AD rules and was the fastest on the
    digits MLP and MiniLM (about 3.3-3.7x a gradient for one vector, 2.6-3.0x per vector with 4 columns per
    call; benchmarks/results/grads.md). ``"block"``: for several columns ``fwd_rev`` (vmap over the columns:
    one batched pass, 1.5-1.7x less time per vector than ``double_backward`` on a small CNN at 4-16 columns,
    benchmarks/results/arnoldi_speed.md), falling back to ``double_backward`` for one column or when the
    model lacks forward-mode AD rules; what block Krylov methods use. Pass several columns at once
    (``H @ V``) where the algorithm allows: the first forward/backward pass is shared by all of them."""

    def __init__(self, task: Task, data: Iterable, sampling: str = "full", damping: float = 0.0,
                 method: str = "auto", progress: bool = False, *, max_batch_columns: int | None = None,
                 mode: Any = None) -> None:
        renamed_mode(mode)
        if method not in HVP_METHODS:
            raise ValueError(f"method: expected one of {HVP_METHODS}, got {method!r}")
        super().__init__(task, data, sampling, damping, progress, max_batch_columns=max_batch_columns)
        self.method = method

    _scales_loss = True

    def _batch_sum(self, split: SplitBatch, V: Tensor, scale: float = 1.0) -> Tensor:
        """``scale · Σ_{i in batch} ∇²ℓ_i V``."""
        method = "double_backward" if self.method == "auto" else self.method
        if method == "block":
            # several columns: vmap of jvp(grad) over them (one batched forward-over-reverse pass); one column,
            # or a model whose ops lack forward-mode rules: double backward
            if V.shape[1] == 1 or self._no_forward_ad:
                return self._double_backward(split, V, scale)
            try:
                return self._fwd_rev(split, V, scale)
            except (NotImplementedError, RuntimeError) as e:
                if not _forward_ad_missing(e):
                    raise
                self._no_forward_ad = True
                return self._double_backward(split, V, scale)
        if method == "fwd_ad":
            return self._fwd_ad(split, V, scale)
        return (self._fwd_rev if method == "fwd_rev" else self._double_backward)(split, V, scale)

    def _fwd_ad(self, split: SplitBatch, V: Tensor, scale: float = 1.0) -> Tensor:
        """Forward-over-reverse with ``torch.autograd.forward_ad``: the parameters become dual numbers
        (θ, v), one ordinary forward and backward pass on them, and the tangent of ∇_θ L is H v. No
        functorch transforms; one forward + backward per column."""
        import torch.autograd.forward_ad as fwAD

        task = self.task
        batch = split.rebuild()
        out = V.new_empty(V.shape)
        for j in range(V.shape[1]):
            vs = task.unflatten(V[:, j])
            with fwAD.dual_level(), torch.enable_grad():
                prim = {n: t.detach().requires_grad_(True) for n, t in task.params_dict().items()}
                duals = {n: fwAD.make_dual(t, vs[n].to(t.dtype)) for n, t in prim.items()}
                loss = task.losses_at(duals, batch, split.size).sum()
                if scale != 1.0:
                    loss = loss * scale
                gs = torch.autograd.grad(loss, list(prim.values()), allow_unused=True)
                tans = [None if g is None else fwAD.unpack_dual(g).tangent for g in gs]
            self._write_column(out, j, tans)
        return out

    def _write_column(self, out: Tensor, j: int, parts: list[Tensor | None]) -> None:
        """``out[:, j] = flatten(parts)`` piece by piece (None: zeros), without a flattened temporary."""
        col = out[:, j]
        for piece, h in zip(torch.split(col, self.task.param_sizes), parts):
            if h is None:
                piece.zero_()
            else:
                piece.copy_(h.detach().reshape(-1))

    def _fwd_rev(self, split: SplitBatch, V: Tensor, scale: float = 1.0) -> Tensor:
        task, batch, B = self.task, split.rebuild(), split.size
        p0 = task.params_dict()
        g = grad(lambda p: task.losses_at(p, batch, B).sum() * scale)

        def col(v: Tensor) -> Tensor:
            return task.flatten(jvp(g, (p0,), (task.unflatten(v),))[1])

        with torch.no_grad():
            return self._columns(col, V)

    def _double_backward(self, split: SplitBatch, V: Tensor, scale: float = 1.0) -> Tensor:
        task = self.task
        direct = all(t.requires_grad for _, t in task.named_params)
        # every selected parameter requires grad (the usual case): differentiate the model as it is, no
        # functional_call (autograd.grad never writes .grad); otherwise detached copies swapped in
        p: dict[str, Tensor] | None = None if direct else {
            n: t.detach().requires_grad_(True) for n, t in task.params_dict().items()}
        leaves = [t for _, t in task.named_params] if p is None else list(p.values())
        out = V.new_empty(V.shape)
        with torch.enable_grad():
            loss = task.losses_at(p, split.rebuild(), split.size).sum()
            if scale != 1.0:
                loss = loss * scale
            gs = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            idx = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
            for j in range(V.shape[1]):
                if not idx:
                    out[:, j].zero_()
                    continue
                vs = list(torch.split(V[:, j], task.param_sizes))
                tang = [vs[i].reshape(leaves[i].shape) for i in idx]
                hv = torch.autograd.grad([gs[i] for i in idx], leaves, grad_outputs=tang,
                                         retain_graph=j < V.shape[1] - 1, allow_unused=True)
                self._write_column(out, j, list(hv))
        return out


class _ReverseLinearization:
    """Reverse-only J v and Jᵀ w of z = fn(θ) at θ0 (J v = ∂/∂u ⟨Jᵀu, v⟩, the double-vjp trick): the
    fallback for models whose ops lack forward-mode AD rules (e.g. CPU flash attention)."""

    def __init__(self, task: Task, fn: Any) -> None:
        self.task = task
        self.p = {n: t.detach().requires_grad_(True) for n, t in task.params_dict().items()}
        self.leaves = list(self.p.values())
        with torch.enable_grad():
            self.z = fn(self.p)
            self.u = torch.zeros_like(self.z, requires_grad=True)
            gs = torch.autograd.grad(self.z, self.leaves, self.u, create_graph=True, allow_unused=True)
        self.pairs = [(i, g) for i, g in enumerate(gs) if g is not None and g.requires_grad]

    def jv(self, v: Tensor) -> Tensor:
        if not self.pairs:
            return torch.zeros_like(self.z)
        vs = list(self.task.unflatten(v).values())
        with torch.enable_grad():
            (out,) = torch.autograd.grad([g for _, g in self.pairs], self.u, [vs[i] for i, _ in self.pairs],
                                         retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.z) if out is None else out.detach()

    def vjp(self, w: Tensor) -> Tensor:
        with torch.enable_grad():
            gs = torch.autograd.grad(self.z, self.leaves, w, retain_graph=True, allow_unused=True)
        return self.task.flatten([torch.zeros_like(t) if g is None else g for g, t in zip(gs, self.leaves)])


def _forward_ad_missing(e: BaseException) -> bool:
    return isinstance(e, (NotImplementedError, RuntimeError)) and (
        "forward AD" in str(e) or "forward-mode" in str(e))


class GGNOperator(CurvatureOperator):
    """G = (1/n) Σ_i J_iᵀ H_{L,i} J_i (+ λI): J_i = ∂z_i/∂θ for the outputs z = ``output_fn(model, batch)``,
    H_{L,i} = ∂²ℓ_i/∂z_i² of ``loss_on_output(z, batch)``. Each product: a jvp through the model, an HVP of
    the loss in output space, a vjp back. Positive semi-definite when the loss is convex in z.

    ``frozen=True`` (``sampling="full"`` only): the data and the parameters are read at the first product and
    kept, with each batch piece's outputs, its vjp (the piece's activations) and, for outputs ``[B, C]`` with
    C ≤ 64 and a loss whose per-example output Hessians are the whole output Hessian (checked on a random
    direction), those ``[B, C, C]`` blocks, so that later products redo only the jvp and the vjp: what an
    eigensolver making several products of one operator wants (the Arnoldi fit). Later changes to the data
    or the model are not seen; memory holds every piece's activations."""

    def __init__(self, task: Task, data: Iterable, sampling: str = "full", damping: float = 0.0,
                 progress: bool = False, *, max_batch_columns: int | None = None, mode: Any = None,
                 frozen: bool = False) -> None:
        renamed_mode(mode)
        if task.output_fn is None or task.loss_on_output is None:
            raise ValueError("task: the GGN needs output_fn and loss_on_output (Task(model, output_fn=..., "
                             "loss_on_output=...) or Task.from_classifier); got a task with only loss_fn")
        if not isinstance(frozen, bool):
            raise TypeError(f"frozen: expected a bool, got {type(frozen).__name__}")
        if frozen and sampling != "full":
            raise ValueError(f"frozen: expected sampling='full' (the same data at every product), got "
                             f"sampling={sampling!r}")
        super().__init__(task, data, sampling, damping, progress, max_batch_columns=max_batch_columns)
        self.frozen = frozen
        self._splits: list[SplitBatch] | None = None
        self._states: dict[tuple[int, int, int], tuple] = {}

    def _functions(self, batch: Any, B: int) -> tuple[Any, Any]:
        """(θ ↦ outputs of ``batch``, z ↦ Σ per-example losses), with the shape checks."""
        task = self.task
        output_fn, loss_on_output = task.output_fn, task.loss_on_output
        assert output_fn is not None and loss_on_output is not None  # checked in __init__

        def out_fn(p: dict[str, Tensor]) -> Tensor:
            z = task.call(output_fn, p, batch)
            if not isinstance(z, Tensor) or z.ndim == 0 or z.shape[0] != B:
                got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                raise ValueError(f"output_fn: expected a tensor [B={B}, ...] of model outputs, got {got}")
            return z

        def losses(z: Tensor) -> Tensor:
            ell = loss_on_output(z, batch)
            if not isinstance(ell, Tensor) or tuple(ell.shape) != (B,):
                got = tuple(ell.shape) if isinstance(ell, Tensor) else type(ell).__name__
                raise ValueError(f"loss_on_output: expected per-example losses of shape [{B}], got {got}")
            return ell

        def lo(z: Tensor) -> Tensor:
            return losses(z).sum()

        lo.losses = losses  # type: ignore[attr-defined]  # the per-example losses, for loss_gradient_start
        return out_fn, lo

    def _matmat_impl(self, V: Tensor) -> Tensor:
        if not self.frozen or self._no_forward_ad:
            return super()._matmat_impl(V)
        try:
            return self._frozen_matmat(V)
        except (NotImplementedError, RuntimeError) as e:
            if not _forward_ad_missing(e):
                raise
            self._no_forward_ad = True
            return super()._matmat_impl(V)

    def _frozen_pieces(self, columns: int) -> Any:
        """(split index, split, piece start, piece, state) of every piece for products of ``columns`` columns,
        the splits read at the first call and the states made at the first use."""
        if self._splits is None:
            splits = []
            for batch in self.data:
                split = self.task.split(batch)
                self.task.validate_batch(split)
                splits.append(split)
            if not splits:
                raise ValueError("data: expected at least one batch, got an empty iterable")
            self._splits = splits
        rows = None if self.max_batch_columns is None else max(1, self.max_batch_columns // columns)
        for i, split in enumerate(self._splits):
            pieces = [(0, split)] if rows is None or rows >= split.size else list(split.chunks(rows))
            for start, piece in pieces:
                key = (i, start, piece.size)
                if key not in self._states:
                    self._states[key] = self._piece_state(piece)
                yield i, split, start, piece, self._states[key]

    def _frozen_matmat(self, V: Tensor) -> Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        self.n_products += V.shape[1]
        acc, total = None, 0
        for _, split, start, _, state in self._frozen_pieces(V.shape[1]):
            part = self._frozen_sum(state, V)
            acc = part if acc is None else acc + part
            total += split.size if start == 0 else 0
        assert acc is not None
        out = acc / total
        return out + self.damping * V if self.damping else out

    def loss_gradient_start(self, columns: int, generator: torch.Generator) -> Tensor:
        """``Σ_i r_ij ∇_θ ℓ_i [N, columns]`` for standard Gaussian ``r`` drawn per batch in data order (as
        :func:`gradsketch.attribution.methods.gradient_start` draws them), ℓ_i the losses ``loss_on_output``
        of the outputs: ``Jᵀ ∂(Σ_i r_ij ℓ_i)/∂z`` through the frozen pieces' vjps, no further forward pass.
        ``frozen=True`` only."""
        if not self.frozen:
            raise ValueError("loss_gradient_start: expected a frozen operator (GGNOperator(..., frozen=True))")
        task, out, R = self.task, None, None
        with torch.no_grad():
            for _, split, start, piece, state in self._frozen_pieces(columns):
                if start == 0:
                    R = torch.randn(split.size, columns, generator=generator, dtype=torch.float64).to(
                        self.device, self.dtype)
                assert R is not None
                z, vjp_fn, losses = state[2], state[3], state[5]
                _, back = vjp(losses, z)  # type: ignore[misc]  # torch.func stubs
                U = vmap(lambda r, back=back: back(r)[0], in_dims=1)(R[start:start + piece.size])  # [k, *z]
                part = vmap(lambda u, f=vjp_fn: task.flatten(f(u)[0]), in_dims=0, out_dims=1)(U)
                out = part if out is None else out + part
        assert out is not None
        return out

    def _piece_state(self, piece: SplitBatch) -> tuple:
        """(outputs function, loss function, outputs, vjp, output Hessian blocks or None) of one piece."""
        out_fn, lo = self._functions(piece.rebuild(), piece.size)
        with torch.no_grad():
            z, vjp_fn = vjp(out_fn, self.task.params_dict())  # type: ignore[misc]  # torch.func stubs
            gz = grad(lo)
            blocks = None
            if z.ndim == 2 and z.shape[1] <= 64:
                B, C = z.shape
                E = torch.eye(C, dtype=z.dtype, device=z.device)[:, None, :].expand(C, B, C)  # e_c in every row
                blocks = vmap(lambda e: jvp(gz, (z,), (e,))[1])(E).permute(1, 2, 0)  # [B, out, direction]
                g = torch.Generator().manual_seed(0)
                u = torch.randn(B, C, generator=g, dtype=torch.float64).to(z.device, z.dtype)
                full, mine = jvp(gz, (z,), (u,))[1], torch.einsum("bij,bj->bi", blocks, u)
                tol = 100 * torch.finfo(z.dtype).eps * max(float(full.abs().max()), 1e-30) * C
                if not bool(((full - mine).abs() <= tol).all()):  # examples coupled through the loss
                    blocks = None
        return out_fn, gz, z, vjp_fn, blocks, lo.losses  # type: ignore[attr-defined]

    def _frozen_sum(self, state: tuple, V: Tensor) -> Tensor:
        out_fn, gz, z, vjp_fn, blocks, _ = state
        task, p0 = self.task, self.task.params_dict()
        with torch.no_grad():
            if V.shape[1] == 1:
                jv = jvp(out_fn, (p0,), (task.unflatten(V[:, 0]),))[1]  # type: ignore[misc]
                hjv = (torch.einsum("bij,bj->bi", blocks, jv) if blocks is not None
                       else jvp(gz, (z,), (jv,))[1])  # type: ignore[misc]
                return task.flatten(vjp_fn(hjv)[0])[:, None]
            JV = vmap(lambda v: jvp(out_fn, (p0,), (task.unflatten(v),))[1], in_dims=1)(V)  # [k, *z.shape]
            HJV = (torch.einsum("bij,kbj->kbi", blocks, JV) if blocks is not None
                   else vmap(lambda u: jvp(gz, (z,), (u,))[1])(JV))
            return vmap(lambda u: task.flatten(vjp_fn(u)[0]), in_dims=0, out_dims=1)(HJV)

    def _batch_sum(self, split: SplitBatch, V: Tensor) -> Tensor:
        task, batch, B = self.task, split.rebuild(), split.size
        p0 = task.params_dict()
        out_fn, lo = self._functions(batch, B)
        if not self._no_forward_ad:
            try:
                with torch.no_grad():
                    z, vjp_fn = vjp(out_fn, p0)  # type: ignore[misc]  # torch.func stubs: has_aux variant
                    gz = grad(lo)

                    def col(v: Tensor) -> Tensor:
                        _, jv = jvp(out_fn, (p0,), (task.unflatten(v),))  # type: ignore[misc]  # torch.func stubs: has_aux variant
                        _, hjv = jvp(gz, (z,), (jv,))  # type: ignore[misc]  # torch.func stubs: has_aux variant
                        return task.flatten(vjp_fn(hjv)[0])

                    return self._columns(col, V)
            except (NotImplementedError, RuntimeError) as e:
                if not _forward_ad_missing(e):
                    raise
                self._no_forward_ad = True
        lin = _ReverseLinearization(task, out_fn)
        z = lin.z.detach()
        cols = []
        for j in range(V.shape[1]):
            jv = lin.jv(V[:, j])
            zz = z.clone().requires_grad_(True)
            with torch.enable_grad():
                (gz1,) = torch.autograd.grad(lo(zz), zz, create_graph=True)
                (hjv,) = torch.autograd.grad(gz1, zz, jv, allow_unused=True)
            cols.append(lin.vjp(torch.zeros_like(z) if hjv is None else hjv.detach()))
        return torch.stack(cols, 1).detach()


class FisherOperator(CurvatureOperator):
    """Empirical Fisher F = (1/n) Σ_i g_i g_iᵀ (+ λI), g_i = ∇ℓ_i: per batch F_B V = Jᵀ(J V) with J the
    [B, N] Jacobian of the per-example losses (one jvp and one vjp; no per-example gradients stored)."""

    def _batch_sum(self, split: SplitBatch, V: Tensor) -> Tensor:
        task, batch, B = self.task, split.rebuild(), split.size
        p0 = task.params_dict()

        def lf(p: dict[str, Tensor]) -> Tensor:
            return task.losses_at(p, batch, B)

        if not self._no_forward_ad:
            try:
                with torch.no_grad():
                    _, vjp_fn = vjp(lf, p0)  # type: ignore[misc]  # torch.func stubs: has_aux variant

                    def col(v: Tensor) -> Tensor:
                        _, jv = jvp(lf, (p0,), (task.unflatten(v),))  # type: ignore[misc]  # torch.func stubs: has_aux variant
                        return task.flatten(vjp_fn(jv)[0])

                    return self._columns(col, V)
            except (NotImplementedError, RuntimeError) as e:
                if not _forward_ad_missing(e):
                    raise
                self._no_forward_ad = True
        lin = _ReverseLinearization(task, lf)
        return torch.stack([lin.vjp(lin.jv(V[:, j])) for j in range(V.shape[1])], 1).detach()


def sketched(op: LinearOperator, sketch: Any, task: Task | None = None) -> LinearOperator:
    """``Φ A Φᵀ`` as a ``[d, d]`` operator: ``sketch @ op @ sketch.T`` (any sketch is a LinearOperator with
    ``n = op.shape[1]``; Schioppa 2024, §3: Arnoldi/Lanczos on the sketched Hessian). Symmetric when ``op`` is.
    ``task`` is accepted for symmetry with ``Task.sketched_hessian`` and unused.

    >>> import torch, gradsketch
    >>> H = gradsketch.MatrixOperator(torch.eye(16, dtype=torch.float64))
    >>> S = gradsketch.sketch("dense", 16, 4, seed=0)
    >>> SH = sketched(H, S)
    >>> SH.shape, SH.symmetric, bool(torch.allclose(SH.to_dense(), S.matrix() @ S.matrix().T))
    ((4, 4), True, True)
    """
    if not isinstance(op, LinearOperator) or op.shape[0] != op.shape[1]:
        raise ValueError(f"op: expected a square operator, got {type(op).__name__} of shape "
                         f"{getattr(op, 'shape', None)}")
    if not isinstance(sketch, LinearOperator):
        raise TypeError(f"sketch: expected a gradsketch sketch (a LinearOperator), got {type(sketch).__name__}")
    if sketch.shape[1] != op.shape[1]:
        raise ValueError(f"sketch: expected a sketch with n = {op.shape[1]} (the operator's size), got "
                         f"n = {sketch.shape[1]}")
    return sketch @ op @ sketch.T


def subsample_data(data: Iterable, size: int | float, seed: int = 0, batch_size: int | None = None) -> list:
    """A fixed random subset of the examples in ``data`` (an iterable of batches), as a list of batches: the
    Hessian data of a subsampled curvature operator, ``H_S = (1/|S|) Σ_{i∈S} ∇²ℓ_i`` (Schioppa et al., AAAI
    2022, run Arnoldi on the HVP of a sample of the training data).

    ``size``: an int ``m ≥ 1`` (examples; all of them when ``m ≥ n``) or a fraction in ``(0, 1]`` of ``n``
    (rounded, at least 1). The subset is ``m`` distinct indices drawn uniformly by ``seed`` from the ``n``
    examples in iteration order (two passes over ``data``: one to count, one to gather; a shuffling
    DataLoader therefore gives a random subset that a rerun does not reproduce). Batches are rebuilt with the
    structure of the first one, ``batch_size`` examples each (default: the size of the first batch).

    >>> import torch
    >>> data = [(torch.arange(6.0)[:, None], torch.zeros(6, dtype=torch.long)),
    ...         (torch.arange(6.0, 10.0)[:, None], torch.ones(4, dtype=torch.long))]
    >>> sub = subsample_data(data, 0.5, seed=0, batch_size=3)
    >>> [b[0].shape[0] for b in sub], torch.cat([b[0] for b in sub]).unique().numel()
    ([3, 2], 5)
    """
    if not is_reiterable(data):
        raise TypeError(f"data: subsampling iterates the data twice; expected a re-iterable (list, DataLoader), "
                        f"got a one-shot {type(data).__name__}")
    size = check_count_or_fraction(size, "size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
    sizes = [SplitBatch(batch).size for batch in data]
    n = sum(sizes)
    if n == 0:
        raise ValueError("data: expected at least one batch, got an empty iterable")
    m = min(n, max(1, round(size * n)) if isinstance(size, float) else size)
    bs = sizes[0] if batch_size is None else batch_size
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.sort(torch.randperm(n, generator=g)[:m]).values
    parts: list[list[Tensor]] = []
    skeleton: SplitBatch | None = None
    start = 0
    for batch in data:
        split = SplitBatch(batch)
        if skeleton is None:
            skeleton = split
        stop = start + split.size
        lo, hi = torch.searchsorted(chosen, start), torch.searchsorted(chosen, stop)
        if hi > lo:
            rows = (chosen[lo:hi] - start).to(split.leaves[0].device)
            parts.append([t.index_select(0, rows.to(t.device)) for t in split.leaves])
        start = stop
    if start != n:
        raise ValueError(f"data: the second pass gave {start} examples, the first {n}; expected the same data "
                         "twice")
    assert skeleton is not None
    leaves = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
    return [skeleton.rebuild([t[i:i + bs] for t in leaves]) for i in range(0, m, bs)]
