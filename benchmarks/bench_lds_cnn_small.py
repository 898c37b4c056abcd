"""Peers beside gradsketch's defaults on the smaller CNN LDS ground truth of bench_arnoldi_speed.py (4,000
Fashion-MNIST training images, 200 test targets, 32 half subsets x 2 retrains; cached under
/tmp/gradsketch-arnoldi-lds by ``python benchmarks/bench_arnoldi_speed.py cnn``). A stand-in for
bench_lds_cnn.py (5,000 / 500, 50 x 3) while that ground truth is recomputed; peers as bench extras.

    python benchmarks/bench_lds_cnn_small.py
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_arnoldi_speed import setup  # noqa: E402
from bench_lds_cnn import _lds, kronfluence_run, traker_run  # noqa: E402

from gradsketch import Attributor  # noqa: E402
from gradsketch.attribution import batches  # noqa: E402

torch.set_num_threads(1)
task, (Xtr, ytr), (Xte, yte), gt = setup("cnn", Path("/tmp/gradsketch-arnoldi-lds"), 32, 2)
model = task.model
train, test = batches(Xtr, ytr, batch_size=500), batches(Xte, yte, batch_size=500)
rows = []


def gs(label, method, **kw):
    c0, t0 = time.process_time(), time.perf_counter()
    a = Attributor(task, method, **kw).fit(train, progress=False)
    S = a.score(test, progress=False)
    rows.append((label, _lds(S, gt), time.process_time() - c0, time.perf_counter() - t0))
    print(rows[-1], flush=True)


gs("gradsketch Arnoldi (defaults: tail, top 50)", "arnoldi")
gs("gradsketch Arnoldi, sketched affd d=2048 (defaults)", "arnoldi", sketch=dict(kind="affd", d=2048))
gs("gradsketch TRAK (unsketched)", "trak")
gs("gradsketch EK-FAC", "ekfac")
tmp = Path(tempfile.mkdtemp())
for label, fn in [("kronfluence EK-FAC", lambda: kronfluence_run(model, Xtr, ytr, Xte, yte, "ekfac", tmp)),
                  ("traker TRAK (d=2048)", lambda: traker_run(model, Xtr, ytr, Xte, yte, tmp))]:
    c0, t0 = time.process_time(), time.perf_counter()
    S, _ = fn()
    rows.append((label, _lds(S, gt), time.process_time() - c0, time.perf_counter() - t0))
    print(rows[-1], flush=True)
print("| method | LDS | CPU s (fit + score) | wall s |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.1f} | {r[3]:.1f} |")
