"""Exact influence on a small model: the dense Hessian / GGN from batched torch.func passes
(``gradsketch.curvature.dense.dense_curvature``) against the columns of the matrix-free operator
(``HessianOperator(...).to_dense()``, N products), measured in the same run.

Digits MLP 64-48-10 (N = 3,610), 1,000 training examples in batches of 250, float32 (the library's default
model dtype) and float64. Prints a markdown table; ``--out`` writes benchmarks/results/influence_exact.md.

    nice -n 10 python benchmarks/bench_influence_exact.py --out benchmarks/results/influence_exact.md
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradsketch import Task
from gradsketch.curvature import GGNOperator, HessianOperator
from gradsketch.curvature.dense import dense_curvature
from gradsketch.datasets import digits_batches, load_digits_split, make_mlp, train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-slow", action="store_true", help="time the operator's columns on 200 columns only")
    p.add_argument("--note", default="")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = load_digits_split(n_train=1000, n_test=200, seed=0)
    model = make_mlp((64, 48, 10), seed=0)
    train_classifier(model, digits_batches(d.x_train, d.y_train, 100), epochs=20, lr=1e-2)
    rows = []
    for dtype in [getattr(torch, n) for n in args.dtypes]:
        m = make_mlp((64, 48, 10), seed=0, dtype=dtype)
        m.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
        task = Task.from_classifier(m)
        data = digits_batches(d.x_train.to(dtype), d.y_train, 250)
        N = task.n_params
        for kind, Op in (("hessian", HessianOperator), ("ggn", GGNOperator)):
            t, c = time.perf_counter(), time.process_time()
            fast = dense_curvature(task, data, kind=kind)
            t_fast, c_fast = time.perf_counter() - t, time.process_time() - c
            op = Op(task, data)
            t, c = time.perf_counter(), time.process_time()
            if args.skip_slow:
                cols = 200
                slow = op @ torch.eye(N, dtype=dtype)[:, :cols]
                t_slow = (time.perf_counter() - t) * N / cols
                c_slow = (time.process_time() - c) * N / cols
                err = float((slow - fast[:, :cols]).norm() / slow.norm())
                note = f"extrapolated from {cols} columns"
            else:
                slow = op.to_dense()
                t_slow = time.perf_counter() - t
                c_slow = time.process_time() - c
                err = float((slow - fast).norm() / slow.norm())
                note = "all columns"
            rows.append((str(dtype).replace("torch.", ""), kind, N, f"{t_slow:.1f} / {c_slow:.1f}", note,
                         f"{t_fast:.1f} / {c_fast:.1f}", f"{t_slow / t_fast:.1f}x / {c_slow / c_fast:.1f}x",
                         f"{err:.1e}"))
            print(rows[-1], flush=True)
    head = ("dtype", "matrix", "N", "operator columns, wall / CPU s", "", "dense_curvature, wall / CPU s",
            "ratio wall / CPU", "rel. difference")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"# Exact influence: dense curvature of a small model (issue 16)\n\n"
                f"{when}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
                f"torch {torch.__version__}; the machine was shared with other jobs (ratios are from the same "
                f"run; CPU seconds of the process are the better guide to a quiet machine). Digits MLP "
                f"64-48-10 trained 20 epochs, 1,000 training examples in batches of 250.\n"
                f"Before: `HessianOperator(task, data).to_dense()` / `GGNOperator(...).to_dense()` (one "
                f"product per basis vector, the explicit influence solver's old path). After: "
                f"`gradsketch.curvature.dense.dense_curvature` (vmapped forward-over-reverse Hessian columns "
                f"in chunks of 512; GGN from per-example Jacobians as one GEMM).\n\n{table}\n\n{args.note}\n")
        args.out.write_text(text)


if __name__ == "__main__":
    main()
