"""gradsketch.attribution: training data attribution with sketched gradients.

``Attributor(task, method, sketch, store).fit(train_data)`` featurises the training set once (in memory or
into a resumable :class:`gradsketch.GradientStore`); ``score``, ``topk`` and ``self_influence`` then score
test examples against it. Methods: grad-dot, grad-cos, TracIn, TRAK, Arnoldi influence, exact influence.
"""

from ._data import batches
from ._features import DataMismatchError, StoreMismatchError
from .attributor import METHODS, Attributor, TopK, classification_margin
from .options import ArnoldiOptions, GradDotOptions, InfluenceOptions, TracInOptions, TRAKOptions, options_for

__all__ = ["Attributor", "TopK", "METHODS", "classification_margin", "batches", "DataMismatchError",
           "StoreMismatchError", "options_for", "GradDotOptions", "TracInOptions", "TRAKOptions", "ArnoldiOptions",
           "InfluenceOptions"]
