"""Subprocess writer for tests/test_store_processes.py: fills (part of) a GradientStore slowly.

usage: python _store_writer.py PATH N_ROWS D CHUNK_ROWS SEED SLEEP MODE [RANK WORLD_SIZE]
MODE "loop" / "step": write the missing chunks one by one, printing "done <i>" after each write_chunk
    returns. Each chunk passes three announced windows; in each the writer sleeps SLEEP seconds
    ("loop") or blocks until it reads a line from stdin ("step"), so that a test can SIGKILL it
    exactly inside a chosen one:
      "phase compute <i>"  computing the rows (nothing written yet)
      "phase data <i>"     half of the chunk's bytes written to data.npy (a torn chunk)
      "phase marker <i>"   all bytes written and fsync'd, completion marker not yet published
MODE "fill": gradsketch.store.fill(rank=RANK, world_size=WORLD_SIZE), sleeping SLEEP per chunk,
    then print "wrote <chunks>".
Rows are a fixed function of SEED (reference_rows), so every run produces the same bytes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

SPEC = {"kind": "dense", "n": 123, "d": 0, "seed": 0}


def reference_rows(seed: int, n_rows: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_rows, d)).astype(np.float32)


def announce(phase: str, i: int, sleep: float, step: bool) -> None:
    print(f"phase {phase} {i}", flush=True)
    if step:
        sys.stdin.readline()
    else:
        time.sleep(sleep)


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gradsketch.store import GradientStore, _io, fill

    path, n_rows, d, chunk_rows, seed, sleep, mode = argv[:7]
    n_rows, d, chunk_rows, seed, sleep = int(n_rows), int(d), int(chunk_rows), int(seed), float(sleep)
    rows = reference_rows(seed, n_rows, d)
    spec = dict(SPEC, d=d)
    store = GradientStore.create_or_open(path, n_rows, d, spec, f"fp-{seed}", chunk_rows=chunk_rows)
    print("open", flush=True)

    if mode in ("loop", "step"):
        step = mode == "step"
        current = [-1]
        pwrite_all, atomic_write = _io.pwrite_all, _io.atomic_write

        def slow_pwrite_all(fd, data, offset):  # write the chunk in two halves, pausing in between
            data = data.cast("B")
            half = len(data) // 2
            pwrite_all(fd, data[:half], offset)
            announce("data", current[0], sleep, step)
            pwrite_all(fd, data[half:], offset + half)

        def slow_atomic_write(path, data, **kw):  # pause after the data fsync, before the marker
            if path.parent.name == "chunks":
                announce("marker", current[0], sleep, step)
            atomic_write(path, data, **kw)

        _io.pwrite_all, _io.atomic_write = slow_pwrite_all, slow_atomic_write
        for i in store.missing_chunks():
            current[0] = i
            announce("compute", i, sleep, step)
            r0, r1 = store.chunk_range(i)
            store.write_chunk(i, rows[r0:r1])
            print(f"done {i}", flush=True)
    elif mode == "fill":
        rank, world_size = int(argv[7]), int(argv[8])

        def compute(r0: int, r1: int) -> np.ndarray:
            time.sleep(sleep)
            return rows[r0:r1]

        written = fill(store, compute, rank=rank, world_size=world_size, progress=False)
        print("wrote " + " ".join(map(str, written)), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
