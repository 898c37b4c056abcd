"""Which curvature should TRAK invert? Exact float64 kernels on three LDS benchmarks (issue 16, session 9).

For each benchmark, from the trained model in float64: the loss gradients g_i, the per-example output Jacobians
J_i and the output Hessians H_i = diag(p_i) − p_i p_iᵀ of the cross-entropy. Kernels: K_emp = Σ g_i g_iᵀ (TRAK's
ΦᵀΦ unsketched: the empirical Fisher), K_ggn = Σ J_iᵀ H_i J_i (the Gauss-Newton matrix, what
``Attributor(task, "trak", kernel="ggn")`` inverts), each whole or block-diagonal by layer, and (session 10)
K_tr = Σ ω_i g_i g_iᵀ with ω_i = tr(H_i)/‖p_i − e_{y_i}‖² (``kernel="ggn_trace"``: the empirical Fisher with each
row carrying its example's Gauss-Newton curvature). Scores
g(x)ᵀ(K + λI)⁻¹g(z) with TRAK's rule λ = r·tr(K)/min(n, N), r ∈ {0.1, 0.3, 1, 3}; LDS on a validation half and a
report half of the targets (defaults are read off the first). On the issue-16 CNN also: which layer's block
EK-FAC loses (each block of the exact block-diagonal GGN replaced by EK-FAC's or K-FAC's, materialised from
:class:`gradsketch.curvature.KFACOperator`), and whole-model Gaussian sketches of K_ggn (d = 2,048 or 4,096, one
sketch or the average of several at the same kernel cost).

    python benchmarks/bench_ggn_kernels.py issue16 --cache DIR   # bench_lds_cnn's cache: ground truth, model
    python benchmarks/bench_ggn_kernels.py mlp --cache DIR --subsets 64   # bench_arnoldi_speed's ground truths
    python benchmarks/bench_ggn_kernels.py cnn --cache DIR --subsets 32
    python benchmarks/bench_ggn_kernels.py mlp --cache DIR --subsets 64 --library   # the library's TRAK, each
                                                                                     # kernel, timed (float32)
    python benchmarks/bench_ggn_kernels.py mlp --cache DIR --subsets 64 --library --margin   # margin features

Needs about 3 GB (the issue-16 CNN's 5,000 × 10 × 5,994 Jacobians in float64). Results: results/lds_cnn.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

from gradsketch.eval import lds

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def load(which: str, cache: Path, subsets: int):
    """(model float64, (X, y) train, (X, y) test, masks, outputs, validation targets, report targets)."""
    if which == "issue16":
        import bench_lds_cnn as B

        from gradsketch.eval import subset_masks

        Xtr, ytr, Xte, yte = B.fashion(5000, 500)
        m = B.make_cnn()
        m.load_state_dict(torch.load(cache / "full_model.pt", weights_only=True))
        files = sorted((cache / "gt").glob("group_*.npy"))
        outs = np.concatenate([np.load(f) for f in files])
        masks = subset_masks(5000, 50, 0.5, 0)[: outs.shape[0]].numpy()
        val, rep = np.arange(250), np.arange(250, 500)   # as bench_lds_cnn.py levers
        return m.double().eval(), (Xtr, ytr), (Xte, yte), masks, outs, val, rep
    from bench_arnoldi_speed import halves, setup

    task, tr, te, gt = setup(which, cache, subsets, 2)
    val, rep = halves(len(te[1]))
    return task.model.double().eval(), tr, te, np.asarray(gt.masks), np.asarray(gt.outputs), val, rep


def parts(model, X, y, chunk: int = 250):
    """Loss gradients [n, N], K_ggn = Σ R_iᵀR_i with R_i = H_i^{1/2} J_i (accumulated directly), the layer slices
    and the ggn_trace weights ω_i = tr(H_i)/‖p_i − e_{y_i}‖² [n]."""
    P = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x[None],))[0]

    N = sum(v.numel() for v in P.values())
    G, K, W = [], torch.zeros(N, N, dtype=torch.float64), []
    for i in range(0, len(y), chunk):
        Jd = vmap(jacrev(f), in_dims=(None, 0))(P, X[i:i + chunk].double())
        J = torch.cat([Jd[k].reshape(Jd[k].shape[0], Jd[k].shape[1], -1) for k in P], -1)
        with torch.no_grad():
            p = model(X[i:i + chunk].double()).softmax(-1)
        w = p.clone()
        w[torch.arange(len(w)), y[i:i + chunk]] -= 1
        G.append(torch.einsum("nc,ncp->np", w, J))
        W.append((1 - (p * p).sum(1)) / (w * w).sum(1))
        R = (J - torch.einsum("nc,ncp->np", p, J)[:, None]) * p.sqrt()[:, :, None]   # rows √p_c (J_c − pᵀJ)
        R = R.reshape(-1, N)
        K += R.T @ R
    sizes = [v.numel() for v in P.values()]
    offs = np.cumsum([0] + sizes)
    layers = [slice(int(offs[i]), int(offs[i + 2])) for i in range(0, len(sizes), 2)]   # weight + bias
    return torch.cat(G), K, layers, torch.cat(W)


def library(which, model, tr, te, masks, outs, val, rep, margin: bool = False) -> None:
    """``Attributor(task, "trak")`` with each kernel (float32 model, as a user runs it): LDS and process CPU
    seconds of fit + score, after a warm-up of each on a few examples. ``margin``: TRAK's margin features
    (``margin_fn=classification_margin()``), the features and ggn_trace kernels only."""
    import time

    from gradsketch import Attributor, Task
    from gradsketch.attribution import batches, classification_margin

    task = Task.from_classifier(model, margin_fn=classification_margin() if margin else None)
    X, y = tr
    N = task.n_params
    tag = ", margin features" if margin else ""
    cfgs = [(f"features{tag}", dict(kernel="features")), (f"ggn_trace{tag} (default, 'auto')", {})]
    if not margin:
        cfgs += [("ggn", dict(kernel="ggn")), ("ggn, ggn_rank=2", dict(kernel="ggn", ggn_rank=2))]
    if N > 2048:
        sk = dict(sketch=dict(kind="affd", d=2048))
        cfgs += [(f"features{tag}, affd d=2048", dict(kernel="features", **sk)),
                 (f"ggn_trace{tag}, affd d=2048", sk)]
        if not margin:
            cfgs += [("ggn, affd d=2048", dict(kernel="ggn", **sk)),
                     ("ggn, ggn_rank=2, affd d=2048", dict(kernel="ggn", ggn_rank=2, **sk))]
    print("| benchmark | TRAK kernel | LDS validation half | LDS report half | LDS all | fit + score CPU s |\n"
          "|---|---|---|---|---|---|")
    for label, kw in cfgs:
        Attributor(task, "trak", **kw).fit(batches(X[:100], y[:100], batch_size=50), progress=False)
        c = time.process_time()
        S = Attributor(task, "trak", **kw).fit(batches(X, y, batch_size=500), progress=False).score(
            batches(*te, batch_size=500), progress=False)
        cpu = time.process_time() - c
        per = lds(S.double().numpy(), masks, outs).per_target
        print(f"| {which} | {label} | {np.nanmean(per[val]):.3f} | {np.nanmean(per[rep]):.3f} | "
              f"{np.nanmean(per):.3f} | {cpu:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["issue16", "mlp", "cnn"])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--library", action="store_true", help="only the library's TRAK with each kernel, timed")
    ap.add_argument("--margin", action="store_true", help="with --library: TRAK's margin features")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, (X, y), (Xt, yt), masks, outs, val, rep = load(a.which, a.cache, a.subsets)
    if a.library:
        library(a.which, model.float(), (X, y), (Xt, yt), masks, outs, val, rep, a.margin)
        return
    Gtr, KG, layers, w = parts(model, X, y)
    Gte, _, _, _ = parts(model, Xt, yt)
    KE = Gtr.T @ Gtr
    KT = Gtr.T @ (Gtr * w[:, None])
    n, N = Gtr.shape
    print(f"{a.which}: n = {n}, N = {N}, layers {[s.stop - s.start for s in layers]}, tr K_emp = "
          f"{float(torch.trace(KE)):.4g}, tr K_ggn = {float(torch.trace(KG)):.4g}", flush=True)

    def show(label: str, S: torch.Tensor) -> None:
        per = lds(S.numpy(), masks, outs).per_target
        print(f"| {a.which} | {label} | {np.nanmean(per[val]):.3f} | {np.nanmean(per[rep]):.3f} | "
              f"{np.nanmean(per):.3f} |", flush=True)

    def score(blocks: list[tuple[slice, torch.Tensor]], lam: float, A=Gte, B=Gtr) -> torch.Tensor:
        S = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64)
        for s, Kb in blocks:
            L = torch.linalg.cholesky(Kb + lam * torch.eye(Kb.shape[0], dtype=Kb.dtype))
            S += A[:, s] @ torch.cholesky_solve(B[:, s].T.contiguous(), L)
        return S

    whole = [slice(0, N)]
    print("| benchmark | kernel | LDS validation half | LDS report half | LDS all |\n|---|---|---|---|---|")
    for name, K in (("empirical Fisher (TRAK)", KE), ("GGN", KG), ("ggn_trace", KT)):
        lam0 = float(torch.trace(K)) / min(n, N)
        for r in (0.1, 0.3, 1.0, 3.0):
            show(f"{name}, whole, r = {r}", score([(s, K[s, s]) for s in whole], r * lam0))
            show(f"{name}, block-diagonal by layer, r = {r}", score([(s, K[s, s]) for s in layers], r * lam0))
    if a.which != "issue16":
        return
    from gradsketch.attribution import batches
    from gradsketch.curvature import KFACOperator
    from gradsketch.model import Task

    task = Task.from_classifier(model)
    src = {"G": KG}
    for kind, key in (("ekfac", "E"), ("kfac", "K")):
        op = KFACOperator.fit(task, batches(X.double(), y, batch_size=500), kind=kind, fisher="ggn", progress=False)
        M = torch.cat([op(torch.eye(N, dtype=torch.float64)[i:i + 500]) for i in range(0, N, 500)]) * n
        src[key] = 0.5 * (M + M.T)   # the operator is of the mean loss; K_ggn is a sum over examples
    lam0 = float(torch.trace(KG)) / min(n, N)
    names = {"G": "exact GGN", "E": "EK-FAC", "K": "K-FAC"}
    for combo in ("GGG", "EEE", "KKK", "EGG", "GEG", "GGE", "EEG"):
        label = ", ".join(f"{ly} {names[c]}" for ly, c in zip(("conv1", "conv2", "linear"), combo))
        for r in (0.1, 0.3):
            show(f"block-diagonal: {label}, r = {r}", score([(s, src[c][s, s]) for s, c in zip(layers, combo)],
                                                          r * lam0))
    for d, seeds in ((2048, (0,)), (1448, (1, 2)), (1024, (3, 4, 5, 6)), (4096, (0,))):
        for r in (1.0, 3.0):
            S = 0
            for sd in seeds:
                g = torch.Generator().manual_seed(sd)
                Pm = torch.randn(d, N, generator=g, dtype=torch.float64) / d ** 0.5
                Ks = Pm @ KG @ Pm.T
                S = S + score([(slice(0, d), Ks)], r * float(torch.trace(KG)) / min(n, d), Gte @ Pm.T, Gtr @ Pm.T)
            show(f"GGN, Gaussian sketch d = {d} × {len(seeds)} averaged, r = {r}", S)


if __name__ == "__main__":
    main()
