"""Top-k merge across ranks: all-gather (``merge_topk(method="gather")``) against the binomial tree
(``method="tree"``), gloo on the CPU, 2, 4 and 8 ranks (issue 15).

Each configuration starts fresh processes (one thread each) with an initialised gloo group; every rank holds
``m × k`` candidates (random scores, global indices); each method merges ``--reps`` times after two warm-up
merges, with a barrier before each timed merge; the time of a merge is the slowest rank's. Both methods'
results are checked equal on every run. With more ranks than cores the latencies include time slicing.

    python benchmarks/bench_topk_merge.py [--reps 20] [--out benchmarks/results/topk_merge.json]
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init: str, shapes: list[tuple[int, int]], reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    from gradsketch.linalg.distributed import merge_topk

    res = {}
    for m, k in shapes:
        g = torch.Generator().manual_seed(rank)
        v = torch.randn(m, k, generator=g)
        i = torch.randint(0, 10**9, (m, k), generator=g)
        a = merge_topk(v, i, k, method="gather")
        b = merge_topk(v, i, k, method="tree")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for method in ("gather", "tree"):
            times = []
            for _ in range(reps):
                dist.barrier()
                t = time.perf_counter()
                merge_topk(v, i, k, method=method)
                dt = torch.tensor([time.perf_counter() - t])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times.append(float(dt))
            res[f"{m}x{k}/{method}"] = statistics.median(times)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--out", default="benchmarks/results/topk_merge.json")
    a = ap.parse_args()
    shapes = [(100, 10), (1000, 100)]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
              "load_before": os.getloadavg()[0], "reps": a.reps, "worlds": {}}
    for world in [int(w) for w in a.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, f"{d}/init", shapes, a.reps, f"{d}/out.json"), nprocs=world, join=True)
            with open(f"{d}/out.json") as f:
                times = json.load(f)
        result["worlds"][world] = times
        print(world, {k: f"{v * 1e3:.2f} ms" for k, v in times.items()}, flush=True)
    result["load_after"] = os.getloadavg()[0]
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
