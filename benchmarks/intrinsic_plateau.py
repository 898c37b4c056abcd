"""One-run search (plateau test "trend" or "step") against the fixed-d grid, measured the same way.

    python benchmarks/intrinsic_plateau.py --task digits --kinds affd,afjl,qk [--what grid,trend,step]
    python benchmarks/intrinsic_plateau.py --task minilm --kinds qk --what trend --full-metric 0.7695

Grid: one fresh subspace per d on a log2 grid, ``--grid-steps`` steps each (stopped once τ is reached), same
lr and evaluation interval as the search. One-run: ``intrinsic_dimension(method="one-run")`` with the rule
asked for and a confirming run at D*/2. Every evaluation is printed as it happens (so a killed run keeps its
curve) and a summary table at the end. Digits: MLP 64-32-10, full batch, accuracy on 449 images, full
fine-tuning measured (Adam 1e-2, 1000 steps). MiniLM: MiniLM-L6 + linear head on 1,024 Rotten Tomatoes
snippets (24 tokens, batch 16), accuracy on 256, word embeddings frozen and outside the subspace.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gradsketch.intrinsic import accuracy, full_finetune_metric, intrinsic_dimension


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits", choices=["digits", "minilm"])
    ap.add_argument("--kinds", default="affd,afjl,qk")
    ap.add_argument("--what", default="grid,trend,step")
    ap.add_argument("--full-metric", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--delta", type=float, default=0.005)
    ap.add_argument("--steps", type=int, default=None, help="one-run budget")
    ap.add_argument("--grid-steps", type=int, default=None, help="steps per d of the grid (and the confirm run)")
    ap.add_argument("--d-start", type=int, default=None)
    ap.add_argument("--d-max", type=int, default=None)
    ap.add_argument("--grid", default=None, help="comma-separated d of the grid")
    ap.add_argument("--noise", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = None
    if a.task == "digits":
        from gradsketch.datasets import digits_task

        model_fn, train_data, eval_data = digits_task(hidden=32, seed=0)
        dflt = dict(lr=0.05, eval_every=25, steps=1000, grid_steps=300, d_start=8, d_max=2048,
                    grid="8,16,32,64,128,256,512,1024,2048")
    else:
        from gradsketch.datasets import minilm_task

        model_fn, train_data, eval_data = minilm_task(n_train=1024, n_eval=256, max_len=24, batch_size=16)
        params = (lambda name, p: "word_embeddings" not in name)  # noqa: E731
        dflt = dict(lr=0.1, eval_every=15, steps=1200, grid_steps=450, d_start=64, d_max=16384,
                    grid="64,128,256,512,1024")
    o = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in dflt.items()}
    t0 = time.time()
    calls = {"n": 0}

    def metric(model, data):  # type: ignore[no-untyped-def]
        v = accuracy(model, data)
        calls["n"] += 1
        d = getattr(model, "active_dim", None)
        print(json.dumps({"eval": calls["n"], "t": round(time.time() - t0, 1), "d": d, "metric": v}), flush=True)
        return v

    full = a.full_metric
    if full is None:
        full, _ = full_finetune_metric(model_fn, train_data, lambda m: accuracy(m, eval_data), steps=1000, lr=1e-2,
                                       eval_every=25, progress=False)
    print(f"# task {a.task}, full metric {full:.4f}, τ = {0.9 * full:.4f}, settings {o}, delta {a.delta}", flush=True)
    noise = None if a.noise is None else (a.noise if a.noise == "binomial" else float(a.noise))
    rows = []
    for kind in a.kinds.split(","):
        common = dict(kind=kind, full_metric=full, lr=o["lr"], eval_every=o["eval_every"], params=params,
                      progress=False, d_max=o["d_max"])
        for what in a.what.split(","):
            t = time.time()
            print(f"# {kind} {what}", flush=True)
            if what == "grid":
                res = intrinsic_dimension(model_fn, train_data, eval_data, metric, method="grid",
                                          grid=[int(g) for g in o["grid"].split(",")], steps=o["grid_steps"],
                                          stop_at_threshold=True, **common)
            else:
                res = intrinsic_dimension(model_fn, train_data, eval_data, metric, method="one-run", plateau=what,
                                          steps=o["steps"], delta=a.delta, d_start=o["d_start"], noise=noise,
                                          confirm_steps=o["grid_steps"], **common)
            dt = time.time() - t
            print(f"## {kind} {what} ({dt:.0f}s): {res}\n{res.to_markdown()}", flush=True)
            stages = ", ".join(f"{r['d']}: {r['metric']:.3f}/{r['steps']}" for r in res.table)
            conf = "-" if res.confirm is None else f"{res.confirm['metric']:.3f} at {res.confirm['d']}"
            rows.append(f"| {kind} | {what} | {res.estimate_str} | {stages} | {conf} | {dt:.0f} |")
    print("\n| kind | method | D_int90 | stages (d: best metric/steps) | confirm | time (s) |")
    print("|---|---|---:|---|---|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
