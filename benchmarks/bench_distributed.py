"""Strong and weak scaling of featurisation and of Hessian-vector products over torch.distributed ranks (gloo).

Each configuration runs in fresh processes started with ``torch.multiprocessing`` (one thread per rank) and
an initialised gloo process group, also for one rank, so the one- and two-rank numbers share every overhead
but the split:

* **HVP**: ``gradsketch.curvature.sharded("hessian", task, data)`` on a digits MLP 64-128-128-10 (26k
  parameters); time per product (median of ``--reps`` products of one vector; every rank's compute plus the
  all-reduce). Strong: the same ``--n`` examples over 1 and 2 ranks; weak: ``--n`` examples per rank.
* **Collectives** (for the scale model in docs/ARCHITECTURE.md): ``all_reduce`` of 1, 26k and 1M floats
  and a :func:`~gradsketch.linalg.distributed.merge_topk` of 100 queries × top-10 with 2, 4 and 8 ranks
  (more ranks than cores: latencies include time-slicing).
* **Featurisation**: ``Attributor(task, "trak", sketch=sjlt d=512, store=...).featurise(data, rank, world)``
  into one store on the local disk; time until the slowest rank is done. Strong and weak as above.

Efficiency: strong ``T₁ / (P · T_P)``, weak ``T₁(n) / T_P(P·n)`` on the wall clock; and the *work*
efficiency from CPU time summed over ranks (strong ``C₁ / C_P``, weak ``P·C₁(n) / C_P(P·n)``), which counts the
duplicated work and the communication of the distributed version but not the machine's load. On a shared
2-core VM two ranks already use every core, so background load lowers the wall-clock two-rank figures; the
load average is printed with them.

    python benchmarks/bench_distributed.py [--n 1024] [--reps 10] [--out benchmarks/results/distributed.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _data(n: int, batch: int = 128):
    from gradsketch.datasets import load_digits_split

    d = load_digits_split(n_train=1000, n_test=100)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, d.x_train.shape[0], (n,), generator=g)
    x = d.x_train[idx] + 0.01 * torch.randn(n, d.x_train.shape[1], generator=g)
    y = d.y_train[idx]
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _task():
    from gradsketch import Task
    from gradsketch.datasets import make_mlp

    return Task.from_classifier(make_mlp((64, 128, 128, 10), seed=0))


def _worker(rank: int, world: int, init: str, kind: str, n: int, reps: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    task, data = _task(), _data(n)
    if kind == "collectives":
        from gradsketch.linalg.distributed import merge_topk

        res: dict[str, float] = {}
        for size in (1, 26_000, 1_000_000):
            x = torch.ones(size)
            dist.all_reduce(x)
            ts = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                ts.append(time.perf_counter() - t0)
            res[f"all_reduce_{size}"] = statistics.median(ts)
        v, i = torch.randn(100, 10), torch.randint(0, 10**9, (100, 10))
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            merge_topk(v, i, k=10)
            ts.append(time.perf_counter() - t0)
        res["merge_topk_100x10"] = statistics.median(ts)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": res}))
        dist.destroy_process_group()
        return
    if kind == "hvp":
        from gradsketch.curvature import sharded

        op = sharded("hessian", task, data)
        v = torch.randn(task.n_params, generator=torch.Generator().manual_seed(1))
        op @ v  # warm-up
        times, cpu = [], []
        for _ in range(reps):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            op @ v
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        value = statistics.median(times)
        cpu_s = statistics.median(cpu)
    else:
        from gradsketch import Attributor, sketch

        att = Attributor(task, "trak", sketch=sketch("sjlt", n=task.n_params, d=512, seed=0), store=store)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        att.featurise(data, rank=rank, world_size=world, progress=False)
        value, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = float(t[0])
    c = torch.tensor([cpu_s], dtype=torch.float64)
    dist.all_reduce(c)  # CPU seconds of all ranks together: the work, whatever the machine's load
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": value, "cpu_seconds": float(c[0])}))
    dist.destroy_process_group()


def run(kind: str, world: int, n_total: int, reps: int, key: str | None = "seconds") -> Any:
    """One configuration in fresh processes; the value under ``key`` of rank 0's result (all of it for None)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), kind, n_total, reps, os.path.join(tmp, "store"),
                                out), nprocs=world, join=True)
        res = json.loads(Path(out).read_text())
        return res if key is None else res[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1024, help="examples (strong: in total; weak: per rank)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="repeat every configuration, alternating order")
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    args = ap.parse_args()
    configs = [(kind, world, n) for kind in ("hvp", "featurise")
               for world, n in ((1, args.n), (2, args.n), (2, 2 * args.n))]
    times: dict[str, list[float]] = {f"{k}/{w}/{n}": [] for k, w, n in configs}
    cpus: dict[str, list[float]] = {f"{k}/{w}/{n}": [] for k, w, n in configs}
    for r in range(args.rounds):
        for kind, world, n in (configs if r % 2 == 0 else configs[::-1]):
            key = f"{kind}/{world}/{n}"
            both = run(kind, world, n, args.reps, key=None)
            times[key].append(both["seconds"])
            cpus[key].append(both["cpu_seconds"])
            print(f"{kind:9s} ranks {world} examples {n:6d}: {both['seconds']:.4f} s wall, "
                  f"{both['cpu_seconds']:.4f} CPU-s (all ranks)", flush=True)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg": os.getloadavg(),
                 "n": args.n, "median_s": {k: statistics.median(v) for k, v in times.items()},
                 "median_cpu_s": {k: statistics.median(v) for k, v in cpus.items()}}
    coll = {}
    for world in (2, 4, 8):
        coll[world] = run("collectives", world, 0, args.reps)
        print(f"collectives, {world} ranks: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in coll[world].items()),
              flush=True)
    res["collectives_s"] = coll
    for kind in ("hvp", "featurise"):
        t1 = res["median_s"][f"{kind}/1/{args.n}"]
        t2s = res["median_s"][f"{kind}/2/{args.n}"]
        t2w = res["median_s"][f"{kind}/2/{2 * args.n}"]
        res[f"{kind}_strong_efficiency"] = t1 / (2 * t2s)
        res[f"{kind}_weak_efficiency"] = t1 / t2w
        c1 = res["median_cpu_s"][f"{kind}/1/{args.n}"]
        c2s = res["median_cpu_s"][f"{kind}/2/{args.n}"]
        c2w = res["median_cpu_s"][f"{kind}/2/{2 * args.n}"]
        # work efficiency: one rank's CPU time over all ranks' together (strong) or per-example (weak)
        res[f"{kind}_strong_work_efficiency"] = c1 / c2s
        res[f"{kind}_weak_work_efficiency"] = 2 * c1 / c2w
        print(f"{kind}: wall-clock strong efficiency {t1 / (2 * t2s):.2f}, weak {t1 / t2w:.2f}; work (CPU time) "
              f"strong {c1 / c2s:.2f}, weak {2 * c1 / c2w:.2f}")
    print(f"load average {res['load_avg']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
