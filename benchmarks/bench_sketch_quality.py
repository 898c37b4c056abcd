"""Sketch quality on real per-example gradients: minimal log2 d for Pearson r > 0.95 / 0.98 / 0.99.

Models (trained briefly on scikit-learn's bundled digits, no download):
  small: MLP 64-64-10 (n = 4,810 parameters)
  big:   MLP 64-1024-1024-10 (n = 1,126,410 ≥ 2^20)
Per-example gradients of the cross-entropy for G examples (held-out rows) via torch.func.vmap(grad).
For each kind, seed and d = 2^k: Pearson correlation between the exact inner products ⟨g_i, g_j⟩ and
the sketched ones ⟨Φg_i, Φg_j⟩ over all pairs i < j (the diagonal — squared norms — is EXCLUDED).
r is averaged over seeds; the table gives the smallest k with mean r above each threshold.

    .venv/bin/python benchmarks/bench_sketch_quality.py            # both models (a few minutes)
    .venv/bin/python benchmarks/bench_sketch_quality.py --quick    # small model only
    .venv/bin/python benchmarks/bench_sketch_quality.py --factored-only

"factored" rows: the LoGra-style path of the gradient layer (``task.sketch_grads(mode="factored")`` with
``task.factored_sketch(d)``: a Kronecker qk sketch F_out ⊗ F_in per Linear weight with its bias folded in),
which never forms the per-example gradient, measured against the same exact inner products.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

from gradsketch import Task, sketch

KINDS = ["dense", "sjlt", "fjl", "ffd", "affd", "afjl", "qk"]
PAPER = {  # Table 6 of Schioppa 2024 (GPT-2 / BART gradients): minimal log2 D for r > 0.95 / 0.99
    "fjl": (10, 13), "affd": (10, 13), "ffd": (10, 14), "afjl": (12, 15), "qk": (14, 17)}
THRESH = (0.95, 0.98, 0.99)


def data():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return X[perm], y[perm]


def train(model: nn.Module, X, y, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (256,), generator=g)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def per_example_grads(model: nn.Module, X, y) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([gs[k].reshape(len(y), -1) for k in params], dim=1)


def pearson_offdiag(a: np.ndarray, b: np.ndarray) -> float:
    iu = np.triu_indices(a.shape[0], 1)
    return float(np.corrcoef(a[iu], b[iu])[0, 1])


def sweep(G: torch.Tensor, kinds, ks, seeds, echo) -> dict[str, dict[int, float]]:
    exact = (G.double() @ G.double().T).numpy()
    n = G.shape[1]
    out: dict[str, dict[int, float]] = {}
    for kind in kinds:
        out[kind] = {}
        for k in ks:
            d = 1 << k
            if d > n and kind not in ("dense", "sjlt"):
                continue
            if kind == "dense" and n * d > 1 << 28:
                continue
            rs = []
            for s in seeds:
                S = sketch(kind, n, d, seed=s)
                with torch.no_grad():
                    SG = S(G).double()
                rs.append(pearson_offdiag(exact, (SG @ SG.T).numpy()))
            out[kind][k] = float(np.mean(rs))
            if out[kind][k] > 0.995:  # all thresholds reached: larger d only costs time
                break
        echo(f"  {kind}: " + " ".join(f"2^{k}:{r:.3f}" for k, r in out[kind].items()))
    return out


def factored_sweep(model: nn.Module, X, y, G: torch.Tensor, ks, seeds, echo) -> dict[int, float]:
    """Pearson r of the factored path's inner products against the exact ones, per log2 d."""
    exact = (G.double() @ G.double().T).numpy()
    task = Task(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    out: dict[int, float] = {}
    for k in ks:
        rs = []
        for s in seeds:
            FS = task.factored_sketch(1 << k, seed=s)
            Z = task.sketch_grads([(X, y)], FS, mode="factored", progress=False).double()
            rs.append(pearson_offdiag(exact, (Z @ Z.T).numpy()))
        out[k] = float(np.mean(rs))
        if out[k] > 0.995:
            break
    echo("  factored: " + " ".join(f"2^{k}:{r:.3f}" for k, r in out.items()))
    return out


def minimal(rk: dict[int, float], thr: float) -> str:
    ks = sorted(rk)
    for k in ks:
        if rk[k] > thr:
            return f"≤{k}" if k == ks[0] else str(k)
    return f">{max(rk)}" if rk else "-"


def table(name: str, n: int, res, echo) -> None:
    echo(f"\n{name} (n = {n:,}): minimal log2 d with mean Pearson r > 0.95 / 0.98 / 0.99 "
         "(paper Table 6: > 0.95 / > 0.99)")
    echo("| kind | r > 0.95 | r > 0.98 | r > 0.99 | paper r > 0.95 | paper r > 0.99 |")
    echo("|---|---|---|---|---|---|")
    for kind, rk in res.items():
        p = PAPER.get(kind, ("-", "-"))
        echo(f"| {kind} | " + " | ".join(minimal(rk, t) for t in THRESH) + f" | {p[0]} | {p[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model only")
    ap.add_argument("--examples", type=int, default=128, help="gradients per model (pairs i<j among them)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--factored-only", action="store_true", help="only the factored (LoGra-style) rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    echo = print
    X, y = data()
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    seeds = list(range(args.seeds))
    models = [("small MLP 64-64-10", nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), range(5, 13))]
    if not args.quick:
        models.append(("big MLP 64-1024-1024-10", nn.Sequential(
            nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)), range(8, 18)))
    for name, model, ks in models:
        t0 = time.perf_counter()
        acc = train(model, Xtr, ytr, steps=60, lr=1e-3)
        G = per_example_grads(model, Xte[: args.examples], yte[: args.examples])
        n = G.shape[1]
        echo(f"{name}: n = {n:,}, train accuracy after 60 Adam steps {acc:.3f}; {G.shape[0]} per-example "
             f"gradients ({time.perf_counter() - t0:.1f} s)")
        res = {} if args.factored_only else sweep(G, KINDS, list(ks), seeds, echo)
        res["factored"] = factored_sweep(model, Xte[: args.examples], yte[: args.examples], G, list(ks), seeds, echo)
        table(name, n, res, echo)
        echo(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
