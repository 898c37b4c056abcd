"""EK-FAC and K-FAC influence: ``score(x, z) = ∇ℓ(x)ᵀ (K + δI)⁻¹ ∇ℓ(z)`` with K the (E)K-FAC approximation of
the GGN of the mean training loss (:class:`gradsketch.curvature.KFACOperator`; Grosse et al. 2023, "Studying
large language model generalization with influence functions", §3; George et al. 2018 for the eigenvalue
correction).

Damping: δ = ``damping`` · mean eigenvalue of K (the factors' scale, known once they are fitted; kronfluence
uses the same heuristic with 0.1). K is positive semi-definite, so any δ > 0 gives a well-posed inverse.

Without a sketch the stored rows are the exact loss gradients (the same rows as grad-dot, so the methods share
a store) and the kernel is (K + δI)⁻¹, applied to each test gradient through the per-layer eigenbases. With a
sketch Φ the stored rows are Φ (K + δI)^{-1/2} ∇ℓ(z) on both sides (kernel: the identity), so that
⟨Φ K^{-1/2} g(x), Φ K^{-1/2} g(z)⟩ estimates the same score (E ΦᵀΦ = I) in d columns per example. The
factors are fitted once per model state (on ``factor_data``, default the training batches) and saved next to
the store (``torch.save`` of tensors and plain metadata, read back with ``weights_only=True``).
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
from ..sketch.base import SketchOperator
from . import methods as _builtin  # noqa: F401  (the built-in methods register first: registry order)
from .base import Attributor, Component, register_method
from .options import CommonOptions


@dataclass
class EKFACOptions(CommonOptions):
    """EK-FAC / K-FAC influence: ``damping`` (relative: δ = damping · mean eigenvalue of K, > 0), the
    ``fisher`` of the factors (``"ggn"`` exact, ``"mc"`` with ``mc_samples`` seeded by ``seed``, or
    ``"empirical"``), and ``factor_data`` (batches the factors are fitted on; default the training data)."""

    damping: float = 0.1
    fisher: str = "ggn"
    mc_samples: int = 1
    seed: int = 0
    factor_data: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.damping = check_real(self.damping, "damping", minimum=0.0, min_inclusive=False)
        self.fisher = check_choice(self.fisher, "fisher", FISHERS)
        self.mc_samples = check_int(self.mc_samples, "mc_samples", minimum=1)
        self.seed = check_int(self.seed, "seed", minimum=0)


class _WhitenedSketch(SketchOperator):
    """x ↦ Φ (K + δI)^{-1/2} x: the stored rows of sketched (E)K-FAC influence."""

    def __init__(self, base: Any, root: Any, task: Any, tag: str, factors_hash: str, damping: float) -> None:
        self.base, self.root, self.sizes = base, root, list(task.param_sizes)
        self.n, self.d = int(base.n), int(base.d)
        self.kind = tag
        base_spec = getattr(base, "spec", {"kind": type(base).__name__, "n": self.n, "d": self.d})
        self._spec = {"kind": tag, "n": self.n, "d": self.d, "base": base_spec, "factors": factors_hash,
                      "damping": damping}
        self._init_operator(self.n, self.d, getattr(base, "device", "cpu"))

    @property
    def spec(self) -> dict:
        return dict(self._spec)

    def __call__(self, x: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        y = self.root(x).to(x.dtype)
        out = self.base.apply_blocks(list(torch.split(y, self.sizes, dim=-1)))
        return out if out_dtype is None else out.to(out_dtype)

    def _adjoint_rows(self, y: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        x = torch.cat(self.base.adjoint_blocks(y, self.sizes), dim=-1)
        out = self.root(x)
        return out if out_dtype is None else out.to(out_dtype)

    def to(self, device: Any) -> _WhitenedSketch:
        return self


def _hash_state(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state["tensors"]):
        h.update(k.encode())
        h.update(state["tensors"][k].to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class EKFACInfluence(Attributor):
    """EK-FAC influence: ``∇ℓ(x)ᵀ (K + δI)⁻¹ ∇ℓ(z)`` with K the eigenvalue-corrected Kronecker-factored GGN
    (module docstring: damping, sketched form, saved factors). After ``fit``: ``curvature_`` (the
    :class:`~gradsketch.curvature.KFACOperator` of the last model state) and ``damping_`` (absolute δ).

    >>> import gradsketch
    >>> model = torch.nn.Linear(2, 2).double()
    >>> task = gradsketch.Task.from_classifier(model, loss="mse")
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> data = [(X, torch.zeros(3, 2, dtype=torch.float64))]
    >>> a = EKFACInfluence(task, damping=0.1).fit(data, progress=False)
    >>> a.score(data, progress=False).shape, bool((a.self_influence(progress=False) > 0).all())
    (torch.Size([3, 3]), True)
    """

    options_cls = EKFACOptions
    method_name = "ekfac"
    #: the KFACOperator kind this class fits
    kfac_kind = "ekfac"

    def _reset_fit(self) -> None:
        self.damping_s_: list[float] = []

    def _check_mode(self) -> None:
        if self.mode == "factored":
            raise ValueError(f"mode: {self.method!r} stores K^(-1/2)-whitened gradients, which need the explicit "
                             "per-example gradient; expected mode='explicit', got 'factored'")

    def feature_kind(self) -> str:
        return "loss-gradient" if self.sketch is None else f"{self.kfac_kind}-whitened"

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
        lam = op.eigenvalues()
        damping = float(self._opt("damping")) * float(lam.mean())
        if not damping > 0:
            raise ValueError(f"damping: the {self.kfac_kind.upper()} curvature is zero (mean eigenvalue "
                             f"{float(lam.mean()):.3g}), so a relative damping gives δ = 0; check the model/loss")
        comp.info.update(kfac=op, damping=damping, factors=_hash_state(state))
        self._time("curvature", t0)
        return op, damping

    def feature_sketch(self, comp: Component, data: Iterable, sketch: Any, progress: bool) -> Any:
        self._check_mode()
        if self.sketch is None:
            return sketch
        op, damping = self._factors(comp, data, progress)
        return _WhitenedSketch(sketch, op.power(-0.5, damping), self.task, f"{self.kfac_kind}-whitened",
                               comp.info["factors"], damping)

    def _feature_mode(self, comp: Component) -> str:
        return "explicit" if isinstance(comp.sketch, _WhitenedSketch) else super()._feature_mode(comp)

    def finalise(self, comp: Component, data: Iterable, progress: bool) -> None:
        op, damping = self._factors(comp, data, progress)
        comp.kernel = op.inverse(damping) if self.sketch is None else None
        comp.info["damping_abs"] = damping
        self.curvature_ = op
        self.damping_ = damping
        self.damping_s_.append(damping)


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
