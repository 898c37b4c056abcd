"""Intrinsic dimension of fine-tuning pretrained MiniLM-L6 (+ linear head) on Rotten Tomatoes, offline once the
snippets are fetched (`gradsketch data fetch rotten-tomatoes` or `python examples/fetch_data.py`).

    python examples/intrinsic_minilm.py [--kind qk] [--n-train 1024] [--seq 24] [--batch 16]
        [--full-steps 60 | --full-metric ACC] [--steps 120] [--lr 0.05] [--eval-every 15] [--delta 0.005]
        [--plateau trend|step]
        [--d-start 64] [--d-max 16384] [--confirm [--confirm-steps N]] [--threads 2] [--all-params]

Full fine-tuning accuracy first (Adam 5e-5... here 1e-4 for few steps), then the one-run doubling search
(Schioppa 2024) in a d_max subspace with τ = 0.9 × full accuracy. By default the word-embedding matrix
(11.7M of the 22.7M parameters) is left frozen and outside the subspace, to keep Φᵀω cheap on CPU;
``--all-params`` puts every parameter in the subspace.
"""

from __future__ import annotations

import argparse
import time

import torch

from gradsketch.datasets import minilm_task
from gradsketch.intrinsic import accuracy, full_finetune_metric, intrinsic_dimension


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="qk")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--full-steps", type=int, default=60)
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--full-metric", type=float, default=None,
                    help="skip full fine-tuning and use this accuracy as the reference (τ = 0.9 × it)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--d-start", type=int, default=64)
    ap.add_argument("--d-max", type=int, default=2**14)
    ap.add_argument("--delta", type=float, default=0.005)
    ap.add_argument("--plateau", default="trend", help="plateau test: trend (noise-robust) or step (last gain < δ)")
    ap.add_argument("--confirm", action="store_true", help="confirming run at D*/2 (stops early if it reaches τ)")
    ap.add_argument("--confirm-steps", type=int, default=None)
    ap.add_argument("--all-params", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model_fn, train_data, eval_data = minilm_task(n_train=a.n_train, n_eval=a.n_eval, max_len=a.seq,
                                                  batch_size=a.batch)
    t = time.time()
    if a.full_metric is not None:
        full = a.full_metric
        print(f"full fine-tuning: skipped, reference accuracy {full:.4f} given", flush=True)
    else:
        full, hist = full_finetune_metric(model_fn, train_data, lambda m: accuracy(m, eval_data),
                                          steps=a.full_steps, lr=a.full_lr, eval_every=a.eval_every,
                                          progress=a.progress)
        print(f"full fine-tuning: eval accuracy {full:.4f} after {hist.steps} steps ({time.time() - t:.0f}s); "
              f"curve {[round(m, 3) for m in hist.metrics]}", flush=True)
    params = None if a.all_params else (lambda name, p: "word_embeddings" not in name)
    t = time.time()
    res = intrinsic_dimension(model_fn, train_data, eval_data, "accuracy", d_max=a.d_max, kind=a.kind,
                              method="one-run", full_metric=full, steps=a.steps, lr=a.lr, eval_every=a.eval_every,
                              delta=a.delta, plateau=a.plateau, d_start=a.d_start, params=params, confirm=a.confirm,
                              confirm_steps=a.confirm_steps, progress=a.progress)
    print(f"one-run search ({time.time() - t:.0f}s): {res}")
    print(res.to_markdown())
    for n in res.notes:
        print("note:", n)
    if a.plot:
        res.plot(a.plot, title="MiniLM-L6 on Rotten Tomatoes (one-run)")


if __name__ == "__main__":
    main()
