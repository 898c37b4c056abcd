"""``Task``: a model, a per-example loss and a selection of parameters; exact per-example gradients.

θ ∈ R^N is the concatenation of the selected parameters (row-major, in ``task.named_params`` order). For a
batch of B examples, ``task.grads(batch)`` is the [B, N] matrix with rows g_i = ∇_θ ℓ_i(θ), computed with
``torch.func.vmap(torch.func.grad(...))`` over ``torch.func.functional_call`` (other parameters and the
buffers are held fixed). Sketched gradients (``sketch_grads``) and curvature operators (``hessian``,
``ggn``, ``fisher``) are built on the same functional view.

BatchNorm. A BatchNorm layer that normalises with batch statistics (any ``_BatchNorm`` in train mode, or
built with ``track_running_stats=False``) makes each example's loss depend on the other examples of its
batch, so per-example gradients are not defined: every per-example path (``grads``, ``per_example_grads``,
``sketch_grads`` in every mode) raises ``ValueError`` naming the layer before any forward pass
(:meth:`Task.check_per_example`). Curvature operators of the mean loss are defined and allowed. No forward
pass run by a ``Task`` updates running statistics: BatchNorm/InstanceNorm layers in train mode normalise with
batch (instance) statistics as usual while their running estimates are detached for the call
(:meth:`Task.frozen_running_stats`), so the model's buffers are left as they were.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parameter import UninitializedBuffer

from ._batch import SplitBatch

if TYPE_CHECKING:
    from ..curvature import FisherOperator, GGNOperator, HessianOperator
    from ..linalg import LinearOperator
    from ..sketch import BlockSketch, FactoredSketch

LossFn = Callable[[nn.Module, Any], Tensor]

NAN_POLICIES = ("raise", "skip")
PER_EXAMPLE = ("auto", "vmap", "loop")
SKETCH_MODES = ("explicit", "implicit", "factored")


class _Call(nn.Module):
    """``forward(fn, batch) = fn(model, batch)``: lets ``functional_call`` swap the model's parameters
    for whatever callable (loss, output, ...) the task evaluates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module, Any], Any], batch: Any) -> Any:
        return fn(self.model, batch)


def _batch_statistics(mod: nn.Module) -> bool:
    """Whether ``mod`` is a BatchNorm (1d/2d/3d, Sync, Lazy) that normalises with the statistics of the
    batch: in train mode, or in eval mode without running estimates (``track_running_stats=False``); the
    rule of ``_BatchNorm.forward``."""
    if not isinstance(mod, _BatchNorm):
        return False
    return bool(mod.training) or (mod.running_mean is None and mod.running_var is None)



class DtypeMismatchError(TypeError, RuntimeError):
    """The batch's floating tensors and the model's parameters have different dtypes. A ``TypeError`` that is
    also the ``RuntimeError`` torch raises for it, so existing handlers keep working."""

def _reads_dict_as_tuple(e: BaseException) -> bool:
    """Whether an error from a loss called on a dict batch looks like tuple access: ``batch[0]`` (KeyError of an
    integer), ``x, y = batch`` (unpacking the keys: "values to unpack", or the model called on a key string)."""
    if isinstance(e, KeyError):
        return bool(e.args) and isinstance(e.args[0], int)
    msg = str(e)
    return any(t in msg for t in ("values to unpack", "'str'", "not str", "str object"))


class Task:
    """A model, a per-example loss and the parameters to differentiate.

    Parameters
    ----------
    model : nn.Module
        Any module; its train/eval mode and buffers are used as they are, and never written (BatchNorm
        running statistics included). A BatchNorm that normalises with batch statistics (train mode, or
        ``track_running_stats=False``) mixes the examples of a batch: per-example gradients then raise
        ``ValueError`` (call ``model.eval()`` or use GroupNorm/LayerNorm); curvature operators work.
    loss_fn : callable ``(model, batch) -> Tensor [B]``
        Per-example losses (unreduced). May be omitted when ``output_fn`` and ``loss_on_output`` are given:
        then ``loss_fn(model, batch) = loss_on_output(output_fn(model, batch), batch)``.
    params : None, list of str, list of nn.Module or nn.Parameter
        ``None``: every parameter with ``requires_grad``. Strings are ``fnmatch`` globs over parameter names
        (``"encoder.layer.5.*"``); modules select all of their parameters. Others are held fixed.
    output_fn, loss_on_output : callables, optional
        ``output_fn(model, batch) -> [B, ...]`` (e.g. logits) and ``loss_on_output(outputs, batch) -> [B]``;
        needed by :meth:`ggn` (J^T H_L J) and by TRAK's Gauss-Newton kernels (its default ``kernel="auto"`` is
        ``"ggn_trace"`` for a task that declares them). A ``loss_on_output`` object with a method
        ``gradient_and_hessian_trace(outputs, batch) -> (e [B, C], t [B])`` (each example's ∂ℓ/∂z flattened and
        the trace of the positive part of ∂²ℓ/∂z²) gives TRAK those in closed form, as
        :class:`gradsketch.losses.OutputLoss` does. See :meth:`from_classifier`.
    margin_fn : callable ``(model, batch) -> Tensor [B]``, optional
        TRAK's output function f (one scalar per example, e.g. :func:`gradsketch.losses.classification_margin`:
        the correct-class margin log p/(1 − p)): TRAK featurises ∇f and weights training examples by
        1 − σ(f) (Park et al. 2023; as kronfluence/trak tasks declare their measurement). ``None``: TRAK
        uses loss gradients. ``Attributor(..., margin_fn=...)`` overrides it for one fit.
    per_example : ``"auto"`` | ``"vmap"`` | ``"loop"``
        How exact per-example gradients are computed. ``"vmap"``: ``vmap(grad)``; ``"loop"``: one backward
        pass per example (slow; works for any model); ``"auto"``: vmap, falling back to the loop (with a
        warning, once) when vmap cannot trace the model (``.item()``/data-dependent control flow, in-place
        updates of buffers, ops without batching rules).
    randomness : ``"different"`` | ``"same"``
        Under vmap each example is a batch of one; ``"different"`` draws independent random numbers
        (dropout masks) per example, as a batched forward pass would; ``"same"`` shares one draw across the
        examples of a call. Results in train mode with dropout are random either way; use ``model.eval()``
        for reproducible gradients.
    nan_policy : ``"raise"`` | ``"skip"``
        A non-finite loss or gradient raises ``FloatingPointError`` naming the example's index (counted over
        the data); ``"skip"`` zeroes its row instead and records it in ``task.skipped_indices_``.
    validate : bool
        On the first batch, run one ordinary backward pass that checks the loss shape and that every
        selected parameter receives a gradient (``ValueError`` naming those that do not).

    Batches are any nested tuple/list/dict of tensors sharing a leading batch dimension (transformers'
    ``BatchEncoding`` included); tensor leaves are moved to the parameters' device.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None,
                 params: None | Sequence[str | nn.Module | nn.Parameter] = None, *,
                 output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 loss_on_output: Callable[[Tensor, Any], Tensor] | None = None,
                 margin_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 per_example: str = "auto", randomness: str = "different", nan_policy: str = "raise",
                 validate: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            # DDP replicates the module and all-reduces .grad in backward; per-example gradients and curvature
            # products never write .grad, so the task works on the wrapped module itself (same forward)
            model = model.module
        if loss_fn is None:
            if output_fn is None or loss_on_output is None:
                raise ValueError("loss_fn: expected a callable (model, batch) -> [B], or both output_fn and "
                                 "loss_on_output; got none of them")

            def loss_fn(m: nn.Module, b: Any) -> Tensor:
                return loss_on_output(output_fn(m, b), b)
        if not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable (model, batch) -> [B], got "
                            f"{type(loss_fn).__name__}")
        if margin_fn is not None and not callable(margin_fn):
            raise TypeError(f"margin_fn: expected a callable (model, batch) -> [B] or None, got "
                            f"{type(margin_fn).__name__}")
        for name, val, allowed in (("per_example", per_example, PER_EXAMPLE),
                                   ("randomness", randomness, ("different", "same")),
                                   ("nan_policy", nan_policy, NAN_POLICIES)):
            if val not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {val!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.loss_on_output = loss_on_output
        self.margin_fn = margin_fn
        self.per_example = per_example
        self.randomness = randomness
        self.nan_policy = nan_policy
        self.validate = validate
        self.named_params: list[tuple[str, nn.Parameter]] = self._select(params)
        self.param_names = [n for n, _ in self.named_params]
        self.param_shapes = [tuple(p.shape) for _, p in self.named_params]
        self.param_sizes = [p.numel() for _, p in self.named_params]
        self.n_params = int(sum(self.param_sizes))
        self._call = _Call(model)
        self._validated = False
        self.skipped_indices_: list[int] = []

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def from_classifier(cls, model: nn.Module, loss: str = "cross_entropy", input_key: Any = 0,
                        target_key: Any = 1, params: Any = None, **kwargs: Any) -> Task:
        """A task for ``outputs = model(batch[input_key])`` and ``targets = batch[target_key]`` with
        cross-entropy (``loss="cross_entropy"``, outputs are logits [B, C]) or squared error (``"mse"``,
        mean_j (o_j − t_j)², :func:`gradsketch.losses.mse_per_example`). Sets ``output_fn``/``loss_on_output``
        (a :class:`gradsketch.losses.OutputLoss`, which also has the output derivatives in closed form) so that
        :meth:`ggn` works; ``margin_fn=`` (TRAK's output function) passes through ``kwargs``."""
        from .losses import OutputLoss, _get

        loss_on_output = OutputLoss(loss, target_key)   # checks loss

        def output_fn(m: nn.Module, b: Any) -> Tensor:
            return m(_get(b, input_key, "input_key"))

        return cls(model, None, params, output_fn=output_fn, loss_on_output=loss_on_output, **kwargs)

    def _select(self, params: Any) -> list[tuple[str, nn.Parameter]]:
        all_named = list(self.model.named_parameters())
        if params is None:
            out = [(n, p) for n, p in all_named if p.requires_grad]
            if not out:
                raise ValueError("params: the model has no parameter with requires_grad=True")
            return out
        if isinstance(params, (str, nn.Module, nn.Parameter)):
            params = [params]
        chosen: set[int] = set()
        for sel in params:
            if isinstance(sel, str):
                hit = {id(p) for n, p in all_named if fnmatch.fnmatchcase(n, sel)}
                if not hit:
                    names = ", ".join(n for n, _ in all_named[:12]) + (", ..." if len(all_named) > 12 else "")
                    raise ValueError(f"params: pattern {sel!r} matches no parameter name; names are {names}")
            elif isinstance(sel, nn.Parameter):
                hit = {id(sel)}
                if not any(p is sel for _, p in all_named):
                    raise ValueError("params: a given nn.Parameter is not a parameter of the model")
            elif isinstance(sel, nn.Module):
                hit = {id(p) for p in sel.parameters()}
                if not hit or not hit <= {id(p) for _, p in all_named}:
                    raise ValueError(f"params: module {type(sel).__name__} has no parameters of the model")
            else:
                raise TypeError("params: expected None or a list of name patterns (str), modules or "
                                f"parameters, got an element of type {type(sel).__name__}")
            chosen |= hit
        return [(n, p) for n, p in all_named if id(p) in chosen]

    # -- basic properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.named_params[0][1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.named_params[0][1].dtype

    def params_dict(self) -> dict[str, Tensor]:
        """Detached current values of the selected parameters, ``name -> tensor``."""
        return {n: p.detach() for n, p in self.named_params}

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor], batch_dims: int = 0) -> Tensor:
        """Per-parameter tensors ``[*lead, *shape_i]`` -> ``[*lead, N]`` (parameter order)."""
        seq = [tensors[n] for n in self.param_names] if isinstance(tensors, dict) else list(tensors)
        lead = seq[0].shape[:batch_dims]
        return torch.cat([t.reshape(*lead, -1) for t in seq], dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """``[*lead, N]`` -> ``name -> [*lead, *shape_i]``."""
        if vec.shape[-1] != self.n_params:
            raise ValueError(f"vec: expected last dimension {self.n_params} (task.n_params), "
                             f"got {vec.shape[-1]}")
        lead = vec.shape[:-1]
        parts = torch.split(vec, self.param_sizes, dim=-1)
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def split(self, batch: Any) -> SplitBatch:
        """``batch`` as a :class:`~gradsketch.model._batch.SplitBatch` (tensor leaves on the task's device)."""
        return batch if isinstance(batch, SplitBatch) else SplitBatch(batch, self.device)

    # -- BatchNorm ----------------------------------------------------------------------------------
    def check_per_example(self) -> None:
        """Raise ``ValueError`` when per-example gradients of the model are not defined: a BatchNorm layer
        (any ``torch.nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*)
        normalises with the statistics of the whole batch (train mode, or ``track_running_stats=False`` in
        any mode), so each example's loss depends on the other examples of its batch. The message names
        the layer and the fix (``model.eval()``, or a per-example normalisation such as GroupNorm or
        LayerNorm). Every per-example path runs it before any forward pass, so a refused call changes
        nothing (buffers included). InstanceNorm, GroupNorm, LayerNorm and dropout act on each example
        alone and are allowed."""
        bad = [(n, m) for n, m in self.model.named_modules() if _batch_statistics(m)]
        if not bad:
            return
        name, mod = bad[0]
        where = f"module {name!r}" if name else "the model itself"
        cls = type(mod).__name__
        if mod.running_mean is None and mod.running_var is None:
            why = (f"{where} ({cls}) has track_running_stats=False, so it normalises with the statistics of "
                   "the whole batch, in eval mode too")
            fix = ("model.eval() does not change that; build the layer with track_running_stats=True and call "
                   "model.eval() (it then normalises with its running estimates), or use a per-example "
                   "normalisation such as GroupNorm or LayerNorm")
        else:
            why = f"{where} ({cls}) is in train mode, so it normalises with the statistics of the whole batch"
            fix = ("call model.eval() first (BatchNorm then normalises every example with its running "
                   "estimates), or use a per-example normalisation such as GroupNorm or LayerNorm")
        more = ""
        if len(bad) > 1:
            others = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in bad[1:4])
            more = f" (and {len(bad) - 1} more such layer(s): {others}{', ...' if len(bad) > 4 else ''})"
        raise ValueError(f"model: per-example gradients are not defined: {why}, and each example's loss "
                         f"depends on the other examples in its batch{more}. To fix: {fix}.")

    @contextlib.contextmanager
    def frozen_running_stats(self) -> Iterator[None]:
        """Within the block, BatchNorm (and InstanceNorm) layers in train mode that track running statistics
        normalise with batch (instance) statistics as usual but do not update ``running_mean``,
        ``running_var`` and ``num_batches_tracked``: the buffers are detached from the layer for the block
        (as ``torch.func.replace_all_batch_norm_modules_`` does, for good) and put back, unchanged, at its
        end. Every forward pass of the task runs inside it: outputs are those of an ordinary train-mode
        forward pass, and ``torch.func`` transforms (vmap, curvature products) do not meet in-place buffer
        updates, which they cannot trace."""
        saved = []
        for mod in self.model.modules():
            if (isinstance(mod, _NormBase) and mod.training and mod.track_running_stats
                    and isinstance(mod.running_mean, Tensor) and not isinstance(mod.running_mean, UninitializedBuffer)):
                saved.append((mod, mod.running_mean, mod.running_var, mod.num_batches_tracked))
        for mod, *_ in saved:
            mod.running_mean = mod.running_var = mod.num_batches_tracked = None
            mod.track_running_stats = False
        try:
            yield
        finally:
            for mod, rm, rv, nbt in saved:
                mod.running_mean, mod.running_var, mod.num_batches_tracked = rm, rv, nbt
                mod.track_running_stats = True

    # -- functional evaluation ---------------------------------------------------------------------
    def call(self, fn: Callable[[nn.Module, Any], Any], p: dict[str, Tensor], batch: Any) -> Any:
        """``fn(model, batch)`` with the selected parameters replaced by ``p`` (``torch.func.functional_call``;
        running statistics frozen): the functional view every gradient and curvature routine evaluates."""
        with self.frozen_running_stats():
            return functional_call(self._call, {"model." + n: t for n, t in p.items()}, (fn, batch))

    def losses_at(self, p: dict[str, Tensor] | None, batch: Any, expected: int) -> Tensor:
        """Per-example losses with the selected parameters replaced by ``p`` (``None``: the model's own
        parameters, called directly, without ``functional_call``); checks the shape ``[B]``."""
        if p is None:
            with self.frozen_running_stats():
                out = self.loss_fn(self.model, batch)
        else:
            out = self.call(self.loss_fn, p, batch)
        if not isinstance(out, Tensor):
            raise TypeError(f"loss_fn: expected a tensor of per-example losses [B], got {type(out).__name__}")
        if out.ndim == 0:
            raise ValueError(f"loss_fn: expected per-example losses of shape [B] = [{expected}], got a "
                             "scalar; return unreduced losses (e.g. F.cross_entropy(..., reduction='none'))")
        if tuple(out.shape) != (expected,):
            raise ValueError(f"loss_fn: expected per-example losses of shape [{expected}] (one per example "
                             f"of the batch), got shape {tuple(out.shape)}")
        return out

    def validate_batch(self, split: SplitBatch) -> None:
        """Once, on the first batch seen (``validate=True``): the loss has shape ``[B]`` and every selected
        parameter is reached by it (``ValueError`` naming those that are not)."""
        if self._validated or not self.validate:
            return
        p = {n: t.detach().requires_grad_(True) for n, t in self.params_dict().items()}
        with torch.enable_grad():
            batch = split.rebuild()
            try:
                out = self.losses_at(p, batch, split.size)
            except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
                if isinstance(batch, Mapping) and _reads_dict_as_tuple(e):
                    keys = list(batch)
                    raise TypeError(
                        f"loss_fn: the batches are dicts (keys {keys}) but the loss reads them as tuples "
                        f"({type(e).__name__}: {e}); expected a loss that indexes the batch by key (e.g. "
                        f"batch[{keys[0]!r}] instead of batch[0] or x, y = batch), or batches of tuples (x, y)"
                    ) from e
                raise
            except RuntimeError as e:  # name the common cause: data and model in different float dtypes
                other = sorted({str(t.dtype).replace("torch.", "") for t in split.leaves
                                if t.is_floating_point() and t.dtype != self.dtype})
                if other and "dtype" in str(e).lower():
                    model_dt = str(self.dtype).replace("torch.", "")
                    raise DtypeMismatchError(
                        f"batch: the model's parameters are {model_dt} but the batch holds {', '.join(other)} "
                        f"tensors ({e}); convert the data (e.g. x.to(torch.{model_dt})) or the model "
                        f"(model.to(torch.{other[0]}))") from e
                raise
            gs = torch.autograd.grad(out.sum(), list(p.values()), allow_unused=True)
        dead = [n for n, g in zip(p, gs) if g is None]
        if dead:
            raise ValueError("params: selected parameters receive no gradient from loss_fn: "
                             f"{', '.join(dead)}; deselect them (params=[...]) or check the model")
        self._validated = True

    @property
    def validated(self) -> bool:
        """Whether the first-batch check (:meth:`validate_batch`) has run and passed."""
        return self._validated

    def loss(self, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at the current parameters (no gradient). A BatchNorm in train mode
        normalises with the statistics of this batch (its running estimates are not updated)."""
        split = self.split(batch)
        with torch.no_grad():
            return self.losses_at(self.params_dict(), split.rebuild(), split.size)

    # -- exact per-example gradients (gradsketch.gradients) ------------------------------------------
    def per_example_grads(self, batch: Any, names: Sequence[str] | None = None
                          ) -> tuple[dict[str, Tensor], Tensor]:
        """Exact per-example gradients ``name -> [B, *shape]`` and the losses ``[B]``: a thin convenience
        for :func:`gradsketch.gradients.per_example_grads` (see there)."""
        from ..gradients.exact import per_example_grads

        return per_example_grads(self, batch, names)

    def grads(self, batch: Any, nan_policy: str | None = None) -> Tensor:
        """Exact per-example gradients ``[B, N]`` (row i = ∇_θ ℓ_i(θ)): a thin convenience for
        :func:`gradsketch.gradients.grads` (see there)."""
        from ..gradients.exact import grads

        return grads(self, batch, nan_policy=nan_policy)

    # -- sketches, sketched gradients, curvature: thin conveniences --------------------------------------
    # The work is done by gradsketch.gradients and gradsketch.curvature, which import Task; these methods
    # import them lazily (at call time), so nothing at import time points upwards. The import-linter
    # contract lists exactly these lines as its allowed exceptions (pyproject.toml; docs/ARCHITECTURE.md).
    def block_sketch(self, d: int, kind: str = "affd", seed: int = 0, **options: Any) -> BlockSketch:
        """A :class:`gradsketch.BlockSketch` over the selected parameters (``name -> numel`` blocks, one
        independent sketch each, summed): a whole-model sketch R^N -> R^d."""
        from ..sketch import BlockSketch

        return BlockSketch({n: s for n, s in zip(self.param_names, self.param_sizes)}, d, kind=kind,
                           seed=seed, **options)

    def factored_sketch(self, d: int, kind: str = "affd", seed: int = 0, **options: Any) -> FactoredSketch:
        """A :class:`~gradsketch.sketch.FactoredSketch` for ``sketch_grads(mode="factored")`` (same argument
        order as :meth:`block_sketch`): a Kronecker ``qk`` sketch F_out ⊗ F_in per supported weight (Linear,
        transformers Conv1D, Embedding, Conv2d) with its bias folded in as an extra input column (row for
        Conv1D); small weights that admit no factorisation of d are written exactly into a slice of the
        output; a ``kind`` BlockSketch over the other parameters; all blocks summed into R^d. Built by
        :func:`gradsketch.gradients.factored_sketch_for`."""
        from ..gradients.factored import factored_sketch_for

        return factored_sketch_for(self, d, kind=kind, seed=seed, **options)

    def iter_sketch_grads(self, data: Iterable, sketch: Any, mode: str = "explicit", progress: bool = True,
                          chunk_size: int | None = None, nan_policy: str | None = None) -> Iterator[Tensor]:
        """:func:`gradsketch.gradients.iter_sketch_grads`: one ``[B, d]`` tensor per batch."""
        from ..gradients.sketching import iter_sketch_grads

        return iter_sketch_grads(self, data, sketch, mode=mode, progress=progress, chunk_size=chunk_size,
                                 nan_policy=nan_policy)

    def sketch_grads(self, data: Iterable, sketch: Any, mode: str = "explicit", progress: bool = True,
                     chunk_size: int | None = None, nan_policy: str | None = None) -> Tensor:
        """Sketched per-example gradients ``[n_examples, d]``, row i = Φ ∇_θ ℓ_i(θ), streaming over ``data``:
        :func:`gradsketch.gradients.sketch_grads` (see there for ``mode``, ``chunk_size``, ``nan_policy``).

        ``sketch``: a BlockSketch over the task's parameters (:meth:`block_sketch`), a plain sketch with
        ``n == task.n_params``, or a FactoredSketch (:meth:`factored_sketch`). ``mode``: ``"explicit"``,
        ``"implicit"`` (∇_ω ℓ_i(θ0 + Φᵀω) at ω = 0; Schioppa 2024) or ``"factored"`` (LoGra). Non-finite rows
        follow ``nan_policy`` (indices of skipped rows in ``task.skipped_indices_``). Every mode raises
        ``ValueError`` before any forward pass when a BatchNorm normalises with batch statistics.
        """
        from ..gradients.sketching import sketch_grads

        self.skipped_indices_ = []
        return sketch_grads(self, data, sketch, mode=mode, progress=progress, chunk_size=chunk_size,
                            nan_policy=nan_policy)

    def hessian(self, data: Iterable, sampling: str = "full", damping: float = 0.0, method: str = "auto",
                progress: bool = False, *, mode: Any = None) -> HessianOperator:
        """The Hessian of the mean loss, ∇²_θ (1/n) Σ_i ℓ_i, as a symmetric LinearOperator [N, N]
        (+ ``damping`` · I): :class:`gradsketch.curvature.HessianOperator` (see there for ``sampling`` —
        ``"full"``, ``"batch"``, ``"stochastic"``; formerly ``mode=``, now a TypeError — and ``method``)."""
        from ..curvature import HessianOperator

        return HessianOperator(self, data, sampling, damping=damping, method=method, progress=progress, mode=mode)

    def ggn(self, data: Iterable, sampling: str = "full", damping: float = 0.0, progress: bool = False, *,
            mode: Any = None) -> GGNOperator:
        """Generalised Gauss-Newton (1/n) Σ_i J_iᵀ H_{L,i} J_i of the mean loss (needs ``output_fn`` and
        ``loss_on_output``, e.g. from :meth:`from_classifier`): :class:`gradsketch.curvature.GGNOperator`."""
        from ..curvature import GGNOperator

        return GGNOperator(self, data, sampling, damping=damping, progress=progress, mode=mode)

    def fisher(self, data: Iterable, sampling: str = "full", damping: float = 0.0, progress: bool = False, *,
               mode: Any = None) -> FisherOperator:
        """Empirical Fisher (1/n) Σ_i g_i g_iᵀ: :class:`gradsketch.curvature.FisherOperator`."""
        from ..curvature import FisherOperator

        return FisherOperator(self, data, sampling, damping=damping, progress=progress, mode=mode)

    def sketched_hessian(self, data: Iterable, sketch: Any, **kwargs: Any) -> LinearOperator:
        """The [d, d] operator ``sketch @ H @ sketch.T`` (``kwargs`` go to :meth:`hessian`)."""
        return sketch @ self.hessian(data, **kwargs) @ sketch.T

    def __repr__(self) -> str:
        return (f"Task(model={type(self.model).__name__}, n_params={self.n_params}, "
                f"n_tensors={len(self.named_params)})")


