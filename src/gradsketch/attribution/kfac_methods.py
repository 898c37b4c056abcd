"""EK-FAC and K-FAC influence: ``score(x, z) = ∇ℓ(x)ᵀ (K + δI)⁻¹ ∇ℓ(z)`` with K the (E)K-FAC approximation of
the GGN of the mean training loss (:class:`gradsketch.curvature.KFACOperator`; Grosse et al. 2023, "Studying
large language model generalization with influence functions", §3; George et al. 2018 for the eigenvalue
correction).

Damping: the library's one damping rule (:mod:`gradsketch.attribution.damping`), kernel (|K| + δI)⁻¹ with the
absolute ``damping`` δ ≥ 0 (default ``DEFAULT_DAMPING`` = 3e-3, the same as Influence and Arnoldi). K is
positive semi-definite (its factors' eigenvalues are clipped at 0), so this is (K + δI)⁻¹; δ = 0 is accepted
when K is non-singular (a singular K with δ = 0 is refused at fit, naming ``damping``). Measured on the
Fashion-MNIST CNN of ``benchmarks/bench_lds_cnn.py`` (validation half of the LDS targets): EK-FAC LDS 0.240 at
δ = 3e-3 against 0.239 under the former relative rule δ = 0.1 · mean eigenvalue (kronfluence's heuristic; the
mean eigenvalue there is 0.033, so the two coincide), K-FAC 0.230 against 0.228.

The stored rows are the loss gradients, exact or sketched (the same rows as grad-dot and sketched influence,
so the methods share a store). Without a sketch the kernel is (K + δI)⁻¹, applied to each test gradient
through the per-layer eigenbases. With a sketch Φ it is (Φ K Φᵀ + δI)⁻¹, the d × d compression of K (built
from d products with K, each a few small per-layer matrix products), exactly as sketched influence
compresses the Hessian. (Whitening before sketching, rows Φ(K + δI)^{-1/2}∇ℓ, was tried and rejected: the
whitened gradients spread over most of the N directions, so at d = 2048 the sketched inner products were
noise, LDS 0.02 against 0.31 unsketched on a small CNN.) The factors are fitted once per model state (on
``factor_data``, default the training batches) and saved next to the store (``torch.save`` of tensors and
plain metadata, read back with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._validation import check_choice, check_int, check_real
from ..curvature.kfac import FISHERS, KFACOperator
from . import methods as _builtin  # noqa: F401  (the built-in methods register first: registry order)
from .base import Attributor, Component, register_method
from .damping import damped_inverse
from .options import DEFAULT_DAMPING, CommonOptions


@dataclass
class EKFACOptions(CommonOptions):
    """EK-FAC / K-FAC influence: ``damping`` δ ≥ 0 of the one damping rule (absolute, default 3e-3), the
    ``fisher`` of the factors (``"ggn"`` exact, ``"mc"`` with ``mc_samples`` seeded by ``seed``, or
    ``"empirical"``), and ``factor_data`` (batches the factors are fitted on; default the training data)."""

    damping: float = DEFAULT_DAMPING
    fisher: str = "ggn"
    mc_samples: int = 1
    seed: int = 0
    factor_data: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.damping = check_real(self.damping, "damping", minimum=0.0)
        self.fisher = check_choice(self.fisher, "fisher", FISHERS)
        self.mc_samples = check_int(self.mc_samples, "mc_samples", minimum=1)
        self.seed = check_int(self.seed, "seed", minimum=0)


def _hash_state(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state["tensors"]):
        h.update(k.encode())
        h.update(state["tensors"][k].to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class EKFACInfluence(Attributor):
    """EK-FAC influence: ``∇ℓ(x)ᵀ (K + δI)⁻¹ ∇ℓ(z)`` with K the eigenvalue-corrected Kronecker-factored GGN
    (module docstring: damping, sketched form, saved factors). After ``fit``: ``curvature_`` (the
    :class:`~gradsketch.curvature.KFACOperator` of the last model state) and ``damping_`` (δ of the one damping
    rule, :mod:`gradsketch.attribution.damping`).

    >>> import gradsketch
    >>> model = torch.nn.Linear(2, 2).double()
    >>> task = gradsketch.Task.from_classifier(model, loss="mse")
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> data = [(X, torch.zeros(3, 2, dtype=torch.float64))]
    >>> a = EKFACInfluence(task, damping=0.1).fit(data, progress=False)   # kernel (K + 0.1 I)⁻¹
    >>> a.score(data, progress=False).shape, bool((a.self_influence(progress=False) > 0).all())
    (torch.Size([3, 3]), True)
    """

    options_cls = EKFACOptions
    method_name = "ekfac"
    auto_factored = False
    #: the KFACOperator kind this class fits
    kfac_kind = "ekfac"

    def _reset_fit(self) -> None:
        self.damping_s_: list[float] = []

    def _factors(self, comp: Component, data: Iterable, progress: bool) -> tuple[KFACOperator, float]:
        """The fitted operator of this model state (cached next to the store) and the absolute damping."""
        if "kfac" in comp.info:
            return comp.info["kfac"], comp.info["damping"]
        import time

        t0 = time.perf_counter()
        fdata = self._opt("factor_data") or data
        config = {"kind": self.kfac_kind, "fisher": self._opt("fisher"), "mc_samples": self._opt("mc_samples"),
                  "seed": self._opt("seed"), "fingerprint": comp.fingerprint,
                  "factor_data": "train" if self._opt("factor_data") is None else "given"}

        def compute() -> dict:
            op = KFACOperator.fit(self.task, fdata, kind=self.kfac_kind, fisher=self._opt("fisher"),
                                  mc_samples=self._opt("mc_samples"), seed=self._opt("seed"), progress=progress)
            return op.state_dict()

        state = self._cached(comp, self.kfac_kind, config, compute)
        op = KFACOperator.from_state_dict(self.task, state)
        damping = float(self._opt("damping"))  # the one damping rule: absolute δ, kernel (K + δI)⁻¹
        comp.info.update(kfac=op, damping=damping, factors=_hash_state(state))
        self._time("curvature", t0)
        return op, damping

    def finalise(self, comp: Component, data: Iterable, progress: bool) -> None:
        op, damping = self._factors(comp, data, progress)
        if self.sketch is None:
            comp.kernel = op.inverse(damping)
        else:
            comp.kernel = damped_inverse(_compress(op, comp.sketch, self.task.param_sizes), damping)
        comp.info["damping_abs"] = damping
        self.curvature_ = op
        self.damping_ = damping
        self.damping_s_.append(damping)


def _compress(op: KFACOperator, sketch: Any, sizes: list[int], rows: int = 256) -> Tensor:
    """Φ K Φᵀ ``[d, d]`` float64 from the rows of Φ (``rows`` at a time): (Φ K)ᵢ = K Φᵢ (K symmetric)."""
    d = int(sketch.d)
    eye = torch.eye(d, dtype=torch.float64, device=op.device)
    KPt = []
    for lo in range(0, d, rows):
        Pt = torch.cat([b.to(torch.float64) for b in sketch.adjoint_blocks(eye[lo:lo + rows], sizes)], dim=-1)
        KPt.append(op(Pt))                                                  # rows K Φᵀ e_i, [r, N]
    M = torch.cat(KPt)                                                      # Φ K [d, N]
    out = sketch.apply_blocks(list(torch.split(M, sizes, dim=-1))).to(torch.float64)   # Φ K Φᵀ [d, d]
    return 0.5 * (out + out.T)


class KFACInfluence(EKFACInfluence):
    """K-FAC influence: as :class:`EKFACInfluence` with K = S ⊗ A per layer (no eigenvalue correction).

    >>> import gradsketch
    >>> task = gradsketch.Task.from_classifier(torch.nn.Linear(2, 2).double(), loss="mse")
    >>> data = [(torch.eye(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))]
    >>> KFACInfluence(task).fit(data, progress=False).score(data, progress=False).shape
    torch.Size([2, 2])
    """

    method_name = "kfac"
    kfac_kind = "kfac"


for _cls in (EKFACInfluence, KFACInfluence):
    register_method(_cls.method_name, _cls)

__all__ = ["EKFACInfluence", "KFACInfluence", "EKFACOptions"]
