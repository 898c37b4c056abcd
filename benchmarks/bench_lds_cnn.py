"""LDS at CNN scale, gradsketch's attribution methods beside the peers (issue 16).

A small CNN on 5,000 Fashion-MNIST training images and 500 test images (Debian's dataset-fashion-mnist IDX
files). Ground truth: ``--subsets`` random half subsets × ``--runs`` retrains each, trained with the library's
vectorised harness (``gradsketch.eval.lds_ground_truth``), cached per group of subsets in ``--cache`` and
resumed on a rerun. Every method scores the same trained model against the same ground truth; featurisation
(fit) and scoring times are recorded separately.

    nice -n 10 python benchmarks/bench_lds_cnn.py ground-truth   # the CPU-heavy part, resumable

The issue's ground truth (50 × 3, about 85 CPU minutes) and the trained model are committed in
``benchmarks/data/lds_cnn`` (236 KB): ``cp -r benchmarks/data/lds_cnn/. DIR/`` and ``--cache DIR`` skip the first
phase (``ground-truth`` finds every group done and checks its config), and are what every table in
``benchmarks/results/lds_cnn.md`` from session 7 on was computed against.
    nice -n 10 python benchmarks/bench_lds_cnn.py methods         # gradsketch methods + installed peers
    python benchmarks/bench_lds_cnn.py levers                     # TRAK's levers on a validation / report half

Peers (optional): traker (TRAK) and dattri from the ``bench`` extra; kronfluence (EK-FAC, K-FAC) by hand with
``pip install --no-deps kronfluence==1.0.1 accelerate einops einconv opt-einsum`` (its torchvision dependency
would replace torch with a CUDA build). A peer that is not installed is reported as such, never silently dropped.

On a GPU (issue 16's time goal; the CPU table cannot meet it): ``methods --device cuda`` moves the model and the
data to the device before any method sees them (gradsketch's ``Task`` runs where the parameters are; kronfluence
with ``cpu=False``, traker and dattri with ``device=``), times each stage in wall seconds between
``torch.cuda.synchronize()`` calls after a full-size warm-up (``--warmup-size``), brings the scores back to the
CPU for the LDS, records a method that fails with its error, and reports every row against the best peer of the
same run with the goal-2 verdict. The ground truth and the model come from the CPU run's cache (``--cache``), the
images from an ``export-data`` npz (``--data``), since the device machine has neither the IDX files nor a
network. The prepared call: ``bash benchmarks/gpu_prep.sh`` here, then on the device
``PARTS=lds bash benchmarks/gpu_session.sh --skip-tests`` (see its header and benchmarks/results/lds_cnn.md).

    python benchmarks/bench_lds_cnn.py export-data --out .gpu/lds_cnn/fashion.npz
    python benchmarks/bench_lds_cnn.py methods --device cuda --cache .gpu/lds_cnn --data .gpu/lds_cnn/fashion.npz \
        --seed 0 --first "kronfluence EK-FAC" "TRAK (unsketched, default kernel='auto': ggn_trace)"
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# the IDX files, or the npz of the selected images that ``export-data`` writes (for a machine without the files)
ROOT = Path(os.environ.get("GS_FASHION", "/usr/share/datasets/fashion-mnist"))
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("GS_LDS_CNN_CACHE", str(HERE.parent / ".cache" / "lds_cnn")))
TRAIN = dict(steps=400, lr=5e-3, weight_decay=1e-4, optimizer="adam", batch_size=256, data_seed=0)


class Clock:
    """Wall and process-CPU seconds per phase: ``lap()`` closes a phase; returns the list of
    ``(wall, cpu)`` phases so far (fit, then score). With ``Clock.cuda_sync`` (``--device cuda``) every reading
    waits for the device's queued work first (``torch.cuda.synchronize()``), so a phase's wall seconds include
    its kernels; process CPU seconds mean little there (the host waits or spins)."""

    cuda_sync = False

    def __init__(self) -> None:
        self.t = self._now()
        self.laps: list[tuple[float, float]] = []

    @classmethod
    def _now(cls) -> tuple[float, float]:
        if cls.cuda_sync:
            torch.cuda.synchronize()
        return (time.perf_counter(), time.process_time())

    def lap(self) -> list[tuple[float, float]]:
        now = self._now()
        self.laps.append((now[0] - self.t[0], now[1] - self.t[1]))
        self.t = now
        return self.laps


def load_idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(ROOT / name, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_raw(n_train: int = 5000, n_test: int = 500) -> tuple[np.ndarray, ...]:
    """uint8 images [n, 1, 28, 28] and labels: the first ``n_train``/``n_test`` of a fixed permutation of the
    train/test files, or the same arrays read back from an ``export-data`` npz (``ROOT`` ends in .npz), which
    holds such a prefix (so any smaller n reads the same images)."""
    if ROOT.suffix == ".npz":
        z = np.load(ROOT)
        if len(z["ytr"]) < n_train or len(z["yte"]) < n_test:
            raise SystemExit(f"{ROOT}: holds {len(z['ytr'])} / {len(z['yte'])} train / test images, "
                             f"expected at least {n_train} / {n_test}")
        return z["Xtr"][:n_train], z["ytr"][:n_train], z["Xte"][:n_test], z["yte"][:n_test]
    Xtr = load_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    ytr = load_idx("train-labels-idx1-ubyte.gz", 8)
    Xte = load_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    yte = load_idx("t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(0)
    tr, te = rng.permutation(len(ytr))[:n_train], rng.permutation(len(yte))[:n_test]
    return Xtr[tr], ytr[tr], Xte[te], yte[te]


def fashion(n_train: int = 5000, n_test: int = 500) -> tuple[torch.Tensor, ...]:
    """First ``n_train``/``n_test`` images of a fixed permutation of the train/test files, standardised."""
    Xtr, ytr, Xte, yte = fashion_raw(n_train, n_test)

    def prep(X: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(X.astype(np.float32)) / 255.0 - 0.2860) / 0.3530

    return (prep(Xtr), torch.from_numpy(ytr.astype(np.int64)), prep(Xte), torch.from_numpy(yte.astype(np.int64)))


def make_cnn() -> nn.Module:
    """Two strided convolutions and a linear head: 5,994 parameters."""
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def ground_truth(args: argparse.Namespace):
    from gradsketch.eval import lds_ground_truth

    Xtr, ytr, Xte, yte = fashion(args.n_train, args.n_test)
    t = time.perf_counter()
    gt = lds_ground_truth(make_cnn, (Xtr, ytr), (Xte, yte), n_subsets=args.subsets, n_runs=args.runs,
                          output="margin", seed=0, group=args.group, cache=args.cache / "gt", progress=True,
                          **TRAIN)
    print(f"ground truth: {args.subsets} subsets x {args.runs} runs in {time.perf_counter() - t:.0f} s", flush=True)
    return gt


def trained_model(args: argparse.Namespace) -> nn.Module:
    """The model every method attributes: trained on all of the training set with the ground truth's recipe."""
    from gradsketch.eval import train_models
    from gradsketch.eval.train import load_model

    f = args.cache / "full_model.pt"
    if f.exists():
        m = make_cnn()
        m.load_state_dict(torch.load(f, weights_only=True))
        return m.eval()
    Xtr, ytr, _, _ = fashion(args.n_train, args.n_test)
    params = train_models(make_cnn, Xtr, ytr, seeds=[0], **TRAIN)
    m = load_model(make_cnn, params, 0).eval()
    tmp = f.with_suffix(".tmp")
    torch.save(m.state_dict(), tmp)
    os.replace(tmp, f)
    return m


def _lds(scores: torch.Tensor, gt) -> float:
    from gradsketch.eval import lds

    return float(lds(scores.double().numpy(), gt.masks.numpy(), gt.outputs.numpy()).mean)


def gradsketch_runs(model: nn.Module) -> list[tuple[str, Any]]:
    """(label, fn(Xtr, ytr, Xte, yte) -> (scores, clock laps)) for every gradsketch method at its defaults
    (no tuning on the targets)."""
    from gradsketch import Attributor, Task
    from gradsketch.attribution import batches

    task = Task.from_classifier(model)
    d = 2048
    # TRAK's default kernel is 'auto' since session 11: 'ggn_trace' for this task (Task.from_classifier); the
    # published ΦᵀΦ, the default before, is kernel='features'
    cfgs = [("grad-dot", "grad-dot", {}), ("TRAK (unsketched, default kernel='auto': ggn_trace)", "trak", {}),
            (f"TRAK, affd d={d} (default kernel: ggn_trace)", "trak", dict(sketch=dict(kind="affd", d=d))),
            ("TRAK, affd d=4096 (default kernel: ggn_trace)", "trak", dict(sketch=dict(kind="affd", d=4096))),
            ("TRAK, kernel='features' (unsketched; published, the default before session 11)", "trak",
             dict(kernel="features")),
            (f"TRAK, kernel='features', affd d={d}", "trak", dict(kernel="features", sketch=dict(kind="affd", d=d))),
            ("EK-FAC", "ekfac", {}), ("K-FAC", "kfac", {}),
            (f"EK-FAC, affd d={d}", "ekfac", dict(sketch=dict(kind="affd", d=d))),
            ("EK-FAC, fisher='mc' (one sampled label, as kronfluence)", "ekfac", dict(fisher="mc")),
            ("Arnoldi (defaults)", "arnoldi", {}),
            # TRAK with the Gauss-Newton kernel (session 9): not TRAK's default; its cost is one pass per
            # output-Hessian direction (9 for 10 classes) and a d x d kernel even when d > n
            ("TRAK, kernel='ggn' (unsketched)", "trak", dict(kernel="ggn")),
            (f"TRAK, kernel='ggn', affd d={d}", "trak", dict(kernel="ggn", sketch=dict(kind="affd", d=d))),
            (f"TRAK, kernel='ggn', ggn_rank=2, affd d={d}", "trak",
             dict(kernel="ggn", ggn_rank=2, sketch=dict(kind="affd", d=d))),
            ("TRAK, kernel='ggn', affd d=4096", "trak", dict(kernel="ggn", sketch=dict(kind="affd", d=4096)))]
    # influence (explicit) is left out at this scale: N = 5,994 dense Hessian columns (or d = 2,048 sketched
    # ones) over 5,000 images cost 30x (10x) Arnoldi's Hessian products on this shared 2-core machine
    out = []
    for label, method, kw in cfgs:
        def run(Xtr, ytr, Xte, yte, method: str = method, kw: dict = kw) -> tuple[torch.Tensor, list]:
            train, test = batches(Xtr, ytr, batch_size=500), batches(Xte, yte, batch_size=500)
            clk = Clock()
            a = Attributor(task, method, **kw).fit(train, progress=False)
            clk.lap()
            sc = a.score(test, progress=False)
            return sc, clk.lap()
        out.append((label, run))
    return out


def kronfluence_run(model: nn.Module, Xtr, ytr, Xte, yte, strategy: str, tmp: Path):
    import copy
    import logging
    import tempfile

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task as KTask
    from torch.utils.data import TensorDataset

    class ClassificationTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if not sample:
                return F.cross_entropy(logits, y, reduction="sum")
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):   # kronfluence's examples: the margin, as a loss
            x, y = batch
            logits = model(x)
            idx = torch.arange(logits.shape[0], device=logits.device)
            other = logits.clone()
            other[idx, y] = float("-inf")
            return -(logits[idx, y] - other.logsumexp(-1)).sum()

    ktask = ClassificationTask()
    m = prepare_model(copy.deepcopy(model), ktask)
    # a fresh folder per call: a full-size warm-up must leave nothing that the timed run could load
    an = Analyzer(f"lds_cnn_{strategy}", m, ktask, cpu=Xtr.device.type == "cpu", disable_tqdm=True,
                  output_dir=tempfile.mkdtemp(dir=tmp), log_level=logging.WARNING)
    tr, te = TensorDataset(Xtr, ytr), TensorDataset(Xte, yte)
    clk = Clock()
    an.fit_all_factors(strategy, tr, per_device_batch_size=500, factor_args=FactorArguments(strategy=strategy),
                       overwrite_output_dir=True)
    clk.lap()
    # all test targets in one query batch: kronfluence recomputes the training gradients for every query batch
    an.compute_pairwise_scores(f"s_{strategy}", strategy, te, tr, per_device_query_batch_size=len(yte),
                               per_device_train_batch_size=500, overwrite_output_dir=True)
    sc = an.load_pairwise_scores(f"s_{strategy}")
    return sc["all_modules"].detach().cpu(), clk.lap()


def traker_run(model: nn.Module, Xtr, ytr, Xte, yte, tmp: Path):
    import copy
    import tempfile

    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    m = copy.deepcopy(model).eval()
    n_params = sum(p.numel() for p in m.parameters())
    dev = str(Xtr.device)   # its BasicProjector on either device (its CudaProjector needs fast_jl, not carried)
    proj = BasicProjector(grad_dim=n_params, proj_dim=2048, seed=0, proj_type=ProjectionType.rademacher,
                          device=dev, dtype=torch.float32)
    clk = Clock()
    # a fresh save_dir per call: traker resumes from what a save_dir holds (a full-size warm-up's features)
    tk = TRAKer(model=m, task="image_classification", train_set_size=len(ytr),
                save_dir=tempfile.mkdtemp(dir=tmp, prefix=f"trak_{len(ytr)}_"),
                device=dev, projector=proj, use_half_precision=False)
    tk.load_checkpoint(m.state_dict(), model_id=0)
    for i in range(0, len(ytr), 250):
        tk.featurize(batch=(Xtr[i:i + 250], ytr[i:i + 250]), num_samples=min(250, len(ytr) - i))
    tk.finalize_features()
    clk.lap()
    tk.start_scoring_checkpoint(exp_name="lds", checkpoint=m.state_dict(), model_id=0, num_targets=len(yte))
    for i in range(0, len(yte), 250):
        tk.score(batch=(Xte[i:i + 250], yte[i:i + 250]), num_samples=min(250, len(yte) - i))
    sc = torch.as_tensor(tk.finalize_scores(exp_name="lds")).T.cpu()
    return sc, clk.lap()


def dattri_run(model: nn.Module, Xtr, ytr, Xte, yte, which: str):
    """dattri 0.3.0's attributors as in its MNIST examples: the training loss is the cross-entropy, the target
    (test side) the correct-class margin (as for kronfluence: −margin for the influence attributors, whose scores
    read loss-valued targets); TRAK with its own margin loss and correct-class probability, projection d = 2,048
    (its default is 512) in float32. The influence attributors invert the Hessian of the loss with
    ``regularization=0.01``: CG with its default 10 iterations over the whole training set (one 5,000-example
    batch, so every HVP is the full mean), Arnoldi with 100 iterations and the top 100 eigenpairs (its defaults)
    on the Hessian of the first 1,000 images (memory); CG scores with one training batch of all examples (dattri
    recomputes the test side for every training batch) and 1 test target at a time (memory). Scores are returned
    [n_test, n_train], positive = the training example raises the test margin."""
    import copy

    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    m = copy.deepcopy(model).eval()
    dev = str(Xtr.device)
    ce = nn.CrossEntropyLoss()

    def logits(params, x):  # dattri calls with one example (vmapped, maybe without its batch axis) or a batch
        return torch.func.functional_call(m, params, x if x.ndim == 4 else x.unsqueeze(0))

    def loss(params, data):
        x, y = data
        return ce(logits(params, x), y.reshape(-1))

    def margin(params, data):
        x, y = data
        z, y = logits(params, x), y.reshape(-1)
        hit = torch.arange(z.shape[1], device=z.device) == y[:, None]
        other = torch.where(hit, torch.full_like(z, float("-inf")), z)
        return ((z * hit).sum(1) - torch.logsumexp(other, 1)).sum()

    def prob(params, data):
        return torch.exp(-loss(params, data))

    tr, te = TensorDataset(Xtr, ytr), TensorDataset(Xte, yte)
    full = DataLoader(tr, batch_size=len(tr), shuffle=False)
    clk = Clock()
    if which == "trak":
        task = AttributionTask(loss_func=margin, model=m, checkpoints=m.state_dict())
        a = TRAKAttributor(task=task, correct_probability_func=prob, device=dev,
                           projector_kwargs={"proj_dim": 2048, "device": dev})
        a.cache(DataLoader(tr, batch_size=500, shuffle=False))
        clk.lap()
        with torch.no_grad():
            sc = a.attribute(DataLoader(te, batch_size=500, shuffle=False))
        return sc.T.detach().cpu(), clk.lap()
    def neg_margin(params, data):
        return -margin(params, data)

    # dattri's influence score is ∇targetᵀ H⁻¹ ∇loss(z) with the sign its loss-valued targets read as "z helps"
    # (including z lowers the target by about that, over n); for the margin, where higher is better, the target is
    # therefore −margin, as in the kronfluence task above (with +margin every score's sign flips: LDS −0.164)
    task = AttributionTask(loss_func=loss, model=m, checkpoints=m.state_dict(), target_func=neg_margin)
    if which == "cg":
        a = IFAttributorCG(task=task, device=dev, max_iter=10, regularization=0.01)
    elif which == "arnoldi":
        # the Hessian of 1,000 of the 5,000 images (its precompute_data_ratio): with all 5,000 in one batch its
        # forward-over-reverse HVP passed a 13 GB address-space cap on this shared machine
        a = IFAttributorArnoldi(task=task, device=dev, proj_dim=100, max_iter=100, regularization=0.01,
                                precompute_data_ratio=0.2)
        full = DataLoader(tr, batch_size=len(tr) // 5, shuffle=False)
    else:
        raise ValueError(f"which: expected 'trak', 'cg' or 'arnoldi', got {which!r}")
    a.cache(full)
    if which == "arnoldi":
        # dattri 0.3.0's ArnoldiProjector keeps the top proj_dim eigenpairs by |λ|; when some are negative (the loss
        # Hessian of this CNN is indefinite beyond its `regularization`) it lowers proj_dim and warns, but keeps the
        # negative pairs, and project() then divides by sqrt(λ) < 0: NaN in every projected row, so every score
        # is NaN. Its own intent (positive eigenvalues only) is applied here by hand, before any projection.
        from dattri.func.projection import ArnoldiProjector

        for f in a.arnoldi_projectors:   # arnoldi_project returns a closure over its ArnoldiProjector
            p = next(c.cell_contents for c in f.__closure__ if isinstance(c.cell_contents, ArnoldiProjector))
            p.get_eigenspace()
            keep = p.eigvals > 0
            p.eigvals, p.eigvecs, p.proj_dim = p.eigvals[keep], p.eigvecs[keep], int(keep.sum())
            print(f"dattri Arnoldi: {p.proj_dim} of {keep.numel()} eigenvalues positive "
                  f"(range {float(p.eigvals.min()):.3g} .. {float(p.eigvals.max()):.3g})", flush=True)
    clk.lap()
    # dattri recomputes the test side's inverse-HVP for every training batch, so CG gets one training batch of
    # all 5,000; it vmaps its HVPs over the test batch, each over the 5,000-image Hessian batch (20 targets at
    # once needed 18 GB and were killed for memory here): 1 target at a time. Arnoldi's test side is a cheap
    # projection: training batches of 500 (one batch of 5,000 ran out of a 9 GB memory cap)
    if which == "cg":   # memory grows with the targets one attributor has scored: a fresh one per 4 targets
        import gc

        parts = []
        for lo in range(0, len(yte), 4):
            if lo:
                del a
                gc.collect()
                a = IFAttributorCG(task=task, device=dev, max_iter=10, regularization=0.01)
                a.cache(full)
            sub = TensorDataset(Xte[lo:lo + 4], yte[lo:lo + 4])
            parts.append(a.attribute(DataLoader(tr, batch_size=len(tr), shuffle=False),
                                     DataLoader(sub, batch_size=1, shuffle=False)).detach())
        sc = torch.cat(parts, 1)
    else:
        sc = a.attribute(DataLoader(tr, batch_size=500, shuffle=False), DataLoader(te, batch_size=500, shuffle=False))
    return sc.T.detach().cpu(), clk.lap()


def _device_name(dev: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)


def _gt_complete(args: argparse.Namespace) -> bool:
    n_groups = -(-args.subsets // args.group)
    return len(list((args.cache / "gt").glob("group_*.npy"))) >= n_groups


def run_methods(args: argparse.Namespace) -> None:
    """Scores of every method on the trained model, saved in the cache (runs while the ground truth trains).

    Every method first runs once on 200 training / 20 test images (``--warmup``, on by default) so that the
    timed run carries no one-off costs of the process (lazy imports, kernel selection): the times are what a
    user pays per attribution, for gradsketch and the peers alike.

    ``--device cuda``: the model and the data are moved to the device before any method sees them (so
    ``Task.from_classifier`` and the peers run there; the scores come back to the CPU for the LDS), every stage is
    timed in wall seconds between ``torch.cuda.synchronize()`` calls, and the warm-up is the full-size run itself
    (``--warmup-size full``): kernel selection and Triton compilation depend on the shapes, which a 200 / 20 warm-up
    does not share. A method that fails there is recorded with its error and the run goes on. ``--first`` puts
    the named labels first, so that a run cut short by its timeout still holds the decisive rows."""
    import re
    import shutil
    import tempfile
    import traceback

    Xtr, ytr, Xte, yte = fashion(args.n_train, args.n_test)
    model = trained_model(args)
    dev = torch.device(args.device)
    on_device = dev.type != "cpu"
    if on_device:
        Clock.cuda_sync = dev.type == "cuda"
        model = model.to(dev)
        Xtr, ytr, Xte, yte = (t.to(dev) for t in (Xtr, ytr, Xte, yte))
    res_path = args.cache / "methods.json"
    sdir = args.cache / "scores"
    sdir.mkdir(exist_ok=True)
    done = json.loads(res_path.read_text()) if res_path.exists() else {}
    tmp = Path(tempfile.mkdtemp(prefix="lds-cnn-"))
    peers: list[tuple[str, Any]] = [
        ("kronfluence EK-FAC", lambda *D: kronfluence_run(model, *D, "ekfac", tmp)),
        ("kronfluence K-FAC", lambda *D: kronfluence_run(model, *D, "kfac", tmp)),
        ("traker TRAK (d=2048)", lambda *D: traker_run(model, *D, tmp)),
        ("dattri TRAK (d=2048)", lambda *D: dattri_run(model, *D, "trak")),
        ("dattri Arnoldi (top 100 of 100 it., Hessian of 1/5 of the images)",
         lambda *D: dattri_run(model, *D, "arnoldi")),
        ("dattri influence, CG (10 it.)", lambda *D: dattri_run(model, *D, "cg"))]
    runs = gradsketch_runs(model) + peers
    if args.first:
        labels = [lb for lb, _ in runs]
        unknown = [f for f in args.first if f not in labels]
        if unknown:
            raise SystemExit(f"--first: expected method labels, got unknown {unknown}; labels: {labels}")
        runs = sorted(runs, key=lambda r: args.first.index(r[0]) if r[0] in args.first else len(args.first))
    full_warmup = args.warmup_size == "full" or (args.warmup_size == "auto" and on_device)
    try:
        for label, fn in runs:
            if label in done or (args.only and not any(o in label for o in args.only)):
                continue
            n_test = args.n_test
            if "CG" in label and args.cg_targets < args.n_test:
                n_test = args.cg_targets   # its cost grows with n_train x n_test: a prefix of the targets
            try:
                if args.warmup and full_warmup:
                    fn(Xtr, ytr, Xte[:n_test], yte[:n_test])
                elif args.warmup:
                    fn(Xtr[:200], ytr[:200], Xte[:20], yte[:20])
                if args.seed is not None:   # kronfluence and fisher='mc' sample labels from torch's global RNG
                    torch.manual_seed(args.seed)
                sc, laps = fn(Xtr, ytr, Xte[:n_test], yte[:n_test])
                f = sdir / (re.sub(r"[^A-Za-z0-9]+", "_", label) + ".pt")
                torch.save(sc.double().cpu(), f)
                (fw, fc), (sw, scpu) = laps
                done[label] = dict(scores=f.name, fit_s=fw, score_s=sw, fit_cpu=fc, score_cpu=scpu, n_test=n_test,
                                   warmup=bool(args.warmup))
                if on_device:
                    done[label].update(device=_device_name(dev), clock="wall, cuda-synchronised" if
                                       Clock.cuda_sync else "wall", warmup_size="full" if full_warmup else "small",
                                       seed=args.seed)
            except ImportError as e:
                done[label] = dict(error=f"not installed: {e}")
            except Exception as e:   # on the device only: one method's failure must not lose the others
                if not on_device:
                    raise
                traceback.print_exc()
                done[label] = dict(error=f"failed on {dev}: {type(e).__name__}: {str(e)[:300]}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            print(label, done[label], flush=True)
            res_path.write_text(json.dumps(done, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _gt_complete(args):
        print("ground truth incomplete: the report uses the groups finished so far", flush=True)
    report(args)


def report(args: argparse.Namespace) -> None:
    import platform

    import numpy as np

    from gradsketch.eval import LDSData, subset_masks

    # the groups finished so far (all of them once the ground-truth phase is complete)
    files = sorted((args.cache / "gt").glob("group_*.npy"))
    if not files:
        raise SystemExit("no ground-truth group finished yet")
    outs = torch.cat([torch.from_numpy(np.load(f)) for f in files])
    gt = LDSData(subset_masks(args.n_train, args.subsets, 0.5, 0)[:outs.shape[0]], outs)
    n_done = int(outs.shape[0])
    done = json.loads((args.cache / "methods.json").read_text())
    k = min([args.cg_targets] + [int(r.get("n_test", args.n_test)) for r in done.values() if "error" not in r])
    gt_k = LDSData(gt.masks, gt.outputs[:, :k])
    devices = sorted({r["device"] for r in done.values() if "device" in r})
    if devices:
        device_report(args, done, gt, gt_k, k, n_done, devices)
        return
    rows = [f"| method | LDS | LDS, first {k} targets | fit CPU s | score CPU s | total CPU s | total wall s |",
            "|---|---|---|---|---|---|---|"]
    for label, r in done.items():
        if "error" in r:
            rows.append(f"| {label} | {r['error']} | | | | | |")
            continue
        sc = torch.load(args.cache / "scores" / r["scores"], weights_only=True)
        n_test = sc.shape[0]
        bad = int((~torch.isfinite(sc)).sum())
        if bad:
            rows.append(f"| {label} | {bad} of {sc.numel()} scores NaN/Inf | | {r['fit_cpu']:.2f} | "
                        f"{r['score_cpu']:.2f} | {r['fit_cpu'] + r['score_cpu']:.2f} | "
                        f"{r['fit_s'] + r['score_s']:.1f} |")
            continue
        lds_all = f"{_lds(sc, gt):.3f}" if n_test == gt.outputs.shape[1] else f"(scored {n_test} targets only)"
        fc, scpu = r.get("fit_cpu", float("nan")), r.get("score_cpu", float("nan"))
        rows.append(f"| {label} | {lds_all} | {_lds(sc[:k], gt_k):.3f} | {fc:.2f} | {scpu:.2f} | {fc + scpu:.2f} | "
                    f"{r['fit_s'] + r['score_s']:.1f} |")
    _emit(args, "LDS at CNN scale, gradsketch beside the peers (issue 16)", "\n".join(rows),
          f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}; machine shared with other "
          f"jobs (load 10-12 on 2 cores, times are indicative only). CNN Conv2d(1, 8, 5, stride 2)-ReLU-"
          f"Conv2d(8, 16, 5, stride 2)-ReLU-Linear(256, 10) "
          f"({sum(p.numel() for p in make_cnn().parameters())} parameters), {args.n_train} Fashion-MNIST "
          f"training images, {args.n_test} test images; model and ground truth trained with Adam {TRAIN}. "
          f"Ground truth: {n_done} (of {args.subsets} planned) random half subsets x {args.runs} retrains, "
          f"output = correct-class margin. Every method at its defaults (no tuning on the test targets); peers as "
          f"in their documentation's classification examples.")


def _emit(args: argparse.Namespace, title: str, table: str, intro: str) -> None:
    """Prints the table and, with ``--out``, writes it under a heading and a dated introduction."""
    from datetime import datetime, timezone

    print(table)
    if args.out is not None:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        args.out.write_text(f"# {title}\n\n{when}, {intro}\n\n{table}\n")


PEERS = ("kronfluence", "traker", "dattri")


def device_report(args: argparse.Namespace, done: dict, gt, gt_k, k: int, n_done: int, devices: list[str]) -> None:
    """The table of a ``methods --device cuda`` run: times are the synchronised wall seconds of each stage (the
    process CPU seconds of the host thread are shown but mean little), and every row is set against the best peer
    of the same run (highest LDS over all targets): issue 16's second goal is LDS ≥ best peer + 0.05 at ≤ 1/3 of
    its time."""
    import platform

    clocks = sorted({r.get("clock", "?") for r in done.values() if "error" not in r})
    ok: dict[str, tuple[float, float, float, float, str]] = {}
    rows = [f"device: {', '.join(devices)}; clock: {', '.join(clocks)}; each stage after a "
            f"{', '.join(sorted({r.get('warmup_size', '?') for r in done.values() if 'error' not in r}))}-size "
            f"warm-up run of the same method in the same process", "",
            f"| method | LDS | LDS, first {k} targets | fit s | score s | total s | host CPU s | LDS − best peer "
            f"| time / best peer |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in done.items():
        if "error" in r:
            continue
        sc = torch.load(args.cache / "scores" / r["scores"], weights_only=True)
        if not bool(torch.isfinite(sc).all()):
            ok[label] = (float("nan"), float("nan"), r["fit_s"], r["score_s"],
                         f"{int((~torch.isfinite(sc)).sum())} of {sc.numel()} scores NaN/Inf")
            continue
        full = _lds(sc, gt) if sc.shape[0] == gt.outputs.shape[1] else float("nan")
        ok[label] = (full, _lds(sc[:k], gt_k), r["fit_s"], r["score_s"], "")
    peers = {lb: v for lb, v in ok.items() if lb.startswith(PEERS) and v[0] == v[0]}
    best = max(peers, key=lambda lb: peers[lb][0]) if peers else None
    for label, r in done.items():
        if "error" in r:
            rows.append(f"| {label} | {r['error']} | | | | | | | |")
            continue
        full, first, fs, ss, bad = ok[label]
        cpu = r.get("fit_cpu", float("nan")) + r.get("score_cpu", float("nan"))
        if bad:
            rows.append(f"| {label} | {bad} | | {fs:.3f} | {ss:.3f} | {fs + ss:.3f} | {cpu:.2f} | | |")
            continue
        vs = ("", "")
        if best is not None and full == full:
            vs = (f"{full - peers[best][0]:+.3f}", f"{(fs + ss) / (peers[best][2] + peers[best][3]):.2f}")
        lds_all = f"{full:.3f}" if full == full else f"(scored {r['n_test']} targets only)"
        rows.append(f"| {'**' + label + '** (best peer)' if label == best else label} | {lds_all} | {first:.3f} | "
                    f"{fs:.3f} | {ss:.3f} | {fs + ss:.3f} | {cpu:.2f} | {vs[0]} | {vs[1]} |")
    if best is not None:
        bar, budget = peers[best][0] + 0.05, (peers[best][2] + peers[best][3]) / 3
        hits = [lb for lb, v in ok.items() if not lb.startswith(PEERS) and v[0] == v[0] and v[0] >= bar
                and v[2] + v[3] <= budget]
        rows += ["", f"Goal 2's bar in this run (best peer + 0.05 at ≤ 1/3 of its time; best peer: {best}): "
                 f"LDS ≥ {bar:.3f} at ≤ {budget:.3f} s. "
                 + (f"gradsketch rows that clear it: {'; '.join(hits)}." if hits else
                    "No gradsketch row of this run clears it.")]
    else:
        rows += ["", "No peer finished in this run: goal 2 cannot be judged from it."]
    _emit(args, f"LDS at CNN scale on {', '.join(devices)} (issue 16)", "\n".join(rows),
          f"{platform.machine()} host, {args.threads} host thread(s), torch {torch.__version__}. Same CNN "
          f"({sum(p.numel() for p in make_cnn().parameters())} parameters), model and ground truth as the CPU "
          f"table (the CPU run's cache: {n_done} of {args.subsets} subsets x {args.runs} retrains); "
          f"{args.n_train} training / {args.n_test} test images on the device; scores brought back to the CPU "
          f"for the LDS.")


def levers(args: argparse.Namespace) -> None:
    """Issue 16's second goal (best default ≥ best peer + 0.05 at ≤ 1/3 of its time): the TRAK levers, each scored
    on the validation half (targets 0 .. n/2 - 1, where a setting would be chosen) and the report half (the rest).

    The kernel variants are exact (float64 per-example gradients of the correct-class margin f, their loss
    features q·f' with q = 1 - σ(f), since ∇ loss = -(1 - p_y) ∇f for the cross-entropy; per-layer Gram matrices
    combined with weights; λ = r · tr(G)/n); the library rows are timed in process CPU seconds after a warm-up.
    ``python benchmarks/bench_lds_cnn.py levers --cache DIR`` (the ground truth and the model must be cached)."""
    import copy

    import numpy as np

    from gradsketch import Attributor, Task
    from gradsketch.attribution import batches, classification_margin
    from gradsketch.eval import lds, subset_masks

    files = sorted((args.cache / "gt").glob("group_*.npy"))
    if not files:
        raise SystemExit("no ground-truth group finished yet")
    outs = torch.cat([torch.from_numpy(np.load(f)) for f in files]).numpy()
    masks = subset_masks(args.n_train, args.subsets, 0.5, 0)[:outs.shape[0]].numpy()
    h = args.n_test // 2

    def halves(S: torch.Tensor) -> tuple[float, float, float]:
        per = lds(S.double().numpy(), masks, outs).per_target
        return float(np.nanmean(per[:h])), float(np.nanmean(per[h:])), float(np.nanmean(per))

    Xtr, ytr, Xte, yte = fashion(args.n_train, args.n_test)
    model = trained_model(args)
    rows: list[tuple[str, tuple[float, float, float], str]] = []

    def row(label: str, S: torch.Tensor, cpu: str = "") -> None:
        rows.append((label, halves(S), cpu))
        print(f"{label}: val {rows[-1][1][0]:.3f} report {rows[-1][1][1]:.3f} all {rows[-1][1][2]:.3f} {cpu}",
              flush=True)

    # exact float64 features, split by layer (the modules holding parameters, in order)
    m64 = copy.deepcopy(model).double()
    ft = Task(m64, classification_margin())
    F = torch.cat([ft.grads((Xtr[i:i + 500].double(), ytr[i:i + 500])) for i in range(0, len(ytr), 500)])
    Fx = torch.cat([ft.grads((Xte[i:i + 500].double(), yte[i:i + 500])) for i in range(0, len(yte), 500)])
    with torch.no_grad():
        q = torch.sigmoid(-classification_margin()(m64, (Xtr.double(), ytr)))
    layers: dict[str, list[int]] = {}
    at = 0
    for name, prm in m64.named_parameters():
        layers.setdefault(name.rsplit(".", 1)[0], []).extend(range(at, at + prm.numel()))
        at += prm.numel()
    names = list(layers)
    n = F.shape[0]

    def grams(Ftr: torch.Tensor, Fte: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: (Ftr[:, i] @ Ftr[:, i].T, Fte[:, i] @ Ftr[:, i].T) for k, i in layers.items()}

    def trak(gr: dict, w: dict[str, float], r: float = 1.0, train_w: torch.Tensor | None = None) -> torch.Tensor:
        G = sum(w.get(k, 0.0) * gr[k][0] for k in names)
        C = sum(w.get(k, 0.0) * gr[k][1] for k in names)
        lam = r * float(torch.trace(G)) / n
        L = torch.linalg.cholesky(G + lam * torch.eye(n, dtype=G.dtype))
        S = torch.cholesky_solve(C.T.contiguous(), L).T
        return S if train_w is None else S * train_w

    idx = [i for k in names for i in layers[k]]
    loss_gr = grams(F * q[:, None], Fx)
    ones = {k: 1.0 for k in names}
    for r in (0.5, 1.0, 1.5, 2.0):
        row(f"all layers, λ = {r:g}·tr(G)/n" + (" (the default rule)" if r == 1.0 else ""), trak(loss_gr, ones, r))
    marg_gr = grams(F, Fx)
    row("measurement: margin-gradient kernel, train weights q (TRAK paper)", trak(marg_gr, ones, 1.0, q))
    row("measurement: margin-gradient kernel, no q", trak(marg_gr, ones))
    last, head = names[-1], names[:-1]
    row(f"layers: last only ({last})", trak(loss_gr, {last: 1.0}))
    row(f"layers: last two ({', '.join(names[-2:])})", trak(loss_gr, {k: 1.0 for k in names[-2:]}))
    for a in (0.1, 0.3):
        row(f"layers: all but the last × {a:g}", trak(loss_gr, {**{k: a for k in head}, last: 1.0}))
    tr_ = {k: float(torch.trace(loss_gr[k][0])) for k in names}
    row("layers: equal traces (each layer's Gram / its trace)", trak(loss_gr, {k: 1 / tr_[k] for k in names}))
    Fl = (F * q[:, None])[:, idx]
    nrm = Fl.norm(dim=1)
    row("normalisation: unit-norm training gradients", trak(grams(Fl / nrm[:, None], Fx[:, idx]), ones))
    m2 = (Fl ** 2).mean(0)
    for pw in (0.25, 0.5):
        sc = m2.clamp_min(1e-12 * float(m2.mean())) ** -pw
        row(f"normalisation: coordinates × (mean g²)^-{pw:g} (a diagonal, Adam-like metric)",
            trak(grams(Fl * sc, Fx[:, idx] * sc), ones))
    del F, Fx, Fl, marg_gr

    # the library, timed (process CPU after a warm-up of each configuration)
    task = Task.from_classifier(model)
    tr, te = batches(Xtr, ytr, batch_size=500), batches(Xte, yte, batch_size=500)
    lib: dict[str, torch.Tensor] = {}
    cfgs = [("library TRAK (default)", task, "trak", {}),
            ("library TRAK, last layer (Task(params=last layer); not a default)",
             Task.from_classifier(model, params=[p for _, p in list(model.named_parameters())[-2:]]), "trak", {})]
    cfgs += [(f"library TRAK, affd d={d}", task, "trak", dict(sketch=dict(kind="affd", d=d)))
             for d in (1024, 2048, 4096)]
    cfgs += [("library K-FAC", task, "kfac", {}),
             ("library EK-FAC, fisher='mc'", task, "ekfac", dict(fisher="mc"))]
    cpu: dict[str, float] = {}
    for label, t, method, kw in cfgs:
        Attributor(t, method, **kw).fit(batches(Xtr[:200], ytr[:200], batch_size=200), progress=False).score(
            batches(Xte[:20], yte[:20], batch_size=20), progress=False)
        c0 = time.process_time()
        S = Attributor(t, method, **kw).fit(tr, progress=False).score(te, progress=False)
        cpu[label] = time.process_time() - c0
        lib[label] = S.double()
        row(label, S, f"{cpu[label]:.2f}")

    def z(S: torch.Tensor) -> torch.Tensor:   # per-target standardisation before averaging two estimators
        return (S - S.mean(1, keepdim=True)) / S.std(1, keepdim=True)

    a_all = "library TRAK (default)"
    a_last = "library TRAK, last layer (Task(params=last layer); not a default)"
    for a in (a_all, a_last):
        for b in ("library K-FAC", "library EK-FAC, fisher='mc'", "library TRAK, affd d=1024"):
            row(f"z-score average: {a.replace('library ', '')} + {b.replace('library ', '')}", z(lib[a]) + z(lib[b]),
                f"{cpu[a] + cpu[b]:.2f}")
    lines = ["| variant | val LDS | report LDS | all | CPU s |", "|---|---|---|---|---|"]
    lines += [f"| {lb} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} | {c} |" for lb, v, c in rows]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["ground-truth", "methods", "report", "timing", "levers", "export-data"])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--group", type=int, default=10)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--only", nargs="*", default=None, help="run only the methods whose label contains one of these")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="time every method's first run in the process (one-off costs included)")
    p.add_argument("--cg-targets", type=int, default=50,
                   help="test targets dattri's CG influence scores (its cost grows with n_train x n_test)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the methods run (methods phase); the ground truth and the LDS stay on the CPU")
    p.add_argument("--first", nargs="*", default=None,
                   help="method labels to run first, in this order (the rest follow in the usual order)")
    p.add_argument("--warmup-size", choices=["auto", "small", "full"], default="auto",
                   help="warm-up on 200 / 20 images (small) or a full-size run (full); auto: small on the CPU, "
                        "full on a device")
    p.add_argument("--seed", type=int, default=None,
                   help="torch.manual_seed before every method's timed run (default: none; the sampled-label "
                        "methods then depend on what ran before them)")
    p.add_argument("--data", type=Path, default=None,
                   help="the Fashion-MNIST IDX folder or an export-data npz (default $GS_FASHION or Debian's folder)")
    args = p.parse_args()
    global ROOT
    if args.data is not None:
        ROOT = args.data
    if args.phase == "export-data":   # the selected images, for a machine without the IDX files
        if args.out is None:
            raise SystemExit("export-data: expected --out FILE.npz, got none")
        Xtr, ytr, Xte, yte = fashion_raw(args.n_train, args.n_test)
        np.savez_compressed(args.out, Xtr=Xtr, ytr=ytr, Xte=Xte, yte=yte)
        print(f"{args.out}: {len(ytr)} / {len(yte)} images, {args.out.stat().st_size / 1e6:.1f} MB")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: expected a CUDA device, torch sees none")
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.phase == "timing":
        from gradsketch.eval import train_models

        Xtr, ytr, _, _ = fashion(args.n_train, args.n_test)
        for M in (1, 15):
            kw = dict(TRAIN, steps=20)
            t = time.perf_counter()
            train_models(make_cnn, Xtr, ytr, torch.ones(M, Xtr.shape[0], dtype=torch.bool), seeds=range(M), **kw)
            dt = time.perf_counter() - t
            print(f"M={M}: {dt / 20 * 1000:.1f} ms/step, {dt / 20 / M * TRAIN['steps']:.1f} s per model", flush=True)
        return
    if args.phase == "ground-truth":
        m = trained_model(args)
        _, _, Xte, yte = fashion(args.n_train, args.n_test)
        with torch.no_grad():
            print(f"full model test accuracy {(m(Xte).argmax(1) == yte).float().mean():.3f}", flush=True)
        ground_truth(args)
        return
    if args.phase == "report":
        report(args)
        return
    if args.phase == "levers":
        levers(args)
        return
    run_methods(args)


if __name__ == "__main__":
    main()
