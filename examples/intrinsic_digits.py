"""Intrinsic dimension of an MLP on scikit-learn digits: grid sweep vs one-run search for several sketch kinds.

    python examples/intrinsic_digits.py [--kinds ffd,affd,afjl,qk,dense] [--out intrinsic_out]

MLP 64-32-10 (n = 2,410 parameters), Adam, full batch (1,348 training images), metric = test accuracy
(449 images). Full fine-tuning accuracy is measured once; τ = 0.9 × that.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from gradsketch.datasets import digits_task
from gradsketch.intrinsic import full_finetune_metric, intrinsic_dimension

model_fn, _train, _test = digits_task(hidden=32, seed=0)  # MLP 64-32-10, the same θ0 on every call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="ffd,affd,afjl,qk,dense")
    ap.add_argument("--steps", type=int, default=300, help="steps per grid run (one-run budget: 4x)")
    ap.add_argument("--out", default="intrinsic_out")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    train_data, test_data = _train, _test
    t = time.time()
    full, _ = full_finetune_metric(model_fn, train_data, lambda m: _acc(m, test_data), steps=a.steps, lr=1e-2,
                                   eval_every=25, progress=a.progress)
    print(f"full fine-tuning test accuracy: {full:.4f} ({time.time() - t:.1f}s); threshold 0.9x = {0.9 * full:.4f}")
    common = dict(metric="accuracy", d_max=2048, full_metric=full, lr=0.05, eval_every=25, delta=0.005,
                  d_start=8, progress=a.progress)
    rows = []
    for kind in a.kinds.split(","):
        t = time.time()
        g = intrinsic_dimension(model_fn, train_data, test_data, kind=kind, method="grid", steps=a.steps, **common)
        tg = time.time() - t
        t = time.time()
        o = intrinsic_dimension(model_fn, train_data, test_data, kind=kind, method="one-run", steps=4 * a.steps,
                                **common)
        to = time.time() - t
        g.plot(os.path.join(a.out, f"digits_grid_{kind}.png"), title=f"digits MLP, grid, {kind}")
        print(f"\n## {kind}\n{g}\n{g.to_markdown()}\n{o}\n{o.to_markdown()}")
        conf = "-" if o.confirm is None else f"{o.confirm['metric']:.3f} at {o.confirm['d']}"
        rows.append(f"| {kind} | {g.estimate_str} | {tg:.0f} | {o.estimate_str} | {conf} | {to:.0f} |")
    print("\n| kind | D_int90 grid | grid s | D_int90 one-run | confirm (acc at D/2) | one-run s |")
    print("|---|---:|---:|---:|---|---:|")
    print("\n".join(rows))


def _acc(model: nn.Module, data) -> float:  # type: ignore[no-untyped-def]
    x, y = data
    return float((model(x).argmax(-1) == y).float().mean())


if __name__ == "__main__":
    main()
