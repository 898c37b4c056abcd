"""Arnoldi influence fit time and LDS: today's default against block Lanczos with subsampled Hessian data and a
residual stop (issue 20). Ratios are to the default measured in the same run.

    python benchmarks/bench_arnoldi_speed.py mlp      # digits MLP 64-48-10 (N = 3,610), 1,000 train / 200 test
    python benchmarks/bench_arnoldi_speed.py cnn      # CNN conv-conv-linear (N = 5,994), 4,000 Fashion-MNIST
    python benchmarks/bench_arnoldi_speed.py sweep-mlp / sweep-cnn   # the option sweep behind the defaults

Every variant is ``Attributor(task, "arnoldi", **options).fit(train)`` (eigenpairs + projection of the training
gradients on them), then ``score(test)``. Speed is the ratio of fit CPU seconds (``time.process_time``, one torch
thread: far less sensitive than wall time to the other jobs of a shared machine) to the first row, the
pre-issue-20 algorithm (single-vector Arnoldi, 200 steps, top 100, all the training data), in the same run.
LDS ground truth: retraining on 50% subsets (cached under --cache). TRAK's default fit is timed as a reference.
Run under ``nice``. Results: results/arnoldi_speed.md.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradsketch.attribution import Attributor, batches
from gradsketch.eval import lds, lds_ground_truth, load_digits_split, load_models, make_mlp, train_models
from gradsketch.model import Task

FASHION = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


def _idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def setup(which: str, cache: Path, subsets: int, runs: int):
    """(task, train (X, y), test (X, y), ground truth, damping, batch size)."""
    if which == "mlp":
        D = load_digits_split(1000, 200, seed=0)
        kw = dict(steps=300, lr=1e-2, weight_decay=1e-3)

        def mf():
            return make_mlp((64, 48, 10))
        tr, te = (D.x_train, D.y_train), (D.x_test, D.y_test)
    else:
        X = torch.tensor(_idx(f"{FASHION}/train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)[:4000] / 255.0,
                         dtype=torch.float32)
        y = torch.tensor(_idx(f"{FASHION}/train-labels-idx1-ubyte.gz", 8)[:4000].astype(np.int64))
        Xt = torch.tensor(_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)[:200] / 255.0,
                          dtype=torch.float32)
        yt = torch.tensor(_idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz", 8)[:200].astype(np.int64))
        kw = dict(steps=300, lr=3e-3, weight_decay=1e-3, batch_size=500)
        mf = _cnn
        tr, te = (X, y), (Xt, yt)
    t = time.perf_counter()
    gt = lds_ground_truth(mf, tr, te, n_subsets=subsets, n_runs=runs, cache=cache / f"{which}_{subsets}x{runs}",
                          progress=True, group=8, **kw)
    print(f"ground truth {subsets} subsets × {runs} runs: {time.perf_counter() - t:.0f} s", flush=True)
    model = load_models(mf, train_models(mf, tr[0], tr[1], seeds=[0], **kw))[0]
    return Task.from_classifier(model), tr, te, gt


OLD_DEFAULT = dict(block_size=1, n_iters=200, top_k=100, curvature="hessian", hessian_subsample=None,
                   tail=False)  # pre-issue 20


def fit_once(task, data, te, gt, opts: dict, damping: float) -> dict:
    """One ``Attributor(task, "arnoldi", **opts)`` fit: process CPU seconds (1 thread: robust to the load of a
    shared machine), wall seconds, Krylov work, LDS."""
    c0, t0 = time.process_time(), time.perf_counter()
    a = Attributor(task, "arnoldi", damping=damping, **opts).fit(data, progress=False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    S = a.score(batches(*te, batch_size=200), progress=False)
    return dict(cpu=cpu, wall=wall, krylov=a.krylov_, lds=float(lds(S, gt.masks, gt.outputs).mean),
                timings={k: round(v, 2) for k, v in a.timings_.items()})


def trak_fit(task, data) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    Attributor(task, "trak").fit(data, progress=False)
    return time.process_time() - c0, time.perf_counter() - t0


def ekfac_fit(task, data) -> tuple[float, float] | None:
    """The library's EK-FAC curvature (K-FAC eigenbasis + exact eigenvalue correction, exact GGN), if present."""
    try:
        from gradsketch.curvature.kfac import KFACOperator
    except ImportError:
        return None
    c0, t0 = time.process_time(), time.perf_counter()
    KFACOperator.fit(task, data, kind="ekfac")
    return time.process_time() - c0, time.perf_counter() - t0


def run(which: str, args, variants) -> None:
    torch.set_num_threads(1)
    task, tr, te, gt = setup(which, Path(args.cache), args.subsets, args.runs)
    data = batches(*tr, batch_size=250)
    # warm-up: the first vmap/jvp of a process compiles (a one-time ~2 s); neither algorithm is charged for it
    for opts in (OLD_DEFAULT, {}):
        Attributor(task, "arnoldi", **dict(opts, n_iters=8, top_k=4)).fit(data[:1], progress=False)
    print(f"{which}: N = {task.n_params}, train {len(tr[0])}, test {len(te[0])}, damping {args.damping}, "
          f"LDS ground truth {args.subsets} subsets x {args.runs} runs, load {os.getloadavg()[0]:.1f}", flush=True)
    rows, base = [], None
    for label, opts in variants:
        r = fit_once(task, data, te, gt, opts, args.damping)
        base = base or r
        kr = r["krylov"]
        rows.append([label, f"{r['cpu']:.2f}", f"{r['wall']:.1f}", f"{base['cpu'] / r['cpu']:.1f}×",
                     str(kr.get("passes")), str(kr.get("dim")), str(kr.get("stop")), f"{r['lds']:.3f}"])
        print(rows[-1], r["timings"], f"load {os.getloadavg()[0]:.1f}", flush=True)
    tc, tw = trak_fit(task, data)
    rows.append(["TRAK default fit (reference)", f"{tc:.2f}", f"{tw:.1f}", f"{base['cpu'] / tc:.1f}×", "", "", "", ""])
    ek = ekfac_fit(task, data)
    if ek is not None:
        rows.append(["EK-FAC curvature fit, KFACOperator.fit (reference)", f"{ek[0]:.2f}", f"{ek[1]:.1f}",
                     f"{base['cpu'] / ek[0]:.1f}×", "", "", "", ""])
    print(f"\n{which} (N = {task.n_params}; speed-up = CPU-time ratio to the first row, same run)\n")
    print("| variant | fit CPU s | fit wall s | speed-up | passes | Krylov dim | stop | LDS |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # numpy's BLAS too (the distill eigh): one thread, like torch
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["mlp", "cnn", "sweep-mlp", "sweep-cnn", "tail-mlp", "tail-cnn"])
    p.add_argument("--cache", default=os.path.join("/tmp", "gradsketch-arnoldi-lds"))
    p.add_argument("--subsets", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--damping", type=float, default=0.0)
    args = p.parse_args()
    which = args.what.split("-")[-1]
    n = 1000 if which == "mlp" else 4000
    variants: list[tuple[str, dict]] = [("before issue 20: Arnoldi 200 steps, top 100, all data", OLD_DEFAULT),
                                        ("default now", {})]
    if args.what == "sweep-mlp":
        for curv in ("hessian", "ggn"):
            for b, dim in [(32, 192), (64, 192), (64, 256)]:
                for sub in [None, n // 4]:
                    variants.append((f"{curv} b={b} dim={dim} sub={sub or 'all'}",
                                     dict(curvature=curv, block_size=b, n_iters=dim, hessian_subsample=sub)))
    elif args.what == "sweep-cnn":  # fewer: one pre-issue-20 fit here is ~70 CPU seconds
        for curv, sub in [("ggn", None), ("hessian", n // 4), ("ggn", n // 4), ("ggn", n // 8)]:
            variants.append((f"{curv} b=32 dim=200 sub={sub or 'all'}",
                             dict(curvature=curv, block_size=32, n_iters=200, hessian_subsample=sub)))
    elif args.what.startswith("tail"):  # the complement of the kept eigenspace (tail=True) and smaller spaces
        variants = [variants[0], ("block Lanczos defaults, tail=False (the issue-20 default)", dict(tail=False)),
                    ("block Lanczos defaults, tail=True", dict(tail=True))]
        for k, dim, sub in [(50, 128, None), (32, 96, None), (32, 96, n // 2), (32, 64, None)]:
            variants.append((f"tail=True, top {k}, dim {dim}, curvature examples {sub or 'default'}",
                             dict(tail=True, top_k=k, n_iters=dim, hessian_subsample=sub or 1000)))
    run(which, args, variants)


if __name__ == "__main__":
    sys.exit(main())
