"""CMD of training dynamics on the digits data (sklearn): record a trajectory on disk, decompose it
post-hoc with M = 1..8 modes, run online and embedded CMD beside training, and draw the four plots.

Run: python examples/dynamics_digits.py [out_dir]   (CPU, well under a minute)
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from gradsketch import dynamics


def main(out: str = "dynamics_digits_out") -> None:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    Xtr, ytr, Xte, yte = X[:1200], y[:1200], X[1200:], y[1200:]

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(Xtr), generator=g)
        return [perm[i:i + 32] for i in range(0, len(Xtr), 32)]

    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    path = os.path.join(out, "trajectory")
    shutil.rmtree(path, ignore_errors=True)
    epochs = 30
    rec = dynamics.TrajectoryRecorder(path, net, n_snapshots=epochs)
    online = dynamics.OnlineCMD(net, n_modes=5, warmup=10, n_samples=800)
    curve = {"final iterate": [], "online CMD": []}
    for epoch in range(epochs):
        for idx in batches(epoch):
            loss = nn.functional.cross_entropy(net(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        rec.on_epoch_end(net, epoch)
        online.update(net)
        curve["final iterate"].append(100 * dynamics.accuracy(net, Xte, yte))
        curve["online CMD"].append(100 * dynamics.accuracy(online.model(net), Xte, yte))

    traj = dynamics.Trajectory.open(path)
    print(traj)
    errors, accs = [], []
    for m in (1, 2, 3, 5, 8):
        res = dynamics.cmd(traj, n_modes=m, n_samples=800)
        acc = 100 * dynamics.accuracy(dynamics.cmd_model(net, res, t=-1), Xte, yte)
        errors.append(res.rel_error)
        accs.append(acc)
        print(f"post-hoc CMD M={m}: relative error {res.rel_error:.4f}, reconstructed final test acc. {acc:.2f}%")
        if m == 5:
            curve["post-hoc CMD (M=5)"] = dynamics.evaluate_snapshots(
                net, res, lambda model: 100 * dynamics.accuracy(model, Xte, yte))
            dynamics.plots.reference_trajectories(res).savefig(os.path.join(out, "references.png"))
            dynamics.plots.mode_membership(res).savefig(os.path.join(out, "membership.png"))
    dynamics.plots.reconstruction_error([1, 2, 3, 5, 8], errors).savefig(os.path.join(out, "error_vs_M.png"))

    emb = dynamics.EmbeddedCMD(make(), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), n_modes=5, warmup=10,
                               every=5, percent=20, n_samples=800)
    curve["embedded CMD"] = []
    for epoch in range(epochs):
        emb.train()
        for idx in batches(epoch):
            loss = nn.functional.cross_entropy(emb(Xtr[idx]), ytr[idx])
            emb.optimizer.zero_grad()
            loss.backward()
            emb.optimizer.step()
        emb.epoch_end()
        curve["embedded CMD"].append(100 * dynamics.accuracy(emb.model(), Xte, yte))
    print(f"trained {curve['final iterate'][-1]:.2f}%, online CMD {curve['online CMD'][-1]:.2f}%, embedded CMD "
          f"{curve['embedded CMD'][-1]:.2f}% with {emb.n_trainable:,} of {emb.layout.n:,} weights trainable")
    dynamics.plots.accuracy_curves(curve).savefig(os.path.join(out, "accuracy.png"))
    print(f"figures in {out}/")


if __name__ == "__main__":
    main(*sys.argv[1:])
