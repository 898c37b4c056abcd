"""gradsketch.attribution: training data attribution with sketched gradients.

``Attributor(task, method, sketch, store).fit(train_data)`` featurises the training set once (in memory or
into a resumable :class:`gradsketch.GradientStore`); ``score``, ``topk`` and ``self_influence`` then score
test examples against it. One class per method (:class:`GradDot`, :class:`GradCos`, :class:`TracIn`,
:class:`TRAK`, :class:`ArnoldiInfluence`, :class:`Influence`) on the base class :class:`Attributor`, which is
also the factory (``Attributor(task, method="trak")`` returns a :class:`TRAK`); :func:`register_method` adds
a method without touching the base.
"""

from ._data import batches
from ._features import DataMismatchError, StoreMismatchError
from .attributor import METHODS, classification_margin
from .base import Attributor, TopK, method_class, register_method, registered_methods, unregister_method
from .damping import DEFAULT_DAMPING, damped_inverse, damped_reciprocal
from .kfac_methods import EKFACInfluence, EKFACOptions, KFACInfluence  # registers "ekfac", "kfac"
from .methods import TRAK, ArnoldiInfluence, GradCos, GradDot, Influence, TracIn
from .options import (
    ArnoldiOptions,
    CommonOptions,
    CurvatureOptions,
    GradDotOptions,
    InfluenceOptions,
    TracInOptions,
    TRAKOptions,
    options_for,
)
from .persist import AttributorFileError

__all__ = ["Attributor", "TopK", "METHODS", "classification_margin", "batches", "DataMismatchError",
           "StoreMismatchError", "options_for", "CommonOptions", "CurvatureOptions", "GradDotOptions",
           "TracInOptions", "TRAKOptions", "ArnoldiOptions", "InfluenceOptions", "GradDot", "GradCos", "TracIn",
           "TRAK", "ArnoldiInfluence", "Influence", "EKFACInfluence", "KFACInfluence", "EKFACOptions",
           "register_method", "unregister_method", "registered_methods", "method_class", "DEFAULT_DAMPING",
           "damped_inverse", "damped_reciprocal", "AttributorFileError"]
