"""Which gradient mode should an Attributor use by default (issue 19)? explicit vs factored featurisation time
and score agreement per model, and TRAK's LDS on the digits MLP with each mode.

usage: python benchmarks/bench_mode_default.py [speed|lds|all] [--n 512] [--d 1024] [--subsets 64] [--runs 2]

speed: grad-dot with sketch=dict(kind="affd", d=--d) on --n training / 64 test examples, for the digits MLPs
  64-32-10 and 64-128-10, a small CNN on the 8×8 digit images, and a GPT-2 built from a config (2 layers,
  n_embd 128, vocab 1,000, 32 tokens; random weights, nothing downloaded). Prints the fit time of each mode (the
  median of 3 fits after a warm-up, within one run), their ratio explicit/factored, and the Pearson correlation
  of the two modes' scores (and of each with exact, unsketched grad-dot where N is small).
lds: TRAK (one model, classification margin) on digits 1,000 train / 200 test with the LDS ground truth of
  bench_attribution.py (64 subsets × 2 runs), d = 2048, explicit vs factored vs the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gradsketch import Attributor, Task
from gradsketch.attribution import batches, classification_margin

torch.set_num_threads(1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _digits(n: int, image: bool = False):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    if image:
        X = X.reshape(-1, 1, 8, 8)
    return X[:n], y[:n], X[n:n + 64], y[n:n + 64]


def _models(n: int):
    out = {}
    for h in (32, 128):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))
        X, y, Xt, yt = _digits(n)
        out[f"MLP 64-{h}-10"] = (Task.from_classifier(m), batches(X, y, batch_size=128), batches(Xt, yt, batch_size=64))
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 64, 10))
    X, y, Xt, yt = _digits(n, image=True)
    out["CNN 1-16-32 conv + linear"] = (Task.from_classifier(cnn), batches(X, y, batch_size=128),
                                        batches(Xt, yt, batch_size=64))
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=1000, n_positions=32)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (n + 64, 32), generator=g)

    def lm_loss(model, batch):
        ids = batch[0]
        logits = model(input_ids=ids).logits[:, :-1]
        return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    tb = [(ids[i:i + 32],) for i in range(0, n, 32)]
    out["GPT-2 (2 layers, n_embd 128, vocab 1000)"] = (Task(gpt, lm_loss), tb, [(ids[n:n + 64],)])
    return out


def speed(args) -> None:
    rows = []
    for name, (task, tr, te) in _models(args.n).items():
        N = task.n_params
        res = {}
        for mode in ("explicit", "factored"):
            sk = dict(kind="affd", d=args.d, seed=0)
            Attributor(task, "grad-dot", sketch=sk, mode=mode).fit(tr[:1], progress=False)  # warm-up
            times = []
            for _ in range(3):
                t = time.process_time()
                a = Attributor(task, "grad-dot", sketch=sk, mode=mode).fit(tr, progress=False)
                times.append(time.process_time() - t)
            res[mode] = (statistics.median(times), a.score(te, progress=False))
        exact = ""
        if N <= 20000:
            E = Attributor(task, "grad-dot").fit(tr, progress=False).score(te, progress=False)
            exact = f"{_corr(res['explicit'][1], E):.3f} / {_corr(res['factored'][1], E):.3f}"
        auto = Attributor(task, "grad-dot", sketch=dict(d=args.d))
        row = [name, N, f"{res['explicit'][0]:.3f}", f"{res['factored'][0]:.3f}",
               f"{res['explicit'][0] / res['factored'][0]:.1f}×",
               f"{_corr(res['explicit'][1], res['factored'][1]):.3f}",
               exact or "—", f"{auto.mode} ({getattr(auto, 'mode_reason_', '')})"]
        rows.append(row)
        print(row, flush=True)
    hdr = ["model", "N", "explicit fit CPU-s", "factored fit CPU-s", "explicit/factored", "corr(explicit, factored)",
           "corr with exact (explicit / factored)", "default mode (why)"]
    print("\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")


def lds_check(args) -> None:
    from gradsketch.eval import lds, lds_ground_truth, load_digits_split, load_models, make_mlp, train_models

    D = load_digits_split(1000, 200, seed=0)
    mf = lambda: make_mlp((64, 32, 10))  # noqa: E731
    kw = dict(steps=300, lr=1e-2, weight_decay=1e-3)
    gt = lds_ground_truth(mf, (D.x_train, D.y_train), (D.x_test, D.y_test), n_subsets=args.subsets,
                          n_runs=args.runs, cache=Path(args.cache) / "MLP_64-32-10", progress=False, **kw)
    model = load_models(mf, train_models(mf, D.x_train, D.y_train, seeds=[0], **kw))[0]
    task = Task.from_classifier(model)
    tr, te = batches(D.x_train, D.y_train, batch_size=250), batches(D.x_test, D.y_test, batch_size=200)
    rows = []
    for label, mode in (("explicit", "explicit"), ("factored", "factored"), ("default", None)):
        for seed in range(3):
            kwm = {} if mode is None else {"mode": mode}
            t = time.process_time()
            a = Attributor(task, "trak", sketch=dict(kind="affd", d=2048, seed=seed), margin_fn=classification_margin(),
                           **kwm).fit(tr, progress=False)
            fit = time.process_time() - t
            L = lds(a.score(te, progress=False), gt.masks, gt.outputs).mean
            rows.append([label, a.mode, seed, f"{L:.3f}", f"{fit:.2f}"])
            print(rows[-1], flush=True)
    print("\n| mode asked | mode run | sketch seed | LDS | fit CPU-s |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="all", choices=["speed", "lds", "all"])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradsketch-lds"))
    args = p.parse_args()
    if args.what in ("speed", "all"):
        speed(args)
    if args.what in ("lds", "all"):
        lds_check(args)


if __name__ == "__main__":
    main()
