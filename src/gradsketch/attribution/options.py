"""Validated option dataclasses, one per attribution method (checked in ``__post_init__``: type, finiteness,
range), so a bad value fails when the :class:`~gradsketch.attribution.Attributor` is built, naming the
option, never after a fit (``damping=float("nan")`` used to give all-zero scores; ``damping=-1`` negative
self-influences). The defaults are those documented on :class:`~gradsketch.attribution.Attributor`.

>>> ArnoldiOptions(damping=0.1).damping
0.1
>>> InfluenceOptions(damping=float("nan"))
Traceback (most recent call last):
    ...
ValueError: damping: expected a finite number, got nan
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_count_or_fraction,
    check_int,
    check_real,
    describe,
)


@dataclass
class CommonOptions:
    """Options every method accepts: the NaN policy of featurisation, the store's dtype and chunking, and
    the row blocks of scoring."""

    nan_policy: str = "raise"
    on_data_change: str = "raise"
    store_dtype: str = "float16"
    chunk_rows: int | None = None
    block_rows: int = 4096
    test_block_rows: int = 1024

    def __post_init__(self) -> None:
        self.nan_policy = check_choice(self.nan_policy, "nan_policy", ("raise", "skip"))
        self.on_data_change = check_choice(self.on_data_change, "on_data_change", ("raise", "refeaturise"))
        self.store_dtype = check_choice(str(self.store_dtype).replace("torch.", ""), "store_dtype",
                                        ("float16", "float32"))
        self.chunk_rows = check_int(self.chunk_rows, "chunk_rows", minimum=1, allow_none=True)
        self.block_rows = check_int(self.block_rows, "block_rows", minimum=1)
        self.test_block_rows = check_int(self.test_block_rows, "test_block_rows", minimum=1)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-friendly values (callables and data are described, not serialised)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or isinstance(v, bool | int | float | str):
                out[f.name] = v
            elif callable(v) and hasattr(v, "__qualname__"):
                out[f.name] = f"{getattr(v, '__module__', '?')}.{v.__qualname__}"
            elif isinstance(v, list | tuple):
                out[f.name] = f"{type(v).__name__} of {len(v)}"
            else:
                out[f.name] = type(v).__name__
        return out


def _check_models(value: Any, name: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{name}: expected a non-empty list, got {describe(value)}")
    return value


@dataclass
class GradDotOptions(CommonOptions):
    """grad-dot / grad-cos: an ensemble of model states given as ``checkpoints`` or ``models``."""

    checkpoints: Any = None
    models: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.checkpoints = _check_models(self.checkpoints, "checkpoints")
        self.models = _check_models(self.models, "models")
        if self.checkpoints is not None and self.models is not None:
            raise ValueError("models: pass either models= or checkpoints=, not both")


@dataclass
class TracInOptions(CommonOptions):
    """TracIn: ``checkpoints`` as ``(state_dict, lr)`` pairs (Σ_c η_c⟨g_c(x), g_c(z)⟩)."""

    checkpoints: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.checkpoints = _check_models(self.checkpoints, "checkpoints")


#: TRAK's kernels (``TRAKOptions.kernel``; the CLI's ``--kernel`` takes the same names)
TRAK_KERNELS = ("auto", "features", "ggn", "ggn_trace")


@dataclass
class TRAKOptions(GradDotOptions):
    """TRAK: the output function ``margin_fn``, the ``kernel`` K (``"auto"``, the default: ``"ggn_trace"`` when the
    task declares ``output_fn``/``loss_on_output``, else ``"features"``, ``TRAK._resolve_kernel``; ``"features"``:
    ΦᵀΦ of the training rows, as published;
    ``"ggn"``: the Gauss-Newton matrix of the training loss in the sketched coordinates, from the top
    ``ggn_rank`` output-Hessian directions of each example, all of them when ``None``; ``"ggn_trace"``: ΦᵀΦ with
    each row weighted to carry its example's Gauss-Newton curvature, ``TRAK._ggn_trace_weights``) and the
    ``ridge`` λ = ridge · tr(K)/min(n, d) (≥ 0)."""

    margin_fn: Any = None
    ridge: float = 1.0
    kernel: str = "auto"
    ggn_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin_fn is not None:
            check_callable(self.margin_fn, "margin_fn", "a callable (model, batch) -> [B]")
        self.ridge = check_real(self.ridge, "ridge", minimum=0.0)
        self.kernel = check_choice(self.kernel, "kernel", TRAK_KERNELS)
        self.ggn_rank = check_int(self.ggn_rank, "ggn_rank", minimum=1, allow_none=True)
        if self.ggn_rank is not None and self.kernel != "ggn":
            raise ValueError(f"ggn_rank: only kernel='ggn' uses it (the output-Hessian directions per example); "
                             f"got ggn_rank={self.ggn_rank} with kernel={self.kernel!r}")


#: the default damping δ of every influence-type method (:mod:`gradsketch.attribution.damping`, where the
#: rule (|K| + δI)⁻¹ and the validation data that chose 3e-3 are described)
DEFAULT_DAMPING = 3e-3


@dataclass
class CurvatureOptions(CommonOptions):
    """Options of every influence-type method: the curvature K (``"hessian"``, ``"ggn"``, or ``None`` /
    ``"auto"``: the method's choice, see each method), the data of its products, and the ``damping`` δ ≥ 0 of
    the one damping rule, kernel (|K| + δI)⁻¹ (:mod:`gradsketch.attribution.damping`; default 3e-3 for all)."""

    curvature: str | None = None
    hessian_data: Any = None
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.curvature is not None and self.curvature != "auto":
            self.curvature = check_choice(self.curvature, "curvature", ("auto", "hessian", "ggn"))
        self.damping = check_real(self.damping, "damping", minimum=0.0)


_CurvatureOptions = CurvatureOptions  # the name used before


@dataclass
class ArnoldiOptions(CurvatureOptions):
    """Arnoldi influence (Schioppa et al. 2022): ``n_iters`` Krylov dimension (at most; ``None``, the default:
    1.5·top_k rounded up to a multiple of ``block_size``, i.e. 64 for 40 eigenpairs in blocks of 16),
    ``top_k`` eigenpairs, ``damping`` δ ≥ 0 in 1/(|λ_i| + δ) (the one damping rule,
    :mod:`gradsketch.attribution.damping`; default 3e-3), start vector ``seed`` and ``start`` rule, Krylov
    basis ``krylov_store``.

    ``block_size`` b: Krylov vectors per pass over the Hessian data (block Lanczos with full
    re-orthogonalisation, :func:`gradsketch.linalg.block_lanczos_eigs`; 1: single-vector Arnoldi + distill,
    the pre-issue-20 algorithm, which ``krylov_store="host"`` needs). ``tol``: stop once the top-k Ritz
    residuals are ≤ tol·|θ_max| (``None``: always build ``n_iters`` vectors; b > 1 only).
    ``krylov_start`` (b > 1): ``"gradients"`` (the default) starts the Krylov space from b random combinations
    Γᵀr_j of the per-example loss gradients of the Hessian data (one vectorised vjp pass; with a sketch and
    ``start="parameter"``, from Φ·Γᵀr_j), the directions the influence scores are made of; ``"random"``: a
    Gaussian block. With the gradient start a Krylov space of 1.5·top_k gives the LDS that a Gaussian start
    needed 2.5·top_k for (digits MLP, top 50: 0.70; benchmarks/results/arnoldi_speed.md, session 7).
    ``hessian_subsample``: a fixed random subset of the Hessian data (int: examples, all of them when there
    are fewer; float: fraction; ``None``: all of it), drawn with ``seed``. ``curvature``: ``"auto"`` (the
    default) is the GGN when the task declares ``output_fn``/``loss_on_output`` (``Task.from_classifier``),
    else the Hessian. Defaults (block 16, tol 1e-3, GGN, at most 1,000 Hessian examples, gradient start,
    Krylov dimension 1.5·top_k) from the issue-20 measurements, benchmarks/results/arnoldi_speed.md.

    ``tail``: the complement of the top-k eigenspace. ``False`` drops it (the paper's estimator,
    ``Σ_{i≤k} p_i p_i /(|λ_i| + δ)``). ``True`` weights it by the smallest kept eigenvalue, the bound of every
    eigenvalue left out: ``(|K| + δ)⁻¹ ≈ U diag(1/(|λ_i| + δ)) Uᵀ + (I − U Uᵀ)/(|λ_k| + δ)``, the form of the
    randomized Nyström preconditioner (Frangella, Tropp & Udell, SIMAX 2023). It needs the whole gradient:
    with a sketch the features already are Φg; without one the features become [Uᵀg, g], which is affordable
    for small models only. ``"auto"`` (the default): on with a sketch or when the model has at most
    ``TAIL_EXACT_MAX`` = 16,384 parameters, else off. ``top_k=None`` (the default) keeps 40 eigenpairs with
    the tail and 100 without. Chosen on a validation half of the LDS targets of the digits MLP and the
    Fashion-MNIST CNN (benchmarks/results/arnoldi_speed.md): with the tail, 100 collapses on the CNN (its
    100th GGN eigenvalue is 6e-4, near δ, so the tail weight 1/(|λ_k| + δ) swamps the rest); 50 (session 6)
    gives 0.015 (MLP) and 0.01 (CNN) more validation LDS than 40 but needs a Krylov space of 80 instead of
    64, and the digits MLP's fit is then 9× instead of 11× faster than the pre-issue-20 one (issue 20's
    goal: 10×)."""

    n_iters: int | None = None
    top_k: int | None = None
    positive_only: bool = False
    seed: Any = 0
    krylov_store: str = "device"
    start: str = "parameter"
    curvature: str = "auto"
    block_size: int = 16
    tol: float | None = 1e-3
    hessian_subsample: int | float | None = 1000
    tail: bool | str = "auto"
    krylov_start: str = "gradients"

    def __post_init__(self) -> None:
        if self.tail not in (True, False, "auto"):
            raise ValueError(f"tail: expected True, False or 'auto', got {self.tail!r}")
        auto = self.curvature == "auto"  # Arnoldi only: the GGN when the task declares outputs, else the Hessian
        if auto:
            self.curvature = "hessian"
        super().__post_init__()
        if auto:
            self.curvature = "auto"
        self.n_iters = check_int(self.n_iters, "n_iters", minimum=1, allow_none=True)
        self.top_k = check_int(self.top_k, "top_k", minimum=1, allow_none=True)
        self.krylov_start = check_choice(self.krylov_start, "krylov_start", ("gradients", "random"))
        if self.top_k is not None and self.n_iters is not None and self.top_k > self.n_iters:
            raise ValueError(f"top_k: expected 1 <= top_k <= n_iters = {self.n_iters}, got {self.top_k}")
        self.positive_only = check_bool(self.positive_only, "positive_only")
        if not isinstance(self.seed, torch.Generator):
            self.seed = check_int(self.seed, "seed", minimum=0)
        self.krylov_store = check_choice(self.krylov_store, "krylov_store", ("device", "host"))
        self.start = check_choice(self.start, "start", ("parameter", "sketch"))
        self.block_size = check_int(self.block_size, "block_size", minimum=1)
        if self.krylov_store == "host" and self.block_size > 1:
            raise ValueError(f"krylov_store: 'host' is supported by single-vector Arnoldi only; expected "
                             f"block_size=1 with it, got block_size={self.block_size}")
        self.tol = check_real(self.tol, "tol", minimum=0.0, allow_none=True)
        if self.hessian_subsample is not None:
            self.hessian_subsample = check_count_or_fraction(self.hessian_subsample, "hessian_subsample")


@dataclass
class InfluenceOptions(CurvatureOptions):
    """Influence functions (Koh & Liang 2017): (|ΦKΦᵀ| + δI)⁻¹ by ``solver`` (explicit, cg, lissa) with the
    damping δ ≥ 0 actually added (LiSSA included); ``tol``/``maxiter`` (cg), ``depth``/``scale`` (lissa)."""

    solver: str = "explicit"
    tol: float | None = None
    maxiter: int | None = None
    depth: int = 1000
    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.solver = check_choice(self.solver, "solver", ("explicit", "cg", "lissa"))
        self.tol = check_real(self.tol, "tol", minimum=0.0, allow_none=True)
        self.maxiter = check_int(self.maxiter, "maxiter", minimum=1, allow_none=True)
        self.depth = check_int(self.depth, "depth", minimum=1)
        self.scale = check_real(self.scale, "scale", minimum=0.0, min_inclusive=False, allow_none=True)


OPTIONS: dict[str, type[CommonOptions]] = {
    "grad-dot": GradDotOptions,
    "grad-cos": GradDotOptions,
    "tracin": TracInOptions,
    "trak": TRAKOptions,
    "arnoldi": ArnoldiOptions,
    "influence": InfluenceOptions,
}


def options_for(method: str, options: dict[str, Any], cls: type[CommonOptions] | None = None) -> CommonOptions:
    """The validated options of ``method`` (its dataclass ``cls``, default ``OPTIONS[method]``, the built-in
    methods'); unknown names raise ``TypeError`` listing the accepted ones.

    >>> options_for("trak", {"ridge": 0.5}).ridge
    0.5
    >>> options_for("trak", {"damping": 0.5})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    TypeError: method_options: ['damping'] not accepted by method='trak'; expected some of [...]
    """
    cls = OPTIONS[method] if cls is None else cls
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"method_options: {unknown} not accepted by method={method!r}; expected some of "
                        f"{sorted(allowed)}")
    return cls(**options)


__all__ = ["CommonOptions", "CurvatureOptions", "DEFAULT_DAMPING", "GradDotOptions", "TracInOptions", "TRAKOptions",
           "ArnoldiOptions", "InfluenceOptions", "OPTIONS", "options_for"]
