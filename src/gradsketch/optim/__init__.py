"""Second-order optimisers built on sketches: Shampoo, Sketchy (FD-sketched Shampoo) and OCO learners.

An application layer: it imports :mod:`gradsketch.linalg.frequent_directions` (torch only) and nothing
above it. ``Shampoo``/``Sketchy`` are ``torch.optim.Optimizer`` subclasses; ``oco`` holds S-AdaGrad and
its baselines for online convex optimisation; ``diagnostics`` tracks the Kronecker-factor spectra.
"""

from .diagnostics import FactorSpectrumTracker, top_k_share
from .oco import (
    FDSON,
    OGD,
    AdaFD,
    DiagonalAdaGrad,
    FullMatrixAdaGrad,
    OnlineLearner,
    RegretResult,
    SAdaGrad,
    online_logistic_regret,
)
from .shampoo import Shampoo, Sketchy

__all__ = [
    "Shampoo", "Sketchy",
    "OnlineLearner", "OGD", "DiagonalAdaGrad", "FullMatrixAdaGrad", "SAdaGrad", "AdaFD", "FDSON",
    "RegretResult", "online_logistic_regret",
    "FactorSpectrumTracker", "top_k_share",
]
