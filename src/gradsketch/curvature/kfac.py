"""K-FAC and EK-FAC: Kronecker-factored curvature of the mean loss, per layer, as one LinearOperator.

For a weight used as y_t = W a_t (``nn.Linear``; ``nn.Conv2d`` on unfolded patches; transformers' ``Conv1D``
with W stored transposed; ``nn.Embedding`` with a_t the one-hot token) the per-example gradient is
G_i = Σ_t δ_t a_tᵀ, δ_t = ∂(cᵀ z_i)/∂y_t for an output cotangent c. The GGN block of W is
(1/n) Σ_i Σ_k vec(G_ik) vec(G_ik)ᵀ with the c_ik the columns of a square root of the output Hessian
H_i = ∂²ℓ_i/∂z_i² (so Σ_k c_ik c_ikᵀ = H_i: the expectation over the model's predictive distribution, taken
exactly). K-FAC (Martens & Grosse 2015; for convolutions Grosse & Martens 2016, "expand" form for shared
weights, Eschenhagen et al. 2023) replaces the block by A ⊗ S with

    A = (1/(n T)) Σ_i Σ_t a_t a_tᵀ          (a bias is a constant 1 appended to a_t)
    S = (1/n) Σ_i Σ_k Σ_t δ_t δ_tᵀ

(row-major vec(δ aᵀ) = δ ⊗ a, so the block is S ⊗ A in the flat layout; for an embedding A is diagonal, the
token frequencies). EK-FAC (George et al. 2018; Grosse et al. 2023, "Studying large language model
generalization with influence functions", eq. 20) keeps the Kronecker eigenbasis Q_S ⊗ Q_A and replaces the
eigenvalues by the exact second moments of the gradients in it, Λ = (1/n) Σ_i Σ_k (Q_Sᵀ G_ik Q_A)² (elementwise
square): the diagonal of the exact block in that basis, so EK-FAC is the best approximation of the block with
that eigenbasis in Frobenius norm. ``fisher="empirical"`` uses the training labels' gradients instead (one c
per example: the loss gradient), ``fisher="mc"`` random cotangents c = Lε with L Lᵀ = H_i (unbiased).

Parameters the Kronecker rule does not cover (LayerNorm, lone biases, weights tied across modules, any
other module under ``fisher="empirical"``) get a diagonal block with the same correction in the identity
basis, E[g²]. Everything uses the task's per-example structure: one forward pass with hooks on the layers,
one backward pass per output cotangent (C of them for a C-class classifier under the exact GGN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_int, check_real
from ..gradients.factored import HookEngine, _rows_cols, plan_task
from ..linalg.operator import LinearOperator
from ..model._batch import SplitBatch, data_len, is_reiterable, progress_iter

if TYPE_CHECKING:
    from ..model.task import Task

FISHERS = ("ggn", "empirical", "mc")
KINDS = ("ekfac", "kfac")
#: largest per-example output dimension C for which ``fisher="ggn"`` runs C backward passes per batch
MAX_GGN_OUTPUTS = 256
#: an eigenvalue at most this fraction of the largest is zero up to rounding (a factor's null direction, e.g.
#: softmax's all-ones output direction, comes out of float64 eigendecompositions as ±1e-17-ish, not 0), so a
#: negative power without damping is refused for it instead of returning 1/rounding
SINGULAR_RTOL = 1e-12
#: an output-Hessian eigenvalue at most this fraction of the example's largest is rounding (output_loss_derivatives)
ROOT_RTOL = 1e-10
#: per-example gradient elements formed at once in the eigenvalue correction (examples are chunked to fit)
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class KroneckerBlock:
    """One weight (and its folded bias) under a Kronecker factorisation.

    The weight is viewed as ``[rows, cols]`` (``weight.reshape(rows, -1)``; with the bias appended as a last
    column for Linear/Conv2d, a last row for Conv1D). ``act`` is the side of the activations (``"cols"``
    for Linear/Conv2d, ``"rows"`` for Conv1D and Embedding). ``R``/``C`` are the row and column factors
    (``[k, k]``, or a ``[vocab]`` diagonal for an embedding's rows), ``qr, er, qc, ec`` their
    eigendecompositions, ``lam [rows, cols]`` the corrected eigenvalues (EK-FAC) or ``er ⊗ ec`` (K-FAC).
    """

    weight: str
    bias: str | None
    kind: str
    module: nn.Module
    rows: int
    cols: int
    act: str
    R: Tensor
    C: Tensor
    count: float = 0.0
    qr: Tensor | None = None
    er: Tensor | None = None
    qc: Tensor | None = None
    ec: Tensor | None = None
    lam: Tensor | None = None

    @property
    def A(self) -> Tensor:
        """The activation factor (a ``[vocab]`` diagonal for an embedding)."""
        return self.C if self.act == "cols" else self.R

    @property
    def S(self) -> Tensor:
        """The output-gradient factor."""
        return self.R if self.act == "cols" else self.C


def _kron_blocks(task: Task, engine: HookEngine) -> dict[str, KroneckerBlock]:
    """Kronecker blocks for the weights used by exactly one supported module (bias folded when that module
    alone uses it), with float64 zero factors."""
    plans = engine.plans
    out: dict[str, KroneckerBlock] = {}
    shapes = dict(zip(task.param_names, task.param_shapes))
    dev = task.device
    for n in task.param_names:
        plan = plans[n]
        if n not in engine.hooked or not plan.weight_like or len(plan.uses) != 1 or len(plan.shape) < 2:
            continue
        mod, kind, _ = plan.uses[0]
        rows, cols = plan.shape[0], math.prod(plan.shape[1:])
        bias = None
        if kind in ("linear", "conv2d", "conv1d"):
            cand = [b for b, pb in plans.items() if b in engine.hooked and pb.uses == [(mod, kind, "bias")]]
            want = (cols,) if kind == "conv1d" else (rows,)
            if cand and shapes[cand[0]] == want:
                bias = cand[0]
        if bias is not None:
            rows, cols = (rows + 1, cols) if kind == "conv1d" else (rows, cols + 1)
        act = "cols" if kind in ("linear", "conv2d") else "rows"
        f64 = torch.float64
        R = (torch.zeros(rows, dtype=f64, device=dev) if kind == "embedding"
             else torch.zeros(rows, rows, dtype=f64, device=dev))
        out[n] = KroneckerBlock(n, bias, kind, mod, rows, cols, act, R,
                                torch.zeros(cols, cols, dtype=f64, device=dev))
    return out


class _Capturer:
    """Layer inputs and output-gradients of the hooked modules for a batch, one backward pass per output
    cotangent (the GGN's square-root columns, random ones, or the loss gradient)."""

    def __init__(self, task: Task, engine: HookEngine, fisher: str, mc_samples: int, seed: int) -> None:
        self.task, self.engine, self.fisher, self.mc = task, engine, fisher, mc_samples
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.clone = False

    def _forward(self, split: SplitBatch) -> tuple[Tensor, dict[int, list[Any]], dict]:
        task, m = self.task, split.size
        while True:
            caps: dict[int, list[Any]] = {id(mod): [] for mod, _ in self.engine.modules}
            clone = self.clone

            def make_hook(key: int, clone: bool = clone, caps: dict = caps):
                def hook(mod: nn.Module, inp: tuple, out: Tensor) -> Tensor | None:
                    x = inp[0].detach()
                    if m > 1 and x.ndim >= 1 and x.shape[0] == 1 and out.ndim >= 1 and out.shape[0] == 1:
                        x, out = x.expand(m, *x.shape[1:]), out.expand(m, *out.shape[1:])
                        caps[key].append((x, out, out._version))
                        return out.clone() if clone else out
                    caps[key].append((x, out, out._version))
                    return out.clone() if clone else None
                return hook

            handles = [mod.register_forward_hook(make_hook(id(mod))) for mod, _ in self.engine.modules]
            p = {n: t.requires_grad_(True) for n, t in ((n, t.detach()) for n, t in task.params_dict().items())}
            try:
                with torch.enable_grad():
                    if self.fisher == "empirical":
                        out = task.losses_at(p, split.rebuild(), m)
                    else:
                        assert task.output_fn is not None
                        out = task.call(task.output_fn, p, split.rebuild())
                        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != m:
                            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                            raise ValueError(f"output_fn: expected a tensor [B={m}, ...] of model outputs, "
                                             f"got {got}")
            finally:
                for h in handles:
                    h.remove()
            if not clone and any(o._version != v for lst in caps.values() for _, o, v in lst):
                self.clone = True
                continue
            return out, caps, p

    def _output_hessian_roots(self, z: Tensor, split: SplitBatch) -> Tensor:
        """``L [m, C, C]`` with L_i L_iᵀ = ∂²ℓ_i/∂z_i² (:func:`output_loss_derivatives`)."""
        C = z[0].numel()
        if C > MAX_GGN_OUTPUTS and self.fisher == "ggn":
            raise ValueError(f"fisher: 'ggn' runs one backward pass per output dimension, and the model has "
                             f"{C} outputs per example (more than {MAX_GGN_OUTPUTS}); use fisher='mc' or "
                             "'empirical'")
        assert self.task.loss_on_output is not None
        g, L = output_loss_derivatives(self.task.loss_on_output, z, split.rebuild())
        bad = nonfinite_examples(g)
        if bool(bad.any()):
            raise FloatingPointError(f"fisher: {int(bad.sum())} example(s) of a batch of {z.shape[0]} (the first at "
                                     f"position {int(bad.nonzero()[0])} of the batch) have non-finite outputs or "
                                     "loss derivatives; the curvature fit needs finite ones")
        return L

    def run(self, split: SplitBatch) -> Iterator[tuple[float, dict[int, list[tuple[Tensor, Tensor]]]]]:
        """Yields ``(weight, caps)``: caps ``id(module) -> [(input, output-gradient)]`` per cotangent; the
        curvature is Σ weight · (per-example outer products)."""
        z, caps, _ = self._forward(split)
        outs = [o for lst in caps.values() for _, o, _ in lst]
        need = [o.requires_grad for o in outs]
        targets = [o for o in outs if o.requires_grad]

        def pack(grads: tuple) -> dict[int, list[tuple[Tensor, Tensor]]]:
            it = iter(grads)
            res: dict[int, list[tuple[Tensor, Tensor]]] = {}
            k = 0
            for key, lst in caps.items():
                pairs = []
                for x, o, _ in lst:
                    g = next(it) if need[k] else None
                    k += 1
                    pairs.append((x, torch.zeros_like(o) if g is None else g.detach()))
                res[key] = pairs
            return res

        if not targets:
            raise ValueError("task: no hooked layer output depends on the parameters")
        if self.fisher == "empirical":
            grads = torch.autograd.grad(z.sum(), targets, allow_unused=True)
            yield 1.0, pack(grads)
            return
        L = self._output_hessian_roots(z, split)
        m, C = L.shape[0], L.shape[1]
        if self.fisher == "ggn":
            cols = [k for k in range(C) if bool((L[:, :, k] != 0).any())]
            cots = [(1.0, L[:, :, k]) for k in cols]
        else:
            eps = torch.randn(self.mc, m, C, generator=self.gen, dtype=torch.float64).to(L.device)
            cots = [(1.0 / self.mc, torch.einsum("mck,mk->mc", L, eps[s])) for s in range(self.mc)]
        for j, (w, c) in enumerate(cots):
            # the vector-Jacobian product Jᵀc as the gradient of the scalar Σ z·c: the same numbers, and passing
            # grad_outputs would make torch import sympy on the first call (~1.3 CPU s)
            grads = torch.autograd.grad((z * c.to(z.dtype).reshape(z.shape)).sum(), targets,
                                        retain_graph=j < len(cots) - 1, allow_unused=True)
            yield w, pack(grads)


def output_loss_derivatives(loss_on_output: Any, z: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
    """``(g [m, C], L [m, C, C])`` float64: g_i = ∂ℓ_i/∂z_i, the gradient of each example's loss in its outputs
    ``z_i`` (flattened to C numbers), and L_i with ``L_i L_iᵀ = ∂²ℓ_i/∂z_i²``, its Hessian, by C double-backward
    passes and an eigendecomposition: column k of ``L_i`` is √w_k u_k for the eigenpairs in ascending order,
    negative eigenvalues and those at rounding level (at most ``ROOT_RTOL`` of the example's largest) set to 0.
    Softmax cross-entropy has an exact zero along the all-ones direction, which eigh returns as ~1e-17: zeroed,
    its column is recognisably empty and costs no backward pass in K-FAC's fit or TRAK's GGN kernel. An example
    whose outputs, gradient or Hessian are not finite gets zero roots (its gradient keeps the non-finite values, so
    that callers can tell it: :func:`nonfinite_examples`).
    ``loss_on_output(z, batch) -> [m]`` is the task's loss on outputs (:meth:`gradsketch.Task.from_classifier`)."""
    m = z.shape[0]
    C = z[0].numel()
    # in float64 whatever the model's precision: a float32 Hessian is off by ~1e-8 of its largest eigenvalue,
    # which would hide softmax's exact null direction among the genuinely small eigenvalues
    zz = z.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        ell = loss_on_output(zz, batch)
        if not isinstance(ell, Tensor) or tuple(ell.shape) != (m,):
            got = tuple(ell.shape) if isinstance(ell, Tensor) else type(ell).__name__
            raise ValueError(f"loss_on_output: expected per-example losses of shape [{m}], got {got}")
        (g,) = torch.autograd.grad(ell.sum(), zz, create_graph=True)
        g = g.reshape(m, C)
        H = torch.empty(m, C, C, dtype=torch.float64, device=z.device)
        for j in range(C):
            (hj,) = torch.autograd.grad(g[:, j].sum(), zz, retain_graph=j < C - 1, allow_unused=True)
            H[:, j, :] = 0 if hj is None else hj.reshape(m, C)
    H = 0.5 * (H + H.transpose(1, 2))
    bad = nonfinite_examples(zz.detach().reshape(m, C), g.detach(), H.reshape(m, C * C))
    if bool(bad.any()):   # eigh cannot take them; the caller sees them through g
        H = torch.where(bad[:, None, None], torch.zeros_like(H), H)
        g = torch.where(bad[:, None], torch.full_like(g, float("nan")), g)
    w, U = torch.linalg.eigh(H)
    w = torch.where(w > ROOT_RTOL * w[:, -1:], w, torch.zeros_like(w))
    return g.detach(), U * w.sqrt().unsqueeze(1)


def nonfinite_examples(*rows: Tensor) -> Tensor:
    """``[m]`` bool: the examples (rows) with a non-finite value in any of ``rows`` (each ``[m, ...]``)."""
    return torch.stack([~torch.isfinite(r.reshape(r.shape[0], -1)).all(1) for r in rows]).any(0)


def _with_ones(side: Tensor) -> Tensor:
    """``side [..., k]`` with a constant 1 appended (the folded bias's input)."""
    return torch.cat([side, torch.ones(*side.shape[:-1], 1, dtype=side.dtype, device=side.device)], -1)


class KFACOperator(LinearOperator):
    """K-FAC or EK-FAC approximation of the GGN (or empirical Fisher) of the mean loss over the flat
    parameter vector ``[N, N]`` (parameter order of ``task.named_params``): block diagonal, one Kronecker
    block per supported weight (its bias folded in) and a diagonal block for every other parameter.

    Build with :meth:`fit`. ``op @ V`` multiplies, ``op.inverse(λ) @ V`` applies (op + λI)⁻¹ and
    ``op.power(p, λ)`` (op + λI)^p, all exactly, through the eigenbases (per block
    Q (Λ + λ)^p Qᵀ, Q = Q_S ⊗ Q_A). ``state_dict()``/``from_state_dict(task, state)`` save and restore the
    fitted factors (tensors and plain metadata only).

    >>> import torch
    >>> from torch import nn
    >>> from gradsketch import Task
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    >>> task = Task.from_classifier(model)
    >>> data = [(torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    >>> op = KFACOperator.fit(task, data)               # EK-FAC of the exact GGN
    >>> op.shape, len(op.blocks)
    ((43, 43), 2)
    >>> v = torch.randn(43, dtype=torch.float64)
    >>> bool(torch.allclose(op.inverse(0.1) @ (op @ v + 0.1 * v), v))
    True
    """

    def __init__(self, task: Task, blocks: dict[str, KroneckerBlock], diag: dict[str, Tensor], kind: str,
                 fisher: str, n_examples: int) -> None:
        super().__init__((task.n_params, task.n_params), task.dtype, task.device, symmetric=True)
        self.task, self.blocks, self.diag = task, blocks, diag
        self.kind, self.fisher, self.n_examples = kind, fisher, n_examples
        offs, o = {}, 0
        for n, s in zip(task.param_names, task.param_sizes):
            offs[n] = (o, o + s)
            o += s
        self._slices = offs

    # -- fitting -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, task: Task, data: Iterable, *, kind: str = "ekfac", fisher: str = "ggn", mc_samples: int = 1,
            seed: int = 0, progress: bool = False) -> KFACOperator:
        """Fit the factors over ``data`` (batches of ``task``; two passes for EK-FAC: factors, then the
        eigenvalue correction in their eigenbasis; one for K-FAC).

        ``kind``: ``"ekfac"`` or ``"kfac"``. ``fisher``: ``"ggn"`` (exact expectation over the output
        Hessian's square root; needs ``task.output_fn``/``loss_on_output``, e.g. ``Task.from_classifier``),
        ``"mc"`` (``mc_samples`` random cotangents per example, seeded by ``seed``) or ``"empirical"``
        (the training loss's gradient). Layers in train mode with dropout make the factors random.
        """
        kind = check_choice(kind, "kind", KINDS)
        fisher = check_choice(fisher, "fisher", FISHERS)
        mc_samples = check_int(mc_samples, "mc_samples", minimum=1)
        if fisher != "empirical" and (task.output_fn is None or task.loss_on_output is None):
            raise ValueError(f"task: fisher={fisher!r} needs output_fn and loss_on_output (Task(model, "
                             "output_fn=..., loss_on_output=...) or Task.from_classifier); got a task with only "
                             "loss_fn (or pass fisher='empirical')")
        if kind == "ekfac" and not is_reiterable(data):
            raise TypeError(f"data: kind='ekfac' reads the data twice; expected a re-iterable (list, DataLoader), "
                            f"got a one-shot {type(data).__name__}")
        task.check_per_example()
        engine = HookEngine(task)
        blocks = _kron_blocks(task, engine)
        in_block = set(blocks) | {b.bias for b in blocks.values() if b.bias is not None}
        diag_names = [n for n in task.param_names if n not in in_block]
        generic = [n for n in diag_names if n not in engine.hooked]
        if generic and fisher != "empirical":
            raise ValueError(f"task: parameters {generic[:6]} belong to layers the K-FAC hooks do not support "
                             f"(supported: Linear, Conv2d, Conv1D, Embedding, LayerNorm); with fisher={fisher!r} "
                             "they have no per-example GGN factor. Deselect them (Task(..., params=[...])) or "
                             "use fisher='empirical'")
        diag = {n: torch.zeros(s, dtype=torch.float64, device=task.device)
                for n, s in zip(task.param_names, task.param_sizes) if n in diag_names}
        cap = _Capturer(task, engine, fisher, mc_samples, seed)
        total = data_len(data)
        n = 0
        # pass 1: factors (and the diagonal blocks' second moments)
        for batch in progress_iter(data, progress, f"{kind} factors", total):
            split = task.split(batch)
            task.validate_batch(split)
            first = True
            for w, caps in cap.run(split):
                for blk in blocks.values():
                    _accumulate_factors(blk, caps[id(blk.module)], w, first)
                _accumulate_diag(engine, diag, caps, w, split, generic)
                first = False
            n += split.size
        if n == 0:
            raise ValueError("data: expected at least one batch, got an empty iterable")
        for blk in blocks.values():
            a_div, s_div = blk.count, float(n)
            if blk.act == "cols":
                blk.C /= a_div
                blk.R /= s_div
            else:
                blk.R /= a_div
                blk.C /= s_div
            blk.er, blk.qr = _eigh(blk.R)
            blk.ec, blk.qc = _eigh(blk.C)
        for t in diag.values():
            t /= n
        if kind == "kfac":
            for blk in blocks.values():
                blk.lam = torch.outer(cast(Tensor, blk.er), cast(Tensor, blk.ec))
        else:
            for blk in blocks.values():
                blk.lam = torch.zeros(blk.rows, blk.cols, dtype=torch.float64, device=task.device)
            for batch in progress_iter(data, progress, "ekfac eigenvalue correction", total):
                split = task.split(batch)
                acts: dict = {}  # the activation sides of this batch, shared by its cotangents (one forward)
                for w, caps in cap.run(split):
                    for blk in blocks.values():
                        _accumulate_lambda(blk, caps[id(blk.module)], w, acts)
            for blk in blocks.values():
                cast(Tensor, blk.lam).div_(n)
        return cls(task, blocks, diag, kind, fisher, n)

    # -- products ------------------------------------------------------------------------------------
    def _apply(self, V: Tensor, p: float, damping: float) -> Tensor:
        """(op + damping·I)^p V, ``V [N, k]``."""
        k = V.shape[1]
        out = torch.empty(V.shape, dtype=torch.result_type(V, torch.empty((), dtype=self.dtype)),
                          device=V.device)
        for n, d in self.diag.items():
            lo, hi = self._slices[n]
            out[lo:hi] = (_pow(d, p, damping).to(out.dtype)[:, None]) * V[lo:hi].to(out.dtype)
        for blk in self.blocks.values():
            lo, hi = self._slices[blk.weight]
            wr, wc = (blk.rows - 1, blk.cols) if blk.bias is not None and blk.kind == "conv1d" else (
                (blk.rows, blk.cols - 1) if blk.bias is not None else (blk.rows, blk.cols))
            X = V[lo:hi].T.reshape(k, wr, wc).double()
            if blk.bias is not None:
                blo, bhi = self._slices[blk.bias]
                Xb = V[blo:bhi].T.double()
                X = torch.cat([X, Xb[:, None, :]], 1) if blk.kind == "conv1d" else torch.cat([X, Xb[:, :, None]], 2)
            qr, qc = blk.qr, cast(Tensor, blk.qc)
            Y = X @ qc
            if qr is not None:
                Y = qr.T @ Y
            Y = Y * _pow(cast(Tensor, blk.lam), p, damping)
            Y = Y @ qc.T
            if qr is not None:
                Y = qr @ Y
            if blk.bias is not None:
                blo, bhi = self._slices[blk.bias]
                if blk.kind == "conv1d":
                    out[blo:bhi] = Y[:, -1, :].T.to(out.dtype)
                    Y = Y[:, :-1, :]
                else:
                    out[blo:bhi] = Y[:, :, -1].T.to(out.dtype)
                    Y = Y[:, :, :-1]
            out[lo:hi] = Y.reshape(k, -1).T.to(out.dtype)
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V, 1.0, 0.0)

    def power(self, p: float, damping: float = 0.0) -> LinearOperator:
        """(op + λI)^p as an operator (p = −1: the inverse, −½: the inverse square root)."""
        p = check_real(p, "p")
        damping = check_real(damping, "damping", minimum=0.0)
        if p < 0 and damping == 0 and self.min_eigenvalue() <= SINGULAR_RTOL * max(self.max_eigenvalue(), 0.0):
            raise ValueError(f"damping: expected > 0 for a negative power: the {self.kind.upper()} curvature has "
                             f"a zero eigenvalue (smallest {self.min_eigenvalue():.3g}, at most {SINGULAR_RTOL:g} of "
                             f"the largest, {self.max_eigenvalue():.3g}: zero up to rounding); got damping=0")
        return _PowerOperator(self, p, damping)

    def inverse(self, damping: float) -> LinearOperator:
        """(op + λI)⁻¹ (``damping`` λ ≥ 0, > 0 when the curvature is singular)."""
        return self.power(-1.0, damping)

    def eigenvalues(self) -> Tensor:
        """All N eigenvalues (ascending), float64."""
        parts = [t for t in self.diag.values()] + [cast(Tensor, b.lam).reshape(-1) for b in self.blocks.values()]
        return torch.sort(torch.cat(parts)).values

    def min_eigenvalue(self) -> float:
        return float(self.eigenvalues()[0])

    def max_eigenvalue(self) -> float:
        return float(self.eigenvalues()[-1])

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"meta": JSON-able dict, "tensors": name -> CPU tensor}``: everything to rebuild the operator
        for the same task (:meth:`from_state_dict`)."""
        tensors: dict[str, Tensor] = {}
        blocks = []
        for n, b in self.blocks.items():
            blocks.append(dict(weight=n, bias=b.bias, kind=b.kind, rows=b.rows, cols=b.cols, act=b.act,
                               count=b.count))
            for key in ("R", "C", "er", "ec", "lam", "qr", "qc"):
                t = getattr(b, key)
                if t is not None:
                    tensors[f"block.{n}.{key}"] = t.detach().cpu()
        for n, t in self.diag.items():
            tensors[f"diag.{n}"] = t.detach().cpu()
        meta = dict(type="KFACOperator", version=1, kind=self.kind, fisher=self.fisher,
                    n_examples=self.n_examples, names=list(self.task.param_names),
                    sizes=list(self.task.param_sizes), blocks=blocks, diag=list(self.diag))
        return {"meta": meta, "tensors": tensors}

    @classmethod
    def from_state_dict(cls, task: Task, state: dict[str, Any]) -> KFACOperator:
        """Rebuild from :meth:`state_dict` for ``task`` (its parameter names and sizes must match)."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("type") != "KFACOperator" or meta.get("version") != 1:
            raise ValueError(f"state: expected a KFACOperator state of version 1, got {meta.get('type')!r} "
                             f"version {meta.get('version')!r}")
        if list(meta["names"]) != list(task.param_names) or list(meta["sizes"]) != list(task.param_sizes):
            raise ValueError("state: fitted for other parameters (names/sizes differ from the task's)")
        plans = plan_task(task)
        dev = task.device
        blocks = {}
        for b in meta["blocks"]:
            n = b["weight"]
            mod = plans[n].uses[0][0]
            t = {k: tensors.get(f"block.{n}.{k}") for k in ("R", "C", "er", "ec", "lam", "qr", "qc")}
            t = {k: (None if v is None else v.to(dev, torch.float64)) for k, v in t.items()}
            blocks[n] = KroneckerBlock(n, b["bias"], b["kind"], mod, b["rows"], b["cols"], b["act"],
                                       cast(Tensor, t["R"]), cast(Tensor, t["C"]), b["count"], t["qr"], t["er"],
                                       t["qc"], t["ec"], t["lam"])
        diag = {n: tensors[f"diag.{n}"].to(dev, torch.float64) for n in meta["diag"]}
        return cls(task, blocks, diag, meta["kind"], meta["fisher"], meta["n_examples"])

    def __repr__(self) -> str:
        return (f"KFACOperator(kind={self.kind!r}, fisher={self.fisher!r}, N={self.shape[0]}, "
                f"kronecker={len(self.blocks)}, diagonal={len(self.diag)}, n={self.n_examples})")


class _PowerOperator(LinearOperator):
    def __init__(self, op: KFACOperator, p: float, damping: float) -> None:
        super().__init__(op.shape, op.dtype, op.device, symmetric=True)
        self.op, self.p, self.damping = op, p, damping

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._apply(V, self.p, self.damping)

    def __repr__(self) -> str:
        return f"({self.op!r} + {self.damping:g} I)^{self.p:g}"


def _pow(lam: Tensor, p: float, damping: float) -> Tensor:
    x = lam + damping
    if p == 1.0:
        return x
    if p < 0:
        x = x.clamp_min(torch.finfo(torch.float64).tiny)
    return x.pow(p)


def _eigh(M: Tensor) -> tuple[Tensor, Tensor | None]:
    """(eigenvalues clipped at 0, eigenvectors); a 1-d factor is a diagonal: (itself, None)."""
    if M.ndim == 1:
        return M.clamp_min(0), None
    w, Q = torch.linalg.eigh(0.5 * (M + M.T))
    return w.clamp_min(0), Q


def _sides(blk: KroneckerBlock, x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(r [m, T, rows] or ids [m, T], c [m, T, cols]) with the bias's constant folded in."""
    r, c = _rows_cols(blk.kind, blk.module, x, dy)
    if blk.kind == "embedding":
        return r, c.double()
    r, c = r.double(), c.double()
    if blk.bias is not None:
        if blk.kind == "conv1d":
            r = _with_ones(r)
        else:
            c = _with_ones(c)
    return r, c


def _grad_side(blk: KroneckerBlock, dy: Tensor) -> Tensor:
    """The output-gradient side of :func:`_sides` alone (``c`` for Conv1D, ``r`` otherwise; never an
    embedding): what changes between the cotangents of one forward pass, without the activation side's
    unfold and copies."""
    m = dy.shape[0]
    if blk.kind == "conv2d":
        return dy.reshape(m, dy.shape[1], -1).transpose(1, 2).double()
    return dy.reshape(m, -1, dy.shape[-1]).double()


def _accumulate_factors(blk: KroneckerBlock, pairs: list[tuple[Tensor, Tensor]], w: float, first: bool) -> None:
    for x, dy in pairs:
        if blk.kind != "embedding" and not first:  # the activation factor is taken once per batch
            g2 = _grad_side(blk, dy)
            g2 = g2.reshape(-1, g2.shape[-1])
            (blk.R if blk.act == "cols" else blk.C).addmm_(g2.T, g2, alpha=w)   # the output-gradient factor
            continue
        r, c = _sides(blk, x, dy)
        if blk.kind == "embedding":
            if first:  # activations: token counts, once per batch
                blk.R.index_add_(0, r.reshape(-1), torch.ones(r.numel(), dtype=torch.float64, device=r.device))
                blk.count += r.numel()
            c2 = c.reshape(-1, c.shape[-1])
            blk.C.addmm_(c2.T, c2, alpha=w)
            continue
        act, grad = (c, r) if blk.act == "cols" else (r, c)
        A, S = (blk.C, blk.R) if blk.act == "cols" else (blk.R, blk.C)
        a2 = act.reshape(-1, act.shape[-1])
        A.addmm_(a2.T, a2)
        blk.count += a2.shape[0]
        g2 = grad.reshape(-1, grad.shape[-1])
        S.addmm_(g2.T, g2, alpha=w)


def _projected_sides(blk: KroneckerBlock, x: Tensor, dy: Tensor, acts: dict | None) -> tuple[Tensor, Tensor]:
    """(r Q_R, c Q_C) of one call of a non-embedding block. ``acts`` caches the projected activation side
    by the input tensor, so the cotangents of one forward pass (the C columns of the GGN, or the MC samples)
    unfold and project it once."""
    qr, qc = blk.qr, cast(Tensor, blk.qc)
    key = (id(blk), id(x))
    hit = None if acts is None else acts.get(key)
    if hit is not None and hit[0] is x:
        g = _grad_side(blk, dy)
        if blk.act == "cols":
            return (g if qr is None else g @ qr), hit[1]
        return hit[1], g @ qc
    r, c = _sides(blk, x, dy)
    pr = r if qr is None else r @ qr
    pc = c @ qc
    if acts is not None:
        acts[key] = (x, pc if blk.act == "cols" else pr)   # x kept: its id cannot be reused while cached
    return pr, pc


def _accumulate_lambda(blk: KroneckerBlock, pairs: list[tuple[Tensor, Tensor]], w: float,
                       acts: dict | None = None) -> None:
    lam, qc = cast(Tensor, blk.lam), cast(Tensor, blk.qc)
    if blk.kind == "embedding":
        # a module called several times per example: its gradient sums over all calls (positions concatenated)
        sides = [_sides(blk, x, dy) for x, dy in pairs]
        r = sides[0][0] if len(sides) == 1 else torch.cat([s[0] for s in sides], 1)
        c = sides[0][1] if len(sides) == 1 else torch.cat([s[1] for s in sides], 1)
        m = c.shape[0]
        pc = c @ qc                                             # [m, T, cols]
        vocab = blk.rows
        key = (torch.arange(m, device=r.device)[:, None] * vocab + r).reshape(-1)
        uniq, inv = torch.unique(key, return_inverse=True)
        G = torch.zeros(uniq.numel(), pc.shape[-1], dtype=pc.dtype, device=pc.device)
        G.index_add_(0, inv, pc.reshape(-1, pc.shape[-1]))
        lam.index_add_(0, uniq % vocab, G.square(), alpha=w)
        return
    # projecting each side first and then concatenating the calls' positions is the same as projecting the
    # concatenation (the projection acts on the last dimension)
    proj = [_projected_sides(blk, x, dy, acts) for x, dy in pairs]
    pr = proj[0][0] if len(proj) == 1 else torch.cat([p[0] for p in proj], 1)
    pc = proj[0][1] if len(proj) == 1 else torch.cat([p[1] for p in proj], 1)
    m = pc.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // (blk.rows * blk.cols))
    for lo in range(0, m, chunk):
        a, b = pr[lo:lo + chunk], pc[lo:lo + chunk]
        if a.shape[1] == 1:
            G = a[:, 0, :, None] * b[:, 0, None, :]
        else:
            G = torch.bmm(a.transpose(1, 2), b)
        lam.add_(G.square().sum(0), alpha=w)


def _accumulate_diag(engine: HookEngine, diag: dict[str, Tensor], caps: dict, w: float, split: SplitBatch,
                     generic: list[str]) -> None:
    if not diag:
        return
    gd: dict[str, Tensor] = {}
    if generic:  # empirical Fisher only (checked in fit): exact per-example loss gradients
        gd, _ = engine.task.per_example_grads(split, names=generic)
    m = split.size
    for n, acc in diag.items():
        g = engine.grad(caps, gd, n, 0, m)
        acc.add_(g.double().square().sum(0), alpha=w)
