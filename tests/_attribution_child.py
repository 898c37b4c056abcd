"""Subprocess for the attribution process tests: featurise a fixed tiny task into a store.

usage: python _attribution_child.py STORE_DIR SLEEP [--rank R --world-size W] [--go FILE] [--scores FILE]

SLEEP seconds per batch (to leave time for a SIGKILL, or to interleave concurrent writers). Without --rank:
``fit`` (then ``--scores FILE`` saves the scores of the first 3 training batches with torch.save); with
--rank/--world-size: ``featurise`` this rank's share only. ``--go FILE``: print "ready", then wait until FILE
exists before starting (a start barrier for concurrent children).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradsketch.attribution import Attributor, batches  # noqa: E402
from gradsketch.model import Task  # noqa: E402

N, BATCH, CHUNK = 240, 10, 20


def setup(sleep: float = 0.0, calls: list | None = None):
    """The task and its batches; ``calls`` (a list) records the inputs of every loss evaluation."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 6, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def loss_fn(m, b):
        if sleep:
            time.sleep(sleep)
        if calls is not None:
            calls.append(b[0].detach().clone())
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    return Task(model, loss_fn), batches(X, y, batch_size=BATCH)


def attributor(task, store, method="grad-dot", **opts):
    return Attributor(task, method, sketch=dict(kind="sjlt", d=16, seed=0), store=store,
                      store_dtype="float32", chunk_rows=CHUNK, **opts)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("sleep", type=float)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world-size", type=int)
    ap.add_argument("--go")
    ap.add_argument("--scores")
    args = ap.parse_args()
    task, data = setup(args.sleep)
    att = attributor(task, args.store)
    if args.go:
        print("ready", flush=True)
        while not Path(args.go).exists():
            time.sleep(0.005)
    if args.rank is not None:
        att.featurise(data, rank=args.rank, world_size=args.world_size, progress=False)
    else:
        att.fit(data, progress=False)
        if args.scores:
            torch.save(att.score(data[:3], progress=False), args.scores)
    print("done", flush=True)
