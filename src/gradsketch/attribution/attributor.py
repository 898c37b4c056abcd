"""``Attributor``: training data attribution (TDA) scores between test and training examples.

Every method is a bilinear form between per-example feature rows,

    score(x, z) = Σ_c w_c · φ_c(x)ᵀ M_c φ_c(z) · q_c(z)        (x: test example, z: training example)

over one or several model states c (checkpoints), with

=============  =================================  ====================================  ==================
method         φ(z)                               M                                     source
=============  =================================  ====================================  ==================
grad-dot       Φ∇ℓ(z)                             I                                     (gradient similarity)
grad-cos       Φ∇ℓ(z)/‖Φ∇ℓ(z)‖                    I                                     (gradient similarity)
tracin         Φ∇ℓ_c(z), w_c = η_c                I                                     Pruthi et al. 2020
trak           Φ∇f(z) (f = margin_fn) or Φ∇ℓ(z)   (Σ_z φ(z)φ(z)ᵀ + λI)⁻¹, q = 1 − σ(f)  Park et al. 2023
arnoldi        p_i(z) = ⟨u_i, Φ∇ℓ(z)⟩ (i ≤ k)     diag(1/(λ_i + δ))                     Schioppa et al. 2022
influence      Φ∇ℓ(z) (Φ = I: exact gradients)    (ΦHΦᵀ + δI)⁻¹ (explicit, CG, LiSSA)   Koh & Liang 2017
=============  =================================  ====================================  ==================

Φ is the sketch (``sketch=None``: the identity, i.e. exact gradients); (λ_i, u_i) are the top-k eigenpairs of
the Hessian H of the mean training loss (or of the sketched Hessian ΦHΦᵀ) found by Arnoldi + distill.

**Sign convention** (as TRAK): a positive score means the training example *supports* the test prediction:
up-weighting z lowers the loss on x (score ≈ −dℓ(x)/dε for ℓ_total + ε ℓ(z), up to the 1/n factor and
the curvature model). A training example that duplicates a test example therefore has a large positive
score, and self-influence (score(z, z)) is ≥ 0 for every PSD M. The influence-function score is
g(x)ᵀ(H + δI)⁻¹g(z) = −I_up,loss(z, x) of Koh & Liang.

**TRAK ensembles** (Park et al. 2023, Algorithm 1; as the ``traker`` package): with M model states
(``models=`` independently trained models, or ``checkpoints=``) the score is

    τ(x, z) = [ (1/M) Σ_m φ_m(x)ᵀ (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_m(z) ] · q̄(z),    q̄ = (1/M) Σ_m q_m,

each model with its own features and kernel, the out-to-loss weights averaged separately. Averaging over
independently trained models is TRAK's main lever: on the digits MLP (benchmarks/results/attribution.md) the
LDS goes from 0.56–0.61 (one model, sketched d = 2048 / unsketched) to 0.66–0.68 (5 models) at the default
ridge. M copies of one model give exactly the one-model score.

**TRAK ridge.** λ = ``ridge`` · tr(ΦᵀΦ) / min(n_train, d), i.e. ``ridge`` is in units of the mean non-zero
eigenvalue of ΦᵀΦ (its rank is at most min(n_train, d)), so one value means the same relative damping for
every d, sketched or not, and for d ≥ n_train where ΦᵀΦ is singular. Default ``ridge=1.0``: damping at the
mean eigenvalue. It was chosen on a validation split of digits (200 held-out images, not the test targets of
the benchmark) from {0.1, 0.3, 1, 3, 10}, where it was best or within 0.01 of best for d = 512, 2048 and
unsketched with 5 and 10 models. ``ridge=0`` is ``traker``'s default (λ = 0, sensible only for d ≪ n_train).
When d > n_train the inverse is applied through the n × n Gram matrix (Woodbury), O(n²d) instead of O(d²n).

**TRAK output function.** TRAK featurises gradients of the model output f (for classification the
correct-class margin f = log p/(1−p)) and weights training examples by q = 1 − p = 1 − σ(f). Pass
``margin_fn(model, batch) -> [B]`` (e.g. :func:`classification_margin`) to do exactly that; without it the
TRAK features are loss gradients and q = 1 (a generic choice that works for any loss).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..linalg import EigenOperator, LinearOperator, dense_inverse, gram, inverse, ridge_inverse
from ._features import (
    IdentitySketch,
    ProjectionSketch,
    featurise_memory,
    featurise_store,
    iter_feature_chunks,
    sketch_spec,
)
from .options import options_for

METHODS = ("grad-dot", "grad-cos", "tracin", "trak", "arnoldi", "influence")
MODES = ("explicit", "implicit", "factored")
class TopK(NamedTuple):
    """Result of :meth:`Attributor.topk`: the k proponents (largest scores, descending) and the k
    opponents (smallest scores, ascending) of each test example; all ``[n_test, k]``."""

    values: Tensor
    indices: Tensor
    opponent_values: Tensor
    opponent_indices: Tensor


def classification_margin(input_key: Any = 0, target_key: Any = 1):
    """TRAK's output function for a classifier: ``f = z_y − logsumexp_{j≠y} z_j = log p_y/(1 − p_y)``
    with logits ``z = model(batch[input_key])`` and labels ``y = batch[target_key]``; returns
    ``margin_fn(model, batch) -> [B]``.

    Dict batches (Hugging Face style) work too: with the default keys the labels are ``batch["labels"]`` and
    every other entry is passed to the model as a keyword argument; a named ``input_key`` is passed
    positionally. Model outputs may be logits ``[B, C]`` or carry them as ``.logits`` / ``["logits"]``.

    >>> m = torch.nn.Linear(2, 3, bias=False); _ = m.weight.data.copy_(torch.eye(3, 2))
    >>> classification_margin()(m, (torch.tensor([[2.0, 0.0]]), torch.tensor([0]))).detach().round(decimals=4)
    tensor([1.3069])
    """
    from collections.abc import Mapping

    def margin_fn(model: nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            tkey = "labels" if target_key == 1 else target_key
            if tkey not in batch:
                raise ValueError(f"batch: expected the labels under {tkey!r} (target_key), got keys {sorted(batch)}")
            y = batch[tkey].long()
            out = (model(**{k: v for k, v in batch.items() if k != tkey}) if input_key == 0
                   else model(batch[input_key]))
        else:
            out = model(batch[input_key])
            y = batch[target_key].long()
        z = out.logits if hasattr(out, "logits") else (out["logits"] if isinstance(out, Mapping) else out)
        zy = z.gather(1, y[:, None])[:, 0]
        hit = torch.zeros_like(z).scatter(1, y[:, None], 1.0) > 0
        others = torch.where(hit, torch.full_like(z, float("-inf")), z)
        return zy - torch.logsumexp(others, dim=1)

    return margin_fn


def apply_kernel(kernel: LinearOperator | None, phi: Tensor) -> Tensor:
    """Rows ``M φ`` (float64, CPU) of the kernel operator M (``None``: the identity)."""
    if kernel is None:
        return phi.to(torch.float64)
    return kernel(phi.to(kernel.device)).to("cpu", torch.float64)


def quad_kernel(kernel: LinearOperator | None, phi: Tensor) -> Tensor:
    """``φᵀ M φ`` per row (float64, CPU)."""
    if kernel is None:
        p = phi.to(torch.float64)
        return (p * p).sum(1)
    return kernel.quadratic(phi.to(kernel.device)).to("cpu", torch.float64)


class _Component:
    """One model state: its features (memory or store), training weights q, kernel M, weight w."""

    def __init__(self, state: dict | None, weight: float, index: int) -> None:
        self.state, self.weight, self.index = state, float(weight), index
        self.feats: Any = None          # Tensor [n, d] or GradientStore
        self.q: Tensor | None = None    # [n] per-training-example multiplier
        self.kernel: Any = None
        self.sketch: Any = None
        self.task: Any = None
        self.fingerprint = ""
        self.info: dict = {}


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


class Attributor:
    """Training data attribution with sketched gradients (scikit-learn style: configure, ``fit``, ``score``).

    Parameters
    ----------
    task : gradsketch.Task
        The model and its per-example loss. Its parameters are the θ of every gradient.
    method : ``"trak"`` | ``"grad-dot"`` | ``"grad-cos"`` | ``"tracin"`` | ``"arnoldi"`` | ``"influence"``
        See the module docstring for each method's formula.
    sketch : None, a sketch, a BlockSketch, a FactoredSketch, or ``dict(kind=, d=, seed=, **options)``
        Φ: R^N -> R^d applied to every gradient. ``None``: exact gradients (d = N; small models). A dict
        builds ``task.block_sketch(d, kind, seed)`` (``task.factored_sketch`` for ``mode="factored"``).
    store : None or path
        ``None`` keeps training features in memory (task dtype). A directory path writes them to
        :class:`gradsketch.GradientStore` s under it (``features_<c>``, one per checkpoint): a rerun of
        ``fit`` after a crash resumes, several processes may fill it at once (:meth:`featurise` with
        ``rank``/``world_size``). A store is identified by what its rows are, not by the method: the
        differentiated output ("loss-gradient": grad-dot, grad-cos, tracin, influence, arnoldi with a sketch,
        trak without ``margin_fn``; "output-gradient": trak with ``margin_fn``; "arnoldi-projection": arnoldi
        with ``sketch=None``), the sketch spec, ``mode``, the model state of checkpoint ``c`` (fingerprint),
        the row count and ``store_dtype``. Methods whose rows agree share a store (the second one only
        finalises); otherwise ``StoreMismatchError`` (a ValueError) says what differs.
    mode : ``"explicit"`` | ``"implicit"`` | ``"factored"``
        How sketched gradients are computed (:meth:`gradsketch.Task.sketch_grads`).
    **method_options
        Common: ``nan_policy`` ("raise" | "skip"), ``store_dtype`` ("float16" | "float32"), ``chunk_rows``,
        ``block_rows`` (training rows per scoring block, default 4096), ``test_block_rows`` (test rows per
        top-k pass, default 1024).
        grad-dot / grad-cos / tracin / trak: ``checkpoints``: list of ``state_dict`` (trak, grad-dot,
        grad-cos: ensemble average) or of ``(state_dict, lr)`` (tracin: Σ_c η_c⟨g_c(x), g_c(z)⟩); default: the
        current model. grad-dot / grad-cos / trak: ``models``: list of ``nn.Module`` (same architecture as
        ``task.model``, e.g. independently trained with :func:`gradsketch.eval.train_models`) or state_dicts,
        the ensemble to average over (an alternative spelling of ``checkpoints``; not both).
        trak: ``margin_fn`` (model, batch) -> [B] output function (see :func:`classification_margin`),
        ``ridge`` (λ = ridge · tr(ΦᵀΦ) / min(n_train, d); default 1.0, see the module docstring).
        arnoldi: ``n_iters`` (200), ``top_k`` (100), ``curvature`` ("hessian" | "ggn"), ``hessian_data``
        (batches for the HVPs, default the training data), ``positive_only`` (False), ``damping`` δ (0),
        ``seed`` (0), ``krylov_store`` ("device" | "host"), ``start`` ("parameter" | "sketch"): with a sketch,
        the Arnoldi start vector on ΦHΦᵀ is Φz for the Gaussian z ∈ R^N that the unsketched run would start
        from ("parameter", default: sketched and unsketched runs share their randomness, and for an orthogonal
        Φ (d = N) give the same eigenpairs), or a Gaussian in R^d ("sketch").
        influence: ``solver`` ("explicit" | "cg" | "lissa"), ``damping`` δ (0.01), ``curvature``,
        ``hessian_data``, ``tol``, ``maxiter`` (cg), ``depth``, ``scale`` (lissa).

    Attributes
    ----------
    config_ : the validated options (:mod:`gradsketch.attribution.options`, one dataclass per method; set at
    construction, so a NaN or negative ``damping``, a non-integer ``top_k`` ... fail before any work).

    Attributes (after ``fit``)
    -----------------------------
    n_train_ : int
    d_ : int, the feature dimension (sketch d, or top_k for Arnoldi with ``sketch=None``)
    kernels_ : list of the kernel operators M (one per model state; ``None`` for the identity): a
    :class:`gradsketch.linalg.LinearOperator` such as the TRAK inverse ``(ΦᵀΦ + λI)⁻¹`` or Arnoldi's
    ``Σ_i u_i u_iᵀ/(λ_i + δ)``,
    eigenvalues_ : Tensor [k] (arnoldi), ridge_ : float (trak: the absolute λ of the last model; ``ridges_`` all
    of them), timings_ : dict of seconds per phase.
    """

    def __init__(self, task: Any, method: str = "trak", sketch: Any = None, store: Any = None,
                 mode: str = "explicit", **method_options: Any) -> None:
        from ..model import Task

        if not isinstance(task, Task):
            raise TypeError(f"task: expected a gradsketch.Task, got {type(task).__name__}")
        self.task = task
        self.method = _check_choice(method, "method", METHODS)
        self.mode = _check_choice(mode, "mode", MODES)
        if sketch is not None and not isinstance(sketch, dict) and not (
                hasattr(sketch, "d") and hasattr(sketch, "n") and callable(sketch)):
            raise TypeError("sketch: expected None, a gradsketch sketch/BlockSketch/FactoredSketch or a dict "
                            f"(kind=, d=, seed=), got {type(sketch).__name__}")
        if isinstance(sketch, dict) and "d" not in sketch:
            raise ValueError(f"sketch: a dict needs at least the key 'd' (and optionally kind, seed), got "
                             f"{sorted(sketch)}")
        if mode == "factored" and sketch is None:
            raise ValueError("mode: 'factored' needs a sketch (dict(d=...) or task.factored_sketch(d)), got "
                             "sketch=None")
        self.sketch = sketch
        self.store = None if store is None else Path(store)
        #: the method's validated options (type, finiteness, range checked here, before any work)
        self.config_ = options_for(self.method, dict(method_options))
        self.options = dict(method_options)
        self.nan_policy = self.config_.nan_policy
        self._components: list[_Component] = []
        self._shared_q: Tensor | None = None  # TRAK: q̄ averaged over the ensemble, applied to the summed score
        self.ridges_: list[float] = []
        self.timings_: dict[str, float] = {}
        self._fitted = False

    # ------------------------------------------------------------------ helpers
    def _opt(self, key: str, default: Any = None) -> Any:
        """An option's validated value (its default from :mod:`gradsketch.attribution.options`)."""
        return getattr(self.config_, key, default)

    def _build_sketch(self) -> Any:
        s = self.sketch
        if s is None:
            return IdentitySketch(self.task.n_params)
        if isinstance(s, dict):
            opts = {k: v for k, v in s.items() if k not in ("kind", "d", "seed")}
            d, seed = int(s["d"]), int(s.get("seed", 0))
            if self.mode == "factored":
                return self.task.factored_sketch(d, seed=seed, kind=s.get("kind", "affd"), **opts)
            return self.task.block_sketch(d, kind=s.get("kind", "affd"), seed=seed, **opts)
        if int(s.n) != self.task.n_params:
            raise ValueError(f"sketch: expected n = task.n_params = {self.task.n_params}, got n = {s.n}")
        return s

    def _checkpoints(self) -> list[tuple[dict | None, float]]:
        cks = self.options.get("checkpoints")
        models = self.options.get("models")
        if models is not None:
            if cks is not None:
                raise ValueError("models: pass either models= or checkpoints=, not both")
            if not isinstance(models, (list, tuple)) or not models:
                raise ValueError("models: expected a non-empty list of nn.Module or state_dicts, got "
                                 f"{type(models).__name__}")
            cks = []
            for i, m in enumerate(models):
                if isinstance(m, nn.Module):
                    cks.append({k: v.detach() for k, v in m.state_dict().items()})
                elif isinstance(m, dict):
                    cks.append(m)
                else:
                    raise TypeError(f"models[{i}]: expected an nn.Module or a state_dict, got {type(m).__name__}")
        if cks is None:
            return [(None, 1.0)]
        if not isinstance(cks, (list, tuple)) or not cks:
            raise ValueError("checkpoints: expected a non-empty list of state_dicts or (state_dict, lr) pairs, "
                             f"got {type(cks).__name__}")
        out = []
        for i, c in enumerate(cks):
            if isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], dict):
                sd, lr = c
            elif isinstance(c, dict):
                sd, lr = c, 1.0
            else:
                raise TypeError(f"checkpoints[{i}]: expected a state_dict or (state_dict, lr), got "
                                f"{type(c).__name__}")
            if not math.isfinite(float(lr)):
                raise ValueError(f"checkpoints[{i}]: expected a finite learning rate, got {lr!r}")
            out.append((sd, float(lr)))
        if self.method == "trak":
            out = [(sd, 1.0 / len(out)) for sd, _ in out]
        elif self.method in ("grad-dot", "grad-cos"):
            out = [(sd, 1.0 / len(out)) for sd, _ in out]
        return out

    @contextlib.contextmanager
    def _state(self, state: dict | None):
        """Within the block ``self.task`` is a Task over a *copy* of the model holding ``state`` (same loss,
        outputs, parameter selection and options): the caller's model and parameters are never written."""
        if state is None:
            yield
            return
        from ..model import Task

        base = self.task
        model = copy.deepcopy(base.model)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError("checkpoints/models: a model state does not fit task.model (expected the same "
                             f"architecture and parameter names): {e}") from e
        named = dict(model.named_parameters())
        self.task = Task(model, base.loss_fn, params=[named[n] for n in base.param_names],
                         output_fn=base.output_fn, loss_on_output=base.loss_on_output,
                         per_example=base.per_example, randomness=base.randomness, nan_policy=base.nan_policy,
                         validate=base.validate)
        try:
            yield
        finally:
            self.task = base

    def _feature_task(self) -> Any:
        if self.method == "trak" and self.options.get("margin_fn") is not None:
            from ..model import Task

            fn = self.options["margin_fn"]
            if not callable(fn):
                raise TypeError(f"margin_fn: expected a callable (model, batch) -> [B], got {type(fn).__name__}")
            return Task(self.task.model, fn, params=[p for _, p in self.task.named_params],
                        per_example=self.task.per_example, nan_policy=self.task.nan_policy)
        return self.task

    def _featurise(self, comp: _Component, data: Iterable, progress: bool, tag: str, rank: int | None = None,
                   world_size: int | None = None) -> Any:
        from ..store import fingerprint_model

        mode = self.mode if comp.sketch.__class__.__name__ != "ProjectionSketch" else "explicit"
        kw: dict[str, Any] = dict(mode=mode, nan_policy=self.nan_policy, progress=progress, name="train_data")
        if self.store is None:
            return featurise_memory(comp.task, data, comp.sketch, desc=f"featurise train [{tag}]", **kw)
        self.store.mkdir(parents=True, exist_ok=True)
        # the store's identity is what its rows ARE (not the method that consumes them): the differentiated
        # output (loss, TRAK margin, Arnoldi projection), the sketch, the mode, the model state (fingerprint),
        # the checkpoint index and (checked by the store) the row count; methods with equal rows share it
        spec = {"sketch": sketch_spec(comp.sketch), "features": self._feature_kind(), "mode": mode}
        return featurise_store(comp.task, data, comp.sketch, path=self.store / f"features_{comp.index}",
                               spec=spec, fingerprint=fingerprint_model(self.task.model),
                               dtype=self._opt("store_dtype", "float16"), chunk_rows=self._opt("chunk_rows", None),
                               metadata={"checkpoint": comp.index}, desc=f"featurise train [{tag}]", rank=rank,
                               world_size=world_size, **kw)

    def _feature_kind(self) -> str:
        if self.method == "trak" and self.options.get("margin_fn") is not None:
            return "output-gradient"
        if self.method == "arnoldi" and self.sketch is None:
            return "arnoldi-projection"
        return "loss-gradient"

    def _blocks(self, comp: _Component, block_rows: int, dtype: torch.dtype):
        """Yields ``(r0, r1, [r1 - r0, d])`` consecutive training feature blocks of one component."""
        f = comp.feats
        if isinstance(f, Tensor):
            for r0 in range(0, f.shape[0], block_rows):
                r1 = min(r0 + block_rows, f.shape[0])
                yield r0, r1, f[r0:r1].to(dtype)
        else:
            r0 = 0
            for blk in f.iter_blocks(block_rows, as_tensor=True):
                yield r0, r0 + blk.shape[0], blk.to(dtype)
                r0 += blk.shape[0]

    def _curvature_op(self, data: Iterable, sketch: Any) -> Any:
        from ..curvature import sketched

        curv = _check_choice(self._opt("curvature", "hessian"), "curvature", ("hessian", "ggn"))
        hdata = self._opt("hessian_data", None) or data
        op = self.task.hessian(hdata) if curv == "hessian" else self.task.ggn(hdata)
        if self.sketch is not None:
            op = sketched(op, sketch)
        return op

    def _cached(self, comp: _Component, name: str, config: dict, compute) -> Any:
        """Curvature results cached next to the store (so that a resumed fit does not redo them)."""
        if self.store is None:
            return compute()
        path = self.store / f"{name}_{comp.index}.pt"
        key = json.dumps(config, sort_keys=True, default=str)
        if path.exists():
            blob = torch.load(path, weights_only=True)
            if blob.get("config") == key:
                return blob["value"]
        value = compute()
        self.store.mkdir(parents=True, exist_ok=True)
        # a private temporary name: concurrent fits (several processes on one store) each save their own
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            torch.save({"config": key, "value": value}, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return value

    # ------------------------------------------------------------------ fit
    def featurise(self, train_data: Iterable, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True) -> Attributor:
        """Write the training feature rows to the store, without finalising (needs ``store=``).

        With ``rank``/``world_size``, this process computes only its share of every store: the contiguous,
        chunk-aligned rows ``GradientStore.row_range_for_rank(rank, world_size)`` (batches before the share
        are skipped without computation; iteration stops after it). Run ``featurise(train_data, rank=r,
        world_size=w)`` in w processes (at once or one after the other), then ``fit(train_data)`` in any
        process: it finds the stores complete and only finalises (a chunk still missing, e.g. from a rank that
        died, is computed there). Without ``rank`` every missing row is computed.

        Processes may share one store freely: each re-checks completion before every batch and (under an
        exclusive file lock) before every chunk write, treating a chunk that another process completed as
        done; nothing is overwritten, and the result is the store one process would have written.

        ``train_data`` must be the same batches, in the same order, in every process. For ``arnoldi`` with
        ``sketch=None`` the rows are projections on the eigenvectors, so each process first computes (or loads
        from the store directory, where the first one to finish caches them) the Arnoldi eigenpairs.
        Returns ``self`` (not fitted: call :meth:`fit` to score).
        """
        from ..model._batch import is_reiterable
        from ..store import fingerprint_model

        if self.store is None:
            raise ValueError("store: featurise() writes the training features to a store; expected "
                             "Attributor(..., store=path), got store=None (fit() featurises in memory)")
        if (rank is None) != (world_size is None):
            raise ValueError(f"rank, world_size: expected both or neither, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        if world_size is not None:
            if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
                raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        if not is_reiterable(train_data):
            raise TypeError("train_data: expected a re-iterable of batches (list, DataLoader), got a one-shot "
                            f"{type(train_data).__name__}")
        base_sketch = self._build_sketch()
        cks = self._checkpoints()
        share = "" if rank is None else f" rank {rank}/{world_size}"
        for c, (state, weight) in enumerate(cks):
            comp = _Component(state, weight, c)
            tag = (f"{self.method} {c + 1}/{len(cks)}" if state is not None else self.method) + share
            with self._state(state):
                comp.task = self._feature_task()
                comp.fingerprint = fingerprint_model(self.task.model)
                if self.method == "arnoldi" and self.sketch is None:
                    comp.sketch = self._arnoldi_projection(self._arnoldi_eig(comp, train_data, base_sketch,
                                                                             progress))
                else:
                    comp.sketch = base_sketch
                self._featurise(comp, train_data, progress, tag, rank=rank, world_size=world_size).close()
        return self

    def fit(self, train_data: Iterable, progress: bool = True) -> Attributor:
        """Featurise the training set (``[n_train, d]`` rows in memory or in the store) and finalise the
        method (TRAK kernel inverse, Arnoldi eigenpairs, Hessian inverse). ``train_data``: a re-iterable
        of batches (list, DataLoader) with a fixed order. Returns ``self``.

        With a store, only missing chunks are computed: a rerun after a crash resumes, a store filled by
        :meth:`featurise` (e.g. one share per rank) or by a fit of another method with the same rows (see the
        class docstring) is only finalised, and concurrent fits on one store all succeed with the same rows."""
        import time

        from ..model._batch import is_reiterable
        from ..store import fingerprint_model

        if not is_reiterable(train_data):
            raise TypeError("train_data: expected a re-iterable of batches (list, DataLoader), got a one-shot "
                            f"{type(train_data).__name__}")
        self._components = []
        self._shared_q = None
        self.ridges_ = []
        self.timings_ = {}
        self._fit_fingerprint = fingerprint_model(self.task.model)
        base_sketch = self._build_sketch()
        for c, (state, weight) in enumerate(self._checkpoints()):
            comp = _Component(state, weight, c)
            tag = f"{self.method} {c + 1}/{len(self._checkpoints())}" if state is not None else self.method
            with self._state(state):
                comp.task = self._feature_task()
                comp.fingerprint = fingerprint_model(self.task.model)
                t0 = time.perf_counter()
                if self.method == "arnoldi":
                    self._fit_arnoldi(comp, train_data, base_sketch, progress, tag)
                else:
                    comp.sketch = base_sketch
                    comp.feats = self._featurise(comp, train_data, progress, tag)
                    self.timings_["featurise"] = self.timings_.get("featurise", 0.0) + time.perf_counter() - t0
                    t1 = time.perf_counter()
                    self._finalise(comp, train_data, progress)
                    self.timings_["finalise"] = self.timings_.get("finalise", 0.0) + time.perf_counter() - t1
            if state is not None:
                comp.task = None  # drop the model copy; scoring makes a fresh one per pass
            self._components.append(comp)
        if self.method == "trak" and self.options.get("margin_fn") is not None:
            # TRAK (Algorithm 1 of Park et al.; traker's finalize_scores): the out-to-loss weights are
            # averaged over the ensemble and applied to the averaged score, not per model
            qs = [cp.q for cp in self._components if cp.q is not None]
            self._shared_q = torch.stack(qs).mean(0)
            for cp in self._components:
                cp.q = None
        self.kernels_ = [cp.kernel for cp in self._components]
        first = self._components[0]
        self.n_train_ = int(first.feats.shape[0] if isinstance(first.feats, Tensor) else first.feats.n_rows)
        self.d_ = int(first.sketch.d)
        self._fitted = True
        return self

    def _arnoldi_eig(self, comp: _Component, data: Iterable, sketch: Any, progress: bool) -> dict:
        """Top-k eigenpairs of H (or ΦHΦᵀ) by Arnoldi + distill, cached next to the store."""
        from ..linalg import arnoldi, distill

        n_iters = int(self._opt("n_iters", 200))
        top_k = int(self._opt("top_k", 100))
        if top_k < 1 or n_iters < top_k:
            raise ValueError(f"top_k: expected 1 <= top_k <= n_iters = {n_iters}, got {top_k}")
        positive_only = bool(self._opt("positive_only", False))
        seed = self._opt("seed", 0)
        start = _check_choice(self._opt("start", "parameter"), "start", ("parameter", "sketch"))
        config = {"n_iters": n_iters, "top_k": top_k, "positive_only": positive_only, "seed": seed,
                  "curvature": self._opt("curvature", "hessian"), "sketch": sketch_spec(sketch),
                  "fingerprint": comp.fingerprint, "start": start if self.sketch is not None else None}

        def compute():
            op = self._curvature_op(data, sketch)
            v0 = None
            if self.sketch is not None and start == "parameter":
                from ..linalg._validate import make_generator, random_probes, work_dtype

                N = self.task.n_params
                z = random_probes(N, 1, "gaussian", make_generator(seed), work_dtype(op), torch.device("cpu"))
                v0 = (sketch @ z[:, 0].to(self.task.device)).to(work_dtype(op))
            res = arnoldi(op, n_iters, v0=v0, seed=seed, store=self._opt("krylov_store", "device"),
                          progress=progress)
            lam, vecs = distill(res.Q, res.H, min(top_k, res.H.shape[1]), positive_only=positive_only)
            vecs = vecs / vecs.norm(dim=0, keepdim=True).clamp_min(torch.finfo(vecs.dtype).tiny)
            return {"eigenvalues": lam.detach().cpu(), "eigenvectors": vecs.detach().cpu()}

        return self._cached(comp, "arnoldi", config, compute)

    def _arnoldi_projection(self, eig: dict) -> ProjectionSketch:
        """Without a sketch, the Arnoldi features are p_i(z) = ⟨u_i, ∇ℓ(z)⟩."""
        return ProjectionSketch(eig["eigenvectors"].to(device=self.task.device, dtype=self.task.dtype),
                                tag="arnoldi-projection")

    def _fit_arnoldi(self, comp: _Component, data: Iterable, sketch: Any, progress: bool, tag: str) -> None:
        import time

        damping = float(self._opt("damping", 0.0))
        t0 = time.perf_counter()
        if self.sketch is not None:  # featurise Φg first, then the sketched Hessian ΦHΦᵀ (d × d)
            comp.sketch = sketch
            comp.feats = self._featurise(comp, data, progress, tag)
            self.timings_["featurise"] = self.timings_.get("featurise", 0.0) + time.perf_counter() - t0
        t1 = time.perf_counter()
        eig = self._arnoldi_eig(comp, data, sketch, progress)
        lam = eig["eigenvalues"].to(torch.float64)
        vecs = eig["eigenvectors"]
        self.timings_["curvature"] = self.timings_.get("curvature", 0.0) + time.perf_counter() - t1
        self.eigenvalues_ = lam
        c = torch.where((lam + damping).abs() > 0, 1.0 / (lam + damping), torch.zeros_like(lam))
        if self.sketch is not None:
            comp.kernel = EigenOperator(c, vecs.to(torch.float64))
        else:  # project exact gradients on the eigenvectors (the stored features are p_i(z))
            t2 = time.perf_counter()
            comp.sketch = self._arnoldi_projection(eig)
            comp.feats = self._featurise(comp, data, progress, tag)
            comp.kernel = EigenOperator(c, None)
            self.timings_["featurise"] = self.timings_.get("featurise", 0.0) + time.perf_counter() - t2

    def _finalise(self, comp: _Component, data: Iterable, progress: bool) -> None:
        m = self.method
        if m in ("grad-dot", "tracin"):
            comp.kernel = None
        elif m == "grad-cos":
            norms = torch.cat([blk.to(torch.float64).norm(dim=1) for _, _, blk in
                               self._blocks(comp, self._opt("block_rows", 4096), torch.float64)])
            comp.q = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            comp.kernel = None
        elif m == "trak":
            d = comp.sketch.d
            ridge = self._opt("ridge", 1.0)
            if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) \
                    or ridge < 0:
                raise ValueError(f"ridge: expected a finite number >= 0, got {ridge!r}")
            br = self._opt("block_rows", 4096)
            n = int(comp.feats.shape[0] if isinstance(comp.feats, Tensor) else comp.feats.n_rows)
            if d > n:  # ΦᵀΦ has rank <= n < d: work with the n × n Gram matrix
                f64 = isinstance(comp.feats, Tensor) and comp.feats.dtype == torch.float64
                fdt = torch.float64 if f64 else torch.float32
                parts = [blk.cpu() for _, _, blk in self._blocks(comp, max(br, n), fdt)]
                F = parts[0] if len(parts) == 1 else torch.cat(parts)
                G = gram(F)
                lam = float(ridge) * float(torch.trace(G)) / n
                comp.kernel = ridge_inverse(F, lam, G)
                del F, G, parts
            else:
                K = torch.zeros(d, d, dtype=torch.float64)
                for _, _, blk in self._blocks(comp, br, torch.float64):
                    K += blk.cpu().T @ blk.cpu()
                lam = float(ridge) * float(torch.trace(K)) / d
                comp.kernel = dense_inverse(K, lam)
            self.ridge_ = lam
            self.ridges_.append(lam)
            comp.info["ridge"] = lam
            if self.options.get("margin_fn") is not None:
                comp.q = self._trak_q(data, progress)
        elif m == "influence":
            solver = _check_choice(self._opt("solver", "explicit"), "solver", ("explicit", "cg", "lissa"))
            damping = float(self._opt("damping", 0.01))
            op = self._curvature_op(data, comp.sketch)
            if solver == "explicit":
                if op.shape[0] > 8192:
                    raise ValueError(f"solver: 'explicit' builds a {op.shape[0]}×{op.shape[0]} matrix; expected "
                                     "at most 8192 rows: use a sketch or solver='cg'")
                K = op.to_dense()
                comp.kernel = dense_inverse(K, damping)
                if isinstance(comp.kernel, EigenOperator):  # Cholesky failed: K + δI is not positive definite
                    lam_min = float(torch.linalg.eigvalsh((K + K.T).to(torch.float64) / 2)[0])
                    warnings.warn(
                        f"damping: the curvature plus damping {damping:g}·I is indefinite (smallest eigenvalue of "
                        f"the curvature {lam_min:.3g}), so the explicit inverse amplifies directions whose eigenvalue "
                        f"is near -{damping:g} and the scores can be meaningless; expected a damping above "
                        f"{-lam_min:.3g} (or curvature='ggn', which is positive semi-definite). solver='cg' refuses "
                        "this system", RuntimeWarning, stacklevel=3)
            else:
                keys = ("tol", "maxiter") if solver == "cg" else ("scale", "depth", "tol")
                comp.kernel = inverse(op, damping, solver, **{k: self.options[k] for k in keys if k in self.options})

    def _trak_q(self, data: Iterable, progress: bool) -> Tensor:
        """q(z) = 1 − σ(f(z)) for the training examples (TRAK's Q)."""
        from ..model._batch import SplitBatch

        fn = self.options["margin_fn"]
        out = []
        with torch.no_grad():
            for batch in data:
                b = SplitBatch(batch, self.task.device).rebuild()
                out.append(torch.sigmoid(-fn(self.task.model, b).detach().to(torch.float64)).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        from ..store import fingerprint_model

        if not self._fitted:
            raise RuntimeError("Attributor: call fit(train_data) before scoring")
        if fingerprint_model(self.task.model) != self._fit_fingerprint:
            raise ValueError("task: the model's parameters changed since fit() (fingerprint differs); the "
                             "training features no longer match: refit, or restore the fitted weights")

    def _test_chunks(self, test_data: Iterable, progress: bool, rows: int):
        """Yields ``(row_start, [ψ_c [m, d_c] for each component])`` with ψ = w_c · M_c φ_c(x)."""
        comps = self._components
        if len(comps) == 1 and comps[0].state is None:
            comp = comps[0]
            for r0, phi in iter_feature_chunks(comp.task, test_data, comp.sketch, self._test_mode(comp),
                                               self.nan_policy, progress, "test_data", "featurise test", rows):
                yield r0, [self._psi(comp, phi)]
            return
        # several model states: features per state, then regroup (test sets are scored a chunk at a time)
        per = []
        for comp in comps:
            with self._state(comp.state):  # a fresh copy of the model in this state
                per.append(list(iter_feature_chunks(self._feature_task(), test_data, comp.sketch, self._test_mode(comp),
                                                    self.nan_policy, progress, "test_data",
                                                    f"featurise test [{comp.index + 1}/{len(comps)}]", rows)))
        for j in range(len(per[0])):
            yield per[0][j][0], [self._psi(comp, per[i][j][1]) for i, comp in enumerate(comps)]

    def _test_mode(self, comp: _Component) -> str:
        return "explicit" if isinstance(comp.sketch, ProjectionSketch) else self.mode

    def _psi(self, comp: _Component, phi: Tensor) -> Tensor:
        if self.method == "grad-cos":
            n = phi.to(torch.float64).norm(dim=1, keepdim=True)
            phi = torch.where(n > 0, phi / n, torch.zeros_like(phi))
        return comp.weight * apply_kernel(comp.kernel, phi.cpu())

    def _score_dtype(self) -> torch.dtype:
        f = self._components[0].feats
        return torch.float64 if isinstance(f, Tensor) and f.dtype == torch.float64 else torch.float32

    def _score_block(self, psis: list[Tensor], blocks: list[tuple[int, int, Tensor]], comps: list[_Component]
                     ) -> Tensor:
        out = None
        for psi, (r0, r1, F), comp in zip(psis, blocks, comps):
            s = psi.to(F.dtype) @ F.cpu().T
            if comp.q is not None:
                s = s * comp.q[r0:r1].to(s.dtype)
            out = s if out is None else out + s
        assert out is not None  # there is at least one component (checkpoints are non-empty)
        if self._shared_q is not None:
            r0, r1 = blocks[0][0], blocks[0][1]
            out = out * self._shared_q[r0:r1].to(out.dtype)
        return out

    def _iter_train_blocks(self, dtype: torch.dtype):
        br = int(self._opt("block_rows", 4096))
        gens = [self._blocks(c, br, dtype) for c in self._components]
        yield from zip(*gens)

    def score(self, test_data: Iterable, progress: bool = True) -> Tensor:
        """Scores ``[n_test, n_train]`` (CPU; float64 for in-memory float64 features, else float32);
        positive = the training example supports the test prediction (see the module docstring)."""
        self._check_fitted()
        dt = self._score_dtype()
        rows = []
        for _, psis in self._test_chunks(test_data, progress, 1 << 62):
            parts = [self._score_block(psis, list(blocks), self._components)
                     for blocks in self._iter_train_blocks(dt)]
            rows.append(torch.cat(parts, 1))
        return torch.cat(rows, 0)

    def topk(self, test_data: Iterable, k: int = 10, progress: bool = True) -> TopK:
        """The ``k`` proponents (largest scores) and opponents (smallest) of every test example.

        Scores a block of ``test_block_rows`` test examples against ``block_rows`` training rows at a time and
        keeps a running top-k, so memory is O(test_block_rows · (block_rows + d + k)), never n_test × n_train.
        Returns :class:`TopK` ``(values, indices, opponent_values, opponent_indices)``, each ``[n_test, k]``.
        """
        self._check_fitted()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        k = min(k, self.n_train_)
        dt = self._score_dtype()
        outs: list[tuple[Tensor, ...]] = []
        for _, psis in self._test_chunks(test_data, progress, int(self._opt("test_block_rows", 1024))):
            m = psis[0].shape[0]
            top_v = torch.full((m, 0), float("-inf"), dtype=dt)
            top_i = torch.zeros((m, 0), dtype=torch.long)
            bot_v = torch.full((m, 0), float("inf"), dtype=dt)
            bot_i = torch.zeros((m, 0), dtype=torch.long)
            for blocks in self._iter_train_blocks(dt):
                blocks = list(blocks)
                r0 = blocks[0][0]
                s = self._score_block(psis, blocks, self._components)
                idx = torch.arange(r0, r0 + s.shape[1]).expand(m, -1)
                v = torch.cat([top_v, s], 1)
                i = torch.cat([top_i, idx], 1)
                tv, ti = torch.topk(v, min(k, v.shape[1]), dim=1)
                top_v, top_i = tv, i.gather(1, ti)
                v = torch.cat([bot_v, s], 1)
                i = torch.cat([bot_i, idx], 1)
                bv, bi = torch.topk(v, min(k, v.shape[1]), dim=1, largest=False)
                bot_v, bot_i = bv, i.gather(1, bi)
            outs.append((top_v, top_i, bot_v, bot_i))
        return TopK(*(torch.cat([o[j] for o in outs], 0) for j in range(4)))

    def self_influence(self, progress: bool = True) -> Tensor:
        """score(z, z) for every training example, ``[n_train]`` (≥ 0 when M is PSD); the mislabel-detection
        statistic of Schioppa et al. 2022 (Arnoldi: Σ_i p_i(z)²/λ_i)."""
        self._check_fitted()
        dt = torch.float64
        out = []
        for blocks in self._iter_train_blocks(dt):
            tot = None
            for (r0, r1, F), comp in zip(blocks, self._components):
                F = F.cpu()
                if self.method == "grad-cos":
                    n = F.norm(dim=1, keepdim=True)
                    F = torch.where(n > 0, F / n, torch.zeros_like(F))
                v = comp.weight * quad_kernel(comp.kernel, F)
                if comp.q is not None and self.method != "grad-cos":
                    v = v * comp.q[r0:r1].to(v.dtype)
                tot = v if tot is None else tot + v
            assert tot is not None  # there is at least one component (checkpoints are non-empty)
            if self._shared_q is not None:
                r0, r1 = blocks[0][0], blocks[0][1]
                tot = tot * self._shared_q[r0:r1].to(tot.dtype)
            out.append(tot)
        return torch.cat(out)

    def __repr__(self) -> str:
        s = f"Attributor(method={self.method!r}, sketch={self.sketch!r}, store={self.store}, mode={self.mode!r}"
        return s + (f", n_train={self.n_train_}, d={self.d_})" if self._fitted else ")")
