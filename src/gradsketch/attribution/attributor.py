"""``Attributor``: training data attribution (TDA) scores between test and training examples.

The methods and their formulas; the code is in :mod:`gradsketch.attribution.base` (the base class, the
registry) and :mod:`gradsketch.attribution.methods` (one class per method). This module re-exports them.

Every method is a bilinear form between per-example feature rows,

    score(x, z) = Σ_c w_c · φ_c(x)ᵀ M_c φ_c(z) · q_c(z)        (x: test example, z: training example)

over one or several model states c (checkpoints), with

=============  =================================  ====================================  ==================
method         φ(z)                               M                                     source
=============  =================================  ====================================  ==================
grad-dot       Φ∇ℓ(z)                             I                                     (gradient similarity)
grad-cos       Φ∇ℓ(z)/‖Φ∇ℓ(z)‖                    I                                     (gradient similarity)
tracin         Φ∇ℓ_c(z), w_c = η_c                I                                     Pruthi et al. 2020
trak           Φ∇f(z) (f = margin_fn) or Φ∇ℓ(z)   (Σ_z φ(z)φ(z)ᵀ + λI)⁻¹, q = 1 − σ(f)  Park et al. 2023
arnoldi        p_i(z) = ⟨u_i, Φ∇ℓ(z)⟩ (i ≤ k)     diag(1/(|λ_i| + δ))                   Schioppa et al. 2022
influence      Φ∇ℓ(z) (Φ = I: exact gradients)    (|ΦHΦᵀ| + δI)⁻¹ (explicit, CG, LiSSA) Koh & Liang 2017
=============  =================================  ====================================  ==================

Φ is the sketch (``sketch=None``: the identity, i.e. exact gradients); (λ_i, u_i) are the top-k eigenpairs of
the Hessian H of the mean training loss (or of the sketched Hessian ΦHΦᵀ) found by Arnoldi + distill.

**One damping rule** for every influence-type method (:mod:`gradsketch.attribution.damping`): the kernel is
(|K| + δI)⁻¹ for the curvature K that is inverted (eigenvalues by absolute value, plus ``damping`` δ, default
3e-3 for every method, chosen on validation data), positive definite even for an indefinite Hessian; for a
PSD K (GGN) it is (K + δI)⁻¹.

**Sign convention** (as TRAK): a positive score means the training example *supports* the test prediction:
up-weighting z lowers the loss on x (score ≈ −dℓ(x)/dε for ℓ_total + ε ℓ(z), up to the 1/n factor and
the curvature model). A training example that duplicates a test example therefore has a large positive
score, and self-influence (score(z, z)) is ≥ 0 for every PSD M. The influence-function score is
g(x)ᵀ(H + δI)⁻¹g(z) = −I_up,loss(z, x) of Koh & Liang (for a PSD H; see the damping rule above).

**TRAK ensembles** (Park et al. 2023, Algorithm 1; as the ``traker`` package): with M model states
(``models=`` independently trained models, or ``checkpoints=``) the score is

    τ(x, z) = [ (1/M) Σ_m φ_m(x)ᵀ (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_m(z) ] · q̄(z),    q̄ = (1/M) Σ_m q_m,

each model with its own features and kernel, the out-to-loss weights averaged separately. Averaging over
independently trained models is TRAK's main lever: on the digits MLP (benchmarks/results/attribution.md) the
LDS goes from 0.56–0.61 (one model, sketched d = 2048 / unsketched) to 0.66–0.68 (5 models) at the default
ridge. M copies of one model give exactly the one-model score.

**TRAK ridge.** λ = ``ridge`` · tr(ΦᵀΦ) / min(n_train, d), i.e. ``ridge`` is in units of the mean non-zero
eigenvalue of ΦᵀΦ (its rank is at most min(n_train, d)), so one value means the same relative damping for
every d, sketched or not, and for d ≥ n_train where ΦᵀΦ is singular. Default ``ridge=1.0``: damping at the
mean eigenvalue. It was chosen on a validation split of digits (200 held-out images, not the test targets of
the benchmark) from {0.1, 0.3, 1, 3, 10}, where it was best or within 0.01 of best for d = 512, 2048 and
unsketched with 5 and 10 models. ``ridge=0`` is ``traker``'s default (λ = 0, sensible only for d ≪ n_train).
When d > n_train the inverse is applied through the n × n Gram matrix G (Woodbury), O(n²d) instead of O(d²n),
and ``score`` computes φFᵀ(G + λI)⁻¹ directly (push-through identity). On the issue-16 CNN (5,000 × 5,994
loss gradients) the ridge rule sits at the validation optimum (r = 1 and 1.5 equal, 0.5 and 2 lower), and
loss-gradient features beat margin gradients with or without q (benchmarks/results/lds_cnn.md, session 8):
for the cross-entropy, ∇ loss = −(1 − p_y) ∇f exactly, so the loss-gradient test side already measures the
margin f up to a positive factor per target.

**TRAK kernel.** ``kernel="features"`` (as published) inverts ΦᵀΦ, the empirical Fisher of the training rows.
The default, ``kernel="auto"``, is ``"ggn_trace"`` (below) when the task declares its outputs and its loss on
them (:meth:`gradsketch.Task.from_classifier`) and ``"features"`` otherwise; ``kernel_`` and ``kernel_reason_``
of a fit say which ran and why. ``kernel="ggn"`` inverts K = Σ_i Φ J_iᵀ H_i J_i, the Gauss-Newton matrix of the
training loss in the same (sketched) coordinates, with H_i the Hessian of example i's loss in its outputs (for softmax
cross-entropy diag(p) − ppᵀ): the curvature of TRAK's own derivation (the Newton step of the linearised model;
for a binary logistic output this is the R = diag(p(1 − p)) weighting of Park et al.'s formula, here in its
multi-class form) instead of the outer products of the observed-label gradients, which weight a confident
example by (1 − p_y)² where the GGN weights it by about (1 − p_y). It needs a task that declares
``output_fn``/``loss_on_output`` (:meth:`gradsketch.Task.from_classifier`) and costs one more pass over the
training data per output-Hessian direction with a positive eigenvalue (C − 1 for softmax cross-entropy over C
classes; ``ggn_rank=k`` keeps the top k of each example, the exact GGN when k covers them all) and always a
d × d kernel (saved next to the store, like EK-FAC's factors, so a resumed fit does not redo the passes).
Same ridge rule. LDS with the unsketched
float64 kernels at ``ridge=1`` (benchmarks/results/lds_cnn.md, session 9): digits MLP 0.64 → 0.75, 4,000-image
Fashion-MNIST CNN 0.43 → 0.46, the issue-16 CNN 0.324 → 0.345; sketched (affd d = 2,048) on the issue-16 CNN
0.304 → 0.317 (0.316 with ``ggn_rank=2``). ``kernel="ggn_trace"`` keeps ΦᵀΦ's one row per example and gives
each the Gauss-Newton curvature of its example: K = Σ_i ω_i φ_i φ_iᵀ with ω_i = tr(H_i)/‖∂ℓ_i/∂z_i‖² for loss
gradients (times q_i² for margin gradients), i.e. the GGN term J_iᵀ H_i J_i with H_i replaced by its trace along
the example's own output gradient (exact when H_i has rank one along it: two classes, one output). It costs one
forward pass more than ΦᵀΦ and keeps most of the GGN's gain (library, float32, session 10): digits MLP 0.64 →
0.72, 4,000-image CNN 0.43 → 0.45, the issue-16 CNN 0.324 → 0.339 (affd d = 2,048: 0.62 → 0.68, 0.41 → 0.42,
0.304 → 0.315); with TRAK's margin features (``margin_fn``) the gain is larger, 0.66 → 0.72, 0.38 → 0.45 and
0.284 → 0.339 (session 11), since there ΦᵀΦ gives every example the same weight whatever its confidence, where
the GGN gives it about 1 − p_y. This is why it became the default in session 11: better on each benchmark and
each kind of features, sketched or not, for one forward pass more (+3% of the fit on the issue-16 CNN, +22% on
an 814k-parameter CNN in factored mode; the traces are in closed form for
:class:`gradsketch.losses.OutputLoss`, which ``Task.from_classifier`` sets; for another ``loss_on_output`` they
take one backward pass per output, and ``"auto"`` keeps ``"features"`` beyond 256 outputs).

**TRAK output function.** TRAK featurises gradients of the model output f (for classification the
correct-class margin f = log p/(1−p)) and weights training examples by q = 1 − p = 1 − σ(f). Pass
``margin_fn(model, batch) -> [B]`` (e.g. :func:`classification_margin`) to do exactly that; without it the
TRAK features are loss gradients and q = 1 (a generic choice that works for any loss).
"""

from __future__ import annotations

from ..model.losses import classification_margin
from .base import MODES, Attributor, Component, TopK, apply_kernel, quad_kernel, register_method, registered_methods
from .methods import TRAK, ArnoldiInfluence, GradCos, GradDot, Influence, TracIn

#: the built-in method names (``registered_methods()`` also lists methods added with ``register_method``)
METHODS = ("grad-dot", "grad-cos", "tracin", "trak", "arnoldi", "influence")


__all__ = ["Attributor", "TopK", "METHODS", "MODES", "classification_margin", "GradDot", "GradCos", "TracIn",
           "TRAK", "ArnoldiInfluence", "Influence", "Component", "apply_kernel", "quad_kernel", "register_method",
           "registered_methods"]
