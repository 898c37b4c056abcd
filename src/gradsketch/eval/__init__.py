"""gradsketch.eval: how good are attributions? Ground truth by retraining many small models at once.

* :func:`train_models` / :func:`model_outputs`: vectorised (torch.func) training of many small models;
  :func:`load_models` turns them into modules (e.g. a TRAK ensemble: ``Attributor(..., models=...)``).
* :func:`lds_ground_truth` + :func:`lds`: linear datamodeling score (Park et al. 2023).
* :func:`loo_effects` + :func:`loo_correlation`: leave-one-out retraining (Koh & Liang 2017).
* :func:`flip_labels` + :func:`mislabel_detection`: ROC-AUC / AP of self-influence (Schioppa et al. 2022).

The digits data and the MLP builder live in :mod:`gradsketch.datasets` (re-exported here).
"""

from ..datasets import Digits, flip_labels, load_digits_split, make_mlp
from .ground_truth import LDSData, lds_ground_truth, loo_effects, subset_masks
from .metrics import LDSResult, MislabelResult, lds, loo_correlation, mislabel_detection, spearman_columns
from .train import init_models, load_model, load_models, model_outputs, train_models

__all__ = [
    "Digits", "load_digits_split", "flip_labels",
    "make_mlp", "init_models", "train_models", "load_model", "load_models", "model_outputs",
    "subset_masks", "LDSData", "lds_ground_truth", "loo_effects",
    "LDSResult", "lds", "MislabelResult", "mislabel_detection", "loo_correlation", "spearman_columns",
]
