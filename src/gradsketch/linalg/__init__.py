"""Algorithms on linear operators; knows nothing of models.

Eigenpairs: :func:`lanczos`, :func:`eigsh` (ARPACK bridge), :func:`arnoldi` + :func:`distill`,
:func:`arnoldi_eigs`, :func:`block_lanczos_eigs` (several vectors per product,
residual stop). Trace: :func:`hutchinson`, :func:`hutchpp`. Spectral density: :func:`slq`.
Inverse products: :func:`cg`, :func:`lissa`. Streaming: :class:`FrequentDirections`.
Operator algebra (``A.T``, ``A @ B``, ``A + B``, ``c * A``, ``A.damped(λ)``, ``inverse(A, λ, method)``) and
inverse operators: :mod:`gradsketch.linalg.operator`.
"""

from .arnoldi import ArnoldiResult, Distilled, arnoldi, arnoldi_eigs, distill
from .block_lanczos import BlockLanczosResult, block_lanczos_eigs
from .frequent_directions import FrequentDirections
from .inverse import CGInverse, LiSSAInverse, inverse
from .lanczos import EigResult, eigsh, lanczos, symmetry_defect
from .operator import (
    AdjointOperator,
    CholeskyInverse,
    DampedOperator,
    EigenOperator,
    FunctionOperator,
    IdentityOperator,
    LinearOperator,
    MatrixOperator,
    ProductOperator,
    SumOperator,
    WoodburyInverse,
    dense_inverse,
    gram,
    ridge_inverse,
)
from .slq import SLQResult, slq
from .solvers import SolveResult, cg, lissa
from .trace import TraceResult, hutchinson, hutchpp

__all__ = [
    "LinearOperator", "MatrixOperator", "FunctionOperator", "DampedOperator", "IdentityOperator",
    "AdjointOperator", "ProductOperator", "SumOperator", "EigenOperator", "CholeskyInverse", "WoodburyInverse",
    "CGInverse", "LiSSAInverse", "inverse", "dense_inverse", "ridge_inverse", "gram",
    "EigResult", "lanczos", "eigsh", "symmetry_defect",
    "ArnoldiResult", "Distilled", "arnoldi", "distill", "arnoldi_eigs",
    "BlockLanczosResult", "block_lanczos_eigs",
    "TraceResult", "hutchinson", "hutchpp",
    "SLQResult", "slq",
    "SolveResult", "cg", "lissa",
    "FrequentDirections",
]
