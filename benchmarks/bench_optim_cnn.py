"""Deep learning: a small CNN on a Fashion-MNIST subset with Adam, our Shampoo, pytorch-optimizer's SOAP
(a peer Shampoo-family method, `bench` extra) and Sketchy at k ∈ {16, 64}.

Every optimiser runs on the same learning-rate grid and seeds; runs are interleaved (seed → lr →
optimiser) so that load from other processes on the shared CPU falls on all optimisers alike. Reported
per optimiser at its best lr (lowest mean final validation loss over seeds): final validation loss and
accuracy (mean ± std over seeds), validation curves against steps and against wall time (training time
only, evaluation excluded), time per training step (forward + backward + step) and per optimiser step,
and optimiser-state bytes measured from ``optimizer.state_dict()``. A separate Shampoo run records the
factor-spectrum diagnostic (share of each factor's trace in its top-k eigenvalues over training).

    python benchmarks/bench_optim_cnn.py [--quick] [--out benchmarks/results/optim]

One thread (torch.set_num_threads(1)); float32.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from gradsketch.optim import FactorSpectrumTracker, Shampoo, Sketchy

ROOT = Path("/usr/share/datasets/fashion-mnist")


def load_idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(ROOT / name, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion(n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:
    Xtr = load_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    ytr = load_idx("train-labels-idx1-ubyte.gz", 8)
    Xte = load_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    yte = load_idx("t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(0)
    tr, va = rng.permutation(len(ytr))[:n_train], rng.permutation(len(yte))[:n_val]

    def prep(X):
        return (torch.from_numpy(X.astype(np.float32)) / 255.0 - 0.2860) / 0.3530

    return prep(Xtr[tr]), torch.from_numpy(ytr[tr].astype(np.int64)), prep(Xte[va]), torch.from_numpy(
        yte[va].astype(np.int64))


def make_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))


def make_opt(name: str, model: nn.Module, lr: float, freq: int) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "shampoo":
        return Shampoo(model.parameters(), lr=lr, update_freq=freq)
    if name.startswith("sketchy"):
        return Sketchy(model.parameters(), lr=lr, rank=int(name[7:]), update_freq=freq)
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=0.0, precondition_frequency=freq)
    raise ValueError(name)


def state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in ``state_dict()['state']``; 'precond' excludes Adam-like moments/momentum."""
    total = precond = 0

    def walk(v, key=""):
        nonlocal total, precond
        if isinstance(v, torch.Tensor):
            b = v.numel() * v.element_size()
            total += b
            if key not in ("exp_avg", "exp_avg_sq", "graft_v", "momentum", "step"):
                precond += b
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, k if key in ("", "exp_avg", "exp_avg_sq") or not key.startswith("blocks") else key)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, key)

    for st in opt.state_dict()["state"].values():
        for k, v in st.items():
            walk(v, k if k != "blocks" else "blocks")
    return {"total": total, "precond": precond}


@torch.no_grad()
def evaluate(model, X, y):
    model.eval()
    out = torch.cat([model(X[i:i + 1000]) for i in range(0, len(X), 1000)])
    model.train()
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def run(name, lr, seed, data, args, tracker_ks=None):
    Xtr, ytr, Xva, yva = data
    torch.manual_seed(seed)
    model = make_cnn()
    opt = make_opt(name, model, lr, args.update_freq)
    tracker = FactorSpectrumTracker(opt, ks=tracker_ks, names=dict(model.named_parameters())) if tracker_ks else None
    g = torch.Generator().manual_seed(1000 + seed)
    steps_per_epoch = len(ytr) // args.batch
    curve, train_time, step_times, opt_times, step = [], 0.0, [], [], 0
    vl, va = evaluate(model, Xva, yva)
    curve.append((0, 0.0, vl, va))
    for _ in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch:(b + 1) * args.batch]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            step += 1
            train_time += t2 - t0
            step_times.append(t2 - t0)
            opt_times.append(t2 - t1)
            if not np.isfinite(loss.item()):
                return {"diverged": True, "curve": curve}
            if tracker is not None and step % 10 == 0:
                tracker.record(step)
            if step % args.eval_every == 0 or (step == args.epochs * steps_per_epoch):
                vl, va = evaluate(model, Xva, yva)
                curve.append((step, train_time, vl, va))
    out = {"diverged": False, "curve": curve, "final_loss": curve[-1][2], "final_acc": curve[-1][3],
           "median_step_s": statistics.median(step_times), "median_opt_step_s": statistics.median(opt_times),
           "mean_step_s": statistics.fmean(step_times), "mean_opt_step_s": statistics.fmean(opt_times),
           "state_bytes": state_bytes(opt), "n_params": sum(p.numel() for p in model.parameters())}
    if tracker is not None:
        out["tracker"] = tracker
    return out


def timing(args, data, names, lr=1e-3, rounds=8, chunk=10):
    """Interleaved step timing: each round runs ``chunk`` steps (one preconditioner refresh when
    update_freq = chunk) of every optimiser in turn, so background load falls on all alike. Returns, per
    optimiser, the median over rounds of the mean time per training step and per ``opt.step()``."""
    Xtr, ytr, _, _ = data
    g = torch.Generator().manual_seed(7)
    setups = {}
    for name in names:
        torch.manual_seed(0)
        model = make_cnn()
        setups[name] = (model, make_opt(name, model, lr, args.update_freq))
    per = {n: ([], []) for n in names}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (names if r % 2 else names[::-1]):
            model, opt = setups[name]
            tot = ot = 0.0
            for _ in range(chunk):
                idx = torch.randint(0, len(ytr), (args.batch,), generator=g)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                tot += t2 - t0
                ot += t2 - t1
            if r:
                per[name][0].append(tot / chunk)
                per[name][1].append(ot / chunk)
    return {n: {"step_ms": 1e3 * statistics.median(a), "opt_step_ms": 1e3 * statistics.median(b)}
            for n, (a, b) in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train", type=int, default=5120)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timing-rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--optims", nargs="+", default=["adam", "shampoo", "soap", "sketchy16", "sketchy64"])
    ap.add_argument("--update-freq", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/optim")
    ap.add_argument("--no-extras", action="store_true", help="skip the spectrum run and the step timing")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="no training: combine the cnn.json of several runs (e.g. more lrs) into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return
    if args.quick:
        args.train, args.val, args.epochs, args.seeds, args.lrs, args.timing_rounds = 1024, 500, 1, [0], [1e-3], 1
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = fashion(args.train, args.val)
    results: dict[str, dict[str, list]] = {o: {str(lr): [] for lr in args.lrs} for o in args.optims}
    t_start = time.time()
    for seed in args.seeds:
        for lr in args.lrs:
            for name in args.optims:
                r = run(name, lr, seed, data, args)
                results[name][str(lr)].append(r)
                print(f"seed {seed} lr {lr:<7g} {name:10s} " + ("diverged" if r["diverged"] else
                      f"val loss {r['final_loss']:.4f} acc {r['final_acc']:.4f} step {1e3 * r['median_step_s']:.1f} ms "
                      f"(opt {1e3 * r['median_opt_step_s']:.2f} ms) state {r['state_bytes']['total']} B "
                      f"[{time.time() - t_start:.0f} s]"), flush=True)
    if args.no_extras:
        summarise(results, args, out, {}, {})
        return
    # spectrum diagnostic: Shampoo at the middle lr, seed 0
    diag = run("shampoo", args.lrs[len(args.lrs) // 2], args.seeds[0], data, args, tracker_ks=(4, 16, 64))
    fig = diag["tracker"].figure(max_factors=8)
    fig.savefig(out / "cnn_factor_spectrum.png", dpi=110)
    spectrum_final = {k: v[-1][1] for k, v in diag["tracker"].history.items()}
    times = timing(args, data, args.optims, rounds=args.timing_rounds)
    summarise(results, args, out, spectrum_final, times)


def merge(args):
    """Rebuild the per-run results of several cnn.json files (final values are the curves' last points)."""
    results: dict[str, dict[str, list]] = {}
    spectrum, times, settings = {}, {}, None
    for d in args.merge:
        blob = json.loads((Path(d) / "cnn.json").read_text())
        settings = settings or blob["meta"]["settings"]
        spectrum = spectrum or blob.get("spectrum_final_step", {})
        times = times or blob.get("timing", {})
        n_steps = blob["meta"]["settings"]["epochs"] * (blob["meta"]["settings"]["train"]
                                                        // blob["meta"]["settings"]["batch"])
        for name, by_lr in blob["curves"].items():
            for lr, cs in by_lr.items():
                for c in cs:
                    ok = c[-1][0] == n_steps and np.isfinite(c[-1][2])
                    results.setdefault(name, {}).setdefault(lr, []).append(
                        {"diverged": not ok, "curve": c, "final_loss": c[-1][2], "final_acc": c[-1][3],
                         "state_bytes": blob["summary"].get(name, {}).get("state_bytes")})
    ns = argparse.Namespace(**{**settings, "lrs": sorted({float(lr) for b in results.values() for lr in b})})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summarise(results, ns, Path(args.out), spectrum, times)


def sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(results, args, out, spectrum_final, times):
    best, summary = {}, {}
    for name, by_lr in results.items():
        cands = []
        for lr, runs in by_lr.items():
            if runs and not any(r["diverged"] for r in runs):
                cands.append((statistics.fmean(r["final_loss"] for r in runs), lr))
        if not cands:
            continue
        _, lr = min(cands)
        best[name] = lr
        runs = by_lr[lr]
        summary[name] = {
            "best_lr": float(lr),
            "val_loss_mean": statistics.fmean(r["final_loss"] for r in runs),
            "val_loss_std": sd([r["final_loss"] for r in runs]),
            "val_acc_mean": statistics.fmean(r["final_acc"] for r in runs),
            "val_acc_std": sd([r["final_acc"] for r in runs]),
            "state_bytes": next((r["state_bytes"] for rs in by_lr.values() for r in rs if r.get("state_bytes")),
                                None),
            "all_lrs": {lr2: [r.get("final_loss") for r in rs] for lr2, rs in by_lr.items()},
        }
    meta = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch "
                       f"{torch.__version__}, 1 thread", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {k: v for k, v in vars(args).items()}}
    curves = {n: {lr: [r["curve"] for r in rs] for lr, rs in by_lr.items()} for n, by_lr in results.items()}
    (out / "cnn.json").write_text(json.dumps({"meta": meta, "summary": summary, "curves": curves,
                                              "spectrum_final_step": spectrum_final, "timing": times}, indent=1))
    # plots: validation loss / accuracy against steps and wall time at each optimiser's best lr (mean of seeds)
    fig = Figure(figsize=(11, 7.5))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    for name, lr in best.items():
        cs = [np.array(c) for c in curves[name][lr]]
        n = min(len(c) for c in cs)
        m = np.mean([c[:n] for c in cs], axis=0)
        lab = f"{name} (lr {float(lr):g})"
        axes[0].plot(m[:, 0], m[:, 2], label=lab)
        axes[1].plot(m[:, 1], m[:, 2], label=lab)
        axes[2].plot(m[:, 0], m[:, 3], label=lab)
        axes[3].plot(m[:, 1], m[:, 3], label=lab)
    for ax, (xl, yl) in zip(axes, [("step", "val loss"), ("training wall time (s)", "val loss"),
                                   ("step", "val accuracy"), ("training wall time (s)", "val accuracy")]):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if "loss" in yl:
            ax.set_ylim(0.3, 1.0)
        else:
            ax.set_ylim(0.65, 0.92)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST CNN, {args.train} train / {args.val} val, {args.epochs} epochs, batch {args.batch}, "
                 f"mean of {len(args.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(out / "cnn_curves.png", dpi=100)
    # markdown
    sh = summary.get("shampoo")
    print(f"\nmachine: {meta['machine']}; date {meta['date']}\n")
    print("| optimiser | best lr | val loss | val acc | val loss / Shampoo | state bytes (preconditioner) "
          "| precond. / Shampoo |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        sr = f"{s['state_bytes']['precond'] / sh['state_bytes']['precond']:.3f}" if sh else "-"
        lr_ = f"{s['val_loss_mean'] / sh['val_loss_mean']:.3f}" if sh else "-"
        print(f"| {name} | {s['best_lr']:g} | {s['val_loss_mean']:.4f} ± {s['val_loss_std']:.4f} | "
              f"{s['val_acc_mean']:.4f} ± {s['val_acc_std']:.4f} | {lr_} | {s['state_bytes']['total']} "
              f"({s['state_bytes']['precond']}) | {sr} |")
    print("\ninterleaved step timing (median over rounds of 10 steps; update_freq = "
          f"{args.update_freq}):\n")
    print("| optimiser | train step ms | × Adam | opt.step ms | × Adam's opt.step |")
    print("|---|---|---|---|---|")
    ta = times.get("adam") if times else None
    for name, t in (times or {}).items():
        r1 = f"{t['step_ms'] / ta['step_ms']:.2f}" if ta else "-"
        r2 = f"{t['opt_step_ms'] / ta['opt_step_ms']:.1f}" if ta else "-"
        print(f"| {name} | {t['step_ms']:.1f} | {r1} | {t['opt_step_ms']:.2f} | {r2} |")
    print("\nfinal loss per lr (seeds):")
    for name, s in summary.items():
        print(f"  {name}: " + "; ".join(f"lr {lr}: " + ", ".join(f"{v:.4f}" if v is not None else "div" for v in vs)
                                       for lr, vs in s["all_lrs"].items()))
    print("\nfactor spectrum at the last record (share of trace in top k):")
    for k, v in (spectrum_final or {}).items():
        print(f"  {k}: " + ", ".join(f"top{kk} {vv:.3f}" for kk, vv in v.items()))


if __name__ == "__main__":
    main()
