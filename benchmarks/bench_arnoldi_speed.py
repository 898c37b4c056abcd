"""Arnoldi influence fit time and LDS: today's default against block Lanczos with subsampled Hessian data and a
residual stop (issue 20). Ratios are to the default measured in the same run.

    python benchmarks/bench_arnoldi_speed.py mlp      # digits MLP 64-48-10 (N = 3,610), 1,000 train / 200 test
    python benchmarks/bench_arnoldi_speed.py cnn      # CNN conv-conv-linear (N = 5,994), 4,000 Fashion-MNIST
    python benchmarks/bench_arnoldi_speed.py sweep-mlp / sweep-cnn   # the option sweep behind the defaults
    python benchmarks/bench_arnoldi_speed.py tail-mlp / tail-cnn     # session 6: the tail, smaller spaces
    python benchmarks/bench_arnoldi_speed.py start-mlp / start-cnn   # session 7: gradient start, dim, top_k

Session 7 ran ``mlp --subsets 64`` and ``cnn --subsets 32``, both with ``--damping 0.003`` (the library default)
and ``--cache`` outside any work tree (the ground truth takes 2 min for the MLP, 17 min for the CNN, loaded).
LDS is reported on all targets and on the two halves of a fixed split (:func:`halves`): defaults are chosen
on the first (validation) half, the second is the one reported.

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


def halves(n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation and report halves of the LDS targets (session 7): a fixed permutation (numpy seed 0), first
    half validation (defaults are chosen on it), second half reported."""
    perm = np.random.default_rng(0).permutation(n_test)
    return perm[: n_test // 2], perm[n_test // 2:]


def fit_once(task, data, te, gt, opts: dict, damping: float) -> dict:
    """One ``Attributor(task, "arnoldi", **opts)`` fit: process CPU seconds (1 thread: robust to the load of a
    shared machine), wall seconds, Krylov work, LDS (all targets, validation half, report half)."""
    c0, t0 = time.process_time(), time.perf_counter()
    a = Attributor(task, "arnoldi", damping=damping, **opts).fit(data, progress=False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    S = a.score(batches(*te, batch_size=200), progress=False)
    per = lds(S, gt.masks, gt.outputs).per_target
    val, rep = halves(len(per))
    return dict(cpu=cpu, wall=wall, krylov=a.krylov_, lds=float(np.nanmean(per)), val=float(np.nanmean(per[val])),
                rep=float(np.nanmean(per[rep])), timings={k: round(v, 2) for k, v in a.timings_.items()})


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
    # rounds over all variants (the load drifts: each round sees it alike); CPU and wall seconds are medians
    cpu: dict[int, list] = {i: [] for i in range(len(variants) + 2)}
    wall: dict[int, list] = {i: [] for i in range(len(variants) + 2)}
    first: dict[int, dict] = {}
    for rnd in range(args.repeats):
        for i, (label, opts) in enumerate(variants):
            if i == 0 and rnd >= args.base_repeats:
                continue
            r = fit_once(task, data, te, gt, opts, args.damping)
            first.setdefault(i, r)
            cpu[i].append(r["cpu"])
            wall[i].append(r["wall"])
            print(f"round {rnd}: {label}: CPU {r['cpu']:.3f} s, LDS {r['lds']:.3f}", r["krylov"], r["timings"],
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        for j, fn in ((len(variants), trak_fit), (len(variants) + 1, ekfac_fit)):
            t = fn(task, data)
            if t is not None:
                cpu[j].append(t[0])
                wall[j].append(t[1])
    med = {i: float(np.median(v)) for i, v in cpu.items() if v}
    medw = {i: float(np.median(v)) for i, v in wall.items() if v}
    rows = []
    for i, (label, _) in enumerate(variants):
        r, kr = first[i], first[i]["krylov"]
        rows.append([label, f"{med[i]:.3f}", f"{medw[i]:.1f}", f"{med[0] / med[i]:.1f}×", str(kr.get("passes")),
                     str(kr.get("dim")), str(kr.get("stop")), f"{r['lds']:.3f}", f"{r['val']:.3f} / {r['rep']:.3f}"])
    for j, label in ((len(variants), "TRAK default fit (reference)"),
                     (len(variants) + 1, "EK-FAC curvature fit, KFACOperator.fit (reference)")):
        if j in med:
            rows.append([label, f"{med[j]:.3f}", f"{medw[j]:.1f}", f"{med[0] / med[j]:.1f}×"] + [""] * 5)
    print(f"\n{which} (N = {task.n_params}; speed-up = ratio of median CPU seconds to the first row's, same run; "
          f"{args.repeats} rounds, the first row {min(args.repeats, args.base_repeats)}; load "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| variant | fit CPU s | fit wall s | speed-up | passes | Krylov dim | stop | LDS | LDS val / rep |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # numpy's BLAS too (the distill eigh): one thread, like torch
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["mlp", "cnn", "sweep-mlp", "sweep-cnn", "tail-mlp", "tail-cnn", "start-mlp",
                                    "start-cnn"])
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "gradsketch-arnoldi-lds"))
    p.add_argument("--subsets", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--damping", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=1, help="rounds of fits over all variants (median CPU time)")
    p.add_argument("--base-repeats", type=int, default=10 ** 9, help="at most this many for the first row")
    args = p.parse_args()
    which = args.what.split("-")[-1]
    n = 1000 if which == "mlp" else 4000
    variants: list[tuple[str, dict]] = [("before issue 20: Arnoldi 200 steps, top 100, all data", OLD_DEFAULT),
                                        ("default now", {})]
    if args.what in ("mlp", "cnn"):  # references: top 50 with today's rules, and the session-6 settings
        variants.append(("top 50 (session 6's top_k), Krylov dim 80", dict(top_k=50)))
        variants.append(("session-6 settings: top 50, block 32, Gaussian start, Krylov dim cap 200",
                         dict(top_k=50, block_size=32, n_iters=200, krylov_start="random")))
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
    elif args.what.startswith("start"):  # session 7: gradient vs Gaussian start, Krylov dimension, top_k
        for k, b, dim in [(50, 16, None), (50, 16, 96), (50, 32, None), (40, 16, None), (32, 16, None),
                          (64, 16, None)]:
            for start in ("gradients", "random"):
                variants.append((f"top {k}, block {b}, dim {dim or '1.5·top_k'}, {start} start",
                                 dict(top_k=k, block_size=b, n_iters=dim, krylov_start=start)))
    run(which, args, variants)


if __name__ == "__main__":
    sys.exit(main())
