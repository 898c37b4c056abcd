"""Online convex optimisation: regret of S-AdaGrad vs full-matrix AdaGrad, diagonal AdaGrad, OGD, Ada-FD and FD-SON.

Online logistic regression, one example per round, regret against the best fixed weight in hindsight
(L-BFGS on the total loss). Problems: a planted one whose features (hence gradients) have a power-law
covariance spectrum λ_i ∝ i^(−alpha) in a random basis, and two scikit-learn bundled sets (breast cancer,
digits even-vs-odd; standardised, bias column, one pass in a fixed random order). Every method runs on the
same grid of learning rates {0.01, 0.03, 0.1, 0.3, 1, 3} and initial ridges δ ∈ {1e-3, 1} (δ sets
the step floor of Ada-FD and FD-SON outside their sketch); the best pair per method (lowest final regret)
is reported. Sketch ranks k ∈ {4, 8,
16, 32} (a rank ≥ d is skipped: it would be full-matrix AdaGrad). One thread.

    python benchmarks/bench_optim_oco.py [--quick] [--out benchmarks/results/optim]

Prints markdown tables; writes oco.json and oco_<problem>.png under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import minimize

from gradsketch.optim import (
    FDSON,
    OGD,
    AdaFD,
    DiagonalAdaGrad,
    FullMatrixAdaGrad,
    SAdaGrad,
    online_logistic_regret,
)


def planted(d: int, T: int, alpha: float, seed: int = 0, isotropic_w: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features with covariance Q diag(i^(−alpha)) Qᵀ; the true weight follows the same spectrum, or is
    isotropic (then the low-variance directions matter and a preconditioner has something to gain)."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = np.arange(1, d + 1) ** (-alpha / 2)
    X = (rng.standard_normal((T, d)) * scales) @ Q.T
    w = Q @ (rng.standard_normal(d) * (1.0 if isotropic_w else scales))
    w *= 3.0 / np.std(X @ w)
    y = np.where(rng.random(T) < 1 / (1 + np.exp(-(X @ w))), 1.0, -1.0)
    return X, y


def sklearn_set(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "breast_cancer":
        ds = load_breast_cancer()
        X, y = ds.data, np.where(ds.target == 1, 1.0, -1.0)
    else:
        ds = load_digits()
        X, y = ds.data, np.where(ds.target % 2 == 0, 1.0, -1.0)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    perm = np.random.default_rng(seed).permutation(X.shape[0])
    return X[perm], y[perm]


def comparator(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    def f(w):
        z = y * (X @ w)
        loss = np.logaddexp(0, -z).sum() + 1e-8 * w @ w
        grad = -(X * (y / (1 + np.exp(z)))[:, None]).sum(0) + 2e-8 * w
        return loss, grad

    return minimize(f, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 5000}).x


def methods(d: int, ks: list[int]):
    """(label, make(lr, delta)); OGD has no delta."""
    out = [("OGD", lambda lr, dl: OGD(d, lr)), ("diag-AdaGrad", lambda lr, dl: DiagonalAdaGrad(d, lr, dl)),
           ("full-AdaGrad", lambda lr, dl: FullMatrixAdaGrad(d, lr, dl))]
    for k in ks:
        if k >= d:
            continue
        out += [(f"S-AdaGrad k={k}", lambda lr, dl, k=k: SAdaGrad(d, k, lr, dl)),
                (f"Ada-FD k={k}", lambda lr, dl, k=k: AdaFD(d, k, lr, dl)),
                (f"FD-SON k={k}", lambda lr, dl, k=k: FDSON(d, k, lr, dl))]
    return out


def run_problem(name, X, y, ks, lrs, deltas):
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    w_star = torch.from_numpy(comparator(X, y))
    rows, curves = [], {}
    for label, make in methods(X.shape[1], ks):
        best = None
        t0 = time.perf_counter()
        for lr in lrs:
            for dl in (deltas if label != "OGD" else deltas[:1]):
                learner = make(lr, dl)
                res = online_logistic_regret(learner, Xt, yt, w_star)
                reg = float(res.regret[-1])
                if not np.isfinite(reg):
                    continue
                if best is None or reg < best[0]:
                    best = (reg, lr, res.regret, getattr(learner, "rho", None), dl)
        secs = time.perf_counter() - t0
        assert best is not None
        rows.append({"method": label, "best_lr": best[1], "best_delta": best[4], "regret": best[0],
                     "seconds_grid": secs, "escaped_mass": best[3]})
        curves[label] = best[2]
        print(f"  {name:14s} {label:18s} lr={best[1]:<8.3g} delta={best[4]:<6.3g} regret={best[0]:9.2f}  "
              f"({secs:.1f} s for the grid)", flush=True)
    comp_loss = float(torch.nn.functional.softplus(-yt * (Xt @ w_star)).sum())
    return {"problem": name, "T": X.shape[0], "d": X.shape[1], "comparator_loss": comp_loss, "rows": rows}, curves


def plot(name, curves, path):
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, reg in curves.items():
        if label.startswith(("Ada-FD", "FD-SON")) and "k=32" not in label and "k=16" not in label:
            continue
        style = "-" if "S-AdaGrad" in label or "full" in label else "--"
        ax.plot(np.arange(1, len(reg) + 1), reg, style, label=label, lw=1.2)
    ax.set_xlabel("round t")
    ax.set_ylabel("regret (best lr per method)")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small problems, 3 learning rates (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/optim")
    ap.add_argument("--problems", nargs="+", default=["planted", "breast_cancer", "digits_parity"],
                    help="subset of: planted planted_iso breast_cancer digits_parity")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [4, 8, 16, 32]
    lrs = [0.03, 0.3, 3.0] if args.quick else [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    deltas = [1e-3, 1.0]
    T = 300 if args.quick else 1000
    d = 64 if args.quick else 128
    makers = {"planted": lambda: planted(d, T, alpha=2.0), "planted_iso": lambda: planted(d, T, 2.0, isotropic_w=True),
              "breast_cancer": lambda: sklearn_set("breast_cancer"), "digits_parity": lambda: sklearn_set("digits")}
    problems = [(name, *makers[name]()) for name in args.problems]
    results = []
    for name, X, y in problems:
        if args.quick:
            X, y = X[:T], y[:T]
        res, curves = run_problem(name, X, y, ks, lrs, deltas)
        results.append(res)
        plot(f"{name} (T={X.shape[0]}, d={X.shape[1]})", curves, out / f"oco_{name}.png")
    (out / f"oco{args.tag}.json").write_text(json.dumps({"lrs": lrs, "deltas": deltas, "results": results}, indent=1))
    for res in results:
        full = next(r["regret"] for r in res["rows"] if r["method"] == "full-AdaGrad")
        print(f"\n### {res['problem']} (T = {res['T']}, d = {res['d']}, comparator loss "
              f"{res['comparator_loss']:.1f})\n")
        print("| method | best lr | best δ | final regret | regret / full-matrix AdaGrad |")
        print("|---|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['method']} | {r['best_lr']:.3g} | {r['best_delta']:.3g} | {r['regret']:.2f} | "
                  f"{r['regret'] / full:.3f} |")


if __name__ == "__main__":
    main()
