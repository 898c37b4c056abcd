"""Intrinsic dimension of fine-tuning: train in a random subspace θ = θ0 + Φᵀω and find the smallest d
reaching 90% of full fine-tuning (Li et al. 2018; SAID, Aghajanyan et al. 2021; one-run search, Schioppa 2024).

``SubspaceModel(model, d, kind, seed, said)`` wraps any module; ``train(...)`` is a small training loop;
``intrinsic_dimension(...)`` runs the one-run doubling search or the classic grid sweep;
``run_intrinsic_dim`` (:mod:`gradsketch.intrinsic.pipeline`) is the ``gradsketch intrinsic-dim`` pipeline.
"""

from .search import DEFAULTS, METHODS, IntrinsicDimResult, accuracy, full_finetune_metric, intrinsic_dimension
from .subspace import SubspaceModel
from .train import History, default_loss, train

__all__ = ["SubspaceModel", "train", "History", "default_loss", "intrinsic_dimension", "IntrinsicDimResult",
           "accuracy", "full_finetune_metric", "METHODS", "DEFAULTS"]
