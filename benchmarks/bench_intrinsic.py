"""Wall time and peak memory per training step: MiniLM in a d = 2^14 subspace vs plain fine-tuning.

    python benchmarks/bench_intrinsic.py [--kinds qk,affd,fjl@regen] [--d 16384] [--batch 32] [--seq 32] [--steps 3]
        [--mmap-threshold BYTES]

A kind written ``kind@regen`` builds the subspace with ``regenerate=True`` (no sketch state kept between calls:
each group's sketch is rebuilt from its seed on every map); ``ffd@rng3`` (or ``ffd@rng3+regen``) uses Fastfood's
chunked χ draws (``rng=3``).

Each configuration runs in its own subprocess (so peak RSS is per configuration): load the model, one warm-up
step, then ``--steps`` timed Adam steps (forward + backward + update) on Rotten Tomatoes batches; the median
step in wall time and in process CPU time (the one to compare on a loaded machine). Memory:
peak RSS of the process (ru_maxrss) and the increase of peak RSS over the RSS right after the model (and
sketch) were built, i.e. what training itself adds. Prints one line per configuration and the ratios
subspace/full measured in this run. glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap
threshold in the heap, so peak RSS also counts fragmentation and varies by ~±100 MB between identical runs;
``--mmap-threshold B`` sets MALLOC_MMAP_THRESHOLD_=B in the workers' environment (every block ≥ B is
mmapped and returned on free), which makes peak RSS track the live tensors (same setting for every config).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, kind: str, d: int, batch: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    from gradsketch.datasets import minilm_task
    from gradsketch.intrinsic import SubspaceModel

    torch.set_num_threads(threads)
    model_fn, train_data, _ = minilm_task(n_train=batch * (steps + 1), n_eval=10, max_len=seq, batch_size=batch)
    model = model_fn()
    t0 = time.perf_counter()
    if mode == "subspace":
        base_kind, _, flags = kind.partition("@")
        opts = {"rng": 3} if "rng3" in flags.split("+") else {}
        model = SubspaceModel(model, d, kind=base_kind, seed=0, regenerate="regen" in flags.split("+"), **opts)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    batches = list(train_data)
    base = rss_mb()

    def step(b):  # type: ignore[no-untyped-def]
        opt.zero_grad(set_to_none=True)
        loss = model(**b)["loss"]
        loss.backward()
        opt.step()

    step(batches[0])
    times, cpu = [], []
    for b in batches[1:steps + 1]:
        t, c = time.perf_counter(), time.process_time()
        step(b)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"mode": mode, "kind": kind if mode == "subspace" else "-", "d": d if mode == "subspace" else None,
            "step_s": sorted(times)[len(times) // 2],
            "step_cpu_s": sorted(cpu)[len(cpu) // 2], "steps": len(times), "build_s": build_s,
            "peak_rss_mb": peak_mb(), "rss_after_build_mb": base, "train_extra_mb": peak_mb() - base,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="qk,affd")
    ap.add_argument("--d", type=int, default=2**14)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mmap-threshold", type=int, default=None)
    ap.add_argument("--worker", default=None)
    a = ap.parse_args()
    if a.worker:
        mode, kind = a.worker.split(":")
        print(json.dumps(worker(mode, kind, a.d, a.batch, a.seq, a.steps, a.threads)))
        return
    confs = ["full:-"] + [f"subspace:{k}" for k in a.kinds.split(",")]
    res = []
    for c in confs:
        cmd = [sys.executable, __file__, "--worker", c, "--d", str(a.d), "--batch", str(a.batch), "--seq",
               str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads)]
        env = dict(os.environ)
        if a.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        res.append(r)
        print(f"{r['mode']:9s} {r['kind']:5s} step {r['step_s']:.3f}s  peak RSS {r['peak_rss_mb']:.0f} MB  "
              f"training adds {r['train_extra_mb']:.0f} MB  build {r['build_s']:.1f}s  trainable {r['trainable']}",
              flush=True)
    full = res[0]
    print(f"\nMiniLM-L6 (22.7M params + head), batch {a.batch}, seq {a.seq}, d = {a.d}, {a.threads} threads, "
          f"MALLOC_MMAP_THRESHOLD_ {a.mmap_threshold or 'unset (glibc default)'}")
    print("| config | step (s) | time ratio | step CPU (s) | CPU ratio | peak RSS (MB) | peak ratio | training adds (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    sys.stdout.flush()
    for r in res:
        name = "full fine-tuning" if r["mode"] == "full" else f"subspace {r['kind']}"
        print(f"| {name} | {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f} | {r['step_cpu_s']:.2f} | "
              f"{r['step_cpu_s'] / full['step_cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | {r['train_extra_mb']:.0f} |")


if __name__ == "__main__":
    main()
