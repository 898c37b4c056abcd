"""gradsketch: sketch gradients and Hessian-vector products of PyTorch models.

Layers (imports flow downward): ``sketch`` (Φ, Φᵀ for every kind), ``linalg`` (Lanczos, Arnoldi, SLQ,
trace, solvers on any linear operator), ``model`` (Task: per-example gradients, curvature operators),
``store`` (sketched gradients on disk), and the applications: attribution, spectrum, intrinsic dimension.
"""

__version__ = "0.1.0"

# ``gradsketch.spectrum`` is the subpackage, made callable: ``gradsketch.spectrum(task, data, k=...)``.
from . import curvature, datasets, dynamics, eval, gradients, linalg, optim, spectrum  # dynamics: CMD
from .attribution import (
    TRAK,
    ArnoldiInfluence,
    Attributor,
    GradCos,
    GradDot,
    Influence,
    TopK,
    TracIn,
    classification_margin,
    register_method,
)
from .curvature import FisherOperator, GGNOperator, HessianOperator, sketched
from .entry import Entry, load_entry  # the one entry-point form of the CLI commands
from .intrinsic import IntrinsicDimResult, SubspaceModel, intrinsic_dimension
from .intrinsic import train as train_subspace
from .linalg import LinearOperator, MatrixOperator
from .model import FactoredSketch, Task, losses
from .sketch import BlockSketch, Sketch, sketch, sketch_from_spec
from .spectrum import (
    DensityResult,
    LocalEnsemble,
    SpectrumResult,
    SpectrumSeries,
    density,
    local_ensemble_score,
    spectrum_over_checkpoints,
    trace,
)
from .store import CorruptChunkError, GradientStore, fingerprint_model
from .store import fill as fill_store

__all__ = [
    "__version__",
    "Attributor", "TopK", "classification_margin", "eval",
    "GradDot", "GradCos", "TracIn", "TRAK", "ArnoldiInfluence", "Influence", "register_method",
    "sketch", "Sketch", "BlockSketch", "sketch_from_spec",
    "linalg", "LinearOperator", "MatrixOperator",
    "Task", "gradients", "curvature", "FactoredSketch",
    "HessianOperator", "GGNOperator", "FisherOperator", "sketched", "losses",
    "GradientStore", "CorruptChunkError", "fingerprint_model", "fill_store",
    "SubspaceModel", "intrinsic_dimension", "IntrinsicDimResult", "train_subspace",
    "spectrum", "SpectrumResult", "density", "DensityResult", "trace", "spectrum_over_checkpoints", "optim",
    "SpectrumSeries", "LocalEnsemble", "local_ensemble_score",
    "dynamics",
    "Entry", "load_entry", "datasets",
]
