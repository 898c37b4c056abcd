"""Attribution benchmarks: quality on digits (LDS, mislabel AUC), throughput vs TRAK's own pipeline, scale.

usage: python benchmarks/bench_attribution.py [quality|traker|scale|all] [--hidden 32] [--d 2048]
         [--subsets 64] [--runs 2] [--cache DIR] [--n-scale 60000]

quality: an MLP 64-H-10 and a logistic regression on digits (1,000 train / 200 test; full-batch Adam /
  L-BFGS, deterministic), LDS ground truth from retraining on 50% subsets (cached, resumable), every method's
  LDS, and mislabel-detection AUC with 10% flipped labels (self-influence).
traker: featurisation (examples/s) and scoring (pairs/s) of gradsketch vs the `traker` package (its CPU
  BasicProjector) on the same model, data and d, ratios from one run, plus both LDS.
scale: featurise Fashion-MNIST training images (IDX files from Debian's dataset-fashion-mnist) with a small
  CNN into an AFFD store; examples/s and store size; blocked top-k memory.
Numbers printed as markdown tables (copied into benchmarks/results/attribution.md).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradsketch.attribution import Attributor, batches, classification_margin
from gradsketch.eval import (
    flip_labels,
    lds,
    lds_ground_truth,
    load_digits_split,
    load_model,
    make_mlp,
    mislabel_detection,
    train_models,
)
from gradsketch.model import Task


def _md(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def quality(args) -> None:
    D = load_digits_split(1000, 200, seed=0)
    H = args.hidden
    setups = {
        f"MLP 64-{H}-10": (lambda: make_mlp((64, H, 10)), dict(steps=300, lr=1e-2, weight_decay=1e-3)),
        "logistic regression": (lambda: make_mlp((64, 10), dtype=torch.float64),
                                dict(optimizer="lbfgs", steps=300, weight_decay=1e-2)),
    }
    for name, (mf, kw) in setups.items():
        if args.only and args.only not in name:
            continue
        dt = torch.float64 if "logistic" in name else torch.float32
        Xtr, Xte = D.x_train.to(dt), D.x_test.to(dt)
        t = time.perf_counter()
        gt = lds_ground_truth(mf, (Xtr, D.y_train), (Xte, D.y_test), n_subsets=args.subsets, n_runs=args.runs,
                              cache=Path(args.cache) / name.replace(" ", "_"), progress=True, **kw)
        print(f"\n### {name}: ground truth {args.subsets} subsets × {args.runs} runs ({time.perf_counter() - t:.0f}s)")
        model = load_model(mf, train_models(mf, Xtr, D.y_train, **kw))
        task = Task.from_classifier(model)
        N = task.n_params
        d = min(args.d, N)
        # the noisy-label model for AUC
        yn, flipped = flip_labels(D.y_train, 0.1, 10, seed=1)
        noisy = Task.from_classifier(load_model(mf, train_models(mf, Xtr, yn, **kw)))
        tr, te = batches(Xtr, D.y_train, batch_size=250), batches(Xte, D.y_test, batch_size=200)
        trn = batches(Xtr, yn, batch_size=250)
        wd = kw["weight_decay"]
        sk = dict(kind="affd", d=d, seed=0)
        mg = classification_margin()
        methods = [
            ("grad-dot", "grad-dot", None, {}),
            ("grad-cos", "grad-cos", None, {}),
            ("TRAK (margin, ridge 0.1)", "trak", None, dict(margin_fn=mg, ridge=0.1)),
            (f"TRAK (margin, ridge 0.1) affd d={d}", "trak", sk, dict(margin_fn=mg, ridge=0.1)),
            ("Arnoldi (100 it, top 30)", "arnoldi", None, dict(n_iters=100, top_k=30, damping=wd)),
            (f"Arnoldi (100 it, top 30) affd d={d}", "arnoldi", sk, dict(n_iters=100, top_k=30, damping=wd)),
            ("Arnoldi (200 it, top 100)", "arnoldi", None, dict(n_iters=200, top_k=100, damping=wd)),
            (f"influence exact GGN δ={max(wd, 1e-3)}", "influence", None,
             dict(curvature="ggn", damping=max(wd, 1e-3))),
            ("influence exact Hessian δ=0.01" if "MLP" in name else f"influence exact Hessian δ={wd}",
             "influence", None, dict(damping=0.01 if "MLP" in name else wd)),
        ]
        rows = []
        for label, m, s, opts in methods:
            t = time.perf_counter()
            S = Attributor(task, m, sketch=s, **opts).fit(tr, progress=False).score(te, progress=False)
            fit_s = time.perf_counter() - t
            L = lds(S, gt.masks, gt.outputs).mean
            a = Attributor(noisy, m, sketch=s, **opts).fit(trn, progress=False)
            auc = mislabel_detection(a.self_influence(progress=False), flipped)
            rows.append([label, L, auc.auc, auc.ap, f"{fit_s:.1f}"])
            print(rows[-1], flush=True)
        print(f"\n{name} (N = {N} parameters)\n")
        print(_md(rows, ["method", "LDS", "mislabel AUC", "mislabel AP", "fit+score s"]))


def traker_compare(args) -> None:
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        print("traker is not installed (pip install traker): skipped")
        return
    D = load_digits_split(1000, 200, seed=0)
    mf = lambda: make_mlp((64, args.hidden, 10))  # noqa: E731
    model = load_model(mf, train_models(mf, D.x_train, D.y_train, steps=300, lr=1e-2, weight_decay=1e-3))
    task = Task.from_classifier(model)
    N = task.n_params
    d = min(args.d, N)
    tr, te = batches(D.x_train, D.y_train, batch_size=250), batches(D.x_test, D.y_test, batch_size=200)
    mg = classification_margin()
    # gradsketch: margin gradients, AFFD sketch, in memory
    t = time.perf_counter()
    a = Attributor(task, "trak", sketch=dict(kind="affd", d=d, seed=0), margin_fn=mg, ridge=0.1).fit(tr, progress=False)
    gs_feat = time.perf_counter() - t
    t = time.perf_counter()
    S = a.score(te, progress=False)
    gs_score = time.perf_counter() - t
    # TRAK's pipeline: per-example margin gradients (torch.func, as TRAK's FunctionalGradientComputer does)
    # projected with its CPU BasicProjector (dense Rademacher, generated block by block)
    mt = Task(model, mg)
    proj = BasicProjector(grad_dim=N, proj_dim=d, seed=0, proj_type=ProjectionType.rademacher, device="cpu",
                          dtype=torch.float32, block_size=100)
    t = time.perf_counter()
    feats = torch.cat([proj.project(mt.grads(b), model_id=0) for b in tr])
    K = feats.T.double() @ feats.double()
    lam = 0.1 * torch.trace(K) / d
    Kinv = torch.linalg.inv(K + lam * torch.eye(d, dtype=torch.float64))
    tk_feat = time.perf_counter() - t
    t = time.perf_counter()
    ft = torch.cat([proj.project(mt.grads(b), model_id=0) for b in te])
    with torch.no_grad():
        q = torch.sigmoid(-mg(model, (D.x_train, D.y_train))).double()
    S2 = (ft.double() @ Kinv @ feats.double().T) * q
    tk_score = time.perf_counter() - t
    gt = lds_ground_truth(mf, (D.x_train, D.y_train), (D.x_test, D.y_test), n_subsets=args.subsets,
                          n_runs=args.runs, cache=Path(args.cache) / f"MLP_64-{args.hidden}-10", progress=True,
                          steps=300, lr=1e-2, weight_decay=1e-3)
    n, m = 1000, 200
    rows = [["gradsketch (affd)", f"{n / gs_feat:.0f}", f"{m * n / gs_score:.3g}", lds(S, gt.masks, gt.outputs).mean],
            ["traker BasicProjector (rademacher)", f"{n / tk_feat:.0f}", f"{m * n / tk_score:.3g}",
             lds(S2, gt.masks, gt.outputs).mean]]
    print(f"\nTRAK pipeline comparison: MLP N = {N}, d = {d}, 1000 train / 200 test, CPU\n")
    print(_md(rows, ["pipeline", "featurise examples/s (incl. kernel)", "score pairs/s (incl. test featurisation)",
                     "LDS"]))
    print(f"\nratio featurisation: {tk_feat / gs_feat:.1f}x, scoring: {tk_score / gs_score:.1f}x")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def scale(args) -> None:
    root = Path("/usr/share/datasets/fashion-mnist")
    imgs = sorted(root.glob("train-images*"))
    if not imgs:
        print(f"Fashion-MNIST not found in {root} (apt-get install -y dataset-fashion-mnist): skipped")
        return
    X = torch.from_numpy(_read_idx(imgs[0], 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    y = torch.from_numpy(_read_idx(sorted(root.glob("train-labels*"))[0], 8).astype(np.int64))
    n = min(args.n_scale, X.shape[0])
    X, y = X[:n], y[:n]
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    task = Task.from_classifier(model)
    d = min(args.d, task.n_params)
    tmp = Path(tempfile.mkdtemp(prefix="gs-scale-"))
    try:
        t = time.perf_counter()
        a = Attributor(task, "grad-dot", sketch=dict(kind="affd", d=d, seed=0), store=tmp).fit(
            batches(X, y, batch_size=500), progress=True)
        dt = time.perf_counter() - t
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        t = time.perf_counter()
        tk = a.topk(batches(X[:1000], y[:1000], batch_size=500), k=10, progress=False)
        tk_s = time.perf_counter() - t
        print(f"\nFashion-MNIST scale: CNN N = {task.n_params}, affd d = {d}, {n} training images\n")
        print(_md([[n, f"{n / dt:.0f}", f"{size / 2**20:.1f} MiB", f"{1000 * n / tk_s:.3g}"]],
                  ["examples", "featurise examples/s", "store size", "top-10 pairs/s (1000 test)"]))
        del tk
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="all", choices=["quality", "traker", "scale", "all"])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--only", default="")
    p.add_argument("--n-scale", type=int, default=60000)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradsketch-lds"))
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.what in ("quality", "all"):
        quality(args)
    if args.what in ("traker", "all"):
        traker_compare(args)
    if args.what in ("scale", "all"):
        scale(args)


if __name__ == "__main__":
    sys.exit(main())
