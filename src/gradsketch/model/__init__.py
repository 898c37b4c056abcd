"""Models as tasks: a :class:`Task` declares a model, its per-example loss, the output function for the GGN
and the parameters to differentiate; the losses module holds per-example loss helpers.

Per-example gradients live in :mod:`gradsketch.gradients`, curvature operators in
:mod:`gradsketch.curvature`; both import Task and are never imported by this package.
"""

from ..sketch import FactoredSketch
from .losses import (
    OutputLoss,
    causal_lm_loss,
    causal_lm_per_example,
    causal_lm_token_losses,
    classification_margin,
    classifier_loss,
    cross_entropy_output_derivatives,
    cross_entropy_per_example,
    mse_output_derivatives,
    mse_per_example,
)
from .task import Task

__all__ = [
    "Task",
    "FactoredSketch",
    "cross_entropy_per_example",
    "mse_per_example",
    "OutputLoss",
    "cross_entropy_output_derivatives",
    "mse_output_derivatives",
    "causal_lm_per_example",
    "classifier_loss",
    "classification_margin",
    "causal_lm_loss",
    "causal_lm_token_losses",
]
