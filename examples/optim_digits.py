"""Sketchy vs Shampoo vs Adam on scikit-learn's digits (bundled, no download), plus the factor-spectrum plot.

    python examples/optim_digits.py [--out optim_digits_spectrum.png]

Trains the same MLP from the same initialisation with each optimiser for 300 full-batch steps, prints the
held-out accuracy and the preconditioner memory, and saves Shampoo's factor-spectrum diagnostic.
"""

from __future__ import annotations

import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

from gradsketch.optim import FactorSpectrumTracker, Shampoo, Sketchy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="optim_digits_spectrum.png")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = load_digits()
    X = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target)
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    for name in ("adam", "shampoo", "sketchy k=8"):
        model = copy.deepcopy(base)
        if name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        elif name == "shampoo":
            opt = Shampoo(model.parameters(), lr=3e-3, update_freq=10)
            tracker = FactorSpectrumTracker(opt, ks=(4, 8), names=dict(model.named_parameters()))
        else:
            opt = Sketchy(model.parameters(), lr=3e-3, rank=8, update_freq=10)
        for step in range(1, args.steps + 1):
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xtr), ytr).backward()
            opt.step()
            if name == "shampoo" and step % 10 == 0:
                tracker.record(step)
        with torch.no_grad():
            acc = float((model(Xte).argmax(1) == yte).float().mean())
        mem = opt.preconditioner_bytes() if hasattr(opt, "preconditioner_bytes") else 0
        print(f"{name:12s} test accuracy {acc:.3f}  preconditioner bytes {mem}")
    tracker.figure().savefig(args.out, dpi=100)
    print(f"factor spectrum plot: {args.out}")


if __name__ == "__main__":
    main()
