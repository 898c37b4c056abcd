"""Where Arnoldi influence's fit time goes (issue 20): cProfile around ``Attributor(task, "arnoldi").fit``.

    python benchmarks/profile_arnoldi.py mlp [old|new]   # digits MLP 64-48-10 (N = 3,610), 1,000 training examples
    python benchmarks/profile_arnoldi.py cnn [old|new]   # small CNN (N = 4,578), 4,000 Fashion-MNIST images

``old``: the pre-issue-20 algorithm (``block_size=1``: single-vector Arnoldi, 200 steps, top 100); ``new`` (the
default): the current defaults (block Lanczos). Prints the fit's CPU and wall time, the Attributor's own
timings and the 40 most expensive calls by cumulative time (one warm-up fit on one batch first, so that
one-time compilation is not charged; BLAS limited to one thread like torch).
Results: benchmarks/results/arnoldi_profile.md.
"""

from __future__ import annotations

import cProfile
import gzip
import io
import pstats
import sys
import time

import numpy as np
import torch
from torch import nn

from gradsketch.attribution import Attributor, batches
from gradsketch.eval import load_digits_split, load_models, make_mlp, train_models
from gradsketch.model import Task

FASHION = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


def _idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_digits_split(1000, 200, seed=0)
    kw = dict(steps=300, lr=1e-2, weight_decay=1e-3)
    model = load_models(lambda: make_mlp((64, 48, 10)),
                        train_models(lambda: make_mlp((64, 48, 10)), data.x_train, data.y_train, seeds=[0], **kw))[0]
    return model, data.x_train, data.y_train


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.tensor(_idx(f"{FASHION}/train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)[:4000] / 255.0,
                     dtype=torch.float32)
    y = torch.tensor(_idx(f"{FASHION}/train-labels-idx1-ubyte.gz", 8)[:4000].astype(np.int64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 5, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, 4000, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    return model, x, y


def main() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    model, x, y = {"mlp": mlp, "cnn": cnn}[sys.argv[1] if len(sys.argv) > 1 else "mlp"]()
    opts = dict(block_size=1) if len(sys.argv) > 2 and sys.argv[2] == "old" else {}
    task = Task.from_classifier(model)
    print(f"parameters {task.n_params}, training examples {len(x)}, options {opts or 'defaults'}")
    data = batches(x, y, batch_size=250)
    Attributor(task, "arnoldi", **dict(opts, n_iters=8, top_k=4)).fit(data[:1], progress=False)  # warm-up
    prof = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    prof.enable()
    attr = Attributor(task, "arnoldi", **opts).fit(data, progress=False)
    prof.disable()
    print(f"fit {time.process_time() - c0:.2f} s CPU, {time.perf_counter() - t0:.1f} s wall; Krylov {attr.krylov_}; "
          f"timings_ {({k: round(v, 2) for k, v in attr.timings_.items()})}")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue())


if __name__ == "__main__":
    main()
