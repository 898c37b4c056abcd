"""Curvature of a :class:`~gradsketch.model.Task`'s mean loss as linear operators over the flat parameter
vector: Hessian, generalised Gauss-Newton and empirical Fisher; ``sketched(op, S) = S @ op @ S.T``;
``subsample_data`` (a fixed random subset of the examples, for subsampled-curvature operators);
K-FAC/EK-FAC (:class:`KFACOperator`, built from the per-example hooks of ``gradients``).
Imports Task; never imported by it (Task's conveniences call in lazily).
"""

from .distributed import BatchShard, sharded
from .kfac import KFACOperator
from .operators import CurvatureOperator, FisherOperator, GGNOperator, HessianOperator, sketched, subsample_data

__all__ = ["sharded", "BatchShard", "CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator",
           "sketched", "subsample_data", "KFACOperator"]
