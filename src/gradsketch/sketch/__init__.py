"""Φ and Φᵀ for every sketch kind; knows nothing of models.

``sketch(kind, n, d, seed=0, **options)`` builds a :class:`Sketch`; :class:`BlockSketch` sketches a list of
tensors (a model's parameter gradients) as a sum of independent per-block sketches.
"""

from .base import Sketch
from .block import BlockSketch
from .factored import FactoredSketch
from .kinds import KINDS, PRECONDITIONERS, sketch
from .spec import sketch_from_spec

__all__ = ["Sketch", "BlockSketch", "FactoredSketch", "sketch", "sketch_from_spec", "KINDS", "PRECONDITIONERS"]
