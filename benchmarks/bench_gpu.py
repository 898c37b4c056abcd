"""GPU checks and speed, for a session that is lent a GPU (no test depends on one).

    python3 benchmarks/bench_gpu.py [--quick] [--out results.md]        # on the GPU machine, from the repo root
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --device cpu --quick   # dry run of the script on a CPU

Three parts, each printed as markdown (and written to --out):

1. **Correctness on the device.** Every sketch kind built from one spec on the CPU and on the device
   (all randomness is drawn on the CPU from the seed, then moved): the device output against the CPU output
   in float64 (max |Δ| / max |y|, expected ~1e-15) and float32 (~1e-6), the adjoint identity
   ⟨Φx, y⟩ = ⟨x, Φᵀy⟩ on the device, and a Task's sketched per-example gradients (explicit, implicit,
   factored) on the device against the CPU in float64.
2. **Sketch speed.** A [32, n] float32 batch, n = 2^20, 2^22, 2^24 and d = 2^10, 2^12, 2^14 (--quick: 2^18,
   2^20 and 2^10, 2^12). Times come from CUDA events, as the median of --repeats calls after a warm-up.
   Each ratio is taken against reading the batch once (x.sum()) in the same run. Where `traker` is
   importable, TRAK's projectors are timed on the same batch at n = 2^20, d = 2^10: BasicProjector
   (rademacher, on the device), and CudaProjector when its `fast_jl` extension is installed.
3. **Model layer.** The digits-sized MLP 64-256-256-10 (N = 85k, batches of 128, 8 batches), with and
   without a larger batch of 1,024. Sketched per-example gradients at d = 4096 (factored qk, explicit sjlt
   and affd) are compared with a plain training step on the same batches, and one HVP with a gradient.

Nothing is downloaded. traker is imported here only, never by the library.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

KINDS = [("dense", {}), ("sjlt", {}), ("fjl", {}), ("ffd", {}), ("affd", {}), ("afjl", {}), ("qk", {}),
         ("affd", {"preconditioner": "fft"}), ("afjl", {"preconditioner": "orthogonal"})]


def _label(kind: str, opts: dict) -> str:
    return kind + "".join(f"-{v}" for v in opts.values())


class Timer:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up: CUDA events on a GPU,
    perf_counter (after a synchronise) elsewhere."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def __call__(self, fn: Callable[[], Any]) -> float:
        fn()
        ts = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def _md(rows: list[list[Any]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def correctness(device: torch.device, quick: bool) -> str:
    from gradsketch import sketch

    n, d = (3 * 2**12 + 17, 512) if quick else (3 * 2**16 + 17, 2048)
    g = torch.Generator().manual_seed(0)
    rows = []
    for kind, opts in KINDS:
        S = sketch(kind, n, d, seed=3, **opts)
        Sd = sketch(kind, n, d, seed=3, **opts).to(device)
        res = [_label(kind, opts)]
        for dt in (torch.float64, torch.float32):
            x = torch.randn(4, n, generator=g, dtype=dt)
            y_cpu = S(x)
            y_dev = Sd(x.to(device)).cpu()
            res.append(f"{float((y_dev - y_cpu).abs().max() / y_cpu.abs().max()):.1e}")
        x = torch.randn(3, n, generator=g, dtype=torch.float64, device="cpu").to(device)
        y = torch.randn(3, d, generator=g, dtype=torch.float64, device="cpu").to(device)
        lhs, rhs = (Sd(x) * y).sum(), (x * Sd.T(y)).sum()
        res.append(f"{float((lhs - rhs).abs() / (lhs.abs() + rhs.abs())):.1e}")
        rows.append(res)
    out = [f"### Sketches on {device} against the CPU (n = {n}, d = {d})\n",
           _md(rows, ["kind", "float64 max abs Δ / max abs y", "float32 max abs Δ / max abs y", "adjoint rel. error"])]

    from gradsketch.model import Task, classifier_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10)).double()
    X = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
    yl = torch.randint(0, 10, (12,), generator=g)
    rows = []
    task_c = Task(model, classifier_loss())
    task_d = Task(copy.deepcopy(model).to(device), classifier_loss())
    data_c = [(X[:6], yl[:6]), (X[6:], yl[6:])]
    data_d = [(a.to(device), b.to(device)) for a, b in data_c]
    for mode in ("explicit", "implicit", "factored"):
        Sc = task_c.factored_sketch(64, seed=1) if mode == "factored" else task_c.block_sketch(64, kind="affd",
                                                                                              seed=1)
        Sdv = (task_d.factored_sketch(64, seed=1) if mode == "factored" else
               task_d.block_sketch(64, kind="affd", seed=1)).to(device)
        zc = task_c.sketch_grads(data_c, Sc, mode=mode, progress=False)
        zd = task_d.sketch_grads(data_d, Sdv, mode=mode, progress=False).cpu()
        rows.append([mode, f"{float((zd - zc).abs().max() / zc.abs().max()):.1e}"])
    v = torch.randn(task_c.n_params, generator=g, dtype=torch.float64)
    hc = task_c.hessian(data_c) @ v
    hd = (task_d.hessian(data_d) @ v.to(device)).cpu()
    rows.append(["HVP (full mode)", f"{float((hd - hc).abs().max() / hc.abs().max()):.1e}"])
    out += [f"\n### Task on {device} against the CPU, float64 CNN\n", _md(rows, ["what", "max abs Δ / max abs"])]
    return "\n".join(out)


def sketch_speed(device: torch.device, quick: bool, repeats: int) -> str:
    from gradsketch import sketch

    timer = Timer(device, repeats)
    log2_n = [18, 20] if quick else [20, 22, 24]
    log2_d = [10, 12] if quick else [10, 12, 14]
    rows = []
    for pn in log2_n:
        x = torch.randn(32, 1 << pn, device=device)
        t_read = timer(lambda x=x: x.sum())
        for pd in log2_d:
            for kind, opts in KINDS:
                if kind == "dense" and (1 << pn) * (1 << pd) > (1 << 30):
                    continue
                S = sketch(kind, 1 << pn, 1 << pd, seed=1, **opts).to(device)
                t = timer(lambda S=S, x=x: S(x))
                rows.append([f"2^{pn}", f"2^{pd}", _label(kind, opts), f"{t / t_read:.1f}", f"{t * 1e3:.3f}",
                             f"{t_read * 1e3:.3f}"])
                del S
        del x
    out = [f"### Sketch speed on {device}: batch 32 float32, ratio to one read of the batch\n",
           _md(rows, ["n", "d", "kind", "ratio to read", "ms", "read ms"])]
    out.append(trak_compare(device, timer))
    return "\n".join(out)


def trak_compare(device: torch.device, timer: Timer) -> str:
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return "\n(traker not importable: TRAK comparison skipped)"
    from gradsketch import sketch

    n, d = 1 << 20, 1 << 10
    x = torch.randn(32, n, device=device)
    rows = []
    P = BasicProjector(grad_dim=n, proj_dim=d, seed=0, proj_type=ProjectionType.rademacher, device=device)
    t_basic = timer(lambda: P.project(x, model_id=0))
    rows.append(["TRAK BasicProjector (rademacher)", f"{t_basic * 1e3:.2f}", "1"])
    t_cuda = None
    if device.type == "cuda":
        try:
            from trak.projectors import CudaProjector

            C = CudaProjector(grad_dim=n, proj_dim=d, seed=0, proj_type=ProjectionType.rademacher, device=device,
                              max_batch_size=32)
            t_cuda = timer(lambda: C.project(x, model_id=0))
            rows.append(["TRAK CudaProjector (fast_jl)", f"{t_cuda * 1e3:.2f}", f"{t_basic / t_cuda:.1f}"])
        except Exception as e:  # fast_jl missing or failing: say so
            rows.append([f"TRAK CudaProjector: not available ({type(e).__name__}: {str(e)[:60]})", "", ""])
    for kind, opts in [("qk", {}), ("afjl", {}), ("affd", {}), ("sjlt", {})]:
        S = sketch(kind, n, d, seed=1, **opts).to(device)
        t = timer(lambda S=S: S(x))
        vs = f"{t_basic / t:.0f}" + ("" if t_cuda is None else f" (vs CudaProjector {t_cuda / t:.1f})")
        rows.append([f"gradsketch {_label(kind, opts)}", f"{t * 1e3:.2f}", vs])
    return "\n".join([f"\n### Against TRAK's projectors on {device}, n = 2^20, d = 2^10, batch 32\n",
                      _md(rows, ["projector", "ms", "speed-up over BasicProjector"])])


def _mlp_rows(device: torch.device, bs: int, repeats: int) -> list[list[Any]]:
    from gradsketch.model import Task, classifier_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(device)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(8 * bs, 64, generator=g).to(device)
    y = torch.randint(0, 10, (8 * bs,), generator=g).to(device)
    data = [(X[i:i + bs], y[i:i + bs]) for i in range(0, 8 * bs, bs)]
    task = Task(model, classifier_loss())
    timer = Timer(device, repeats)

    def train_pass() -> None:
        for xb, yb in data:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()

    rows: list[list[Any]] = []
    t_train = timer(train_pass)
    for mode, kind in [("factored", "qk"), ("explicit", "sjlt"), ("explicit", "affd")]:
        S = task.factored_sketch(4096, seed=0, kind=kind) if mode == "factored" else \
            task.block_sketch(4096, kind=kind, seed=0)
        S = S.to(device)
        t = timer(lambda S=S, mode=mode: task.sketch_grads(data, S, mode=mode, progress=False))
        rows.append([bs, f"{mode} {kind}", f"{t_train / t:.2f}", f"{t * 1e3:.2f}", f"{t_train * 1e3:.2f}"])
    H = task.hessian(data[:1], mode="batch")
    v = torch.randn(task.n_params, device=device)

    def grad_once() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()

    t_g, t_h = timer(grad_once), timer(lambda: H @ v)
    rows.append([bs, "HVP / gradient (one batch)", f"{t_h / t_g:.2f}", f"{t_h * 1e3:.3f}", f"{t_g * 1e3:.3f}"])
    return rows


def model_layer(device: torch.device, repeats: int) -> str:
    rows = _mlp_rows(device, 128, repeats) + _mlp_rows(device, 1024, repeats)
    return "\n".join([f"### MLP 64-256-256-10 (N = 85,002) on {device}, d = 4096, 8 batches\n",
                      _md(rows, ["batch", "measurement", "ratio (sketch: training step / sketch; HVP: HVP / "
                                 "gradient)", "ms", "reference ms"])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--parts", default="correctness,speed,model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible (use --device cpu for a dry run)")
    import gradsketch

    head = (f"Machine: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch "
            f"{torch.__version__}; gradsketch {gradsketch.__version__}; "
            f"{time.strftime('%Y-%m-%dT%H:%M', time.gmtime())} UTC\n")
    parts = [head]
    todo = args.parts.split(",")
    if "correctness" in todo:
        parts.append(correctness(device, args.quick))
    if "speed" in todo:
        parts.append(sketch_speed(device, args.quick, args.repeats))
    if "model" in todo:
        parts.append(model_layer(device, args.repeats))
    text = "\n\n".join(parts)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
