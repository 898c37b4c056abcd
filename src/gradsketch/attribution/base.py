"""The attribution base class and the method registry.

:class:`Attributor` holds everything the methods share: argument checks, the sketch, the checkpoint/model
ensemble (each state on a copy of the model), featurisation into memory or a :class:`GradientStore`, and
scoring (``score``, ``topk``, ``self_influence``) of the bilinear form

    score(x, z) = Σ_c w_c · ψ_c(x)ᵀ ρ_c(z) · q_c(z),    ψ_c(x) = M_c t_c(φ_c(x)),

with φ the feature rows, M the kernel operator, t/ρ the test/training row maps (the identity but for
grad-cos) and q a per-training-example weight. A method is a subclass (:mod:`gradsketch.attribution.methods`)
that supplies its options dataclass and a few hooks (``finalise`` builds M and q; ``feature_sketch``,
``feature_task``, ``feature_kind``, ``test_rows``/``train_rows``, ``after_fit``, ``ensemble_weights``) and
is made known to the factory with :func:`register_method`; nothing in this module names a method.

``Attributor(task, method="trak", ...)`` is also the factory: it returns an instance of the class registered
under ``method`` (so ``isinstance(a, Attributor)`` holds and ``a.method == "trak"``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_int
from ..linalg import LinearOperator
from ..linalg.distributed import (
    all_gather_objects,
    barrier,
    check_same,
    is_distributed,
    merge_topk,
    rank_and_world,
    shard_range,
)
from ..store.fill import check_sequential
from ._features import (
    IdentitySketch,
    ProjectionSketch,
    featurise_memory,
    featurise_store,
    iter_feature_chunks,
    sketch_spec,
)
from .options import OPTIONS, CommonOptions, options_for

MODES = ("auto", "explicit", "implicit", "factored")
#: ``mode="auto"`` picks the factored path from this many selected parameters on (below it the explicit path
#: is as fast; benchmarks/results/mode_default.md)
AUTO_FACTORED_MIN_PARAMS = 2000
#: ... when at least this fraction of them lives in layers the factored hooks differentiate
AUTO_FACTORED_MIN_FRACTION = 0.5
_log = logging.getLogger("gradsketch.attribution")

#: name -> class; filled by :func:`register_method` (the built-in methods register in ``methods.py``)
_REGISTRY: dict[str, type[Attributor]] = {}


def register_method(name: str, cls: type[Attributor], options_cls: type[CommonOptions] | None = None, *,
                    replace: bool = False) -> type[Attributor]:
    """Make ``Attributor(task, method=name, ...)`` build ``cls`` configured by ``options_cls``.

    ``cls`` is a subclass of :class:`Attributor`; ``options_cls`` a dataclass subclass of
    :class:`~gradsketch.attribution.options.CommonOptions` (default ``cls.options_cls``) that validates the
    method's keyword options in ``__post_init__``. A name already taken raises ``ValueError`` unless
    ``replace=True``. Returns ``cls`` (so it can be used as a decorator through ``functools.partial``).

    >>> from gradsketch.attribution import GradDot, registered_methods
    >>> class MyDot(GradDot):
    ...     '''grad-dot under another name.'''
    >>> _ = register_method("my-dot", MyDot)
    >>> "my-dot" in registered_methods()
    True
    >>> unregister_method("my-dot")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {type(name).__name__} ({name!r})")
    if not (isinstance(cls, type) and issubclass(cls, Attributor)) or cls is Attributor:
        raise TypeError(f"cls: expected a subclass of gradsketch.attribution.Attributor, got {cls!r}")
    opts = cls.options_cls if options_cls is None else options_cls
    if not (isinstance(opts, type) and issubclass(opts, CommonOptions)):
        raise TypeError(f"options_cls: expected a subclass of gradsketch.attribution.options.CommonOptions, got "
                        f"{opts!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"name: expected a method name not yet registered, got {name!r} (registered by "
                         f"{_REGISTRY[name].__name__}; pass replace=True to override)")
    _REGISTRY[name] = cls
    OPTIONS[name] = opts
    return cls


def unregister_method(name: str) -> None:
    """Remove a method registered with :func:`register_method` (tests, plugins)."""
    if name not in _REGISTRY:
        raise ValueError(f"name: expected a registered method {registered_methods()}, got {name!r}")
    del _REGISTRY[name]
    OPTIONS.pop(name, None)


def registered_methods() -> tuple[str, ...]:
    """The names ``Attributor(task, method=...)`` accepts, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Attributor]:
    """The class registered under ``name`` (``ValueError`` listing the registered names otherwise)."""
    return _REGISTRY[check_choice(name, "method", registered_methods())]


def describe_callable(fn: Any) -> str | None:
    """A stable name for a function (for manifests): ``module.qualname``, the simple values it closes over,
    and a short hash of its bytecode (two lambdas of one module differ); ``None`` for ``None``.

    >>> describe_callable(len)
    'builtins.len'
    """
    if fn is None:
        return None
    import hashlib

    name = f"{getattr(fn, '__module__', None) or type(fn).__module__}." \
           f"{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    cells = zip(code.co_freevars, getattr(fn, "__closure__", None) or ())
    simple = [f"{n}={c.cell_contents!r}" for n, c in cells
              if isinstance(getattr(c, "cell_contents", None), str | int | float | bool | type(None))]
    digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
    return f"{name}({', '.join(simple)})#{digest}"


class TopK(NamedTuple):
    """Result of :meth:`Attributor.topk`: the k proponents (largest scores, descending) and the k
    opponents (smallest scores, ascending) of each test example; all ``[n_test, k]``."""

    values: Tensor
    indices: Tensor
    opponent_values: Tensor
    opponent_indices: Tensor


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


class Component:
    """One model state of a fit: its features (memory or store), training weights q, kernel M, weight w.

    Methods fill ``kernel`` (a :class:`~gradsketch.linalg.LinearOperator` or ``None`` for the identity),
    ``q`` (``[n_train]`` or ``None``) and ``info`` in :meth:`Attributor.finalise`."""

    def __init__(self, state: dict | None, weight: float, index: int) -> None:
        self.state, self.weight, self.index = state, float(weight), index
        self.feats: Any = None          # Tensor [n, d] or GradientStore
        self.q: Tensor | None = None    # [n] per-training-example multiplier
        self.kernel: Any = None
        self.sketch: Any = None
        self.task: Any = None
        self.fingerprint = ""
        self.info: dict = {}

    @property
    def n_rows(self) -> int:
        f = self.feats
        return int(f.shape[0] if isinstance(f, Tensor) else f.n_rows)


class Attributor:
    """Training data attribution with sketched gradients (scikit-learn style: configure, ``fit``, ``score``).

    ``Attributor(task, method, ...)`` returns an instance of the method's class (:class:`GradDot`,
    :class:`GradCos`, :class:`TracIn`, :class:`TRAK`, :class:`ArnoldiInfluence`, :class:`Influence`, or one
    added with :func:`register_method`); the classes can also be built directly (``TRAK(task, sketch=...)``).
    See :mod:`gradsketch.attribution.attributor` for every method's formula.

    Parameters
    ----------
    task : gradsketch.Task
        The model and its per-example loss. Its parameters are the θ of every gradient.
    method : str
        A registered method name (:func:`registered_methods`): ``"trak"`` (default), ``"grad-dot"``,
        ``"grad-cos"``, ``"tracin"``, ``"arnoldi"``, ``"influence"``.
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
    mode : ``"auto"`` (default) | ``"explicit"`` | ``"implicit"`` | ``"factored"``
        How sketched gradients are computed (:meth:`gradsketch.Task.sketch_grads`). ``"auto"``: factored (per-layer
        Kronecker sketches, no per-example gradient formed) when the sketch is a dict, the model has at least
        ``AUTO_FACTORED_MIN_PARAMS`` parameters, mostly in Linear/Conv1D/Embedding/Conv2d/LayerNorm layers, and
        the method sketches no curvature; explicit otherwise (``mode_reason_`` says why; ``fit`` logs it on the
        ``gradsketch.attribution`` logger, and checks the factored rows of the first examples against their exact
        gradients, falling back to explicit with a warning).
    **method_options
        Validated by the method's options dataclass (:mod:`gradsketch.attribution.options`).
        Common: ``nan_policy`` ("raise" | "skip": skipped examples listed in ``skipped_indices_``),
        ``on_data_change`` ("raise" | "refeaturise": a store whose chunks were computed from other examples
        is refused naming them, or only those chunks are recomputed), ``store_dtype`` ("float16" | "float32"),
        ``chunk_rows``,
        ``block_rows`` (training rows per scoring block, default 4096), ``test_block_rows`` (test rows per
        top-k pass, default 1024).
        grad-dot / grad-cos / tracin / trak: ``checkpoints``: list of ``state_dict`` (trak, grad-dot,
        grad-cos: ensemble average) or of ``(state_dict, lr)`` (tracin: Σ_c η_c⟨g_c(x), g_c(z)⟩); default: the
        current model. grad-dot / grad-cos / trak: ``models``: list of ``nn.Module`` (same architecture as
        ``task.model``, e.g. independently trained with :func:`gradsketch.eval.train_models`) or state_dicts,
        the ensemble to average over (an alternative spelling of ``checkpoints``; not both).
        trak: ``margin_fn`` (model, batch) -> [B] output function (see :func:`classification_margin`),
        ``ridge`` (λ = ridge · tr(ΦᵀΦ) / min(n_train, d); default 1.0).
        Influence-type methods share one damping rule, kernel (|K| + δI)⁻¹ (:mod:`.damping`).
        arnoldi: ``n_iters`` (the Krylov dimension at most; default 2·top_k rounded to the block size),
        ``top_k`` (40 with the tail, 100 without), ``krylov_start`` ("gradients" | "random"),
        ``tail`` ("auto"), ``curvature`` ("auto" | "hessian" | "ggn"), ``hessian_data`` (batches for the HVPs,
        default the training data),
        ``hessian_subsample`` (None | examples | fraction), ``block_size`` (Krylov vectors per data pass), ``tol``
        (residual stop), ``positive_only`` (False), ``damping`` δ (3e-3), ``seed`` (0), ``krylov_store``
        ("device" | "host"), ``start`` ("parameter" | "sketch").
        influence: ``solver`` ("explicit" | "cg" | "lissa"), ``damping`` δ (3e-3), ``curvature``,
        ``hessian_data``, ``tol``, ``maxiter`` (cg), ``depth``, ``scale`` (lissa).

    Attributes
    ----------
    method : str, the registered name; config_ : the validated options dataclass (set at construction, so a
    NaN or negative ``damping``, a non-integer ``top_k`` ... fail before any work).

    Attributes (after ``fit``)
    -----------------------------
    n_train_ : int
    d_ : int, the feature dimension (sketch d, or top_k for Arnoldi with ``sketch=None``)
    kernels_ : list of the kernel operators M (one per model state; ``None`` for the identity): a
    :class:`gradsketch.linalg.LinearOperator` such as the TRAK inverse ``(ΦᵀΦ + λI)⁻¹`` or Arnoldi's
    ``Σ_i u_i u_iᵀ/(λ_i + δ)``, timings_ : dict of seconds per phase; method-specific ones (``ridge_``,
    ``eigenvalues_``) are listed on each class.

    >>> import gradsketch
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> task = gradsketch.Task(model, lambda m, b: ((m(b[0])[:, 0] - b[1]) ** 2))
    >>> data = [(torch.eye(3), torch.zeros(3))]
    >>> a = Attributor(task, "grad-dot").fit(data, progress=False)
    >>> type(a).__name__, a.method, isinstance(a, Attributor)
    ('GradDot', 'grad-dot', True)
    """

    #: the options dataclass of the method (subclasses set it; :func:`register_method` may override)
    options_cls: ClassVar[type[CommonOptions]] = CommonOptions
    #: the name the class registers under (subclasses set it)
    method_name: ClassVar[str] = ""
    #: checkpoint weights: True averages (w_c = 1/C), False keeps the given per-checkpoint weights (TracIn's η_c)
    average_checkpoints: ClassVar[bool] = True
    #: dataset indices of the training examples skipped by the last fit/featurise (``nan_policy="skip"``:
    #: non-finite loss or gradient, row zeroed); with a store, read from its chunk markers
    skipped_indices_: list[int]

    def __new__(cls, task: Any = None, method: str | None = None, *args: Any, **kwargs: Any) -> Attributor:
        if cls is Attributor:  # the factory: the registered class of ``method``
            return super().__new__(method_class("trak" if method is None else method))
        return super().__new__(cls)

    def __init__(self, task: Any, method: str | None = None, sketch: Any = None, store: Any = None,
                 mode: str = "auto", **method_options: Any) -> None:
        from ..model import Task

        if not isinstance(task, Task):
            raise TypeError(f"task: expected a gradsketch.Task, got {type(task).__name__}")
        own = [n for n, c in _REGISTRY.items() if c is type(self)]
        if method is None:
            method = type(self).method_name or (own[0] if own else type(self).__name__)
        elif method not in own and method != type(self).method_name:
            raise ValueError(f"method: expected {own or [type(self).method_name]} for {type(self).__name__} "
                             f"(or None), got {method!r}")
        self.task = task
        self.method = method
        self.mode = check_choice(mode, "mode", MODES)
        #: why this mode: "asked for", or what ``mode="auto"`` saw (logged by ``fit``)
        self.mode_reason_ = "asked for"
        if self.mode == "auto":
            self.mode, self.mode_reason_ = self._auto_mode(task, sketch)
        self._auto = mode == "auto"
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
        if store is not None and not isinstance(store, str | os.PathLike):
            raise TypeError(f"store: expected a directory path or None, got {type(store).__name__}")
        self.store = None if store is None else Path(store)
        if self.store is not None and self.store.exists() and not self.store.is_dir():
            raise ValueError(f"store: expected a directory (or a path to create one), got the file {str(store)!r}")
        #: the method's validated options (type, finiteness, range checked here, before any work)
        self.config_ = options_for(self.method, dict(method_options), cls=type(self).options_cls)
        self.options = dict(method_options)
        self.nan_policy = self.config_.nan_policy
        self._components: list[Component] = []
        self._shared_q: Tensor | None = None  # a q applied to the summed ensemble score (TRAK's q̄)
        self.timings_: dict[str, float] = {}
        self._fitted = False

    #: whether ``mode="auto"`` may choose the factored path for this method (False where the sketch is also
    #: applied to a curvature operator, which the explicit BlockSketch is tested for)
    auto_factored: ClassVar[bool] = True

    def _auto_mode(self, task: Any, sketch: Any) -> tuple[str, str]:
        """``(mode, reason)`` for ``mode="auto"``: factored when the sketch is a dict (or a FactoredSketch), the
        method allows it, the model has at least ``AUTO_FACTORED_MIN_PARAMS`` selected parameters and at least
        ``AUTO_FACTORED_MIN_FRACTION`` of them live in layers the factored hooks differentiate (Linear, Conv1D,
        Embedding, Conv2d and their biases, LayerNorm); explicit otherwise."""
        from ..gradients.factored import plan_task
        from ..sketch.factored import FactoredSketch

        if sketch is None:
            return "explicit", "sketch=None: exact gradients"
        if isinstance(sketch, FactoredSketch):
            return "factored", "the sketch is a FactoredSketch"
        if not isinstance(sketch, dict):
            return "explicit", f"the sketch is a {type(sketch).__name__} (the factored path builds its own from a dict)"
        if not type(self).auto_factored:
            return "explicit", f"{self.method} also sketches its curvature, with the explicit block sketch"
        from ..gradients.model_parallel import is_model_sharded

        if is_model_sharded(task):
            return "explicit", "the model is sharded (FSDP2): its gradients take the model-parallel explicit path"
        N = int(task.n_params)
        if N < AUTO_FACTORED_MIN_PARAMS:
            return "explicit", f"{N} parameters, below {AUTO_FACTORED_MIN_PARAMS} where the factored path pays"
        sizes = dict(zip(task.param_names, task.param_sizes))
        hooked = sum(sizes[n] for n, p in plan_task(task).items() if not p.generic)
        frac = hooked / N
        if frac < AUTO_FACTORED_MIN_FRACTION:
            return "explicit", (f"only {frac:.0%} of the {N} parameters are in layers the factored path supports "
                                "(Linear, Conv1D, Embedding, Conv2d, LayerNorm)")
        return "factored", f"{frac:.0%} of the {N} parameters are in layers the factored path supports"

    def _check_factored(self, data: Iterable, sketch: Any) -> bool:
        """For ``mode="auto"``: the factored rows of the first two training examples against their exact
        gradients sketched by the same FactoredSketch (a weight used outside its module's ``forward`` is
        invisible to the hooks); True when they agree to 1e-3 (float32) / 1e-8 (float64)."""
        from ..model._batch import SplitBatch

        first = next(iter(data))
        split = SplitBatch(first, self.task.device)
        mini = split.slice(0, min(2, split.size)).rebuild()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = self.task.sketch_grads([mini], sketch, mode="factored", progress=False, nan_policy="skip")
            G = self.task.grads(mini)
        if not bool(torch.isfinite(G).all()):
            return True  # non-finite examples are the nan_policy's business
        ref = sketch(G.to(rows.dtype))
        tol = 1e-8 if rows.dtype == torch.float64 else 1e-3
        err = float((rows - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny))
        return err <= tol

    # ------------------------------------------------------------------ hooks (methods override these)
    def feature_kind(self) -> str:
        """What the training rows are (part of the store's identity): ``"loss-gradient"`` by default."""
        return "loss-gradient"

    def feature_task(self) -> Any:
        """The Task whose per-example gradients are the features (default: ``self.task``)."""
        return self.task

    def feature_sketch(self, comp: Component, data: Iterable, sketch: Any, progress: bool) -> Any:
        """The map applied to every gradient of ``comp`` (default: the fit's sketch)."""
        return sketch

    def finalise(self, comp: Component, data: Iterable, progress: bool) -> None:
        """Set ``comp.kernel`` (and ``comp.q``) once the training features ``comp.feats`` exist (default:
        the identity kernel, no weights)."""
        comp.kernel = None

    def after_fit(self) -> None:
        """Called once every component is finalised (e.g. TRAK averages q over the ensemble)."""

    def row_options(self) -> dict[str, Any]:
        """The options that change what the stored rows are, beyond the store's identity (feature kind,
        sketch, mode, model, size, dtype): recorded in a new store's manifest and compared when a store is
        reused (default: ``nan_policy``, which decides whether non-finite examples became zero rows)."""
        return {"nan_policy": self.nan_policy}

    def test_rows(self, comp: Component, phi: Tensor) -> Tensor:
        """The test feature rows as they enter the kernel (default: unchanged)."""
        return phi

    def train_rows(self, comp: Component, F: Tensor) -> Tensor:
        """A block of training feature rows as it enters the score (default: unchanged)."""
        return F

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
            if "d" not in s:
                raise ValueError(f"sketch: expected a dict with the sketch dimension 'd', got {s!r}")
            # checked, never truncated: d = 2.7 or "abc" is an error naming the key
            d, seed = check_int(s["d"], "sketch['d']", minimum=1), check_int(s.get("seed", 0), "sketch['seed']",
                                                                             minimum=0)
            if self.mode == "factored":
                return self.task.factored_sketch(d, seed=seed, kind=s.get("kind", "affd"), **opts)
            return self.task.block_sketch(d, kind=s.get("kind", "affd"), seed=seed, **opts)
        if int(s.n) != self.task.n_params:
            raise ValueError(f"sketch: expected n = task.n_params = {self.task.n_params}, got n = {s.n}")
        return s

    def _checkpoints(self) -> list[tuple[dict | None, float]]:
        """``[(state_dict or None, weight)]``: the model states of the ensemble and their weights w_c."""
        cks = self._opt("checkpoints")
        models = self._opt("models")
        if models is not None:
            if cks is not None:
                raise ValueError("models: pass either models= or checkpoints=, not both")
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
        if self.average_checkpoints:
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
                         output_fn=base.output_fn, loss_on_output=base.loss_on_output, margin_fn=base.margin_fn,
                         per_example=base.per_example, randomness=base.randomness, nan_policy=base.nan_policy,
                         validate=base.validate)
        try:
            yield
        finally:
            self.task = base

    def _feature_mode(self, comp: Component) -> str:
        return "explicit" if isinstance(comp.sketch, ProjectionSketch) else self.mode

    def _featurise(self, comp: Component, data: Iterable, progress: bool, tag: str, rank: int | None = None,
                   world_size: int | None = None) -> Any:
        from ..store import fingerprint_model

        mode = self._feature_mode(comp)
        kw: dict[str, Any] = dict(mode=mode, nan_policy=self.nan_policy, progress=progress, name="train_data")
        if self.store is None:
            skipped: list[int] = []
            feats = featurise_memory(comp.task, data, comp.sketch, desc=f"featurise train [{tag}]", skipped=skipped,
                                     **kw)
            self.skipped_indices_ = sorted(set(self.skipped_indices_) | set(skipped))
            return feats
        self.store.mkdir(parents=True, exist_ok=True)
        # the store's identity is what its rows ARE (not the method that consumes them): the differentiated
        # output (loss, TRAK margin, Arnoldi projection), the sketch, the mode, the model state (fingerprint),
        # the checkpoint index and (checked by the store) the row count; methods with equal rows share it
        spec = {"sketch": sketch_spec(comp.sketch), "features": self.feature_kind(), "mode": mode}
        # how the rows were made, in the manifest: all options (a record) and the row-relevant ones (compared)
        extra = {"attribution": {"method": self.method, "options": self.config_.to_dict(),
                                 "row_options": self.row_options()}}
        store = featurise_store(comp.task, data, comp.sketch, path=self.store / f"features_{comp.index}",
                                spec=spec, fingerprint=fingerprint_model(self.task.model),
                                dtype=self._opt("store_dtype", "float16"), chunk_rows=self._opt("chunk_rows", None),
                                metadata={"checkpoint": comp.index}, desc=f"featurise train [{tag}]", rank=rank,
                                world_size=world_size, extra=extra, on_data_change=self._opt("on_data_change", "raise"),
                                **kw)
        self.skipped_indices_ = sorted(set(self.skipped_indices_) | set(store.skipped_rows()))
        return store

    def _blocks(self, comp: Component, block_rows: int, dtype: torch.dtype, rows: tuple[int, int] | None = None):
        """Yields ``(r0, r1, [r1 - r0, d])`` consecutive training feature blocks of one component, over
        ``rows`` (a block-aligned range; default all) and reading only those rows."""
        f = comp.feats
        lo, hi = rows if rows is not None else (0, comp.n_rows)
        if isinstance(f, Tensor):
            for r0 in range(lo, hi, block_rows):
                r1 = min(r0 + block_rows, hi)
                yield r0, r1, f[r0:r1].to(dtype)
        elif hi > lo:
            r0 = lo
            for blk in f.iter_blocks(block_rows, row_range=(lo, hi), as_tensor=True):
                yield r0, r0 + blk.shape[0], blk.to(dtype)
                r0 += blk.shape[0]

    def _cached(self, comp: Component, name: str, config: dict, compute, valid: Any = None) -> Any:
        """Curvature results cached next to the store (so that a resumed fit does not redo them). ``valid(value)``
        (optional) vets a loaded value: one it refuses is named (RuntimeWarning), recomputed and overwritten.
        Under ``torch.distributed`` (every rank finalises) the ranks agree on the hit: unless every rank found a
        valid value, all of them compute, since ``compute`` may be collective (sharded passes, all-reduced
        products) and a rank that skipped it would leave the others waiting (a file written by another job
        between two ranks' reads)."""
        if self.store is None:
            return compute()
        from ..store.cache import load_cached, save_cached

        path = self.store / f"{name}_{comp.index}.pt"
        key = json.dumps(config, sort_keys=True, default=str)
        found, value = load_cached(path, key)  # a damaged file is named (RuntimeWarning) and recomputed
        ok = found and (valid is None or valid(value))
        hit = all(all_gather_objects(bool(ok))) if is_distributed() and rank_and_world()[1] > 1 else ok
        if hit:
            return value
        if found and not ok:
            warnings.warn(f"{path}: the cached value is not what this fit expects; recomputing it and replacing "
                          "the file", RuntimeWarning, stacklevel=3)
        value = compute()
        # atomic and durable (private temporary file, fsync, rename); optional on a read-only filesystem
        save_cached(path, key, value)
        return value

    def _time(self, key: str, t0: float) -> None:
        self.timings_[key] = self.timings_.get(key, 0.0) + time.perf_counter() - t0

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
        Under ``torch.distributed`` (an initialised process group, e.g. ``torchrun``), ``rank``/``world_size``
        default to the process group's.
        Returns ``self`` (not fitted: call :meth:`fit` to score).
        """
        from ..model._batch import check_batches, is_reiterable
        from ..store import fingerprint_model

        if self.store is None:
            raise ValueError("store: featurise() writes the training features to a store; expected "
                             "Attributor(..., store=path), got store=None (fit() featurises in memory)")
        if (rank is None) != (world_size is None):
            raise ValueError(f"rank, world_size: expected both or neither, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        from ..gradients.model_parallel import is_model_sharded

        # under torchrun: this rank's share, from the process group (a model sharded by FSDP2 needs every rank
        # on every batch: each rank then computes all rows, its parameter shards summed by an all-reduce)
        if rank is None and is_distributed() and not is_model_sharded(self.task):
            rank, world_size = rank_and_world()
        if world_size is not None:
            if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
                raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        check_batches(train_data, "train_data")
        if not is_reiterable(train_data):
            raise TypeError("train_data: expected a re-iterable of batches (list, DataLoader), got a one-shot "
                            f"{type(train_data).__name__}")
        check_sequential(train_data, "train_data")  # row j must be example j on every pass
        self.skipped_indices_ = []
        base_sketch = self._build_sketch()
        cks = self._checkpoints()
        share = "" if rank is None else f" rank {rank}/{world_size}"
        for c, (state, weight) in enumerate(cks):
            comp = Component(state, weight, c)
            tag = (f"{self.method} {c + 1}/{len(cks)}" if state is not None else self.method) + share
            with self._state(state):
                comp.task = self.feature_task()
                comp.fingerprint = fingerprint_model(self.task.model)
                comp.sketch = self.feature_sketch(comp, train_data, base_sketch, progress)
                self._featurise(comp, train_data, progress, tag, rank=rank, world_size=world_size).close()
        return self

    def fit(self, train_data: Iterable, progress: bool = True) -> Attributor:
        """Featurise the training set (``[n_train, d]`` rows in memory or in the store) and finalise the
        method (TRAK kernel inverse, Arnoldi eigenpairs, Hessian inverse). ``train_data``: a re-iterable
        of batches (list, DataLoader) with a fixed order. Returns ``self``.

        With a store, only missing chunks are computed: a rerun after a crash resumes, a store filled by
        :meth:`featurise` (e.g. one share per rank) or by a fit of another method with the same rows (see the
        class docstring) is only finalised, and concurrent fits on one store all succeed with the same rows.

        Under ``torch.distributed`` with a store on storage every rank sees, each rank featurises its share of
        the rows (:meth:`featurise`), waits for the others, and finalises from the complete store; a rank
        restarted by ``torchrun`` resumes from the chunks already written. :meth:`topk` and
        :meth:`self_influence` then split the training rows over ranks and merge."""
        from ..model._batch import check_batches, is_reiterable
        from ..store import fingerprint_model

        check_batches(train_data, "train_data")
        if not is_reiterable(train_data):
            raise TypeError("train_data: expected a re-iterable of batches (list, DataLoader), got a one-shot "
                            f"{type(train_data).__name__}")
        check_sequential(train_data, "train_data")  # row j must be example j on every pass
        if is_distributed() and rank_and_world()[1] > 1:  # ranks that disagree fail together, never hang
            check_same(self.method, "method")
            check_same(getattr(self.sketch, "spec", self.sketch), "sketch")
            check_same(len(train_data) if hasattr(train_data, "__len__") else None, "train_data (its length)")
            check_same(self.store is not None and str(self.store.resolve()), "store (its path)")
        if is_distributed() and self.store is not None and rank_and_world()[1] > 1:
            # every rank writes its share of the one store, then all finalise from the complete store
            self.featurise(train_data, progress=progress)
            barrier()
        self.skipped_indices_ = []
        self._components = []
        self._shared_q = None
        self.timings_ = {}
        self._reset_fit()
        self._fit_fingerprint = fingerprint_model(self.task.model)
        base_sketch = self._build_sketch()
        if self._auto and self.mode == "factored" and self.task.n_params <= 50_000_000 and \
                not self._check_factored(train_data, base_sketch):
            self.mode = "explicit"
            self.mode_reason_ = ("the factored rows of the first examples differ from their exact sketched gradients "
                                 "(a weight used outside its module's forward?)")
            warnings.warn(f"mode: 'auto' fell back to 'explicit': {self.mode_reason_}", RuntimeWarning, stacklevel=2)
            base_sketch = self._build_sketch()
        _log.info("%s: gradients by mode=%r (%s)", self.method, self.mode, self.mode_reason_)
        cks = self._checkpoints()
        for c, (state, weight) in enumerate(cks):
            comp = Component(state, weight, c)
            tag = f"{self.method} {c + 1}/{len(cks)}" if state is not None else self.method
            with self._state(state):
                comp.task = self.feature_task()
                comp.fingerprint = fingerprint_model(self.task.model)
                comp.sketch = self.feature_sketch(comp, train_data, base_sketch, progress)
                t0 = time.perf_counter()
                comp.feats = self._featurise(comp, train_data, progress, tag)
                self._time("featurise", t0)
                t1 = time.perf_counter()
                self.finalise(comp, train_data, progress)
                self._time("finalise", t1)
            if state is not None:
                comp.task = None  # drop the model copy; scoring makes a fresh one per pass
            self._components.append(comp)
        self.after_fit()
        self.kernels_ = [cp.kernel for cp in self._components]
        first = self._components[0]
        self.n_train_ = first.n_rows
        self.d_ = int(first.sketch.d)
        self._fitted = True
        return self

    def _reset_fit(self) -> None:
        """Clear per-fit attributes of a method before a (re)fit (default: nothing)."""

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        from ..store import fingerprint_model

        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}: call fit(train_data) before scoring")
        if fingerprint_model(self.task.model) != self._fit_fingerprint:
            raise ValueError("task: the model's parameters changed since fit() (fingerprint differs); the "
                             "training features no longer match: refit, or restore the fitted weights")

    def _psi(self, comp: Component, phi: Tensor) -> Tensor:
        return comp.weight * apply_kernel(comp.kernel, self.test_rows(comp, phi.cpu()))

    def _test_chunks(self, test_data: Iterable, progress: bool, rows: int,
                     psi: Callable[[Component, Tensor], Tensor] | None = None):
        """Yields ``(row_start, [ψ_c [m, d_c] for each component])`` with ψ = w_c · M_c t_c(φ_c(x)), or
        ``psi(comp, φ)`` where given (e.g. the test rows without the kernel)."""
        from ..model._batch import check_batches

        psi = self._psi if psi is None else psi

        check_batches(test_data, "test_data")
        comps = self._components
        if len(comps) == 1 and comps[0].state is None:
            comp = comps[0]
            for r0, phi in iter_feature_chunks(comp.task, test_data, comp.sketch, self._feature_mode(comp),
                                               self.nan_policy, progress, "test_data", "featurise test", rows):
                yield r0, [psi(comp, phi)]
            return
        # several model states: features per state, then regroup (test sets are scored a chunk at a time)
        per = []
        for comp in comps:
            with self._state(comp.state):  # a fresh copy of the model in this state
                per.append(list(iter_feature_chunks(self.feature_task(), test_data, comp.sketch,
                                                    self._feature_mode(comp), self.nan_policy, progress,
                                                    "test_data", f"featurise test [{comp.index + 1}/{len(comps)}]",
                                                    rows)))
        for j in range(len(per[0])):
            yield per[0][j][0], [psi(comp, per[i][j][1]) for i, comp in enumerate(comps)]

    def _score_dtype(self) -> torch.dtype:
        f = self._components[0].feats
        return torch.float64 if isinstance(f, Tensor) and f.dtype == torch.float64 else torch.float32

    def _combine(self, blocks: list[tuple[int, int, Tensor]], part) -> Tensor:
        """``Σ_c q_c ⊙ part(c, comp, F_c)`` over the components for one block of training rows ``[r0, r1)``,
        times the shared ``q`` (TracIn/TRAK weights); ``part`` returns ``[..., r1 - r0]``."""
        out = None
        for c, ((r0, r1, F), comp) in enumerate(zip(blocks, self._components)):
            v = part(c, comp, F.cpu())
            if comp.q is not None:
                v = v * comp.q[r0:r1].to(v.dtype)
            out = v if out is None else out + v
        assert out is not None  # there is at least one component (checkpoints are non-empty)
        if self._shared_q is not None:
            r0, r1 = blocks[0][0], blocks[0][1]
            out = out * self._shared_q[r0:r1].to(out.dtype)
        return out

    def _score_block(self, psis: list[Tensor], blocks: list[tuple[int, int, Tensor]]) -> Tensor:
        def part(c: int, comp: Component, F: Tensor) -> Tensor:
            F = self.train_rows(comp, F)
            return psis[c].to(F.dtype) @ F.T

        return self._combine(blocks, part)

    def _iter_train_blocks(self, dtype: torch.dtype, shard: bool = False):
        """Consecutive blocks of training rows (one per component); with ``shard`` under a process group,
        only this rank's contiguous share of the blocks (:func:`~gradsketch.linalg.distributed.shard_range`
        over the blocks)."""
        br = int(self._opt("block_rows", 4096))
        rows = None
        if shard and is_distributed():  # this rank's contiguous run of blocks; the others are never read
            rank, world = rank_and_world()
            n = self._components[0].n_rows
            j0, j1 = shard_range(-(-n // br), rank, world)
            rows = (min(j0 * br, n), min(j1 * br, n))
        yield from zip(*(self._blocks(c, br, dtype, rows) for c in self._components))

    def score(self, test_data: Iterable, progress: bool = True) -> Tensor:
        """Scores ``[n_test, n_train]`` (CPU; float64 for in-memory float64 features, else float32);
        positive = the training example supports the test prediction (see the module docstring)."""
        self._check_fitted()
        dt = self._score_dtype()
        rows = []
        for _, psis in self._test_chunks(test_data, progress, 1 << 62):
            parts = [self._score_block(psis, list(blocks)) for blocks in self._iter_train_blocks(dt)]
            rows.append(torch.cat(parts, 1))
        return torch.cat(rows, 0)

    def topk(self, test_data: Iterable, k: int = 10, progress: bool = True, *, index: str | None = None,
             nlist: int | None = None, nprobe: int | None = None) -> TopK:
        """The ``k`` proponents (largest scores) and opponents (smallest) of every test example.

        Scores a block of ``test_block_rows`` test examples against ``block_rows`` training rows at a time and
        keeps a running top-k, so memory is O(test_block_rows · (block_rows + d + k)), never n_test × n_train.
        Under ``torch.distributed`` each rank scores its share of the training blocks and the per-rank lists
        are merged (:func:`gradsketch.linalg.distributed.merge_topk`); every rank returns the same result.
        Returns :class:`TopK` ``(values, indices, opponent_values, opponent_indices)``, each ``[n_test, k]``.

        ``index="faiss"`` searches a FAISS index of the training vectors instead (PyPI ``faiss-cpu``, the
        ``faiss`` extra): exact with ``nlist=None`` (a flat inner-product index), approximate with ``nlist=L``
        inverted lists of which each query visits ``nprobe``; see :mod:`gradsketch.attribution.approx_topk`.
        """
        self._check_fitted()
        k = self._check_k(k)
        if index is not None or nlist is not None or nprobe is not None:
            from .approx_topk import INDEXES, faiss_topk

            if index not in INDEXES:
                raise ValueError(f"index: expected one of {INDEXES} (or None for the exact scan), got {index!r}")
            return TopK(*faiss_topk(self, test_data, k, progress, nlist=nlist, nprobe=nprobe))
        return self._running_topk(self._test_chunks(test_data, progress, int(self._opt("test_block_rows", 1024))), k)

    def _running_topk(self, chunks: Iterable, k: int) -> TopK:
        """The running top-k/bottom-k over the training blocks for every ``(row_start, psis)`` test chunk."""
        dt = self._score_dtype()
        outs: list[tuple[Tensor, ...]] = []
        for _, psis in chunks:
            m = psis[0].shape[0]
            top_v = torch.full((m, 0), float("-inf"), dtype=dt)
            top_i = torch.zeros((m, 0), dtype=torch.long)
            bot_v = torch.full((m, 0), float("inf"), dtype=dt)
            bot_i = torch.zeros((m, 0), dtype=torch.long)
            for blocks in self._iter_train_blocks(dt, shard=True):
                blocks = list(blocks)
                r0 = blocks[0][0]
                s = self._score_block(psis, blocks)
                idx = torch.arange(r0, r0 + s.shape[1]).expand(m, -1)
                v = torch.cat([top_v, s], 1)
                i = torch.cat([top_i, idx], 1)
                tv, ti = torch.topk(v, min(k, v.shape[1]), dim=1)
                top_v, top_i = tv, i.gather(1, ti)
                v = torch.cat([bot_v, s], 1)
                i = torch.cat([bot_i, idx], 1)
                bv, bi = torch.topk(v, min(k, v.shape[1]), dim=1, largest=False)
                bot_v, bot_i = bv, i.gather(1, bi)
            if is_distributed():  # every rank scored its blocks: merge the local lists (identical everywhere)
                top_v, top_i = merge_topk(top_v, top_i, k)
                bot_v, bot_i = merge_topk(bot_v, bot_i, k, largest=False)
            outs.append((top_v, top_i, bot_v, bot_i))
        return TopK(*(torch.cat([o[j] for o in outs], 0) for j in range(4)))

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        if k > self.n_train_:
            warnings.warn(f"k: {k} is larger than the {self.n_train_} training examples; returning all "
                          f"{self.n_train_} (k = {self.n_train_})", UserWarning, stacklevel=3)
            k = self.n_train_
        return k

    def topk_tokens(self, query: Iterable, k: int = 10, token_loss: Any = None, block_tokens: int = 256,
                    progress: bool = True):
        """Per-token attribution for a language model: for every target token t of every query sequence, the
        ``k`` training examples with the largest (and smallest) scores score(t, z) = Σ_c w_c (M_c φ_{c,t})ᵀ
        φ_c(z) · q(z), φ_t = Φ∇θ ℓ_t (:mod:`gradsketch.attribution.tokens`).

        ``query``: batches of sequences (e.g. dicts with ``input_ids``/``attention_mask``);
        ``token_loss(model, batch) -> [B, T]`` per-token losses, NaN where a position is not a target (default
        :func:`gradsketch.losses.causal_lm_token_losses`, next-token loss of a transformers causal LM).
        Tokens are featurised and scored ``block_tokens`` at a time against ``block_rows`` training rows, so
        memory is O(block_tokens · (block_rows + d + k)), never n_tokens × n_train. Returns
        :class:`~gradsketch.attribution.tokens.TokenTopK` ``(values, indices, opponent_values,
        opponent_indices, tokens)``, each ``[n_tokens, k]`` but ``tokens [n_tokens, 2]`` (sequence, position).
        Needs loss-gradient features (not TRAK with ``margin_fn``).
        """
        from ..model.losses import causal_lm_token_losses
        from .tokens import TokenTopK, check_token_method, token_feature_chunks

        self._check_fitted()
        check_token_method(self)
        k = self._check_k(k)
        block_tokens = check_int(block_tokens, "block_tokens", minimum=1)
        fn = causal_lm_token_losses() if token_loss is None else token_loss
        targets: list[tuple[int, int]] = []
        chunks = token_feature_chunks(self, query, fn, block_tokens, progress, targets)
        top = self._running_topk(((r0, [self._psi(c, phi) for c, phi in zip(self._components, phis)])
                                  for r0, phis in chunks), k)
        tokens = torch.tensor(targets, dtype=torch.long).reshape(-1, 2)
        return TokenTopK(*top, tokens)

    def self_influence_tokens(self, data: Iterable, token_loss: Any = None, block_tokens: int = 256,
                              progress: bool = True) -> Tensor:
        """Per-token self-influence Σ_c w_c φ_{c,t}ᵀ M_c φ_{c,t} (``φ_t = Φ∇θ ℓ_t``; the training weights q do
        not enter: a token is not a training example) of every target token of ``data``, computed a block of
        ``block_tokens`` tokens at a time. ``token_loss`` as in :meth:`topk_tokens`. Returns ``[n_seq, T]``
        float64 with NaN where the token loss is NaN (not a target)."""
        from ..model.losses import causal_lm_token_losses
        from .tokens import check_token_method, token_feature_chunks

        self._check_fitted()
        check_token_method(self)
        block_tokens = check_int(block_tokens, "block_tokens", minimum=1)
        fn = causal_lm_token_losses() if token_loss is None else token_loss
        targets: list[tuple[int, int]] = []
        vals: list[Tensor] = []
        for _, phis in token_feature_chunks(self, data, fn, block_tokens, progress, targets):
            vals.append(sum((comp.weight * quad_kernel(comp.kernel, self.test_rows(comp, phi.cpu()))
                             for comp, phi in zip(self._components, phis)), torch.zeros(phis[0].shape[0],
                                                                                         dtype=torch.float64)))
        v = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
        n_seq = 1 + max((i for i, _ in targets), default=-1)
        T = 1 + max((j for _, j in targets), default=-1)
        out = torch.full((n_seq, T), float("nan"), dtype=torch.float64)
        if targets:
            idx = torch.tensor(targets, dtype=torch.long)
            out[idx[:, 0], idx[:, 1]] = v
        return out

    def self_influence(self, progress: bool = True) -> Tensor:
        """score(z, z) for every training example, ``[n_train]`` (≥ 0 when M is PSD); the mislabel-detection
        statistic of Schioppa et al. 2022 (Arnoldi: Σ_i p_i(z)²/λ_i). Under ``torch.distributed`` each rank
        computes its share of the training blocks and every rank returns the whole vector."""
        self._check_fitted()
        pieces: list[tuple[int, Tensor]] = []
        for blocks in self._iter_train_blocks(torch.float64, shard=True):
            blocks = list(blocks)
            tot = self._combine(blocks, lambda c, comp, F: comp.weight * quad_kernel(comp.kernel,
                                                                                     self.test_rows(comp, F)))
            pieces.append((blocks[0][0], tot))
        if is_distributed() and rank_and_world()[1] > 1:  # each rank computed its blocks: gather them all
            pieces = [p for part in all_gather_objects(pieces) for p in part]
        return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the fitted attributor to the directory ``path``: a JSON manifest and raw tensor files (no
        pickle; :mod:`gradsketch.attribution.persist`). A store-backed fit saves a reference to its store.
        ``overwrite=True`` replaces an earlier save in ``path``. Returns the path. Load with :meth:`load`.

        >>> import gradsketch, tempfile
        >>> task = gradsketch.Task(torch.nn.Linear(2, 1, bias=False), lambda m, b: m(b[0])[:, 0] * b[1])
        >>> data = [(torch.eye(2), torch.tensor([1.0, 2.0]))]
        >>> a = Attributor(task, "grad-dot").fit(data, progress=False)
        >>> b = Attributor.load(a.save(tempfile.mkdtemp()), task)
        >>> torch.equal(a.score(data, progress=False), b.score(data, progress=False))
        True
        """
        from .persist import save_attributor

        return save_attributor(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, task: Any, store: Any = None, **options: Any) -> Attributor:
        """The attributor saved by :meth:`save` at ``path``, scoring with ``task`` (the same model and
        parameter selection, dtype and weights as the fit: otherwise ``ValueError`` naming what was expected and
        what arrived). Nothing is unpickled; truncated or edited files raise
        :class:`~gradsketch.attribution.persist.AttributorFileError` naming the file. ``store``: where the
        feature store of a store-backed fit now is (default: where it was). ``options``: callables the manifest
        cannot hold (e.g. TRAK's ``margin_fn`` when it was an option rather than declared on the Task)."""
        from .persist import load_attributor

        obj = load_attributor(path, task, method_class, Component, store=store, **options)
        if cls is not Attributor and not isinstance(obj, cls):
            raise TypeError(f"path: {cls.__name__}.load found a saved {type(obj).__name__} ({obj.method!r}); use "
                            "Attributor.load")
        return obj

    def __repr__(self) -> str:
        s = (f"{type(self).__name__}(method={self.method!r}, sketch={self.sketch!r}, store={self.store}, "
             f"mode={self.mode!r}")
        return s + (f", n_train={self.n_train_}, d={self.d_})" if self._fitted else ")")


__all__ = ["Attributor", "Component", "TopK", "MODES", "AUTO_FACTORED_MIN_PARAMS",
           "describe_callable", "register_method", "unregister_method",
           "registered_methods", "method_class", "apply_kernel", "quad_kernel"]
