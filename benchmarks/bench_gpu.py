"""GPU checks and speed, for a session that is lent a GPU (no test depends on one).

    bash benchmarks/gpu_session.sh                 # the one prepared device call (tests, then this script)
    python3 benchmarks/bench_gpu.py [--quick] [--parts ...] [--out results.md]   # on the GPU machine
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --device cpu --quick           # dry run on a CPU

Parts (``--parts``, comma-separated; each is appended to --out as soon as it is done, so a run cut short
keeps what it measured):

* ``correctness`` — every sketch kind built from one spec on the CPU and on the device: device against CPU
  in float64 (~1e-15) and float32 (~1e-6), the adjoint identity on the device, and a Task's sketched
  per-example gradients (explicit, implicit, factored) and an HVP on the device against the CPU.
* ``fwht`` — the bare normalised Walsh–Hadamard transform of 2^25 float32 elements as rows of 2^10 … 2^16:
  the Triton kernel and the torch formulation (Kronecker GEMMs), as multiples of one device copy of the
  same data (the literature's CUDA FWHT: 1.0–1.2× a copy up to rows of 8,192).
* ``grid`` — the issue's grid: a [32, n] float32 batch, n ∈ {2^20, 2^24, 2^26}, d ∈ {2^12, 2^14, 2^16}
  (--quick: [4, n], n ∈ {2^14, 2^16}, d ∈ {2^8, 2^10}); afjl, sjlt, qk, affd, fjl with the Triton kernels
  and with the torch formulation (``_triton.disabled()``), each as a multiple of one device copy of the
  batch (``x.clone()``) and of one read (``x.sum()``), and the peak device memory beyond the batch.
  Goals: afjl and sjlt ≤ 2× a copy, qk ≤ 3×, affd ≤ 4×, flat in d.
* ``trak`` — TRAK's CudaProjector (``fast_jl``) where it imports, at n = 2^24 (--quick 2^16), d = 2^12 …
  2^16, batch 32, against affd, afjl, qk, sjlt on the same batch; BasicProjector at n = 2^20, d = 2^12.
  Goal: affd ≥ 10× faster than CudaProjector at d = 2^14.
* ``gpt2`` — GPT-2 small built from its config (124M parameters; --quick: a 2-layer toy), batch 8 of 128
  random tokens, float32: per-example sketched gradients at d = 2^14 (explicit affd and sjlt, factored)
  as the ratio (training step time) / (sketch time), a training step being forward + backward of the
  mean loss; one HVP of the batch as a multiple of one gradient; peak device memory of each. Goals:
  ≥ 0.5 explicit, ≥ 1.0 factored, HVP ≤ 3×.
* ``mlp`` — the earlier digits-sized MLP rows (not in the default set).

Times come from CUDA events (median of --repeats calls after a warm-up); on a CPU (dry run) from
perf_counter. Nothing is downloaded; traker/fast_jl are imported here only, never by the library.
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device, fn: Callable[[], Any], base: int = 0) -> float:
    """MiB of device memory allocated at the peak of one ``fn()`` beyond what was allocated before
    (``base`` subtracted too); nan on a CPU."""
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before - base) / 2**20


def _triton_state() -> str:
    from gradsketch.sketch import _triton

    return _triton.status()["state"]


def fwht_part(device: torch.device, quick: bool, repeats: int) -> str:
    from gradsketch.sketch import _triton
    from gradsketch.sketch._transforms import wht

    timer = Timer(device, repeats)
    total = 1 << (18 if quick else 25)
    rows = []
    for p in (range(8, 13, 2) if quick else range(10, 17)):
        x = torch.randn(total >> p, 1 << p, device=device)
        t_copy = timer(lambda x=x: x.clone())
        t_torch = float("nan")
        with _triton.disabled():
            t_torch = timer(lambda x=x: wht(x))
        t_tri = timer(lambda x=x: wht(x)) if _triton.usable(x) else float("nan")
        if _triton.usable(x):
            with _triton.disabled():
                ref = wht(x[:4].double()).float()
            err = float((wht(x[:4]) - ref).abs().max() / ref.abs().max())
        else:
            err = float("nan")
        rows.append([f"2^{p}", total >> p, f"{t_tri / t_copy:.2f}", f"{t_torch / t_copy:.2f}",
                     f"{t_tri * 1e3:.3f}", f"{t_torch * 1e3:.3f}", f"{t_copy * 1e3:.3f}", f"{err:.1e}"])
        del x
    return "\n".join([f"### Normalised FWHT on {device}: {total} float32 elements, multiples of one copy "
                      f"(Triton: {_triton_state()})\n",
                      _md(rows, ["row length", "rows", "Triton / copy", "torch / copy", "Triton ms", "torch ms",
                                 "copy ms", "Triton vs float64 (rel.)"])])


GRID_KINDS = [("afjl", {}), ("sjlt", {}), ("qk", {}), ("affd", {}), ("fjl", {})]
GOALS = {"afjl": 2, "sjlt": 2, "qk": 3, "affd": 4, "fjl": float("nan")}


def grid_part(device: torch.device, quick: bool, repeats: int, log=print) -> str:
    from gradsketch import sketch
    from gradsketch.sketch import _triton

    timer = Timer(device, repeats)
    batch = 4 if quick else 32
    log2_n = [14, 16] if quick else [20, 24, 26]
    log2_d = [8, 10] if quick else [12, 14, 16]
    rows = []
    for pn in log2_n:
        x = torch.randn(batch, 1 << pn, device=device)
        t_copy = timer(lambda x=x: x.clone())
        t_read = timer(lambda x=x: x.sum())
        for pd in log2_d:
            for kind, opts in GRID_KINDS:
                t0 = time.perf_counter()
                try:
                    S = sketch(kind, 1 << pn, 1 << pd, seed=1, **opts).to(device)
                except Exception as e:  # noqa: BLE001 - a row that says why beats a lost session
                    rows.append([f"2^{pn}", f"2^{pd}", kind, f"build failed: {type(e).__name__}: {str(e)[:80]}"]
                                + [""] * 6)
                    continue
                build = time.perf_counter() - t0
                res = []
                for on in (True, False):
                    try:
                        if on:
                            t = timer(lambda S=S, x=x: S(x))
                            mem = _peak(device, lambda S=S, x=x: S(x))
                        else:
                            with _triton.disabled():
                                t = timer(lambda S=S, x=x: S(x))
                                mem = _peak(device, lambda S=S, x=x: S(x))
                        res.append((t, mem))
                    except Exception as e:  # noqa: BLE001
                        res.append((float("nan"), float("nan")))
                        log(f"grid {kind} n=2^{pn} d=2^{pd} triton={on}: {type(e).__name__}: {e}")
                (tt, mt), (tp, mp) = res
                rows.append([f"2^{pn}", f"2^{pd}", _label(kind, opts), f"{tt / t_copy:.2f}", f"{tp / t_copy:.2f}",
                             f"{tt / t_read:.2f}", f"{tt * 1e3:.2f}", f"{tp * 1e3:.2f}", f"{mt:.0f} / {mp:.0f}",
                             f"≤ {GOALS[kind]}" if GOALS[kind] == GOALS[kind] else "—"])
                log(f"  grid n=2^{pn} d=2^{pd} {kind}: triton {tt * 1e3:.2f} ms, torch {tp * 1e3:.2f} ms, "
                    f"copy {t_copy * 1e3:.2f} ms (built in {build:.1f} s)")
                del S
        rows.append([f"2^{pn}", "", "(copy / read ms)", "", "", "", f"{t_copy * 1e3:.3f}", f"{t_read * 1e3:.3f}", "",
                     ""])
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join([f"### Sketch time on {device}: batch {batch} float32, multiples of one device copy "
                      f"(Triton: {_triton_state()})\n",
                      _md(rows, ["n", "d", "kind", "Triton / copy", "torch / copy", "Triton / read", "Triton ms",
                                 "torch ms", "peak extra MiB (Triton / torch)", "goal (/ copy)"])])


def trak_part(device: torch.device, quick: bool, repeats: int) -> str:
    from gradsketch import sketch

    timer = Timer(device, repeats)
    out = []
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as e:  # noqa: BLE001
        return f"\n(traker not importable: TRAK comparison skipped; {type(e).__name__}: {str(e)[:120]})"
    n_b, d_b = (1 << 14, 1 << 8) if quick else (1 << 20, 1 << 12)
    xb = torch.randn(32, n_b, device=device)
    rows = []
    try:
        P = BasicProjector(grad_dim=n_b, proj_dim=d_b, seed=0, proj_type=ProjectionType.rademacher, device=device)
        t_basic = timer(lambda: P.project(xb, model_id=0))
        rows.append([f"2^{n_b.bit_length() - 1}", f"2^{d_b.bit_length() - 1}", "TRAK BasicProjector (rademacher)",
                     f"{t_basic * 1e3:.2f}", "1"])
        for kind in ("affd", "qk"):
            S = sketch(kind, n_b, d_b, seed=1).to(device)
            t = timer(lambda S=S: S(xb))
            rows.append(["", "", f"gradsketch {kind}", f"{t * 1e3:.2f}", f"{t_basic / t:.1f}"])
    except Exception as e:  # noqa: BLE001
        rows.append(["", "", f"BasicProjector failed: {type(e).__name__}: {str(e)[:80]}", "", ""])
    out += [f"\n### TRAK BasicProjector on {device}, batch 32\n", _md(rows, ["n", "d", "projector", "ms",
                                                                             "speed-up over it"])]
    n = 1 << (16 if quick else 24)
    x = torch.randn(32, n, device=device)
    rows = []
    for pd in ([8, 10] if quick else [12, 13, 14, 15, 16]):
        d = 1 << pd
        t_cuda = float("nan")
        if device.type == "cuda":
            try:
                from trak.projectors import CudaProjector

                C = CudaProjector(grad_dim=n, proj_dim=d, seed=0, proj_type=ProjectionType.rademacher,
                                  device=device, max_batch_size=32)
                t_cuda = timer(lambda C=C: C.project(x, model_id=0))
                rows.append([f"2^{pd}", "TRAK CudaProjector (fast_jl)", f"{t_cuda * 1e3:.2f}", "1"])
            except Exception as e:  # noqa: BLE001 - fast_jl missing or failing: say so
                rows.append([f"2^{pd}", f"CudaProjector not available ({type(e).__name__}: {str(e)[:60]})", "",
                             ""])
        for kind in ("affd", "afjl", "qk", "sjlt"):
            S = sketch(kind, n, d, seed=1).to(device)
            t = timer(lambda S=S: S(x))
            rows.append([f"2^{pd}", f"gradsketch {kind}", f"{t * 1e3:.2f}", f"{t_cuda / t:.1f}"])
            del S
    out += [f"\n### Against TRAK's CudaProjector on {device}, n = 2^{n.bit_length() - 1}, batch 32\n",
            _md(rows, ["d", "projector", "ms", "speed-up over CudaProjector"])]
    return "\n".join(out)


def gpt2_part(device: torch.device, quick: bool, repeats: int, log=print) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gradsketch.model import Task
    from gradsketch.model.losses import causal_lm_loss

    torch.manual_seed(0)
    if quick:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64)
        bs, seq, d = 2, 16, 1 << 8
    else:
        cfg = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50257 tokens (124M parameters)
        bs, seq, d = 8, 128, 1 << 14
    cfg._attn_implementation = "eager"  # double backward (HVP) through the plain attention ops
    model = GPT2LMHeadModel(cfg).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), generator=g).to(device)
    batch = {"input_ids": ids}
    data = [batch]
    loss_fn = causal_lm_loss()
    task = Task(model, loss_fn)
    timer = Timer(device, max(3, repeats // 4))

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).mean().backward()

    t_train = timer(train_step)
    m_train = _peak(device, train_step)
    model.zero_grad(set_to_none=True)
    rows: list[list[Any]] = [["training step (forward + backward of the mean loss)", "1", f"{t_train * 1e3:.1f}",
                              f"{m_train:.0f}", ""]]
    goals = {"explicit": "≥ 0.5", "factored": "≥ 1.0"}
    for mode, kind in [("explicit", "affd"), ("explicit", "sjlt"), ("factored", "qk")]:
        try:
            S = (task.factored_sketch(d, seed=0) if mode == "factored" else task.block_sketch(d, kind=kind, seed=0))
            S = S.to(device)
            t = timer(lambda S=S, mode=mode: task.sketch_grads(data, S, mode=mode, progress=False))
            mem = _peak(device, lambda S=S, mode=mode: task.sketch_grads(data, S, mode=mode, progress=False))
            rows.append([f"{mode} {kind if mode == 'explicit' else '(Kronecker qk per layer)'}",
                         f"{t_train / t:.2f}", f"{t * 1e3:.1f}", f"{mem:.0f}", goals[mode]])
            del S
        except Exception as e:  # noqa: BLE001
            rows.append([f"{mode} {kind}: failed ({type(e).__name__}: {str(e)[:100]})", "", "", "", goals[mode]])
            log(f"gpt2 {mode} {kind}: {type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        H = task.hessian(data, sampling="batch")
        v = torch.randn(n_params, generator=g).to(device)
        t_h = timer(lambda: H @ v)
        m_h = _peak(device, lambda: H @ v)
        rows.append(["HVP of the batch / one gradient (training step)", f"{t_h / t_train:.2f}", f"{t_h * 1e3:.1f}",
                     f"{m_h:.0f}", "≤ 3"])
    except Exception as e:  # noqa: BLE001
        rows.append([f"HVP failed ({type(e).__name__}: {str(e)[:100]})", "", "", "", "≤ 3"])
        log(f"gpt2 HVP: {type(e).__name__}: {e}")
    head = (f"### GPT-2 {'toy (2 layers)' if quick else 'small'} from config on {device}: N = {n_params:,}, "
            f"batch {bs} × {seq} tokens, d = 2^{d.bit_length() - 1}, float32\n")
    return "\n".join([head, _md(rows, ["measurement", "ratio (sketch: training step / sketch; HVP: HVP / step)",
                                       "ms", "peak extra MiB", "goal"])])


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
    H = task.hessian(data[:1], sampling="batch")
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
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--parts", default="correctness,fwht,grid,trak,gpt2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible (use --device cpu for a dry run)")
    import gradsketch
    from gradsketch.sketch import _native

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not importable"
    head = (f"Machine: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch "
            f"{torch.__version__}; triton {tv}; gradsketch {gradsketch.__version__}; native CPU kernels: "
            f"{_native.status()['state']}; {time.strftime('%Y-%m-%dT%H:%M', time.gmtime())} UTC\n")

    def emit(text: str) -> None:
        print(text + "\n", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n\n")

    if args.out:
        open(args.out, "w").close()
    emit(head)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    parts: dict[str, Callable[[], str]] = {
        "correctness": lambda: correctness(device, args.quick),
        "fwht": lambda: fwht_part(device, args.quick, args.repeats),
        "grid": lambda: grid_part(device, args.quick, args.repeats, log),
        "trak": lambda: trak_part(device, args.quick, args.repeats),
        "gpt2": lambda: gpt2_part(device, args.quick, args.repeats, log),
        "mlp": lambda: model_layer(device, args.repeats),
    }
    for name in args.parts.split(","):
        if name not in parts:
            sys.exit(f"--parts: unknown part {name!r}; expected some of {sorted(parts)}")
        t0 = time.perf_counter()
        try:
            text = parts[name]()
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            import traceback

            text = f"### {name}: FAILED\n\n```\n{traceback.format_exc()[-3000:]}\n```"
            log(f"part {name} failed: {e!r}")
        emit(text + f"\n\n({name}: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
