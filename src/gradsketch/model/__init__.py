"""Models as tasks: per-example gradients (exact, sketched, factored) and curvature operators.

``Task(model, loss_fn, params)`` is the entry point; see :mod:`gradsketch.model.task`.
"""

from .curvature import (
    CurvatureOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    sketched,
)
from .factored import FactoredSketch
from .losses import (
    causal_lm_loss,
    causal_lm_per_example,
    classifier_loss,
    cross_entropy_per_example,
    mse_per_example,
)
from .task import Task

__all__ = [
    "Task",
    "FactoredSketch",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "sketched",
    "cross_entropy_per_example",
    "mse_per_example",
    "causal_lm_per_example",
    "classifier_loss",
    "causal_lm_loss",
]
