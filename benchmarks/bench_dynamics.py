"""CMD of training dynamics on Fashion-MNIST with a LeNet-5-like CNN: final iterate vs EMA vs SWA vs
post-hoc / online / embedded CMD, several seeds, paired differences with 95% confidence intervals.

Per seed, ONE training run (SGD) produces the trajectory that every averaging method reads: the final
iterate, EMA and SWA (torch.optim.swa_utils, their decay / start chosen on a validation split), online
CMD (modes fixed after a warm-up, (a, b) updated each epoch) and post-hoc CMD (on the recorded trajectory
on disk). Embedded CMD changes training, so it is a second run from the same seed (same initialisation
and batch order; identical to the first run until the first embedding).

Run:  PYTHONPATH=src python benchmarks/bench_dynamics.py --seeds 5 --epochs 30 --out /tmp/dyn
Writes a JSON of all numbers and PNG figures to --out and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import platform
import resource
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gradsketch.dynamics import (
    EmbeddedCMD,
    Layout,
    OnlineCMD,
    Trajectory,
    TrajectoryRecorder,
    accuracy,
    cmd,
    cmd_model,
    model_with_weights,
    plots,
)

ROOT = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load(n_train: int, n_val: int):
    X = read_idx(next(ROOT.glob("train-images*")), 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    y = read_idx(next(ROOT.glob("train-labels*")), 8).astype(np.int64)
    Xt = read_idx(next(ROOT.glob("t10k-images*")), 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    yt = read_idx(next(ROOT.glob("t10k-labels*")), 8).astype(np.int64)
    mean, std = X.mean(), X.std()
    perm = np.random.default_rng(12345).permutation(len(X))  # fixed split, the same for every seed
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]

    def t(a, b):
        return torch.from_numpy((a - mean) / std), torch.from_numpy(b)
    return t(X[tr], y[tr]), t(X[va], y[va]), t(Xt, yt)


class LeNet5(nn.Module):
    """LeNet-5-like: conv5(6)-pool-conv5(16)-pool-fc120-fc84-fc10, ReLU (61,706 parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


def batches(n: int, bs: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + bs] for s in range(0, n, bs)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_seed(seed: int, data, args, out: Path) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = data
    xc, yc = xte[:args.n_curve], yte[:args.n_curve]  # per-epoch curves on a test subset; final numbers on all
    torch.manual_seed(seed)
    net = LeNet5()
    init = copy.deepcopy(net.state_dict())
    lay = Layout.from_model(net)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    gen = torch.Generator().manual_seed(seed)
    order = [batches(len(xtr), args.batch, gen) for _ in range(args.epochs)]   # shared by both runs
    emas = {d: AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in args.ema_decays}
    swas = {s: AveragedModel(net) for s in args.swa_starts}
    traj_dir = out / f"traj_seed{seed}"
    rec = TrajectoryRecorder(traj_dir, net, n_snapshots=args.epochs)
    online = OnlineCMD(net, n_modes=args.modes, warmup=args.warmup, n_samples=args.samples, seed=seed)
    t_train = t_ema = t_swa = t_rec = t_online = 0.0
    curves: dict[str, list[float]] = {"final iterate": [], "online CMD": []}
    for epoch in range(args.epochs):
        net.train()
        for idx in order[epoch]:
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            for ema in emas.values():
                ema.update_parameters(net)
            t2 = time.perf_counter()
            t_train += t1 - t0
            t_ema += t2 - t1
        t0 = time.perf_counter()
        for s, swa in swas.items():
            if epoch + 1 >= s:
                swa.update_parameters(net)
        t1 = time.perf_counter()
        rec.on_epoch_end(net, epoch)
        t2 = time.perf_counter()
        online.update(net)
        t3 = time.perf_counter()
        t_swa += t1 - t0
        t_rec += t2 - t1
        t_online += t3 - t2
        curves["final iterate"].append(100 * accuracy(net, xc, yc))
        curves["online CMD"].append(100 * accuracy(online.model(net), xc, yc))
        for d, ema in emas.items():
            curves.setdefault(f"EMA {d}", []).append(100 * accuracy(ema.module, xc, yc))
        print(f"  seed {seed} epoch {epoch + 1}: loss {loss.item():.3f} test {curves['final iterate'][-1]:.2f} "
              f"online CMD {curves['online CMD'][-1]:.2f}", flush=True)
    rec.close()
    res: dict = {"seed": seed, "n_params": lay.n}
    res["final"] = {"test": 100 * accuracy(net, xte, yte), "train": 100 * accuracy(net, xtr, ytr),
                    "val": 100 * accuracy(net, xva, yva)}
    # EMA / SWA: pick the decay / start with the best validation accuracy at the end
    ema_val = {d: 100 * accuracy(m.module, xva, yva) for d, m in emas.items()}
    swa_val = {s: 100 * accuracy(m.module, xva, yva) for s, m in swas.items()}
    d_best = max(ema_val, key=ema_val.get)
    s_best = max(swa_val, key=swa_val.get)
    res["ema"] = {"choice": d_best, "val_by_choice": ema_val, "test": 100 * accuracy(emas[d_best].module, xte, yte),
                  "train": 100 * accuracy(emas[d_best].module, xtr, ytr)}
    res["swa"] = {"choice": s_best, "val_by_choice": swa_val, "test": 100 * accuracy(swas[s_best].module, xte, yte),
                  "train": 100 * accuracy(swas[s_best].module, xtr, ytr)}
    om = online.model(net)
    res["online"] = {"test": 100 * accuracy(om, xte, yte), "train": 100 * accuracy(om, xtr, ytr),
                     "modes": online.result.n_modes}
    res["curves"] = {"final iterate": curves["final iterate"], "online CMD": curves["online CMD"],
                     "EMA": curves[f"EMA {d_best}"]}
    # post-hoc CMD on the recorded trajectory (on disk)
    tr = Trajectory.open(traj_dir)
    posthoc = {}
    for m in args.posthoc_modes:
        t0 = time.perf_counter()
        r = cmd(tr, n_modes=m, n_samples=args.samples, seed=seed)
        dt = time.perf_counter() - t0
        final = cmd_model(net, r, t=-1)
        posthoc[m] = {"modes": r.n_modes, "rel_error": r.rel_error, "layer_error": r.layer_error,
                      "test": 100 * accuracy(final, xte, yte), "train": 100 * accuracy(final, xtr, ytr),
                      "seconds": dt}
        if m == args.modes:
            res["curves"]["post-hoc CMD"] = [100 * accuracy(cmd_model(net, r, t=k), xc, yc)
                                             for k in range(r.n_snapshots)]
            if seed == args.seeds[0]:
                plots.reference_trajectories(r).savefig(out / "cmd_references.png")
                plots.mode_membership(r).savefig(out / "cmd_membership.png")
    res["posthoc"] = posthoc
    # SWA curve for the chosen start, by replaying the recorded trajectory (equal average of snapshots)
    swa_curve, acc = [], None
    for k in range(args.epochs):
        w = torch.from_numpy(tr.snapshot(k)).double()
        if k + 1 >= s_best:
            acc = w if acc is None else acc + w
            swa_curve.append(100 * accuracy(model_with_weights(net, lay, acc / (k + 2 - s_best)), xc, yc))
        else:
            swa_curve.append(float("nan"))
    res["curves"]["SWA"] = swa_curve
    # embedded CMD: a second run from the same init and batch order
    torch.manual_seed(seed)
    net2 = LeNet5()
    net2.load_state_dict(init)
    emb = EmbeddedCMD(net2, lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=args.wd),
                      n_modes=args.modes, warmup=args.warmup, every=args.embed_every, percent=args.embed_percent,
                      n_samples=args.samples, seed=seed)
    t_emb = 0.0
    emb_curve = []
    for epoch in range(args.epochs):
        emb.train()
        t0 = time.perf_counter()
        for idx in order[epoch]:
            loss = nn.functional.cross_entropy(emb(xtr[idx]), ytr[idx])
            emb.optimizer.zero_grad()
            loss.backward()
            emb.optimizer.step()
        emb.epoch_end()
        t_emb += time.perf_counter() - t0
        emb_curve.append(100 * accuracy(emb.model(), xc, yc))
    em = emb.model()
    res["embedded"] = {"test": 100 * accuracy(em, xte, yte), "train": 100 * accuracy(em, xtr, ytr),
                       "trainable_end": emb.n_trainable, "frozen_end": emb.n_frozen, "history": emb.history}
    res["curves"]["embedded CMD"] = emb_curve
    e = args.epochs
    res["time_per_epoch_ms"] = {"train (SGD step)": 1e3 * t_train / e, "EMA update (all decays)": 1e3 * t_ema / e,
                                "EMA update (per decay)": 1e3 * t_ema / e / len(emas),
                                "SWA update (all starts)": 1e3 * t_swa / e, "trajectory recorder": 1e3 * t_rec / e,
                                "online CMD update": 1e3 * t_online / e,
                                "embedded CMD epoch (train + CMD)": 1e3 * t_emb / e}
    n = lay.n
    res["state_mb"] = {"EMA (per decay)": 4 * n / 2**20, "SWA (per start)": 4 * n / 2**20,
                       "online CMD after warm-up (float64 mean, co-moment; int32 modes)": (8 + 8 + 4) * n / 2**20,
                       "online CMD warm-up buffer (float64)": 8 * n * args.warmup / 2**20,
                       "trajectory on disk (float32)": 4 * n * e / 2**20}
    res["peak_rss_mb"] = rss_mb()
    return res


def ci(diffs):
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan")
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(h)


def report(all_res: list[dict], args, out: Path) -> str:
    lines = []
    methods = [("final iterate", lambda r: r["final"]), ("EMA", lambda r: r["ema"]), ("SWA", lambda r: r["swa"]),
               (f"post-hoc CMD (M={args.modes}, reconstructed final)", lambda r: r["posthoc"][args.modes]),
               (f"online CMD (M={args.modes}, F={args.warmup})", lambda r: r["online"]),
               (f"embedded CMD (M={args.modes}, F={args.warmup}, L={args.embed_every}, P={args.embed_percent}%)",
                lambda r: r["embedded"])]
    lines.append("| method | test acc. (mean ± sd) | paired diff. vs final, 95% CI | train acc. | modes |")
    lines.append("|---|---|---|---|---|")
    base = [r["final"]["test"] for r in all_res]
    for name, get in methods:
        te = [get(r)["test"] for r in all_res]
        trn = [get(r)["train"] for r in all_res]
        mean_d, h = ci(np.array(te) - np.array(base))
        modes = "-"
        if "CMD" in name and "embedded" not in name:
            modes = ", ".join(str(get(r)["modes"]) for r in all_res)
        diff = "-" if name == "final iterate" else f"{mean_d:+.2f} ± {h:.2f}"
        lines.append(f"| {name} | {np.mean(te):.2f} ± {np.std(te, ddof=1):.2f} | {diff} | {np.mean(trn):.2f} | "
                     f"{modes} |")
    lines.append("")
    lines.append("EMA decay chosen per seed: " + ", ".join(str(r["ema"]["choice"]) for r in all_res)
                 + "; SWA start epoch chosen per seed: " + ", ".join(str(r["swa"]["choice"]) for r in all_res))
    lines.append("")
    lines.append("Post-hoc CMD against M (reconstructed final model; mean over seeds):")
    lines.append("")
    lines.append("| M | modes found | rel. reconstruction error (all snapshots) | test acc. | diff. vs trained, "
                 "95% CI | CMD seconds |")
    lines.append("|---|---|---|---|---|---|")
    for m in args.posthoc_modes:
        te = [r["posthoc"][m]["test"] for r in all_res]
        md, h = ci(np.array(te) - np.array(base))
        lines.append(f"| {m} | {np.mean([r['posthoc'][m]['modes'] for r in all_res]):.1f} | "
                     f"{np.mean([r['posthoc'][m]['rel_error'] for r in all_res]):.4f} | {np.mean(te):.2f} | "
                     f"{md:+.2f} ± {h:.2f} | {np.mean([r['posthoc'][m]['seconds'] for r in all_res]):.2f} |")
    lines.append("")
    lines.append("Time per epoch (ms, mean over seeds) and state:")
    lines.append("")
    lines.append("| component | ms / epoch | ratio to the SGD training epoch |")
    lines.append("|---|---|---|")
    keys = list(all_res[0]["time_per_epoch_ms"])
    tr_ms = np.mean([r["time_per_epoch_ms"]["train (SGD step)"] for r in all_res])
    for k in keys:
        v = np.mean([r["time_per_epoch_ms"][k] for r in all_res])
        lines.append(f"| {k} | {v:.1f} | {v / tr_ms:.3f} |")
    lines.append("")
    lines.append("| state | MB |")
    lines.append("|---|---|")
    for k, v in all_res[0]["state_mb"].items():
        lines.append(f"| {k} | {v:.2f} |")
    lines.append("")
    emb = all_res[0]["embedded"]
    lines.append(f"Embedded CMD, seed {all_res[0]['seed']}: trainable parameters at the end {emb['trainable_end']:,} "
                 f"of {all_res[0]['n_params']:,} (frozen {emb['frozen_end']:,}); embeddings "
                 + ", ".join(f"epoch {h['epoch']}: {h['frozen']:,} frozen" for h in emb["history"]))
    lines.append(f"Peak RSS of the benchmark process: {max(r['peak_rss_mb'] for r in all_res):.0f} MB")
    # figures: mean accuracy curves, reconstruction error vs M
    curves = {}
    for k in all_res[0]["curves"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # SWA is NaN before its start epoch
            curves[k] = np.nanmean(np.array([r["curves"][k] for r in all_res], dtype=float), axis=0)
    fig = plots.accuracy_curves({k: v for k, v in curves.items()}, title=f"LeNet-5 / Fashion-MNIST, mean of "
                                f"{len(all_res)} seeds ({args.n_curve} test images)")
    ax = fig.axes[0]
    lo = min(np.nanmin(v[args.epochs // 3:]) for v in curves.values())
    ax.set_ylim(lo - 0.5, max(np.nanmax(v) for v in curves.values()) + 0.3)
    fig.savefig(out / "cmd_accuracy_curves.png")
    errs = {"relative error": [np.mean([r["posthoc"][m]["rel_error"] for r in all_res]) for m in args.posthoc_modes]}
    plots.reconstruction_error(args.posthoc_modes, errs).savefig(out / "cmd_error_vs_modes.png")
    accs = {"reconstructed final": [np.mean([r["posthoc"][m]["test"] for r in all_res]) for m in args.posthoc_modes],
            "trained final": [np.mean(base)] * len(args.posthoc_modes)}
    plots.reconstruction_error(args.posthoc_modes, accs, ylabel="test accuracy (%)").savefig(
        out / "cmd_accuracy_vs_modes.png")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-val", type=int, default=5000)
    p.add_argument("--n-curve", type=int, default=2000, help="test images for the per-epoch curves")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--posthoc-modes", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--embed-every", type=int, default=5)
    p.add_argument("--embed-percent", type=float, default=20.0)
    p.add_argument("--ema-decays", type=float, nargs="+", default=[0.99, 0.998, 0.999])
    p.add_argument("--swa-starts", type=int, nargs="+", default=[10, 15, 20, 25])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_dynamics"))
    p.add_argument("--report-only", action="store_true", help="tables and figures from --out/results.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.swa_starts = [s for s in args.swa_starts if s <= args.epochs] or [max(1, args.epochs // 2)]
    if args.report_only:
        all_res = json.loads((args.out / "results.json").read_text())
        for r in all_res:
            r["posthoc"] = {int(k): v for k, v in r["posthoc"].items()}
        print(f"# report of {len(all_res)} seeds from {args.out / 'results.json'}")
        print(report(all_res, args, args.out))
        return
    print(f"# bench_dynamics {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}; "
          f"settings {vars(args)}", flush=True)
    data = load(args.n_train, args.n_val)
    all_res = []
    for seed in args.seeds:
        t0 = time.time()
        all_res.append(run_seed(seed, data, args, args.out))
        print(f"seed {seed} done in {time.time() - t0:.0f} s", flush=True)
        (args.out / "results.json").write_text(json.dumps(all_res, indent=1, default=str))
    print(report(all_res, args, args.out))


if __name__ == "__main__":
    main()
