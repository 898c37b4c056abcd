"""Attribution benchmarks: quality on digits (LDS, mislabel AUC), throughput vs TRAK's own pipeline, scale.

usage: python benchmarks/bench_attribution.py [quality|arnoldi-seeds|traker|scale|all] [--hidden 32,128]
         [--d 4096] [--models 5] [--reps 3] [--seeds 5] [--subsets 64] [--runs 2] [--cache DIR] [--n-scale 60000]

quality: MLPs 64-H-10 (one per --hidden) and a logistic regression on digits (1,000 train / 200 test;
  full-batch Adam / L-BFGS, deterministic), LDS ground truth from retraining on 50% subsets (cached,
  resumable), every method's LDS (TRAK with one model and with an ensemble of --models independently trained
  models), sketched (affd, d = --d, or the largest power of two below N for smaller models) vs unsketched, and
  mislabel-detection AUC with 10% flipped labels (self-influence).
arnoldi-seeds: LDS spread of Arnoldi over start-vector seeds on logistic regression, unsketched vs sketched.
traker: featurisation (examples/s) and scoring of gradsketch vs the `traker` package's own pipeline (TRAKer on
  the CPU) on the same models, data, d and ridge rule; --reps interleaved repetitions, plus both LDS.
scale: featurise Fashion-MNIST training images (IDX files from Debian's dataset-fashion-mnist) with a small
  CNN into an AFFD store; examples/s and store size; blocked top-k memory.
Numbers printed as markdown tables (copied into benchmarks/results/attribution.md).
"""

from __future__ import annotations

import argparse
import copy
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
    load_models,
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


def _pow2_below(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _sketch_d(N: int, d: int) -> int:
    """The sketch size for a model with N parameters: ``d`` when N > d, else the largest power of two < N
    (a real compression, not a full-size rotation)."""
    return d if N > d else _pow2_below(N - 1)


def quality(args) -> None:
    D = load_digits_split(1000, 200, seed=0)
    setups = {}
    for H in [int(h) for h in str(args.hidden).split(",")]:
        setups[f"MLP 64-{H}-10"] = (lambda H=H: make_mlp((64, H, 10)), dict(steps=300, lr=1e-2, weight_decay=1e-3))
    setups["logistic regression"] = (lambda: make_mlp((64, 10), dtype=torch.float64),
                                     dict(optimizer="lbfgs", steps=300, weight_decay=1e-2))
    M = args.models
    for name, (mf, kw) in setups.items():
        if args.only and args.only not in name:
            continue
        dt = torch.float64 if "logistic" in name else torch.float32
        Xtr, Xte = D.x_train.to(dt), D.x_test.to(dt)
        t = time.perf_counter()
        gt = lds_ground_truth(mf, (Xtr, D.y_train), (Xte, D.y_test), n_subsets=args.subsets, n_runs=args.runs,
                              cache=Path(args.cache) / name.replace(" ", "_"), progress=True, **kw)
        print(f"\n### {name}: ground truth {args.subsets} subsets × {args.runs} runs ({time.perf_counter() - t:.0f}s)")
        # model 0 of the ensemble is the single model (seed 0); the ensemble: seeds 0..M-1
        ens = load_models(mf, train_models(mf, Xtr, D.y_train, seeds=list(range(M)), **kw))
        task = Task.from_classifier(ens[0])
        N = task.n_params
        d = _sketch_d(N, args.d)
        # the noisy-label models for AUC
        yn, flipped = flip_labels(D.y_train, 0.1, 10, seed=1)
        ens_n = load_models(mf, train_models(mf, Xtr, yn, seeds=list(range(M)), **kw))
        noisy = Task.from_classifier(ens_n[0])
        tr, te = batches(Xtr, D.y_train, batch_size=250), batches(Xte, D.y_test, batch_size=200)
        trn = batches(Xtr, yn, batch_size=250)
        wd = kw["weight_decay"]
        sk = dict(kind="affd", d=d, seed=0)
        mg = classification_margin()
        ens_opt = dict(models=ens)
        methods = [
            ("grad-dot", "grad-dot", None, {}),
            ("grad-cos", "grad-cos", None, {}),
            # TRAK's default kernel is 'auto' since session 11: 'ggn_trace' for these tasks (Task.from_classifier)
            ("TRAK 1 model", "trak", None, dict(margin_fn=mg)),
            (f"TRAK 1 model affd d={d}", "trak", sk, dict(margin_fn=mg)),
            (f"TRAK {M} models", "trak", None, dict(margin_fn=mg, **ens_opt)),
            (f"TRAK {M} models affd d={d}", "trak", sk, dict(margin_fn=mg, **ens_opt)),
            ("TRAK 1 model, kernel='features' (published)", "trak", None, dict(margin_fn=mg, kernel="features")),
            (f"TRAK 1 model affd d={d}, kernel='features'", "trak", sk, dict(margin_fn=mg, kernel="features")),
            (f"TRAK {M} models, kernel='features'", "trak", None, dict(margin_fn=mg, kernel="features", **ens_opt)),
            (f"TRAK {M} models affd d={d}, kernel='features'", "trak", sk,
             dict(margin_fn=mg, kernel="features", **ens_opt)),
            (f"TRAK {M} models affd d={d}, kernel='features', ridge 0 (traker default)", "trak", sk,
             dict(margin_fn=mg, kernel="features", ridge=0.0, **ens_opt)),
            ("Arnoldi (200 it, top 100)", "arnoldi", None, dict(damping=wd)),
            (f"Arnoldi (200 it, top 100) affd d={d}", "arnoldi", sk, dict(damping=wd)),
        ]
        if N <= 8192:
            methods.append((f"influence exact GGN δ={max(wd, 1e-3)}", "influence", None,
                            dict(curvature="ggn", damping=max(wd, 1e-3))))
        if N <= 3000:
            methods.append(("influence exact Hessian δ=0.01" if "MLP" in name else f"influence exact Hessian δ={wd}",
                            "influence", None, dict(damping=0.01 if "MLP" in name else wd)))
        rows = []
        for label, m, s, opts in methods:
            if args.methods and not any(x in label for x in args.methods):
                continue
            t = time.perf_counter()
            S = Attributor(task, m, sketch=s, **opts).fit(tr, progress=False).score(te, progress=False)
            fit_s = time.perf_counter() - t
            L = lds(S, gt.masks, gt.outputs).mean
            nopts = dict(opts, models=ens_n) if "models" in opts else opts
            a = Attributor(noisy, m, sketch=s, **nopts).fit(trn, progress=False)
            auc = mislabel_detection(a.self_influence(progress=False), flipped)
            rows.append([label, L, auc.auc, auc.ap, f"{fit_s:.1f}"])
            print(rows[-1], flush=True)
        print(f"\n{name} (N = {N} parameters, sketch d = {d})\n")
        print(_md(rows, ["method", "LDS", "mislabel AUC", "mislabel AP", "fit+score s"]))


def arnoldi_seeds(args) -> None:
    """Arnoldi start-vector randomness vs sketch error: LDS of unsketched Arnoldi and of Arnoldi on ΦHΦᵀ over
    several seeds (the seed draws the start vector; the sketch seed is fixed). ``start="parameter"`` (the
    default) starts the sketched run from Φz, z the unsketched run's start vector; ``start="sketch"`` from an
    independent Gaussian in R^d (the behaviour before). Logistic regression (N = 650: d = N, where a random
    square affd is far from orthogonal (singular values 1e-3 to 2.8), and d = 512) and each MLP of --hidden
    (200 iterations / top 100 only)."""
    D = load_digits_split(1000, 200, seed=0)
    setups = [("logistic regression", lambda: make_mlp((64, 10), dtype=torch.float64),
               dict(optimizer="lbfgs", steps=300, weight_decay=1e-2), torch.float64)]
    for H in [int(h) for h in str(args.hidden).split(",")]:
        setups.append((f"MLP 64-{H}-10", lambda H=H: make_mlp((64, H, 10)),
                       dict(steps=300, lr=1e-2, weight_decay=1e-3), torch.float32))
    rows = []
    for name, mf, kw, dt in setups:
        if args.only and args.only not in name:
            continue
        Xtr, Xte = D.x_train.to(dt), D.x_test.to(dt)
        gt = lds_ground_truth(mf, (Xtr, D.y_train), (Xte, D.y_test), n_subsets=args.subsets, n_runs=args.runs,
                              cache=Path(args.cache) / name.replace(" ", "_"), progress=True, **kw)
        task = Task.from_classifier(load_model(mf, train_models(mf, Xtr, D.y_train, **kw)))
        N = task.n_params
        tr, te = batches(Xtr, D.y_train, batch_size=250), batches(Xte, D.y_test, batch_size=200)
        wd = kw["weight_decay"]
        if "logistic" in name:
            settings = [(100, 30), (200, 100)]
            ops = [("unsketched", None, "parameter"),
                   (f"affd d={N} (= N, not orthogonal), start Φz", dict(kind="affd", d=N), "parameter"),
                   (f"affd d={N} (= N), start in R^d", dict(kind="affd", d=N), "sketch"),
                   ("affd d=512, start Φz", dict(kind="affd", d=512), "parameter")]
        else:
            d = _sketch_d(N, args.d)
            settings = [(200, 100)]
            ops = [("unsketched", None, "parameter"), (f"affd d={d}, start Φz", dict(kind="affd", d=d), "parameter")]
        for it, k in settings:
            base = None
            for label, s, start in ops:
                vals = []
                for seed in range(args.seeds):
                    S = Attributor(task, "arnoldi", sketch=s, n_iters=it, top_k=k, damping=wd, seed=seed,
                                   start=start).fit(tr, progress=False).score(te, progress=False)
                    vals.append(lds(S, gt.masks, gt.outputs).mean)
                v = np.array(vals)
                base = v if base is None else base
                gap = v - base
                rows.append([f"{name} (N = {N})", f"{it} it, top {k}", label, f"{v.mean():.3f}",
                             f"{v.std(ddof=1):.3f}", f"{v.min():.3f}–{v.max():.3f}",
                             "" if s is None else f"{gap.mean():+.3f} ({gap.min():+.3f}…{gap.max():+.3f})"])
                print(rows[-1], flush=True)
    print(f"\nArnoldi LDS over {args.seeds} start-vector seeds (gap: sketched − unsketched, same seed)\n")
    print(_md(rows, ["model", "Arnoldi", "operator", "mean LDS", "sd", "range", "gap to unsketched (min…max)"]))


def _traker_run(model, states, tr, te, d, n, m, ridge, tmp):
    """TRAK's own pipeline (traker.TRAKer on the CPU: FunctionalGradientComputer, BasicProjector with its CPU
    default (normal) projection, float32): featurize every model, finalize_features, then scores.
    λ per model by gradsketch's rule on traker's own xtx: ridge · tr(xtx) / min(n, d).
    Returns (featurize s, finalize s, score s, scores [m, n])."""
    import logging

    from trak import TRAKer

    t0 = time.perf_counter()
    tk = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=str(tmp), device="cpu",
                proj_dim=d, use_half_precision=False, projector_seed=0, logging_level=logging.ERROR)
    for i, sd in enumerate(states):
        tk.load_checkpoint(sd, model_id=i)
        for X, y in tr:
            tk.featurize(batch=(X, y), num_samples=X.shape[0])
    t1 = time.perf_counter()
    for i in range(len(states)):
        tk.saver.load_current_store(i)
        g = torch.as_tensor(tk.saver.current_store["grads"])
        tk.score_computer.lambda_reg = ridge * float((g.double() ** 2).sum()) / min(n, d)
        if not hasattr(tk.projector, "proj_matrix"):  # traker 0.3.2 bug: a second free_memory() raises
            tk.projector.proj_matrix = None
        tk.finalize_features(model_ids=[i])
    t2 = time.perf_counter()
    for i, sd in enumerate(states):
        tk.start_scoring_checkpoint(exp_name="test", checkpoint=sd, model_id=i, num_targets=m)
        for X, y in te:
            tk.score(batch=(X, y), num_samples=X.shape[0])
    S = torch.as_tensor(np.array(tk.finalize_scores(exp_name="test"))).T.double()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, S


def traker_compare(args) -> None:
    try:
        import trak  # noqa: F401
    except ImportError:
        print("traker is not installed (pip install traker): skipped")
        return
    D = load_digits_split(1000, 200, seed=0)
    n, m = 1000, 200
    tr, te = batches(D.x_train, D.y_train, batch_size=250), batches(D.x_test, D.y_test, batch_size=200)
    mg = classification_margin()
    out = []
    for H in [int(h) for h in str(args.hidden).split(",")]:
        mf = lambda H=H: make_mlp((64, H, 10))  # noqa: E731
        kw = dict(steps=300, lr=1e-2, weight_decay=1e-3)
        gt = lds_ground_truth(mf, (D.x_train, D.y_train), (D.x_test, D.y_test), n_subsets=args.subsets,
                              n_runs=args.runs, cache=Path(args.cache) / f"MLP_64-{H}-10", progress=True, **kw)
        models = load_models(mf, train_models(mf, D.x_train, D.y_train, seeds=list(range(args.models)), **kw))
        task = Task.from_classifier(copy.deepcopy(models[0]))
        N = task.n_params
        d = _sketch_d(N, args.d)
        configs = [tuple(c.split(":")) for c in args.kinds.split(",")]
        for M in sorted({1, args.models}):
            states = [{k: v.detach().clone() for k, v in mm.state_dict().items()} for mm in models[:M]]
            gs: dict = {c: ([], [], [], None) for c in configs}  # fit s, features s, score s, scores
            tk_f, tk_p, tk_s = [], [], []
            for rep in range(args.reps):  # interleaved: gradsketch (each config), traker, gradsketch, ...
                for c in configs:
                    kind, mode = c
                    t = time.perf_counter()
                    a = Attributor(task, "trak", sketch=dict(kind=kind, d=d, seed=0), mode=mode, margin_fn=mg,
                                   models=states).fit(tr, progress=False)
                    gs[c][0].append(time.perf_counter() - t)
                    gs[c][1].append(a.timings_["featurise"])
                    t = time.perf_counter()
                    S = a.score(te, progress=False)
                    gs[c][2].append(time.perf_counter() - t)
                    gs[c] = (*gs[c][:3], S)
                    print(f"H={H} M={M} rep {rep}: gradsketch {kind}/{mode} fit {gs[c][0][-1]:.2f}s (features "
                          f"{gs[c][1][-1]:.2f}s) score {gs[c][2][-1]:.2f}s", flush=True)
                tmp = Path(tempfile.mkdtemp(prefix="gs-traker-"))
                try:
                    f, fin, s2, S2 = _traker_run(copy.deepcopy(models[0]), states, tr, te, d, n, m, 1.0, tmp)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                tk_f.append(f + fin)
                tk_p.append(f)
                tk_s.append(s2)
                print(f"H={H} M={M} rep {rep}: traker featurize {f:.2f}s finalize {fin:.2f}s score {s2:.2f}s",
                      flush=True)
            L2 = lds(S2, gt.masks, gt.outputs).mean
            out.append([f"MLP 64-{H}-10 (N = {N})", d, M, "traker (TRAKer, CPU, normal projection)",
                        f"{n * M / np.median(tk_p):.0f}", f"{n * M / np.median(tk_f):.0f}", "1", "1", "1", L2])
            for c in configs:
                gs_f, gs_p, gs_s, S = gs[c]
                rf = np.array(tk_f) / np.array(gs_f)
                rp = np.array(tk_p) / np.array(gs_p)
                rs = np.array(tk_s) / np.array(gs_s)
                out.append([f"MLP 64-{H}-10 (N = {N})", d, M, f"gradsketch {c[0]}, {c[1]}",
                            f"{n * M / np.median(gs_p):.0f}", f"{n * M / np.median(gs_f):.0f}",
                            f"{np.median(rp):.1f}× ({rp.min():.1f}–{rp.max():.1f})",
                            f"{np.median(rf):.1f}× ({rf.min():.1f}–{rf.max():.1f})",
                            f"{np.median(rs):.1f}×", lds(S, gt.masks, gt.outputs).mean])
            for r in out[-len(configs) - 1:]:
                print(r, flush=True)
    print(f"\nTRAK pipeline comparison (CPU, {args.reps} interleaved repetitions, medians; ratio = traker time / "
          "gradsketch time per repetition)\n")
    print(_md(out, ["model", "d", "models", "pipeline", "features ex/s", "features + kernel ex/s",
                    "ratio features (range)", "ratio features + kernel (range)", "ratio score", "LDS"]))


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
    data = batches(X, y, batch_size=500)

    def train_pass() -> float:  # reference: a plain training pass (forward + backward, no optimizer)
        t = time.perf_counter()
        for xb, yb in data:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
        return time.perf_counter() - t

    train_pass()  # warm-up
    train_s = min(train_pass(), train_pass())
    rows = []
    for kind, mode in [("affd", "explicit"), ("sjlt", "factored")]:
        tmp = Path(tempfile.mkdtemp(prefix="gs-scale-"))
        try:
            t = time.perf_counter()
            a = Attributor(task, "grad-dot", sketch=dict(kind=kind, d=d, seed=0), mode=mode, store=tmp).fit(
                data, progress=True)
            dt = time.perf_counter() - t
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            t = time.perf_counter()
            tk = a.topk(batches(X[:1000], y[:1000], batch_size=500), k=10, progress=False)
            tk_s = time.perf_counter() - t
            rows.append([f"{kind}, {mode}", n, f"{n / dt:.0f}", f"{train_s / dt:.2f}", f"{size / 2**20:.1f} MiB",
                         f"{1000 * n / tk_s:.3g}"])
            del tk
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nFashion-MNIST scale: CNN N = {task.n_params}, d = {d}, {n} training images; one training pass "
          f"(batch 500, forward + backward) {n / train_s:.0f} examples/s\n")
    print(_md(rows, ["sketch", "examples", "featurise examples/s (store written)", "ratio to a training pass",
                     "store size", "top-10 pairs/s (1000 test)"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="all", choices=["quality", "arnoldi-seeds", "traker", "scale", "all"])
    p.add_argument("--hidden", default="32", help="hidden widths of the digits MLPs, comma-separated (e.g. 32,128)")
    p.add_argument("--models", type=int, default=5, help="TRAK ensemble size (independently trained models)")
    p.add_argument("--reps", type=int, default=3, help="interleaved timing repetitions (traker)")
    p.add_argument("--kinds", default="affd:explicit,sjlt:factored",
                   help="gradsketch sketch kind:mode pairs compared with traker (comma-separated)")
    p.add_argument("--seeds", type=int, default=5, help="Arnoldi start-vector seeds (arnoldi-seeds)")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--only", default="")
    p.add_argument("--methods", nargs="*", default=None,
                   help="quality: only the rows whose label contains one of these")
    p.add_argument("--n-scale", type=int, default=60000)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradsketch-lds"))
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.what in ("quality", "all"):
        quality(args)
    if args.what in ("arnoldi-seeds", "all"):
        arnoldi_seeds(args)
    if args.what in ("traker", "all"):
        traker_compare(args)
    if args.what in ("scale", "all"):
        scale(args)


if __name__ == "__main__":
    sys.exit(main())
