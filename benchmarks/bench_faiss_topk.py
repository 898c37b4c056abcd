"""Recall and speed of ``Attributor.topk(..., index="faiss")`` against the exact top-k (issue 15).

Two workloads, one thread everywhere (torch and FAISS), timings as ratios to the exact scan measured in the
same run:

* **api**: ``Attributor(task, "grad-dot", sketch=sjlt d)`` fitted in memory on ``--n-api`` noisy digits
  examples (MLP 64-128-128-10, 26k parameters); ``--queries`` test examples; exact ``topk`` against the flat
  index and IVF indexes (``nlist`` lists, ``nprobe`` probed) through the library call itself.
* **scale**: ``--n-scale`` synthetic float32 vectors of dimension ``--dim`` shaped like sketched gradients
  (low rank plus noise, log-normal row norms), searched with the index types the library builds
  (``IndexFlatIP``; ``IndexIVFFlat`` trained on 64 vectors per list) against an exact blockwise
  ``torch.topk`` of the inner products.

Recall@k = |approximate top-k ∩ exact top-k| / k, averaged over queries, for the proponents (largest scores)
and the opponents (smallest).

    python benchmarks/bench_faiss_topk.py [--n-api 20000] [--n-scale 200000] [--out benchmarks/results/faiss_topk.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np
import torch


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, exact))
    return hits / exact.numel()


def api(n: int, queries: int, d: int, k: int, grid: list[tuple[int, list[int]]]) -> dict:
    import gradsketch
    from gradsketch import Task
    from gradsketch.datasets import load_digits_split, make_mlp

    data = load_digits_split(n_train=1000, n_test=200)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, data.x_train.shape[0], (n,), generator=g)
    x = data.x_train[idx] + 0.3 * torch.randn(n, data.x_train.shape[1], generator=g)
    y = data.y_train[idx]
    train = [(x[i:i + 256], y[i:i + 256]) for i in range(0, n, 256)]
    test = [(data.x_test[:queries], data.y_test[:queries])]
    task = Task.from_classifier(make_mlp((64, 128, 128, 10), seed=0))
    t0 = time.perf_counter()
    att = gradsketch.Attributor(task, "grad-dot", sketch={"kind": "sjlt", "d": d, "seed": 0}).fit(train, progress=False)
    fit_s = time.perf_counter() - t0

    def timed(**kw):
        t = time.perf_counter()
        out = att.topk(test, k=k, progress=False, **kw)
        return out, time.perf_counter() - t

    att.topk(test, k=k, progress=False)  # warm-up (test featurisation paths)
    exact, t_exact = timed()
    rows = []
    flat, t_build = timed(index="faiss")  # first call builds the index
    _, t_flat = timed(index="faiss")
    rows.append({"index": "flat", "nlist": None, "nprobe": None, "recall_top": recall(flat[1], exact[1]),
                 "recall_bottom": recall(flat[3], exact[3]), "build_and_search_s": t_build, "search_s": t_flat})
    for nlist, probes in grid:
        first = True
        for nprobe in probes:
            out, t = timed(index="faiss", nlist=nlist, nprobe=nprobe)
            if first:  # the first call built the index: time the search again
                build, first = t, False
                out, t = timed(index="faiss", nlist=nlist, nprobe=nprobe)
            rows.append({"index": "ivf", "nlist": nlist, "nprobe": nprobe, "recall_top": recall(out[1], exact[1]),
                         "recall_bottom": recall(out[3], exact[3]), "build_and_search_s": build, "search_s": t})
    return {"n": n, "queries": queries, "d": d, "k": k, "fit_s": fit_s, "exact_topk_s": t_exact, "rows": rows}


def scale(n: int, queries: int, dim: int, k: int, grid: list[tuple[int, list[int]]]) -> dict:
    import faiss

    g = torch.Generator().manual_seed(1)
    basis = torch.randn(32, dim, generator=g)

    def vectors(m: int) -> torch.Tensor:
        z = torch.randn(m, 32, generator=g) @ basis + 0.5 * torch.randn(m, dim, generator=g)
        return (z * torch.exp(0.5 * torch.randn(m, 1, generator=g))).to(torch.float32).contiguous()

    X = torch.cat([vectors(min(50_000, n - i)) for i in range(0, n, 50_000)])
    Q = vectors(queries)

    def exact_topk(largest: bool) -> torch.Tensor:
        best_v = torch.full((queries, 0), float("-inf") if largest else float("inf"))
        best_i = torch.zeros((queries, 0), dtype=torch.long)
        for r0 in range(0, n, 16384):
            s = Q @ X[r0:r0 + 16384].T
            v = torch.cat([best_v, s], 1)
            i = torch.cat([best_i, torch.arange(r0, r0 + s.shape[1]).expand(queries, -1)], 1)
            tv, ti = torch.topk(v, k, dim=1, largest=largest)
            best_v, best_i = tv, i.gather(1, ti)
        return best_i

    t = time.perf_counter()
    ex_top, ex_bot = exact_topk(True), exact_topk(False)
    t_exact = time.perf_counter() - t
    q = Q.numpy()
    rows = []

    def search(index) -> tuple[torch.Tensor, torch.Tensor, float]:
        nonlocal q
        t = time.perf_counter()
        _, top = index.search(q, k)
        _, bot = index.search(np.ascontiguousarray(-q), k)
        return torch.from_numpy(top), torch.from_numpy(bot), time.perf_counter() - t

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(X.numpy())
    build = time.perf_counter() - t
    top, bot, ts = search(flat)
    rows.append({"index": "flat", "nlist": None, "nprobe": None, "recall_top": recall(top, ex_top),
                 "recall_bottom": recall(bot, ex_bot), "build_s": build, "search_s": ts})
    del flat
    from gradsketch.attribution.approx_topk import _augment

    norm = float(X.to(torch.float64).norm(dim=1).max())
    q_plain = q
    for augmented in (False, True):  # plain IVF on the raw rows; the library's IVF on [v, √(M² − ‖v‖²)]
        Xa = _augment(X, norm) if augmented else X
        q = np.ascontiguousarray(np.concatenate([q_plain, np.zeros((queries, 1), np.float32)], 1)) if augmented \
            else q_plain
        width = Xa.shape[1]
        for nlist, probes in grid:
            t = time.perf_counter()
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.train(Xa[:64 * nlist].numpy())
            ivf.add(Xa.numpy())
            build = time.perf_counter() - t
            for nprobe in probes:
                ivf.nprobe = nprobe
                top, bot, ts = search(ivf)
                rows.append({"index": "ivf-augmented" if augmented else "ivf-plain", "nlist": nlist,
                             "nprobe": nprobe, "recall_top": recall(top, ex_top), "recall_bottom": recall(bot, ex_bot),
                             "build_s": build, "search_s": ts})
            del ivf
    return {"n": n, "queries": queries, "dim": dim, "k": k, "exact_s": t_exact, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-api", type=int, default=20000)
    ap.add_argument("--n-scale", type=int, default=200000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/faiss_topk.json")
    a = ap.parse_args()
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "faiss": faiss.__version__, "load_before": os.getloadavg()[0]}
    out["api"] = api(a.n_api, a.queries, a.d, a.k, [(64, [1, 2, 4, 8, 16]), (256, [1, 4, 16, 64])])
    print(json.dumps(out["api"], indent=1), flush=True)
    out["scale"] = scale(a.n_scale, a.queries, a.d, a.k, [(256, [1, 4, 16, 64]), (1024, [4, 16, 64])])
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out["scale"], indent=1), flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
