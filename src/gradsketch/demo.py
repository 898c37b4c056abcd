"""``gradsketch demo``: training data attribution on digits with planted label noise, as an HTML report.

Pipeline (about a minute on a 2-core CPU): load scikit-learn's 8×8 digits (offline), flip 10% of the
training labels, train a small MLP (full-batch Adam, deterministic), featurise the training set into an
AFFD-sketched :class:`gradsketch.GradientStore`, attribute test predictions with Arnoldi influence
(Schioppa et al. 2022, on the sketched Hessian ΦHΦᵀ) and TRAK (Park et al. 2023), detect the flipped
labels by self-influence, and write ``report.html`` (figures inlined) with proponents/opponents of a few
test images, the ROC curves and a timing table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_demo(out_dir: Any = "gradsketch-demo", *, n_train: int = 1000, n_test: int = 200,
             flip_fraction: float = 0.1, hidden: int = 32, steps: int = 300, d: int = 1024, kind: str = "affd",
             n_iters: int = 100, top_k: int = 30, n_show: int = 4, n_each: int = 5, seed: int = 0,
             fresh: bool = True, progress: bool = True, verbose: bool = True) -> Path:
    """Run the demo and return the path of ``report.html`` under ``out_dir``.

    ``fresh=True`` deletes a previous store under ``out_dir`` first (a rerun with ``fresh=False`` reuses
    it: featurisation resumes or is skipped). Deterministic for a fixed ``seed``.
    """
    from .attribution import Attributor, batches, classification_margin
    from .datasets import flip_labels, load_digits_split, make_mlp
    from .eval import load_model, mislabel_detection, train_models
    from .model import Task
    from .report import figure_to_img, table, write_page
    from .report.attribution import attribution_cards
    from .report.plots import plot_roc

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_dir = out / "store"
    if fresh and store_dir.exists():
        shutil.rmtree(store_dir)
    timings: list[tuple[str, float]] = []
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    data = load_digits_split(n_train, n_test, seed=seed)
    y_noisy, flipped = flip_labels(data.y_train, flip_fraction, 10, seed=seed + 1)
    timings.append(("load digits + flip labels", time.perf_counter() - t0))
    say(f"[1/5] digits: {n_train} train ({int(flipped.sum())} labels flipped), {n_test} test")

    t0 = time.perf_counter()
    torch.manual_seed(seed)

    def mf():
        return make_mlp((64, hidden, 10))

    params = train_models(mf, data.x_train, y_noisy, seeds=[seed], steps=steps, lr=1e-2, weight_decay=1e-3,
                          progress=progress)
    model = load_model(mf, params, 0).eval()
    with torch.no_grad():
        acc_test = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        acc_train = float((model(data.x_train).argmax(1) == y_noisy).float().mean())
    timings.append(("train MLP", time.perf_counter() - t0))
    say(f"[2/5] MLP 64-{hidden}-10 trained: train acc (noisy labels) {acc_train:.3f}, test acc {acc_test:.3f}")

    task = Task.from_classifier(model)
    d = min(d, task.n_params)
    tr = batches(data.x_train, y_noisy, batch_size=250)
    te = batches(data.x_test, data.y_test, batch_size=n_test)
    sk = dict(kind=kind, d=d, seed=seed)

    t0 = time.perf_counter()
    # float32 rows: 6% of this small MLP's sketched loss-gradient entries are below float16's normal range
    # (the store would warn that they lose precision); the stores here are a few MB either way
    arn = Attributor(task, "arnoldi", sketch=sk, store=store_dir / "arnoldi", n_iters=n_iters, top_k=top_k,
                     seed=seed, store_dtype="float32").fit(tr, progress=progress)
    timings.append((f"Arnoldi: featurise {n_train} → store ({kind}, d={d})", arn.timings_.get("featurise", 0)))
    timings.append((f"Arnoldi: {n_iters} iterations on ΦHΦᵀ + distill top {top_k}",
                    arn.timings_.get("curvature", 0)))
    say(f"[3/5] Arnoldi influence fitted ({time.perf_counter() - t0:.1f}s); top eigenvalue "
        f"{float(arn.eigenvalues_.abs().max()):.3g}")

    t0 = time.perf_counter()
    trak = Attributor(task, "trak", sketch=sk, store=store_dir / "trak", store_dtype="float32",
                      margin_fn=classification_margin()).fit(tr, progress=progress)
    timings.append((f"TRAK: featurise {n_train} (margin gradients) + kernel inverse", time.perf_counter() - t0))
    say(f"[4/5] TRAK fitted ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    tk = {"Arnoldi influence": arn.topk(te, n_each, progress=progress)}
    timings.append((f"Arnoldi: top-{n_each} proponents/opponents of {n_test} test images", time.perf_counter() - t0))
    t0 = time.perf_counter()
    tk["TRAK"] = trak.topk(te, n_each, progress=progress)
    timings.append((f"TRAK: top-{n_each} proponents/opponents of {n_test} test images", time.perf_counter() - t0))
    t0 = time.perf_counter()
    si = {"Arnoldi influence": arn.self_influence(progress=progress), "TRAK": trak.self_influence(progress=progress)}
    with torch.no_grad():
        si["training loss (baseline)"] = task.loss((data.x_train, y_noisy))
    det = {k: mislabel_detection(v, flipped) for k, v in si.items()}
    timings.append(("self-influence + ROC", time.perf_counter() - t0))

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 2)
    show = torch.randperm(n_test, generator=g)[:n_show].tolist()
    sections = []
    rows = [["train / test examples", f"{n_train} / {n_test}"],
            ["labels flipped", f"{int(flipped.sum())} ({flip_fraction:.0%})"],
            ["model", f"MLP 64-{hidden}-10, {task.n_params} parameters"],
            ["train acc (noisy labels) / test acc", f"{acc_train:.3f} / {acc_test:.3f}"],
            ["sketch", f"{kind}, d = {d}, seed {seed}"],
            ["Arnoldi", f"{n_iters} iterations on ΦHΦᵀ, top {top_k} eigenpairs"],
            ["TRAK", f"margin gradients, kernel {trak.kernel_}, ridge {trak.ridge_:.3g}"],
            ["store", f"{store_dir} ({_store_bytes(store_dir) / 2**20:.2f} MiB)"]]
    sections.append(("Setup", table(rows, ["", ""])))
    det_rows = [[k, r.auc, r.ap] for k, r in det.items()]
    sections.append(("Mislabel detection", figure_to_img(plot_roc(det), "ROC curves") + table(
        det_rows, ["statistic", "ROC-AUC", "average precision"]) +
        f"<p class='note'>Self-influence score(z, z) ranks the {int(flipped.sum())} flipped training labels; "
        "chance is AUC 0.5, AP = "
        f"{float(flipped.float().mean()):.2f}.</p>"))
    test_ex = {t: (data.img_test[t], int(data.y_test[t])) for t in show}
    for name, t in tk.items():
        ids = {int(i) for row in show
               for i in t.indices[row, :n_each].tolist() + t.opponent_indices[row, :n_each].tolist()}
        train_ex = {i: (data.img_train[i], int(y_noisy[i])) for i in ids}
        caption = {}
        with torch.no_grad():
            pred = model(data.x_test[show]).argmax(1).tolist()
        for row, p in zip(show, pred):
            caption[row] = f"predicted {p}"
        flip_share = float(flipped[t.opponent_indices[:, :n_each]].float().mean())
        sections.append((f"Proponents and opponents: {name}", attribution_cards(
            show, t, test_ex, train_ex, n_each, flagged=flipped, flag_text="flipped label", test_caption=caption) + (
            "<p class='note'>Labels shown are the training labels the model saw (after the flips). Proponents have "
            "the largest scores: training on them lowers the test loss. Opponents have the most negative scores. "
            f"{flip_share:.0%} of all {n_test} test images' top-{n_each} opponents are flipped examples "
            f"(base rate {float(flipped.float().mean()):.0%}).</p>")))
    timings.append(("figures + report", time.perf_counter() - t0))
    total = time.perf_counter() - t_all
    sections.append(("Timing", table([[k, f"{v:.2f} s"] for k, v in timings] + [["total", f"{total:.2f} s"]],
                                     ["step", "wall time"])))
    path = write_page(out / "report.html", "gradsketch demo: training data attribution on digits", sections,
                      "<p>Arnoldi influence and TRAK on sketched gradients, with planted label noise.</p>")
    summary = {"auc": {k: r.auc for k, r in det.items()}, "ap": {k: r.ap for k, r in det.items()},
               "test_accuracy": acc_test, "timings_s": dict(timings), "total_s": total, "report": str(path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say("[5/5] mislabel ROC-AUC: " + ", ".join(f"{k} {r.auc:.3f}" for k, r in det.items()))
    say(f"report written to {path.resolve()} ({total:.1f}s)")
    return path


if __name__ == "__main__":  # pragma: no cover
    run_demo()
