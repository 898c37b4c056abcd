"""The one damping rule of every influence-type method (Influence, ArnoldiInfluence, sketched influence, and
EK-FAC and K-FAC influence): with K the curvature the method inverts (the Hessian H or GGN of the
mean training loss, or its sketch ΦHΦᵀ, or the top-k eigenpairs Arnoldi keeps), the kernel is

    M = (|K| + δI)⁻¹ = Σ_i u_i u_iᵀ / (|λ_i| + δ),        K = Σ_i λ_i u_i u_iᵀ,

i.e. the eigenvalues enter by their absolute value and ``damping`` δ ≥ 0 is added to them. For a positive
semi-definite K (GGN, Fisher, a convex loss) this is the textbook (K + δI)⁻¹. For the indefinite Hessian of
a neural network it stays positive definite for every δ > 0, whereas (H + δI)⁻¹ is indefinite and nearly
singular whenever δ is close to or below |λ_min|, which makes influence scores collapse (Koh & Liang's
inverse; the absolute value as in saddle-free Newton, Dauphin et al. 2014).

Chosen on validation data (``benchmarks/bench_damping_rule.py``, results in
``benchmarks/results/damping_rule.md``): digits MLP 64-48-10 (N = 3,610, Hessian eigenvalues in
[−0.0019, 0.206], 625 negative), LDS on 200 held-out validation images (not the benchmark's reported test
targets). (H + δI)⁻¹ falls to LDS 0.10 at δ = 10⁻³ (below |λ_min|); (|H| + δI)⁻¹ gives 0.714 there and is
best at δ = 3·10⁻³ for exact influence (0.745), Arnoldi top-100 (0.606), and sketched influence at
d = 512 / 2048 (0.599 / 0.690): one default, ``DEFAULT_DAMPING = 3e-3``, for every method. The positive
part max(λ, 0) was at most as good (0.706 at 10⁻³); scaling δ by N/d in the sketched space moved the best δ
with d (10⁻³ at d = 512, 3·10⁻³ at 2048), so the damping is added as is, in the space that is inverted.

CG and LiSSA have no eigendecomposition: they solve (K + δI)x = b, which is this rule exactly when K is
positive semi-definite. Influence therefore uses the GGN with them when the task declares one (see
:class:`~gradsketch.attribution.Influence`), and when a Lanczos check finds K indefinite it computes the rule
by eigendecomposition, as the explicit solver does (:func:`damped_inverse_info` reports what it found).

>>> K = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)     # indefinite
>>> damped_reciprocal(torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5).tolist()   # 1/(|λ| + δ)
[0.4, 0.6666666666666666]
>>> damped_inverse(K, 0.5).to_dense().diagonal().tolist()
[0.4, 0.6666666666666666]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_real, describe
from ..linalg import CholeskyInverse, EigenOperator, LinearOperator
from .options import DEFAULT_DAMPING  # the default ``damping`` of every influence-type method (see above)


def damped_reciprocal(eigenvalues: Tensor, damping: float) -> Tensor:
    """``1 / (|λ_i| + δ)`` per eigenvalue (0 where |λ_i| + δ = 0, i.e. δ = 0 and λ_i = 0): the rule's
    kernel eigenvalues. ``eigenvalues [k]`` -> ``[k]`` in their dtype."""
    damping = check_real(damping, "damping", minimum=0.0)
    den = eigenvalues.abs() + damping
    return torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))


#: K counts as indefinite when its smallest eigenvalue is below −INDEFINITE_RTOL · max|λ| (rounding of a
#: singular PSD matrix stays far above this in float64)
INDEFINITE_RTOL = 1e-8


def damped_inverse_info(K: Tensor, damping: float) -> tuple[LinearOperator, dict]:
    """:func:`damped_inverse` and what it found: ``{"indefinite": bool, "lambda_min": float | None,
    "lambda_max": float | None}`` (the extreme eigenvalues of K when the eigendecomposition was needed; K is
    indefinite when λ_min < −``INDEFINITE_RTOL``·max|λ|).

    >>> _, info = damped_inverse_info(torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64), 0.5)
    >>> info
    {'indefinite': True, 'lambda_min': -1.0, 'lambda_max': 2.0}
    """
    damping = check_real(damping, "damping", minimum=0.0)
    if not isinstance(K, Tensor) or K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K: expected a square 2-D tensor, got {describe(K)}")
    K = K.detach().to("cpu", torch.float64)
    K = (K + K.T) / 2
    _, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:  # K positive definite: the rule is (K + δI)⁻¹
        A = K.clone()
        A.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
            return CholeskyInverse(L), {"indefinite": False, "lambda_min": None, "lambda_max": None}
    w, V = torch.linalg.eigh(K)
    den = w.abs() + damping
    tiny = float(den.max()) * K.shape[0] * torch.finfo(torch.float64).eps if den.numel() else 0.0
    op = EigenOperator(torch.where(den > tiny, 1.0 / den.clamp_min(torch.finfo(den.dtype).tiny),
                                   torch.zeros_like(den)), V)
    lo, hi = (float(w[0]), float(w[-1])) if w.numel() else (0.0, 0.0)
    return op, {"indefinite": lo < -INDEFINITE_RTOL * max(abs(lo), abs(hi)), "lambda_min": lo, "lambda_max": hi}


def damped_inverse(K: Tensor, damping: float) -> LinearOperator:
    """``(|K| + δI)⁻¹`` of an explicit symmetric ``K [n, n]`` (float64, CPU) as a LinearOperator.

    A Cholesky factorisation of K itself tells whether K is positive definite; then |K| = K and the inverse is
    the Cholesky of K + δI (about 30× faster than ``eigh`` at n = 2048). Otherwise (indefinite or singular K)
    the eigendecomposition K = V diag(λ) Vᵀ gives V diag(1/(|λ| + δ)) Vᵀ (a pseudo-inverse on exactly zero
    directions when δ = 0)."""
    return damped_inverse_info(K, damping)[0]


__all__ = ["DEFAULT_DAMPING", "INDEFINITE_RTOL", "damped_reciprocal", "damped_inverse", "damped_inverse_info"]
