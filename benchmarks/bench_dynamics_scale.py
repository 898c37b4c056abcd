"""Scale of post-hoc CMD: N >= 10^7 weights × 50 snapshots on disk, peak resident memory of cmd().

1. Writes a synthetic trajectory through TrajectoryRecorder: a module with ``--layers`` parameters of
   ``--n / --layers`` elements; weights follow ``a_i · r_m(t) + b_i + noise`` for ``--modes`` planted
   references (so the answer is known), ``--snapshots`` snapshots, float32 on disk.
2. In a fresh child process (so its peak RSS is cmd()'s alone): ``cmd(Trajectory, n_modes=M)`` streaming
   column blocks; prints time, ru_maxrss and the planted-mode recovery.
3. Baseline in the same run: one plain pass reading every column block (what any streaming method must
   read); cmd() time is reported as a ratio to it, its memory as a ratio to the trajectory's size.

Run:  PYTHONPATH=src python benchmarks/bench_dynamics_scale.py --dir /tmp/cmd_scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHILD = r"""
import json, sys, time
import numpy as np
from gradsketch.dynamics import Trajectory, cmd
path, m, block, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tr = Trajectory.open(path)
t0 = time.perf_counter()
if what == "read":
    s = 0.0
    for _, _, x in tr.blocks(block):
        s += float(x[:, -1].sum())
    out = {"checksum": s}
else:
    res = cmd(tr, n_modes=m, n_samples=1000, block=block)
    truth = np.load(path + ".modes.npy", mmap_mode="r")
    # planted recovery: map each found mode to the planted mode of its reference, count agreement
    ref_truth = np.asarray(truth[res.ref_index])
    agree = 0
    for s in range(0, len(truth), 1 << 22):
        agree += int((ref_truth[np.maximum(res.modes[s:s + (1 << 22)], 0)] == truth[s:s + (1 << 22)]).sum())
    out = {"modes": res.n_modes, "rel_error": res.rel_error, "agree": agree / len(truth),
           "refs_distinct_planted": len(set(ref_truth.tolist()))}
out["seconds"] = time.perf_counter() - t0
# VmHWM: peak resident set of THIS process image (ru_maxrss would include the parent's peak at fork)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
out["maxrss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


class Big(nn.Module):
    def __init__(self, n: int, layers: int):
        super().__init__()
        sizes = [n // layers] * layers
        sizes[-1] += n - sum(sizes)
        self.ws = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])


def write(path: Path, n: int, e: int, layers: int, modes: int, noise: float, seed: int) -> float:
    from gradsketch.dynamics import TrajectoryRecorder

    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, e)
    refs = np.stack([np.cos((k + 1) * 2.1 * t + k) * np.exp(-k * t / 3) + 0.3 * k * t for k in range(modes)])
    mode = rng.integers(0, modes, n).astype(np.int16)
    np.save(str(path) + ".modes.npy", mode)
    a = rng.uniform(0.2, 1.0, n).astype(np.float32) * rng.choice(np.array([-1, 1], np.float32), n)
    b = rng.normal(0, 0.1, n).astype(np.float32)
    net = Big(n, layers)
    rec = TrajectoryRecorder(path, net, n_snapshots=e)
    t0 = time.perf_counter()
    for k in range(e):
        w = a * refs[:, k].astype(np.float32)[mode] + b + noise * rng.standard_normal(n, dtype=np.float32)
        off = 0
        with torch.no_grad():
            for p in net.ws:
                p.copy_(torch.from_numpy(w[off:off + p.numel()]))
                off += p.numel()
        rec.on_epoch_end(net, k)
    rec.close()
    return time.perf_counter() - t0


def child(path: Path, m: int, block: int, what: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(m), str(block), what], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--snapshots", type=int, default=50)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--block", type=int, default=1 << 16)
    p.add_argument("--dir", type=Path, default=Path("/tmp/cmd_scale"))
    p.add_argument("--keep", action="store_true", help="keep the trajectory on disk afterwards")
    p.add_argument("--reuse", action="store_true", help="reuse a trajectory kept by an earlier --keep run")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "traj"
    if args.reuse and (path / "manifest.json").exists() and Path(str(path) + ".modes.npy").exists():
        wt = float("nan")  # written by an earlier run with the same settings
    else:
        if path.exists():
            shutil.rmtree(path)
        wt = write(path, args.n, args.snapshots, args.layers, args.modes, args.noise, 0)
    size_mb = args.n * args.snapshots * 4 / 2**20
    read = child(path, args.modes, args.block, "read")
    res = child(path, args.modes, args.block, "cmd")
    print(f"N = {args.n:,} weights in {args.layers} layers, E = {args.snapshots} snapshots, trajectory "
          f"{size_mb:,.0f} MiB float32 on disk (written by TrajectoryRecorder in {wt:.0f} s); planted "
          f"{args.modes} modes, noise sd {args.noise}; block {args.block} weights; 1 thread\n")
    print("| pass | seconds | ratio to one read pass | peak RSS (MiB) | RSS / trajectory size |")
    print("|---|---|---|---|---|")
    print(f"| read every column block once (baseline) | {read['seconds']:.1f} | 1.00 | {read['maxrss_mb']:.0f} | "
          f"{read['maxrss_mb'] / size_mb:.3f} |")
    print(f"| cmd(M={args.modes}, K=1000) | {res['seconds']:.1f} | {res['seconds'] / read['seconds']:.2f} | "
          f"{res['maxrss_mb']:.0f} | {res['maxrss_mb'] / size_mb:.3f} |")
    print(f"\nmodes found {res['modes']}, references in {res['refs_distinct_planted']} distinct planted modes, "
          f"weights assigned to their planted mode: {100 * res['agree']:.3f}%, relative reconstruction error "
          f"{res['rel_error']:.4f}")
    if not args.keep:
        shutil.rmtree(path)
        os.unlink(str(path) + ".modes.npy")
    print(f"peak RSS of the writer process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(measured children report their own VmHWM)")


if __name__ == "__main__":
    main()
