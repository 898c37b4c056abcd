"""Subprocess for tests/test_attribution_failures.py: featurise a fixed tiny task into a store.

usage: python _attribution_child.py STORE_DIR SLEEP  (SLEEP seconds per batch, to leave time for a SIGKILL)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradsketch.attribution import Attributor, batches  # noqa: E402
from gradsketch.model import Task  # noqa: E402

N, BATCH, CHUNK = 240, 10, 20


def setup(sleep: float = 0.0):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 6, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def loss_fn(m, b):
        if sleep:
            time.sleep(sleep)
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    return Task(model, loss_fn), batches(X, y, batch_size=BATCH)


def attributor(task, store):
    return Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=16, seed=0), store=store,
                      store_dtype="float32", chunk_rows=CHUNK)


if __name__ == "__main__":
    task, data = setup(float(sys.argv[2]))
    attributor(task, sys.argv[1]).fit(data, progress=False)
    print("done", flush=True)
