"""Post-hoc CMD of a REDUCED MiniLM fine-tune on Rotten Tomatoes: reconstruction error and accuracy against M.

Reduced, as in bench_optim_minilm.py (whose data loader and model top it reuses): pretrained MiniLM-L6
frozen up to layer 5, the hidden states entering the last layer cached once, only the last transformer
layer and a linear head train (1.78M parameters). Adam, snapshots every --every steps recorded with
TrajectoryRecorder; post-hoc CMD with M modes on the trajectory on disk; validation accuracy of the
reconstructed final model against the trained one.

    python benchmarks/bench_dynamics_minilm.py [--train 640 --val 500 --epochs 3 --every 6]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_optim_minilm import Top, frozen_features  # noqa: E402

from gradsketch.dynamics import Trajectory, TrajectoryRecorder, cmd, cmd_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--modes", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    enc, (Htr, Mtr, ytr), (Hva, Mva, yva), (tr, va) = frozen_features(args.train, args.val, args.max_len)

    def ext_fn(mask):
        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    @torch.no_grad()
    def acc(model, H, M, y):
        model = copy.deepcopy(model).eval()
        return 100 * float((model(H, M).argmax(1) == y).float().mean())

    torch.manual_seed(args.seed)
    model = Top(copy.deepcopy(enc.encoder.layer[5]), ext_fn, args.seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = len(ytr) // args.batch
    n_snap = args.epochs * steps // args.every
    path = os.path.join(tempfile.mkdtemp(), "traj")
    rec = TrajectoryRecorder(path, model, n_snapshots=n_snap, every=args.every, unit="step")
    g = torch.Generator().manual_seed(100 + args.seed)
    step = 0
    t0 = time.time()
    for _ in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for b in range(steps):
            idx = perm[b * args.batch:(b + 1) * args.batch]
            loss = torch.nn.functional.cross_entropy(model(Htr[idx], Mtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.on_step(model, step)
            step += 1
    rec.close()
    train_s = time.time() - t0
    trained = acc(model, Hva, Mva, yva)
    traj = Trajectory.open(path)
    print(f"MiniLM-L6 last layer + head, N = {traj.n:,} parameters, {traj.n_snapshots} snapshots (every "
          f"{args.every} of {step} Adam steps, lr {args.lr}, batch {args.batch}), {len(ytr)} train / {len(yva)} "
          f"val snippets, {args.max_len} tokens, seed {args.seed}; training {train_s:.0f} s; trained model val "
          f"acc. {trained:.2f}%\n")
    print("| M | modes found | rel. reconstruction error (all snapshots) | worst layer error | val acc. of "
          "reconstructed final | diff. vs trained | CMD seconds |")
    print("|---|---|---|---|---|---|---|")
    for m in args.modes:
        t1 = time.time()
        res = cmd(traj, n_modes=m, n_samples=1000, seed=args.seed)
        dt = time.time() - t1
        worst = max(res.layer_error.items(), key=lambda kv: kv[1])
        a = acc(cmd_model(model, res, t=-1), Hva, Mva, yva)
        print(f"| {m} | {res.n_modes} | {res.rel_error:.4f} | {worst[1]:.4f} ({worst[0]}) | {a:.2f} | "
              f"{a - trained:+.2f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
