"""Wall time and peak memory per training step: MiniLM in a d = 2^14 subspace vs plain fine-tuning.

    python benchmarks/bench_intrinsic.py [--kinds qk,affd,fjl@regen] [--d 16384] [--batch 32] [--seq 32] [--steps 3]
        [--mmap-threshold BYTES] [--rounds R] [--json FILE]

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

``--rounds R`` runs the whole list (baseline first) R times in turn and reports, per configuration, the median
over rounds of its ratios to the baseline of the same round (each round's ratios are printed too): on a shared
machine the load drifts over minutes, and a configuration measured next to its own baseline is compared under
the load of that moment. ``--json FILE`` writes every worker's raw result. ``--also-default-malloc`` (with
``--mmap-threshold``) runs every configuration a second time per round with glibc's default allocator settings,
compared with a baseline run the same way: the low threshold sends every block of ≥ B bytes through mmap, so
each such temporary is page-faulted afresh (kernel CPU time, reported as "sys"), which inflates the step time of
code with many mid-sized temporaries; the default setting is what a user runs.
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
    times, cpu, sys_s = [], [], []
    for b in batches[1:steps + 1]:
        t, c, k = time.perf_counter(), time.process_time(), os.times().system
        step(b)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        sys_s.append(os.times().system - k)
    return {"mode": mode, "kind": kind if mode == "subspace" else "-", "d": d if mode == "subspace" else None,
            "step_s": sorted(times)[len(times) // 2],
            "step_cpu_s": sorted(cpu)[len(cpu) // 2], "step_sys_s": sorted(sys_s)[len(sys_s) // 2],
            "steps": len(times), "build_s": build_s,
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
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--also-default-malloc", action="store_true")
    ap.add_argument("--worker", default=None)
    a = ap.parse_args()
    if a.worker:
        mode, kind = a.worker.split(":")
        print(json.dumps(worker(mode, kind, a.d, a.batch, a.seq, a.steps, a.threads)))
        return
    kinds = ["full:-"] + [f"subspace:{k}" for k in a.kinds.split(",")]
    mallocs = [a.mmap_threshold] + ([None] if a.also_default_malloc and a.mmap_threshold is not None else [])
    confs = [(c, m) for m in mallocs for c in kinds]

    def label(c: str, m: int | None) -> str:
        name = "full fine-tuning" if c == "full:-" else f"subspace {c.split(':')[1]}"
        return name + (f" (malloc {'default' if m is None else f'mmap ≥ {m}'})" if len(mallocs) > 1 else "")

    rounds: list[list[dict]] = []
    for rnd in range(a.rounds):
        res = []
        for c, m in confs:
            cmd = [sys.executable, __file__, "--worker", c, "--d", str(a.d), "--batch", str(a.batch), "--seq",
                   str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads)]
            env = dict(os.environ)
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
            if m is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(m)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["round"], r["mmap_threshold"] = rnd, m
            res.append(r)
            print(f"round {rnd} {label(c, m)}: step {r['step_s']:.3f}s (CPU {r['step_cpu_s']:.3f}s, sys "
                  f"{r['step_sys_s']:.2f}s)  peak RSS {r['peak_rss_mb']:.0f} MB  training adds "
                  f"{r['train_extra_mb']:.0f} MB  build {r['build_s']:.1f}s  trainable {r['trainable']}", flush=True)
        rounds.append(res)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rounds, f, indent=1)

    def base(res: list[dict], i: int) -> dict:  # the baseline run with the same allocator setting
        return res[(i // len(kinds)) * len(kinds)]

    print(f"\nMiniLM-L6 (22.7M params + head), batch {a.batch}, seq {a.seq}, d = {a.d}, {a.threads} threads, "
          f"MALLOC_MMAP_THRESHOLD_ {a.mmap_threshold or 'unset (glibc default)'}"
          f"{' and unset' if len(mallocs) > 1 else ''}, {a.steps} timed steps (median), {a.rounds} round(s)")
    for rnd, res in enumerate(rounds):
        print(f"\nround {rnd}:")
        print("| config | step (s) | time ratio | step CPU (s) | CPU ratio | sys (s) | peak RSS (MB) | peak ratio | "
              "training adds (MB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for i, (r, (c, m)) in enumerate(zip(res, confs)):
            full = base(res, i)
            print(f"| {label(c, m)} | {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f} | {r['step_cpu_s']:.2f} | "
                  f"{r['step_cpu_s'] / full['step_cpu_s']:.2f} | {r['step_sys_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | {r['train_extra_mb']:.0f} |")
    if a.rounds > 1:
        def med(v: list[float]) -> float:
            v = sorted(v)
            return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

        print(f"\nmedian over {a.rounds} rounds of the ratios to the same round's baseline (min-max in brackets):")
        print("| config | time ratio | CPU ratio | peak ratio | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|")
        for i, (c, m) in enumerate(confs):
            rs = [(res[i], base(res, i)) for res in rounds]
            cols = []
            for key in ("step_s", "step_cpu_s", "peak_rss_mb"):
                v = [r[key] / f[key] for r, f in rs]
                cols.append(f"{med(v):.2f} ({min(v):.2f}-{max(v):.2f})")
            print(f"| {label(c, m)} | {' | '.join(cols)} | {med([r['peak_rss_mb'] for r, _ in rs]):.0f} |")


if __name__ == "__main__":
    main()
