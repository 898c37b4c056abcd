"""The built-in attribution methods: one :class:`~gradsketch.attribution.Attributor` subclass each, configured
by its options dataclass (:mod:`gradsketch.attribution.options`) and registered under its name.

=================  ==============  ===========================================================================
class              name            what it adds to the base (features φ, kernel M, weights q)
=================  ==============  ===========================================================================
GradDot            grad-dot        nothing: M = I
GradCos            grad-cos        unit-norm rows on both sides
TracIn             tracin          checkpoint weights η_c kept (not averaged)
TRAK               trak            M = (K + λI)⁻¹, K = ΦᵀΦ or the GGN (``kernel``), output-gradient
                                   features and q̄ with ``margin_fn``
ArnoldiInfluence   arnoldi         M = Σ_i u_i u_iᵀ/(λ_i + δ) from Arnoldi + distill (or projections p_i)
Influence          influence       M = (ΦHΦᵀ + δI)⁻¹ (explicit, CG, LiSSA)
=================  ==============  ===========================================================================

The formulas and their sources are in :mod:`gradsketch.attribution.attributor`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..linalg import EigenOperator, LinearOperator, dense_inverse, gram, inverse, ridge_inverse
from ._features import ProjectionSketch, sketch_spec
from .base import Attributor, Component, describe_callable, register_method
from .damping import INDEFINITE_RTOL, damped_inverse_info, damped_reciprocal
from .options import ArnoldiOptions, GradDotOptions, InfluenceOptions, TracInOptions, TRAKOptions

_log = logging.getLogger("gradsketch.attribution")


def _unit_rows(F: Tensor) -> Tensor:
    n = F.to(torch.float64).norm(dim=1, keepdim=True)
    return torch.where(n > 0, F / n.to(F.dtype), torch.zeros_like(F))


class GradDot(Attributor):
    """Gradient similarity ``score(x, z) = ⟨Φ∇ℓ(x), Φ∇ℓ(z)⟩`` (averaged over ``checkpoints``/``models``).

    >>> import gradsketch
    >>> task = gradsketch.Task(torch.nn.Linear(2, 1, bias=False), lambda m, b: m(b[0])[:, 0] * b[1])
    >>> data = [(torch.eye(2), torch.tensor([1.0, 2.0]))]
    >>> GradDot(task).fit(data, progress=False).score(data, progress=False)  # g(z_i) = y_i e_i
    tensor([[1., 0.],
            [0., 4.]])
    """

    options_cls = GradDotOptions
    method_name = "grad-dot"


class GradCos(Attributor):
    """Cosine gradient similarity ``⟨Φg(x), Φg(z)⟩ / (‖Φg(x)‖ ‖Φg(z)‖)`` (rows of norm 0 score 0).

    >>> import gradsketch
    >>> task = gradsketch.Task(torch.nn.Linear(2, 1, bias=False), lambda m, b: m(b[0])[:, 0] * b[1])
    >>> data = [(torch.eye(2), torch.tensor([1.0, 2.0]))]
    >>> GradCos(task).fit(data, progress=False).self_influence(progress=False)
    tensor([1., 1.], dtype=torch.float64)
    """

    options_cls = GradDotOptions
    method_name = "grad-cos"

    def test_rows(self, comp: Component, phi: Tensor) -> Tensor:
        return _unit_rows(phi)

    def train_rows(self, comp: Component, F: Tensor) -> Tensor:
        return _unit_rows(F)


class TracIn(Attributor):
    """TracIn (Pruthi et al. 2020): ``Σ_c η_c ⟨Φ∇ℓ_c(x), Φ∇ℓ_c(z)⟩`` over ``checkpoints=[(state_dict, η_c)]``.

    >>> import gradsketch
    >>> task = gradsketch.Task(torch.nn.Linear(2, 1, bias=False), lambda m, b: m(b[0])[:, 0] * b[1])
    >>> data = [(torch.eye(2), torch.tensor([1.0, 2.0]))]
    >>> sd = task.model.state_dict()
    >>> TracIn(task, checkpoints=[(sd, 0.5), (sd, 0.5)]).fit(data, progress=False).self_influence(progress=False)
    tensor([1., 4.], dtype=torch.float64)
    """

    options_cls = TracInOptions
    method_name = "tracin"
    average_checkpoints = False


class TRAK(Attributor):
    """TRAK (Park et al. 2023): ``φ(x)ᵀ(ΦᵀΦ + λI)⁻¹φ(z) · q̄(z)`` averaged over the ensemble.

    With an output function f (declared on the Task, ``Task(..., margin_fn=classification_margin())``, or
    passed as the ``margin_fn`` option, which overrides the Task's) the features are gradients of f and
    q = 1 − σ(f); without one, loss gradients and q = 1. ``kernel="ggn"`` replaces ΦᵀΦ by the Gauss-Newton
    matrix of the training loss in the same coordinates (one more pass over the data per output-Hessian
    direction, ``ggn_rank`` of them); ``kernel="ggn_trace"`` weights each row of ΦᵀΦ so that it carries its
    example's Gauss-Newton curvature (one forward pass more; :meth:`_ggn_trace_weights`). The default
    ``kernel="auto"`` is ``"ggn_trace"`` when the task declares its outputs and loss on them
    (``Task.from_classifier``), else ``"features"``, the published ΦᵀΦ (:meth:`_resolve_kernel`).
    λ = ``ridge`` · tr(K)/min(n_train, d) (see :mod:`.attributor`).
    After ``fit``: ``kernel_`` (the kernel used) and ``kernel_reason_``, ``ridge_`` (absolute λ of the last
    model), ``ridges_`` (all of them).

    >>> import gradsketch
    >>> task = gradsketch.Task(torch.nn.Linear(2, 1, bias=False), lambda m, b: m(b[0])[:, 0] * b[1])
    >>> data = [(torch.eye(2), torch.tensor([1.0, 1.0]))]
    >>> a = TRAK(task, ridge=1.0).fit(data, progress=False)   # ΦᵀΦ = I, λ = 1: M = I/2
    >>> a.ridge_, a.score(data, progress=False)
    (1.0, tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]]))
    """

    options_cls = TRAKOptions
    method_name = "trak"

    def _reset_fit(self) -> None:
        self.ridges_: list[float] = []
        self.kernel_: str | None = None
        self.kernel_reason_ = ""

    def _kernel(self) -> str:
        """The kernel of the fit: ``kernel_`` (the ``kernel`` option with ``"auto"`` resolved at fit time), or for
        a fit saved before ``"auto"`` existed, the option it was saved with."""
        from .options import TRAK_KERNELS

        k = getattr(self, "kernel_", None)
        if k is None:
            k = self._opt("kernel")
            return "features" if k == "auto" else k
        if k not in TRAK_KERNELS[1:]:   # a loaded record: the one value that decides how the scores are formed
            raise ValueError(f"kernel_: expected one of {TRAK_KERNELS[1:]} (the kernel a fit resolved), got {k!r}")
        return k

    def _resolve_kernel(self, data: Iterable) -> tuple[str, str]:
        """``(kernel, why)``: ``kernel="auto"`` is ``"ggn_trace"`` when the task declares its outputs and loss on
        them (``Task.from_classifier``) and the output-Hessian traces are available (in closed form, or by one
        backward pass per output for at most ``MAX_GGN_OUTPUTS`` outputs), else ``"features"``."""
        k = self._opt("kernel")
        if k != "auto":
            return k, "the kernel option"
        task = self.task
        if task.output_fn is None or task.loss_on_output is None:
            return "features", "the task has a loss_fn only (no output_fn/loss_on_output)"
        if hasattr(task.loss_on_output, "gradient_and_hessian_trace"):
            return "ggn_trace", "the task's loss_on_output has closed-form output derivatives"
        from ..curvature.kfac import MAX_GGN_OUTPUTS

        C = self._outputs(next(iter(data)))[0][0].numel()
        if C > MAX_GGN_OUTPUTS:
            return "features", (f"{C} outputs per example, more than {MAX_GGN_OUTPUTS}, and a loss_on_output "
                                "without gradient_and_hessian_trace")
        return "ggn_trace", f"the task declares its outputs ({C} per example) and loss_on_output"

    def _margin_fn(self) -> Any:
        """The output function: the ``margin_fn`` option, else the Task's declared ``margin_fn``."""
        fn = self._opt("margin_fn")
        return fn if fn is not None else getattr(self.task, "margin_fn", None)

    def feature_kind(self) -> str:
        return "output-gradient" if self._margin_fn() is not None else "loss-gradient"

    def row_options(self) -> dict[str, Any]:
        out = super().row_options()
        if self._margin_fn() is not None:  # which output function was differentiated
            out["margin_fn"] = describe_callable(self._margin_fn())
        return out

    def feature_task(self) -> Any:
        fn = self._margin_fn()
        if fn is None:
            return self.task
        from ..model import Task

        return Task(self.task.model, fn, params=[p for _, p in self.task.named_params],
                    per_example=self.task.per_example, nan_policy=self.task.nan_policy)

    def finalise(self, comp: Component, data: Iterable, progress: bool) -> None:
        d = comp.sketch.d
        ridge = float(self._opt("ridge", 1.0))
        br = self._opt("block_rows", 4096)
        n = comp.n_rows
        # GEMMs in the features' precision (float32 unless they are float64 in memory), sums and the
        # factorisation in float64: the same rule for both forms of the kernel
        f64 = isinstance(comp.feats, Tensor) and comp.feats.dtype == torch.float64
        fdt = torch.float64 if f64 else torch.float32
        if self.kernel_ is None:
            self.kernel_, self.kernel_reason_ = self._resolve_kernel(data)
            _log.info("trak: kernel=%r (%s)", self.kernel_, self.kernel_reason_)
        q = self._trak_q(data, comp) if self._margin_fn() is not None else None
        # kernel="ggn_trace": row i of Φ scaled by √ω_i, K = Σ ω_i φ_i φ_iᵀ
        sw = self._trace_row_scales(comp, data, q) if self.kernel_ == "ggn_trace" else None
        kernel = self.kernel_

        def rows(r0: int, r1: int, blk: Tensor) -> Tensor:
            blk = blk.cpu()
            return blk if sw is None else blk * sw[r0:r1, None].to(blk.dtype)

        if kernel == "ggn":  # K from the output-Hessian rows, always d × d
            K = self._ggn_kernel(comp, data, fdt, progress)
            if not float(torch.trace(K)) > 0:
                raise ValueError("kernel: 'ggn' found the loss's Hessian in the outputs zero for every training "
                                 "example (a loss that is piecewise linear in them?), so the Gauss-Newton kernel is "
                                 "0 and every score would be 0; use kernel='features'")
            lam = ridge * float(torch.trace(K)) / min(n, d)
            comp.kernel = dense_inverse(K, lam)
        elif d > n:  # K has rank <= n < d: work with the n × n Gram matrix
            parts = [rows(*b) for b in self._blocks(comp, max(br, n), fdt)]
            F = parts[0] if len(parts) == 1 else torch.cat(parts)
            G = gram(F)
            lam = ridge * float(torch.trace(G)) / n
            comp.kernel = ridge_inverse(F, lam, G)
            if sw is not None:  # the kernel's rows are the training rows times sw (for the scoring shortcut)
                comp.info["row_scale"] = sw
            del F, G, parts
        else:
            K = torch.zeros(d, d, dtype=torch.float64)
            for b in self._blocks(comp, br, fdt):
                K += gram(rows(*b).T)   # ΦᵀΦ of the block by lower column blocks (exactly symmetric)
            lam = ridge * float(torch.trace(K)) / d
            comp.kernel = dense_inverse(K, lam)
        self.ridge_ = lam
        self.ridges_.append(lam)
        comp.info["ridge"] = lam
        comp.q = q

    def _trace_row_scales(self, comp: Component, data: Iterable, q: Tensor | None) -> Tensor | None:
        """√ω ``[n]`` of ``kernel="ggn_trace"`` (:meth:`_ggn_trace_weights`). A loss whose output Hessian is zero
        for every example (piecewise linear in the outputs) has a zero Gauss-Newton kernel, whose scores would
        all be 0: refused for ``kernel="ggn_trace"``; under ``"auto"`` the fit falls back to ``"features"``
        (RuntimeWarning, ``kernel_reason_``), as it does when the traces cannot be computed (a RuntimeError from
        autograd, e.g. a loss without second derivatives). ``None`` after a fall-back."""
        auto = self._opt("kernel") == "auto" and comp.index == 0   # later models keep the first one's kernel
        try:
            w = self._ggn_trace_weights(data, q, comp)
        except RuntimeError as e:
            if not auto or isinstance(e, torch.OutOfMemoryError):   # memory is not a property of the loss
                raise
            why = f"the output-Hessian traces could not be computed ({type(e).__name__}: {str(e)[:200]})"
        else:
            if bool((w > 0).any()):
                return w.sqrt()
            why = "the loss's Hessian in the outputs is zero for every training example"
            if not auto:
                raise ValueError("kernel: 'ggn_trace' found the loss's Hessian in the outputs zero for every training "
                                 "example (a loss that is piecewise linear in them?), so the Gauss-Newton kernel is "
                                 "0 and every score would be 0; use kernel='features'")
        warnings.warn(f"kernel: 'auto' fell back to 'features': {why}", RuntimeWarning, stacklevel=4)
        self.kernel_, self.kernel_reason_ = "features", why
        return None

    def _ggn_kernel(self, comp: Component, data: Iterable, fdt: torch.dtype, progress: bool) -> Tensor:
        """K = Σ_i Φ J_iᵀ H_i J_i Φᵀ ``[d, d]`` float64: H_i = L_i L_iᵀ the Hessian of example i's loss in its
        outputs (:func:`gradsketch.curvature.kfac.output_loss_derivatives`), each column r of L_i contributing the row
        Φ J_iᵀ L_i[:, r], the sketched gradient of the pseudo-loss ⟨L_i[:, r], z_i⟩ (coefficients held fixed).
        One pass over ``data`` per output-Hessian direction, in descending order of eigenvalue: ``ggn_rank`` of them
        (all with a positive eigenvalue when None; an eigenvalue that is 0 for every example adds nothing and gets
        no pass)."""
        from ..model import Task
        from ..model._batch import data_len

        task = self.task
        d = int(comp.sketch.d)
        if d > 30_000:
            raise ValueError(f"kernel: 'ggn' builds a d × d matrix and d = {d} here (the number of parameters "
                             "when unsketched); pass a sketch, e.g. sketch=dict(kind='affd', d=4096)")

        def roots(batch: Any) -> Tensor:
            # descending eigenvalues; those at rounding level (softmax's zero direction) come back as zero columns
            return self._output_derivatives(batch)[1].flip(-1)

        rank = self._opt("ggn_rank")

        class Pass:  # the data with each batch's coefficient column r appended: (batch, [B, C])
            def __init__(self, r: int) -> None:
                self.r = r

            def __iter__(self):
                for batch in data:
                    yield batch, roots(batch)[:, :, self.r].to(task.dtype)

            def __len__(self) -> int:
                return data_len(data)

        def pseudo_loss(model: Any, bc: Any) -> Tensor:
            z = task.output_fn(model, bc[0])
            return (z.reshape(z.shape[0], -1) * bc[1].reshape(z.shape[0], -1)).sum(-1)

        ptask = Task(task.model, pseudo_loss, params=[p for _, p in task.named_params],
                     per_example=task.per_example, nan_policy=task.nan_policy)

        def compute() -> Tensor:
            # passes: the largest number of positive output-Hessian eigenvalues of any example, capped by ggn_rank
            passes = max(int((roots(batch).pow(2).sum(1) > 0).sum(1).max()) for batch in data)
            passes = passes if rank is None else min(passes, rank)
            K = torch.zeros(d, d, dtype=torch.float64)
            for r in range(passes):
                for blk in ptask.iter_sketch_grads(Pass(r), comp.sketch, mode=self._feature_mode(comp),
                                                   progress=progress, nan_policy=self.nan_policy):
                    K += gram(blk.cpu().to(fdt).T)
            return K

        # cached next to the store: keyed by what K is made of (model state, loss, ggn_rank, sketch, mode, precision
        # and the training data as the store's chunk markers identify it), so that a resumed fit makes no pass over
        # the data, not even the one that counts the passes; a cached value that is not a finite float64 [d, d]
        # matrix is recomputed, never used
        config = self._pass_key(comp, kernel="ggn", ggn_rank=rank, sketch=sketch_spec(comp.sketch),
                                mode=self._feature_mode(comp), dtype=str(fdt), **self._loss_key())
        return self._cached(comp, "ggn_kernel", config, compute,
                            valid=lambda K: isinstance(K, Tensor) and K.dtype == torch.float64
                            and tuple(K.shape) == (d, d) and bool(torch.isfinite(K).all()))

    def _outputs(self, batch: Any) -> tuple[Tensor, Any]:
        """``(z, batch)``: one batch's outputs (no graph) and the batch on the task's device, for the Gauss-Newton
        kernels, which need a task that declares ``output_fn`` and ``loss_on_output``."""
        from ..model._batch import SplitBatch

        task = self.task
        if task.output_fn is None or task.loss_on_output is None:
            raise ValueError(f"kernel: {self._kernel()!r} needs a task that declares output_fn and loss_on_output "
                             "(Task.from_classifier, or Task(..., output_fn=..., loss_on_output=...)); got a task "
                             "with a loss_fn only")
        b = SplitBatch(batch, task.device).rebuild()
        with torch.no_grad():
            return task.output_fn(task.model, b), b

    def _output_derivatives(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(e [B, C], L [B, C, C])`` float64 for one batch of the Gauss-Newton kernels: the gradient of each
        example's loss in its outputs and the roots of its Hessian there
        (:func:`gradsketch.curvature.kfac.output_loss_derivatives`)."""
        from ..curvature.kfac import MAX_GGN_OUTPUTS, output_loss_derivatives

        z, b = self._outputs(batch)
        C = z[0].numel()
        if C > MAX_GGN_OUTPUTS:
            raise ValueError(f"kernel: {self._kernel()!r} needs each example's output Hessian (one backward pass "
                             f"per output), and the model has {C} outputs per example (more than "
                             f"{MAX_GGN_OUTPUTS}); use kernel='features'"
                             + ("" if self._kernel() == "ggn" else ", or a loss_on_output with a closed-form "
                                "gradient_and_hessian_trace (gradsketch.losses.OutputLoss)"))
        try:
            return output_loss_derivatives(self.task.loss_on_output, z, b)
        except RuntimeError as e:   # autograd's own words do not say which derivative or why it is needed
            raise RuntimeError(f"kernel: {self._kernel()!r} needs the second derivatives of loss_on_output in the "
                               f"outputs, and autograd could not take them ({e}); use kernel='features'") from e

    def _output_gradient_and_trace(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(e [B, C], t [B])`` float64: each example's output gradient of the loss and the trace of its output
        Hessian (positive part). From the task's ``loss_on_output.gradient_and_hessian_trace`` when it has one
        (:class:`gradsketch.losses.OutputLoss`, which ``Task.from_classifier`` sets: closed form, any number of
        outputs), else from the Hessian roots of :meth:`_output_derivatives` (at most ``MAX_GGN_OUTPUTS``)."""
        closed = getattr(self.task.loss_on_output, "gradient_and_hessian_trace", None)
        if closed is None:
            e, L = self._output_derivatives(batch)
            return e, L.pow(2).sum((1, 2))
        z, b = self._outputs(batch)
        e, t = closed(z, b)
        B = z.shape[0]
        if not (isinstance(e, Tensor) and isinstance(t, Tensor) and e.ndim == 2 and e.shape[0] == B
                and tuple(t.shape) == (B,)):
            got = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in (e, t)]
            raise ValueError(f"loss_on_output.gradient_and_hessian_trace: expected tensors [{B}, C] and [{B}], "
                             f"got {got[0]} and {got[1]}")
        return e.detach().to(torch.float64), t.detach().to(torch.float64)

    def _ggn_trace_weights(self, data: Iterable, q: Tensor | None, comp: Component | None = None) -> Tensor:
        """ω ``[n]`` float64 of ``kernel="ggn_trace"``, K = Σ_i ω_i φ_i φ_iᵀ: each row's rank-one term carries the
        trace of its example's Gauss-Newton curvature in output space. With e_i = ∂ℓ_i/∂z_i and H_i = ∂²ℓ_i/∂z_i²
        (its positive part) a loss-gradient row g_i = J_iᵀe_i gets ω_i = tr(H_i)/‖e_i‖², so that ω_i g_i g_iᵀ =
        J_iᵀ (tr(H_i) ê_i ê_iᵀ) J_i: the Gauss-Newton term J_iᵀ H_i J_i with H_i replaced by its trace along the
        example's own output gradient ê_i = e_i/‖e_i‖. A margin-gradient row φ_i (g_i = −q_i φ_i, TRAK's model
        of the loss as softplus(−f)) gets ω_i q_i². An example with e_i = 0 gets ω_i = 0 (its curvature is 0 in
        the limit p → 1 of a classifier). For softmax cross-entropy a confident example (p_y = 1 − ε) gets about
        2/ε where the Gauss-Newton matrix has ε and ΦᵀΦ ε²: it restores the weight of the well-fitted examples
        that TRAK's ΦᵀΦ all but drops. With ``comp`` and a store, the weights before q are cached next to the
        store (``ggn_trace_weights_<c>.pt``, keyed by the model, the data's fingerprints, the output function,
        the loss and ``nan_policy``), so that a resumed fit does not redo their pass over the data."""
        if comp is None:
            w = self._output_trace_weights(data)
        else:   # with a store, cached next to it: a resumed fit does not redo the pass over the data
            n = comp.n_rows
            w = self._cached(comp, "ggn_trace_weights", self._pass_key(comp, kernel="ggn_trace", **self._loss_key()),
                             lambda: self._output_trace_weights(data),
                             valid=lambda v: isinstance(v, Tensor) and v.dtype == torch.float64
                             and tuple(v.shape) == (n,) and bool(torch.isfinite(v).all()) and bool((v >= 0).all()))
        if q is not None:
            w = self._skip_nonfinite(w * q.to(w.dtype) ** 2, ~torch.isfinite(q))
        return w

    def _output_trace_weights(self, data: Iterable) -> Tensor:
        """tr(H_i)/‖e_i‖² ``[n]`` float64 of :meth:`_ggn_trace_weights` (before TRAK's q), by one pass over
        ``data``; an example with non-finite output derivatives is refused or (``nan_policy="skip"``) gets 0."""
        from ..curvature.kfac import nonfinite_examples

        def one(batch: Any) -> tuple[Tensor, Tensor]:
            e, tr = self._output_gradient_and_trace(batch)
            ee = e.pow(2).sum(1)
            w = torch.where(ee > 0, tr / ee.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
            return w.cpu(), nonfinite_examples(e, tr).cpu()

        return self._skip_nonfinite(*self._per_example_pass(data, one))

    def _skip_nonfinite(self, w: Tensor, nonfinite: Tensor) -> Tensor:
        """``w`` with the examples flagged ``nonfinite`` set to 0 under ``nan_policy="skip"`` (their feature rows
        are zero rows), else a FloatingPointError naming them."""
        if not bool(nonfinite.any()):
            return w
        idx = nonfinite.nonzero().flatten().tolist()
        if self.nan_policy != "skip":
            raise FloatingPointError(f"kernel: 'ggn_trace' needs finite outputs and loss derivatives; training "
                                     f"example index(es) {idx[:10]} have non-finite ones (nan_policy='skip' "
                                     "gives them weight 0)")
        return torch.where(nonfinite, 0.0, w)

    def score(self, test_data: Iterable, progress: bool = True) -> Tensor:
        """Scores ``[n_test, n_train]`` as in :meth:`Attributor.score`. When every model's kernel has the Gram
        form (d > n), each model's scores are computed as ``C (G + λI)⁻¹`` with ``C = φ Fᵀ`` (the push-through
        identity φ (FᵀF + λI)⁻¹ Fᵀ = φ Fᵀ (FFᵀ + λI)⁻¹): two products with the n × d training features fewer than
        applying the kernel to φ and then taking the products with the rows, and no subtraction. With
        ``kernel="ggn_trace"`` the kernel's F̃ = diag(s) F holds the training rows scaled by s = √ω > 0, and
        φ (F̃ᵀF̃ + λI)⁻¹ Fᵀ = φ F̃ᵀ (F̃F̃ᵀ + λI)⁻¹ diag(s)⁻¹: the same products, each column divided by its s_i (on
        the issue-16 CNN, s spanning 1e-7 of its largest, within 4e-5 of each row's largest score of the operator
        path, whose subtraction is the less accurate of the two). s is saved with the fit; a fit saved before it
        was, or one with an s_i = 0, goes through the operator."""
        from ..linalg.operator import WoodburyInverse

        self._check_fitted()
        comps = self._components
        weighted = self._kernel() == "ggn_trace"

        def shortcut(c: Component) -> bool:   # ggn_trace: needs the row scales, all positive
            s = c.info.get("row_scale")
            return isinstance(c.kernel, WoodburyInverse) and (not weighted or (s is not None and bool((s > 0).all())))

        if not all(shortcut(c) for c in comps):
            return super().score(test_data, progress)
        dt = self._score_dtype()
        rows = []
        def raw(comp: Component, phi: Tensor) -> Tensor:  # the test rows, without the kernel
            return self.test_rows(comp, phi.cpu())

        for _, phis in self._test_chunks(test_data, progress, 1 << 62, psi=raw):
            out: Tensor | None = None
            for comp, phi in zip(comps, phis):
                k = comp.kernel
                C = (phi.to(k.F.dtype) @ k.F.T).to(torch.float64)   # [m, n]
                v = torch.cholesky_solve(C.T.contiguous(), k.L).T * comp.weight
                if weighted:
                    v = v / comp.info["row_scale"].to(v.dtype)
                if comp.q is not None:
                    v = v * comp.q.to(v.dtype)
                out = v if out is None else out + v
            assert out is not None  # there is at least one component
            if self._shared_q is not None:
                out = out * self._shared_q.to(out.dtype)
            rows.append(out.to(dt))
        return torch.cat(rows, 0)

    def after_fit(self) -> None:
        if self._margin_fn() is not None:
            # TRAK (Algorithm 1 of Park et al.; traker's finalize_scores): the out-to-loss weights are
            # averaged over the ensemble and applied to the averaged score, not per model
            qs = [cp.q for cp in self._components if cp.q is not None]
            self._shared_q = torch.stack(qs).mean(0)
            for cp in self._components:
                cp.q = None

    def _trak_q(self, data: Iterable, comp: Component | None = None) -> Tensor:
        """q(z) = 1 − σ(f(z)) for the training examples (TRAK's Q). With ``nan_policy="skip"`` an example whose
        margin is not finite (a skipped example: its feature row is zero) gets q = 0, so its scores are 0 as in
        the other methods, not NaN. With ``comp`` and a store, cached next to it (``trak_q_<c>.pt``) like the
        ggn_trace weights."""
        from ..model._batch import SplitBatch

        fn = self._margin_fn()

        def one(batch: Any) -> tuple[Tensor]:
            b = SplitBatch(batch, self.task.device).rebuild()
            with torch.no_grad():
                return (torch.sigmoid(-fn(self.task.model, b).detach().to(torch.float64)).cpu(),)

        def compute() -> Tensor:
            (q,) = self._per_example_pass(data, one)
            return torch.where(torch.isfinite(q), q, 0.0) if self.nan_policy == "skip" else q

        if comp is None:
            return compute()
        n = comp.n_rows
        return self._cached(comp, "trak_q", self._pass_key(comp, margin_fn=describe_callable(fn)), compute,
                            valid=lambda v: isinstance(v, Tensor) and v.dtype == torch.float64
                            and tuple(v.shape) == (n,) and bool(((v >= 0) & (v <= 1) | ~torch.isfinite(v)).all()))

    def _loss_key(self) -> dict:
        """The task's output function and loss on outputs as cache-key entries (an :class:`OutputLoss` by its
        repr, which names the loss; functions by :func:`describe_callable`)."""
        from ..model.losses import OutputLoss

        lo = self.task.loss_on_output
        return {"output_fn": describe_callable(self.task.output_fn),
                "loss_on_output": repr(lo) if isinstance(lo, OutputLoss) else describe_callable(lo)}

    def _pass_key(self, comp: Component, **what: Any) -> dict:
        """The cache key of a per-example pass over the training data: the model, the data's fingerprints (from
        the store), ``nan_policy`` and ``what`` the pass evaluates."""
        feats = comp.feats
        return {"fingerprint": comp.fingerprint, "n_rows": comp.n_rows, "nan_policy": self.nan_policy,
                "data": feats.data_fingerprints() if hasattr(feats, "data_fingerprints") else None, **what}

    def _per_example_pass(self, data: Iterable, fn: Any) -> tuple[Tensor, ...]:
        """``fn(batch) -> (t_1 [B, ...], t_2 [B, ...], ...)`` concatenated over the batches of ``data``, in order:
        TRAK's per-example passes over the training data (q, the ggn_trace weights), which every rank needs whole.
        Under ``torch.distributed`` (a model that is not sharded, and ``data`` with a length) each rank runs ``fn``
        on its contiguous share of the batches only (:func:`~gradsketch.linalg.distributed.shard_range`; the
        batches before it are iterated without computation, those after it not at all) and the shares are
        gathered, so the pass costs each rank 1/world of it. A rank whose ``fn`` fails sends its error instead,
        and then every rank raises: no rank is left waiting for the others, and all of them take the same
        decision (e.g. ``kernel="auto"``'s fall-back)."""
        from itertools import islice

        from ..gradients.model_parallel import is_model_sharded
        from ..linalg.distributed import all_gather_objects, is_distributed, rank_and_world, shard_range

        def join(parts: list) -> tuple[Tensor, ...]:
            if not parts:
                raise ValueError("train_data: expected at least one batch, got none")
            return tuple(torch.cat(ts) for ts in zip(*parts))

        rank, world = rank_and_world() if is_distributed() else (0, 1)
        if world == 1 or not hasattr(data, "__len__") or is_model_sharded(self.task):
            return join([fn(b) for b in data])
        lo, hi = shard_range(len(data), rank, world)
        try:
            mine, err = [fn(b) for b in islice(data, lo, hi)], None
        except Exception as e:   # sent to the other ranks, then raised on every rank
            mine, err = [], e
        gathered = all_gather_objects((mine, None if err is None else f"{type(err).__name__}: {err}"))
        if err is not None:
            raise err
        failed = [(r, msg) for r, (_, msg) in enumerate(gathered) if msg is not None]
        if failed:
            r, msg = failed[0]
            cls = torch.OutOfMemoryError if msg.startswith("OutOfMemoryError") else RuntimeError
            raise cls(f"rank {r} failed in a pass over the training data: {msg}")
        return join([part for parts, _ in gathered for part in parts])


BLOCK_ACTIVATION_FLOATS = 1 << 23  # activation floats one chunk of a vectorised block product may hold
FROZEN_ACTIVATION_FLOATS = 1 << 26  # activation floats a frozen GGN (every curvature example's) may keep


def activation_floats(task: Any, batch: Any, rows: int = 8) -> float:
    """Floats one example's forward pass keeps for the backward (the tensors autograd saves, parameters
    excluded), counted on at most ``rows`` examples of ``batch``: the memory a vectorised curvature product
    holds per example and column."""
    from ..model._batch import SplitBatch

    split = SplitBatch(batch, task.device)
    _, piece = next(split.chunks(min(split.size, rows)))
    p = {k: v.detach().requires_grad_(True) for k, v in task.params_dict().items()}
    params = {t.data_ptr() for t in p.values()}
    saved: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.data_ptr() not in params:
            saved[(t.data_ptr(), tuple(t.shape))] = t.numel()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task.call(task.loss_fn, p, piece.rebuild())
    return sum(saved.values()) / piece.size


def block_batch_columns(task: Any, batch: Any) -> int:
    """``max_batch_columns`` of the block curvature products (examples × columns per vectorised chunk): as many
    as keep the chunk's activations within ``BLOCK_ACTIVATION_FLOATS`` (2^23), at least 4,096 (the best on a
    small CNN, 2,300 activation floats per example) and at most 65,536. On the digits MLP (170 per example)
    that is about 49,000, and a GGN column over 1,000 examples costs 0.75 ms of CPU instead of 1.5 ms at
    4,096 (benchmarks/results/arnoldi_speed.md, session 7)."""
    per = activation_floats(task, batch)
    return int(min(1 << 16, max(4096, BLOCK_ACTIVATION_FLOATS // max(per, 1.0))))


def gradient_start(task: Any, data: Iterable, columns: int, seed: Any, max_batch_columns: int | None = None
                   ) -> Tensor:
    """``Γᵀ R [N, columns]``: random combinations of the per-example loss gradients ``Γ [n, N]`` of ``data``
    (``R [n, columns]`` standard Gaussian, drawn with ``seed``), one vjp per batch piece, vectorised over the
    columns; the per-example gradients are never formed. A Krylov start block in the span of the gradients
    that influence scores are made of (the range finder of randomized SVD, Halko, Martinsson & Tropp 2011,
    applied to Γᵀ)."""
    from torch.func import vjp, vmap

    from ..linalg._validate import make_generator
    from ..model._batch import SplitBatch

    gen = make_generator(seed)
    p0 = task.params_dict()
    out: Tensor | None = None
    for batch in data:
        split = SplitBatch(batch, task.device)
        R = torch.randn(split.size, columns, generator=gen, dtype=torch.float64).to(task.device, task.dtype)
        rows = split.size if max_batch_columns is None else max(1, max_batch_columns // columns)
        for s, piece in split.chunks(rows):
            b = piece.rebuild()
            Rp = R[s:s + piece.size]
            with torch.no_grad():
                _, back = vjp(lambda p, b=b, n=piece.size: task.losses_at(p, b, n), p0)  # type: ignore[misc]
                try:
                    part = vmap(lambda r, back=back: task.flatten(back(r)[0]), in_dims=1, out_dims=1)(Rp)
                except (NotImplementedError, RuntimeError):  # a model without vmap rules: one column at a time
                    part = torch.stack([task.flatten(back(Rp[:, j].contiguous())[0]) for j in range(columns)], 1)
            out = part if out is None else out + part
    if out is None:
        raise ValueError("data: expected at least one batch for the Krylov start block, got none")
    return out


class _CurvatureMethod(Attributor):
    """Shared by the curvature-based methods: the Hessian or GGN operator of the mean training loss (on
    ``hessian_data``), sketched to ``S @ H @ S.T`` when the fit has a sketch, inverted by the one damping rule
    (|K| + δI)⁻¹ (:mod:`gradsketch.attribution.damping`)."""

    auto_factored = False

    def _has_ggn(self) -> bool:
        return self.task.output_fn is not None and self.task.loss_on_output is not None

    def _curvature(self) -> str:
        """The curvature the method inverts: the ``curvature`` option, or (``None``/``"auto"``) the method's
        default (here: the GGN when the task declares its outputs, else the Hessian)."""
        c = self._opt("curvature")
        if c is None or c == "auto":
            return "ggn" if self._has_ggn() else "hessian"
        return c

    def _curvature_data(self, data: Iterable, block: bool = False) -> tuple[Iterable, int | None]:
        """The data of the curvature products (``hessian_data`` or ``data``, subsampled by
        ``hessian_subsample``) and the ``max_batch_columns`` of block products (``None`` otherwise)."""
        from ..curvature import subsample_data

        hdata = self._opt("hessian_data", None) or data
        sub = self._opt("hessian_subsample", None)
        # block Krylov: vectorised products over the columns, batches cut to at least 4096 example-columns, more
        # when the model's activations are small (block_batch_columns)
        cols = block_batch_columns(self.task, next(iter(hdata))) if block else None
        if sub is not None:
            seed = self._opt("seed", 0)
            # small activations: rebuild the subsample in batches as large as one vectorised chunk allows
            width = max(1, int(self._opt("block_size", 1)))
            rows = cols // width if cols is not None and cols > 4096 else None
            hdata = subsample_data(hdata, sub, seed=seed if isinstance(seed, int) else 0, batch_size=rows)
        return hdata, cols

    def _curvature_op(self, data: Iterable, sketch: Any, block: bool = False,
                      prepared: tuple[Iterable, int | None] | None = None) -> Any:
        """The curvature operator over ``data`` (or over ``prepared``, a :meth:`_curvature_data` result),
        sketched when the fit has a sketch."""
        from ..curvature import GGNOperator, HessianOperator, sharded, sketched
        from ..linalg.distributed import is_distributed, rank_and_world
        from ..model._batch import SplitBatch

        curv = self._curvature()
        hdata, cols = prepared if prepared is not None else self._curvature_data(data, block)
        if is_distributed() and rank_and_world()[1] > 1:
            # under torch.distributed each rank takes its shard of the curvature data; products are all-reduced
            kw: dict[str, Any] = {"max_batch_columns": cols}
            if curv == "hessian":
                kw["method"] = "block" if block else "auto"
            op: LinearOperator = sharded(curv, self.task, hdata, **kw)
        else:
            # block Krylov on the GGN of a small curvature set: keep every piece's outputs, vjp and output Hessian
            # blocks between the passes (GGNOperator frozen=True; 10.3 against 14.5 ms per 16-column pass on
            # the digits MLP)
            frozen = (block and curv == "ggn" and isinstance(hdata, (list, tuple)) and len(hdata) > 0
                      and sum(SplitBatch(b).size for b in hdata) * activation_floats(self.task, hdata[0])
                      <= FROZEN_ACTIVATION_FLOATS)
            op = (HessianOperator(self.task, hdata, method="block" if block else "auto", max_batch_columns=cols)
                  if curv == "hessian" else GGNOperator(self.task, hdata, max_batch_columns=cols, frozen=frozen))
        if self.sketch is not None:
            op = sketched(op, sketch)
        return op


class ArnoldiInfluence(_CurvatureMethod):
    """Arnoldi influence (Schioppa et al. 2022): ``Σ_{i ≤ k} p_i(x) p_i(z) / (|λ_i| + δ)`` with the top-k
    eigenpairs (λ_i, u_i) of H (or ΦHΦᵀ; ``curvature="ggn"`` for the GGN) from Arnoldi + distill and
    p_i = ⟨u_i, Φ∇ℓ⟩. The one damping rule (:mod:`gradsketch.attribution.damping`): eigenvalues by their
    absolute value plus ``damping`` δ (default 3e-3), so the kernel is positive semi-definite even when the
    Hessian keeps negative eigenvalues (self-influence ≥ 0).

    Without a sketch the stored features are the projections p_i(z) (``d_ = top_k``); with one, the sketched
    gradients, and the kernel carries the eigenvectors. On a large model, ``sketch=task.factored_sketch(d)``
    with ``mode="factored"`` brings the training gradients in through the factored path (per-layer Kronecker
    sketches; the per-example gradient is never formed), and the tail is then free. Eigenpairs are cached next
    to the store. With ``block_size`` b > 1 (the default, 16) the eigenpairs come from block Lanczos
    (:func:`gradsketch.linalg.block_lanczos_eigs`, b vectors per pass over the Hessian data, started from
    random combinations of the per-example loss gradients (``krylov_start``), at most 1.5·top_k vectors,
    stopped earlier by the residual test ``tol``); with b = 1 from Arnoldi + distill.
    After ``fit``: ``eigenvalues_`` ``[k]``; ``krylov_`` (dict: ``dim`` the Krylov dimension built,
    ``passes`` the passes over the Hessian data, ``stop``); ``tail_``: the weight t = 1/(|λ_k| + δ) of the
    complement of the kept eigenspace, or ``None`` when it is dropped (option ``tail``: the default keeps it
    with a sketch and on models of at most 16,384 parameters, with 40 eigenpairs; LDS 0.61 → 0.68 on the digits
    MLP and 0.35 → 0.40 on a Fashion-MNIST CNN, benchmarks/results/arnoldi_speed.md).

    >>> import gradsketch
    >>> task = gradsketch.Task(torch.nn.Linear(2, 1, bias=False), lambda m, b: (m(b[0])[:, 0] - b[1]) ** 2)
    >>> data = [(torch.eye(2), torch.zeros(2))]
    >>> a = ArnoldiInfluence(task, n_iters=2, top_k=2, damping=0.0).fit(data, progress=False)
    >>> a.eigenvalues_   # H = (2/n) Σ x xᵀ = I
    tensor([1., 1.], dtype=torch.float64)
    """

    options_cls = ArnoldiOptions
    method_name = "arnoldi"
    TAIL_EXACT_MAX = 16384  # tail="auto" without a sketch: append the exact gradient up to this many parameters

    def uses_tail(self) -> bool:
        """Whether the complement of the top-k eigenspace is kept (``tail``; see :class:`ArnoldiOptions`)."""
        tail = self._opt("tail", "auto")
        if tail == "auto":
            return self.sketch is not None or self.task.n_params <= self.TAIL_EXACT_MAX
        return bool(tail)

    def top_k(self) -> int:
        """Eigenpairs kept: the option, or by default 40 with the tail and 100 without (ArnoldiOptions)."""
        k = self._opt("top_k", None)
        if k is not None:
            return int(k)
        n = self._opt("n_iters", None)
        return min(40 if self.uses_tail() else 100, int(n) if n is not None else 100)

    def krylov_dim(self) -> int:
        """The Krylov dimension (at most): the ``n_iters`` option, or by default 1.5·top_k rounded up to a
        multiple of ``block_size`` (64 for the default 40 eigenpairs in blocks of 16; 160 for 100)."""
        n = self._opt("n_iters", None)
        if n is not None:
            return int(n)
        k, b = self.top_k(), max(1, int(self._opt("block_size", 1)))
        return b * -(-(3 * k) // (2 * b))

    def feature_kind(self) -> str:
        if self.sketch is not None:
            return "loss-gradient"
        append = getattr(self, "_append_gradient", self.uses_tail())
        return "arnoldi-projection+gradient" if append else "arnoldi-projection"

    def feature_sketch(self, comp: Component, data: Iterable, sketch: Any, progress: bool) -> Any:
        if self.sketch is not None:
            return sketch
        # without a sketch, the features are the projections p_i(z) = ⟨u_i, ∇ℓ(z)⟩ (then ∇ℓ(z) itself when the
        # tail is kept): eigenpairs first
        eig = self._eig_timed(comp, data, sketch, progress)
        V = eig["eigenvectors"]
        self._append_gradient = self.uses_tail() and V.shape[1] < V.shape[0]  # no complement: nothing to append
        return ProjectionSketch(V.to(device=self.task.device, dtype=self.task.dtype), tag=self.feature_kind(),
                                append_identity=self._append_gradient)

    def _eig_timed(self, comp: Component, data: Iterable, sketch: Any, progress: bool) -> dict:
        import time

        t0 = time.perf_counter()
        eig = self._arnoldi_eig(comp, data, sketch, progress)
        self._time("curvature", t0)
        comp.info["eig"] = eig
        return eig

    def finalise(self, comp: Component, data: Iterable, progress: bool) -> None:
        eig = comp.info.get("eig")
        if eig is None:  # with a sketch: features first, then the sketched Hessian ΦHΦᵀ (d × d)
            eig = self._eig_timed(comp, data, comp.sketch, progress)
        lam = eig["eigenvalues"].to(torch.float64)
        self.eigenvalues_ = lam
        self.krylov_ = dict(eig.get("krylov", {}))
        damping = float(self._opt("damping"))
        tiny = lam.abs() <= 1e-6 * float(lam.abs().max()) if lam.numel() else lam.bool()
        if bool(tiny.any()) and damping < 1e-6 * float(lam.abs().max()):
            # e.g. a curvature subsample whose rank is below top_k: 1/|λ| of a numerically zero λ is noise
            warnings.warn(
                f"damping: {int(tiny.sum())} of the {lam.numel()} kept eigenvalues are numerically zero "
                f"(|λ| ≤ 1e-6·|λ_max|, smallest {float(lam.abs().min()):.3g}), so their weights 1/(|λ| + δ) with "
                f"damping δ = {damping:g} are huge and the scores meaningless; expected a damping above "
                f"{1e-6 * float(lam.abs().max()):.3g}, a smaller top_k, or more curvature examples "
                "(hessian_subsample)", RuntimeWarning, stacklevel=2)
        c = damped_reciprocal(lam, damping)  # the one damping rule 1/(|λ_i| + δ): a PSD kernel for any δ ≥ 0
        vecs = eig["eigenvectors"]
        whole = lam.numel() >= vecs.shape[0]  # the kept eigenvectors span the whole (sketch) space: no complement
        # the complement of the kept eigenspace, weighted by the rule at the smallest kept |λ| (the bound of every
        # eigenvalue left out): U diag(c) Uᵀ + t (I − U Uᵀ) = U diag(c − t) Uᵀ + t I, with t ≤ every c_i
        t = (float(damped_reciprocal(lam.abs().min()[None], damping)[0])
             if self.uses_tail() and lam.numel() and not whole else 0.0)
        self.tail_ = t if t else None
        if self.sketch is not None:  # features Φg, eigenvectors in sketch space
            comp.kernel = EigenOperator(c - t, vecs.to(torch.float64), shift=t)
        elif getattr(comp.sketch, "append_identity", False):  # features [Uᵀg, g]: diag(c − t), then t
            comp.kernel = EigenOperator(torch.cat([c - t, torch.full((comp.sketch.n,), t, dtype=c.dtype)]))
        else:  # features Uᵀg
            comp.kernel = EigenOperator(c)

    def _arnoldi_eig(self, comp: Component, data: Iterable, sketch: Any, progress: bool) -> dict:
        """Top-k eigenpairs of H (or ΦHΦᵀ) by Arnoldi + distill, cached next to the store."""
        from ..linalg import arnoldi, block_lanczos_eigs, distill

        n_iters, top_k = self.krylov_dim(), self.top_k()
        positive_only = bool(self._opt("positive_only"))
        seed = self._opt("seed")
        start = self._opt("start")
        block_size, tol = int(self._opt("block_size", 1)), self._opt("tol", None)
        # the gradient start block (block Lanczos; with a sketch, its image Φ·Γᵀ R under start="parameter")
        krylov_start = (self._opt("krylov_start", "random")
                        if block_size > 1 and (self.sketch is None or start == "parameter") else "random")
        config = {"n_iters": n_iters, "top_k": top_k, "positive_only": positive_only, "seed": seed,
                  "curvature": self._curvature(), "sketch": sketch_spec(sketch),
                  "fingerprint": comp.fingerprint, "start": start if self.sketch is not None else None,
                  "block_size": block_size, "tol": tol if block_size > 1 else None,
                  "hessian_subsample": self._opt("hessian_subsample", None),
                  "krylov_start": krylov_start}

        def compute():
            prepared = self._curvature_data(data, block=block_size > 1)
            op = self._curvature_op(data, sketch, block=block_size > 1, prepared=prepared)
            v0 = None
            if krylov_start == "gradients":
                from ..linalg._validate import work_dtype

                # random combinations of the curvature data's loss gradients (of Φ times them with a sketch)
                cols = min(block_size, op.shape[0])
                if getattr(op, "frozen", False):  # the frozen GGN's vjps: no further forward pass
                    from ..linalg._validate import make_generator

                    z = op.loss_gradient_start(cols, make_generator(seed))
                else:
                    z = gradient_start(self.task, prepared[0], cols, seed, prepared[1])
                if bool(torch.isfinite(z).all()) and bool((z != 0).any()):  # else (all gradients 0): random
                    v0 = (sketch @ z if self.sketch is not None else z).to(work_dtype(op))
            elif self.sketch is not None and start == "parameter":
                from ..linalg._validate import make_generator, random_probes, work_dtype

                # the start block Φz_j of the Gaussian z_j ∈ R^N that the unsketched run starts from
                N = self.task.n_params
                cols = 1 if block_size == 1 else min(block_size, op.shape[0])
                z = random_probes(N, cols, "gaussian", make_generator(seed), work_dtype(op), torch.device("cpu"))
                v0 = (sketch @ z.to(self.task.device)).to(work_dtype(op))
                v0 = v0[:, 0] if block_size == 1 else v0
            if block_size > 1:
                r = block_lanczos_eigs(op, min(top_k, op.shape[0]), block_size=block_size, max_dim=n_iters,
                                       tol=tol, seed=seed, v0=v0, positive_only=positive_only, progress=progress)
                krylov = {"dim": r.n_iter, "passes": r.n_passes, "stop": r.stop}
                lam, vecs = r.eigenvalues, r.eigenvectors
            else:
                res = arnoldi(op, n_iters, v0=v0, seed=seed, store=self._opt("krylov_store", "device"),
                              progress=progress)
                lam, vecs = distill(res.Q, res.H, min(top_k, res.H.shape[1]), positive_only=positive_only)
                vecs = vecs / vecs.norm(dim=0, keepdim=True).clamp_min(torch.finfo(vecs.dtype).tiny)
                krylov = {"dim": res.H.shape[1], "passes": res.n_matvec, "stop": "max_dim"}
            return {"eigenvalues": lam.detach().cpu(), "eigenvectors": vecs.detach().cpu(), "krylov": krylov}

        return self._cached(comp, "arnoldi", config, compute)


class Influence(_CurvatureMethod):
    """Influence functions (Koh & Liang 2017): ``Φ∇ℓ(x)ᵀ (|ΦKΦᵀ| + δI)⁻¹ Φ∇ℓ(z)`` with K the Hessian or the
    GGN and the inverse by ``solver``: the one damping rule (:mod:`gradsketch.attribution.damping`), default
    δ = 3e-3.

    - ``"explicit"`` (default): the d × d matrix, Cholesky when it is positive definite, else its
      eigendecomposition with |λ| (well posed for an indefinite Hessian at every δ).
    - ``"cg"`` / ``"lissa"``: solve (K + δI)x = g without an eigendecomposition, which is the rule exactly when
      K is positive semi-definite. So with these solvers ``curvature=None`` means the GGN when the task
      declares one (``Task.from_classifier``; ``output_fn`` and ``loss_on_output``), else the Hessian. Before
      solving, a Lanczos run of min(d, 40) steps looks for a negative Ritz value (a proof that K is
      indefinite); then the kernel is computed by eigendecomposition as with ``"explicit"`` (d ≤ 8192, else a
      ValueError naming the fixes), so all three solvers accept the same systems and return the same kernel.

    After ``fit``: ``kernel_info_`` (dict: ``curvature``, ``solver``, ``solver_used``, ``damping``, ``d``,
    ``indefinite``, ``lambda_min``/``lambda_max`` when an eigendecomposition was needed), also logged as one
    INFO line on the ``gradsketch.attribution`` logger, the same words for every solver.

    >>> import gradsketch
    >>> m = torch.nn.Linear(2, 1, bias=False); _ = torch.nn.init.zeros_(m.weight)
    >>> task = gradsketch.Task(m, lambda m, b: (m(b[0])[:, 0] - b[1]) ** 2)
    >>> data = [(torch.eye(2), torch.ones(2))]   # g(z_i) = -2 e_i, H = I
    >>> Influence(task, damping=1.0).fit(data, progress=False).self_influence(progress=False).round(decimals=4)
    tensor([2., 2.], dtype=torch.float64)
    """

    options_cls = InfluenceOptions
    method_name = "influence"

    def _curvature(self) -> str:
        c = self._opt("curvature")
        if c is not None and c != "auto":
            return c
        if self._opt("solver") != "explicit" and self._has_ggn():
            return "ggn"  # positive semi-definite: (K + δI)⁻¹ is the damping rule, which CG/LiSSA can solve
        return "hessian"

    def finalise(self, comp: Component, data: Iterable, progress: bool) -> None:
        solver = self._opt("solver")
        damping = float(self._opt("damping"))
        op = self._curvature_op(data, comp.sketch)
        d = op.shape[0]
        curv = self._curvature()
        if solver == "explicit":
            if d > 8192:
                raise ValueError(f"solver: 'explicit' builds a {d}×{d} matrix; expected at most 8192 rows: use a "
                                 "sketch or solver='cg' (with curvature='ggn')")
            comp.kernel, found = damped_inverse_info(op.to_dense(), damping)
            used = "explicit"
        else:
            # CG/LiSSA solve (K + δI)x = b, the rule (|K| + δI)⁻¹ only for a PSD K: check first (a negative Ritz
            # value θ = yᵀKy of a Lanczos run proves an eigenvalue below θ), so that every solver applies the
            # same rule to the same systems
            lo, hi = _ritz_extremes(op)
            found = {"indefinite": lo < -INDEFINITE_RTOL * max(abs(lo), abs(hi)), "lambda_min": None,
                     "lambda_max": None}
            if found["indefinite"]:
                if d > 8192:
                    raise ValueError(
                        f"solver: {solver!r} solves (K + δI)x = g, but the {curv} K is indefinite (a Lanczos Ritz "
                        f"value {lo:.3g} < 0), where the damping rule (|K| + δI)⁻¹ needs an eigendecomposition, and "
                        f"K is {d}×{d} (expected at most 8192 rows for it). Expected curvature='ggn' (positive "
                        "semi-definite; Task.from_classifier declares it) or a sketch with d <= 8192")
                comp.kernel, found = damped_inverse_info(op.to_dense(), damping)
                used = "explicit"
            else:
                keys = ("tol", "maxiter") if solver == "cg" else ("scale", "depth", "tol")
                opts = {k: self.options[k] for k in keys if k in self.options}
                if solver == "lissa" and opts.get("scale") is None:  # the scale from the same Lanczos run
                    opts["scale"] = 1.1 * max(abs(lo), abs(hi)) + damping if max(abs(lo), abs(hi)) > 0 else 1.0
                comp.kernel = inverse(op, damping, solver, **opts)
                used = solver
        info = {"curvature": curv, "solver": solver, "solver_used": used, "damping": damping, "d": d, **found}
        comp.info["kernel"] = info
        self.kernel_info_ = info
        _log.info(_kernel_line(info))


def _ritz_extremes(op: LinearOperator) -> tuple[float, float]:
    """(smallest, largest) Ritz value of a Lanczos run of min(d, 40) steps on the symmetric ``op`` (exact for
    d <= 40): inner bounds of the spectrum, so a negative one proves K indefinite."""
    from ..linalg import lanczos

    d = op.shape[0]
    if d <= 2:
        w = torch.linalg.eigvalsh(op.to_dense().to(torch.float64))
        return float(w[0]), float(w[-1])
    r = lanczos(op, 2, "BE", n_iter=min(d, 40), tol=0.0, seed=0, check_symmetric=False, exact_residuals=False)
    ev = r.eigenvalues.to(torch.float64)
    return float(ev.min()), float(ev.max())


def _kernel_line(info: dict) -> str:
    """The one line every solver logs about the kernel it built (the same words for the same system)."""
    if info["indefinite"]:
        how = "" if info["solver_used"] == info["solver"] else \
            f" ({info['solver']!r} cannot apply |K|: the kernel was computed by eigendecomposition, as 'explicit')"
        return (f"influence: the {info['curvature']} K ({info['d']}×{info['d']}) is indefinite (λ_min = "
                f"{info['lambda_min']:.3g}, λ_max = {info['lambda_max']:.3g}); kernel (|K| + δI)⁻¹ with δ = "
                f"{info['damping']:g}{how}")
    return (f"influence: the {info['curvature']} K ({info['d']}×{info['d']}) is positive semi-definite; kernel "
            f"(K + δI)⁻¹ with δ = {info['damping']:g} by solver {info['solver']!r}")


for _cls in (GradDot, GradCos, TracIn, TRAK, ArnoldiInfluence, Influence):
    register_method(_cls.method_name, _cls)

__all__ = ["GradDot", "GradCos", "TracIn", "TRAK", "ArnoldiInfluence", "Influence"]
