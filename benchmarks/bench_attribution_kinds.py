"""Sketched vs unsketched LDS for every sketch kind and three sketch seeds: TRAK (one model) and Arnoldi
(200 iterations, top 100) on a digits MLP 64-H-10 at d = 4096 (default H = 128: N = 9,610, so d/N = 0.43;
H = 32: N = 2,410 < d). Reuses the LDS ground truth that `python benchmarks/bench_attribution.py quality
--hidden H` caches (computed here if missing).

    .venv/bin/python benchmarks/bench_attribution_kinds.py [--cache DIR] [--seeds 3] [--hidden 128] [--d 4096]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from gradsketch.attribution import Attributor, batches, classification_margin
from gradsketch.eval import lds, lds_ground_truth, load_digits_split, load_models, make_mlp, train_models
from gradsketch.model import Task

KINDS = ["affd", "afjl", "fjl", "sjlt", "qk", "dense"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradsketch-lds"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args()

    def make_model():
        return make_mlp((64, args.hidden, 10))

    D = load_digits_split(1000, 200, seed=0)
    kw = dict(steps=300, lr=1e-2, weight_decay=1e-3)
    gt = lds_ground_truth(make_model, (D.x_train, D.y_train), (D.x_test, D.y_test), n_subsets=64, n_runs=2,
                          cache=Path(args.cache) / f"MLP_64-{args.hidden}-10", progress=False, **kw)
    model = load_models(make_model, train_models(make_model, D.x_train, D.y_train, seeds=[0], **kw))[0]
    task = Task.from_classifier(model)
    tr, te = batches(D.x_train, D.y_train, batch_size=250), batches(D.x_test, D.y_test, batch_size=200)
    methods = {"trak": dict(margin_fn=classification_margin()), "arnoldi": dict(damping=kw["weight_decay"])}

    def run(method: str, sk: dict | None) -> float:
        S = Attributor(task, method, sketch=sk, **methods[method]).fit(tr, progress=False).score(te, progress=False)
        return float(lds(S, gt.masks, gt.outputs).mean)

    base = {m: run(m, None) for m in methods}
    print(f"unsketched LDS: {base}")
    print("| kind | method | mean gap | per seed |\n|---|---|---|---|")
    for kind in KINDS:
        for m in methods:
            gaps = np.array([run(m, dict(kind=kind, d=args.d, seed=s)) for s in range(args.seeds)]) - base[m]
            print(f"| {kind} | {m} | {gaps.mean():+.3f} | {', '.join(f'{g:+.3f}' for g in gaps)} |", flush=True)


if __name__ == "__main__":
    main()
