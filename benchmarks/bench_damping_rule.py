"""The one damping rule of influence-type attribution, chosen on validation data (issue 11 / 19).

usage: python benchmarks/bench_damping_rule.py [--subsets 64] [--runs 2] [--cache DIR] [--d 512,2048] [--defaults]

--defaults: instead of the rule table, the validation LDS of the library's default Arnoldi (unsketched and
affd d = 2048) and sketched influence (affd d = 512) on the float32 model (for before/after comparisons of the
defaults; run it with each tree's src on PYTHONPATH).

Digits MLP 64-48-10 (N = 3,610; trained as in bench_attribution.py: 300 full-batch Adam steps, lr 1e-2, weight
decay 1e-3), 1,000 training images. Validation targets: 200 digits images disjoint from the training set AND
from the 200 test images that bench_attribution.py reports (``load_digits_split(1000, 400)``, images
200..399 of the held-out part). LDS ground truth from --subsets half subsets × --runs retrains on them.

Every kernel is formed from one eigendecomposition (float64) of the curvature the method inverts, K = H
(exact influence), K = Φ H Φᵀ (sketched influence, affd), or the top-100 Arnoldi/distill eigenpairs of H
(Arnoldi influence), under three rules for the damping δ:
  plain     1/(λ_i + δ)          (the textbook (K + δI)⁻¹; indefinite when δ < |λ_min|)
  abs       1/(|λ_i| + δ)        (always positive definite)
  positive  1/(max(λ_i, 0) + δ)  (negative curvature treated as none)
and for the sketched kernels also ``abs·N/d``: 1/(|λ_i| + δ·N/d) (δ·ΦΦᵀ replaced by its mean, the sketch of
δI). Prints the validation LDS table (markdown) for δ in a log grid.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from gradsketch.attribution import batches
from gradsketch.eval import lds, lds_ground_truth, load_digits_split, load_models, make_mlp, train_models
from gradsketch.linalg import arnoldi, distill
from gradsketch.model import Task
from gradsketch.sketch import sketch as make_sketch

DAMPINGS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def rule(lam: torch.Tensor, delta: float, kind: str) -> torch.Tensor:
    if kind == "plain":
        den = lam + delta
        return torch.where(den.abs() > 0, 1.0 / den, torch.zeros_like(den))
    if kind == "abs":
        return 1.0 / (lam.abs() + delta)
    if kind == "positive":
        return 1.0 / (lam.clamp_min(0) + delta)
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cache", default=os.environ.get("TMPDIR", "/tmp") + "/gradsketch-damping-val")
    ap.add_argument("--d", default="512,2048")
    ap.add_argument("--defaults", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    def make_model():
        return make_mlp((64, 48, 10))

    kw = dict(steps=300, lr=1e-2, weight_decay=1e-3)
    D = load_digits_split(1000, 400, seed=0)
    Xv, yv = D.x_test[200:], D.y_test[200:]   # validation: not the 200 reported test targets (D.x_test[:200])
    gt = lds_ground_truth(make_model, (D.x_train, D.y_train), (Xv, yv), n_subsets=args.subsets, n_runs=args.runs,
                          cache=Path(args.cache), progress=False, **kw)
    model = load_models(make_model, train_models(make_model, D.x_train, D.y_train, seeds=[0], **kw))[0]
    if args.defaults:
        from gradsketch.attribution import Attributor

        task = Task.from_classifier(model)
        tr, va = batches(D.x_train, D.y_train, batch_size=250), batches(Xv, yv, batch_size=200)
        for label, m, sk in [("arnoldi default (200 it, top 100)", "arnoldi", None),
                             ("arnoldi default, affd d=2048", "arnoldi", dict(kind="affd", d=2048, seed=0)),
                             ("influence default, affd d=512", "influence", dict(kind="affd", d=512, seed=0))]:
            t = time.perf_counter()
            S = Attributor(task, m, sketch=sk).fit(tr, progress=False).score(va, progress=False)
            val = lds(S, gt.masks, gt.outputs).mean
            print(f"| {label} | {val:.3f} | {time.perf_counter() - t:.0f} s |", flush=True)
        return
    model = model.double()
    task = Task.from_classifier(model)
    tr = batches(D.x_train.double(), D.y_train, batch_size=250)
    va = batches(Xv.double(), yv, batch_size=200)
    N = task.n_params
    G = torch.cat([task.grads(b) for b in tr])
    Gv = torch.cat([task.grads(b) for b in va])
    H = task.hessian(tr)
    Hm = H.to_dense()
    Hm = (Hm + Hm.T) / 2
    ev, U = torch.linalg.eigh(Hm)
    print(f"N = {N}; Hessian eigenvalues in [{ev.min():.4g}, {ev.max():.4g}], {(ev < 0).sum()} negative; "
          f"ground truth + Hessian {time.perf_counter() - t_start:.0f} s")

    def L(S: torch.Tensor) -> float:
        return float(lds(S.float(), gt.masks, gt.outputs).mean)

    rows: list[tuple[str, list[float]]] = []
    A, Av = U.T @ G.T, U.T @ Gv.T              # gradients in H's eigenbasis
    for kind in ("plain", "abs", "positive"):
        rows.append((f"exact influence, {kind}", [L(Av.T @ (rule(ev, dl, kind)[:, None] * A)) for dl in DAMPINGS]))
    res = arnoldi(H, 200, seed=0)
    lam_a, V = distill(res.Q, res.H, 100)
    V = V / V.norm(dim=0, keepdim=True)
    Pa, Pav = V.T @ G.T, V.T @ Gv.T
    print(f"Arnoldi top-100: eigenvalues in [{lam_a.min():.4g}, {lam_a.max():.4g}], {(lam_a < 0).sum()} negative")
    for kind in ("plain", "abs", "positive"):
        rows.append((f"Arnoldi top-100, {kind}", [L(Pav.T @ (rule(lam_a, dl, kind)[:, None] * Pa))
                                                  for dl in DAMPINGS]))
    for d in (int(x) for x in args.d.split(",")):
        P = make_sketch("affd", N, d, seed=0).matrix().to(torch.float64)
        K = P @ Hm @ P.T
        es, Us = torch.linalg.eigh((K + K.T) / 2)
        Z, Zv = Us.T @ (P @ G.T), Us.T @ (P @ Gv.T)
        for kind, scale in (("plain", 1.0), ("abs", 1.0), ("positive", 1.0), ("abs·N/d", N / d)):
            k = kind.split("·")[0]
            rows.append((f"sketched affd d={d}, {kind}", [L(Zv.T @ (rule(es, dl * scale, k)[:, None] * Z))
                                                          for dl in DAMPINGS]))
    rows.append(("grad-dot (reference)", [L(Gv @ G.T)] * len(DAMPINGS)))
    print("\n| estimator | " + " | ".join(f"δ={dl:g}" for dl in DAMPINGS) + " |")
    print("|---|" + "---|" * len(DAMPINGS))
    for name, vals in rows:
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
