"""Sketch speed table (time of one sketch of a batch, as a multiple of reading it): the library side of
``gradsketch bench sketches``.

:func:`speed_table` is shared with ``benchmarks/bench_sketch_speed.py``, which runs the full sizes and the
TRAK comparison. Timing method: for every case the baseline (``x.sum()`` on the same
tensor) and the sketch are timed alternately, ``repeats`` times each after one warm-up call, and the
ratio of the medians is reported. Peak extra memory: the process's resident-set high-water mark
(``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs) during one extra call, minus the
resident set just before it; torch frees large blocks back to the OS, so this is the memory the call
needed on top of its input. Linux only; "n/a" elsewhere.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: (label, kind, options) for every variant in the table
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("dense", "dense", {}),
    ("sjlt", "sjlt", {}),
    ("fjl", "fjl", {}),
    ("ffd", "ffd", {}),
    ("affd", "affd", {}),
    ("affd-fft", "affd", {"preconditioner": "fft"}),
    ("affd-orth", "affd", {"preconditioner": "orthogonal"}),
    ("afjl", "afjl", {}),
    ("afjl-fft", "afjl", {"preconditioner": "fft"}),
    ("afjl-orth", "afjl", {"preconditioner": "orthogonal"}),
    ("qk", "qk", {}),
    # the same maps with the native CPU kernels switched off (the pure-torch formulation), for the record
    ("sjlt-torch", "sjlt", {}),
    ("fjl-torch", "fjl", {}),
    ("affd-torch", "affd", {}),
    ("afjl-torch", "afjl", {}),
]
#: dense is O(nd) and generates the n×d Gaussian matrix per call (38 s at n = 2^20, d = 2^10 here):
#: only timed up to this n·d
DENSE_MAX_ND = 1 << 28


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_mib(fn: Callable[[], Any]) -> float | None:
    """Resident-set high-water mark during ``fn()`` minus the resident set before it, in MiB."""
    gc.collect()
    if not _reset_hwm():
        return None
    before = _status_kb("VmRSS")
    fn()
    hwm = _status_kb("VmHWM")
    if before is None or hwm is None:
        return None
    return max(0, hwm - before) / 1024


def time_ratio(fn: Callable[[], Any], x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """(median sketch time / median read time, median sketch seconds, median read seconds), interleaved."""
    fn()  # warm-up (caches, lazy buffers)
    ts, rs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        rs.append(t1 - t0)
        ts.append(t2 - t1)
    t, r = statistics.median(ts), statistics.median(rs)
    return t / r, t, r


def speed_table(log2_n: Sequence[int], log2_d: Sequence[int], variants: Sequence[str] | None = None,
                batch: int = 32, repeats: int = 3, memory: bool = True, seed: int = 0,
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every variant on a ``[batch, n]`` float32 batch; print a markdown table; return the rows.

    ``variants``: labels from :data:`VARIANTS` (default: all but the ``-torch`` ones).

    >>> rows = speed_table([8], [4], ["sjlt"], batch=2, repeats=1, memory=False, echo=lambda s: None)
    >>> rows[0]["variant"], rows[0]["ratio"] > 0
    ('sjlt', True)
    """
    known = [v[0] for v in VARIANTS]
    if variants is not None:
        unknown = sorted(set(variants) - set(known))
        if unknown:
            raise ValueError(f"variants: expected labels among {known}, got unknown {unknown}")
    from gradsketch.sketch import _native, sketch

    chosen = [v for v in VARIANTS if (v[0] in variants if variants is not None else not v[0].endswith("-torch"))]
    rows: list[dict[str, Any]] = []
    echo(f"batch {batch} float32, torch {torch.__version__}, {torch.get_num_threads()} threads; "
         f"ratio = median sketch time / median time of x.sum() (interleaved, {repeats} repeats)")
    header = "| n | d | variant | ratio to read | ms | read ms | peak extra MiB |"
    echo(header)
    echo("|" + "---|" * (header.count("|") - 1))
    g = torch.Generator().manual_seed(seed)
    for pn in log2_n:
        n = 1 << pn
        x = torch.randn(batch, n, generator=g)
        for pd in log2_d:
            d = 1 << pd
            for label, kind, opts in chosen:
                row: dict[str, Any] = {"n": n, "d": d, "variant": label}
                if kind == "dense" and n * d > DENSE_MAX_ND:
                    row.update(ratio=math.nan, ms=math.nan, read_ms=math.nan, mem=None, skipped=True)
                else:
                    S = sketch(kind, n, d, seed=1, **opts)
                    if label.endswith("-torch"):
                        def fn(S=S, x=x):
                            with _native.disabled():
                                return S(x)
                    else:
                        fn = lambda S=S, x=x: S(x)  # noqa: E731
                    reps = 1 if kind == "dense" else repeats
                    ratio, t, r = time_ratio(fn, x, reps)
                    mem = peak_extra_mib(fn) if memory else None
                    row.update(ratio=ratio, ms=t * 1e3, read_ms=r * 1e3, mem=mem, skipped=False)
                    del S
                rows.append(row)
                if row["skipped"]:
                    echo(f"| 2^{pn} | 2^{pd} | {label} | skipped (n·d > 2^28) | | | |")
                else:
                    mem_s = "n/a" if row["mem"] is None else f"{row['mem']:.0f}"
                    echo(f"| 2^{pn} | 2^{pd} | {label} | {row['ratio']:.1f} | {row['ms']:.1f} | "
                         f"{row['read_ms']:.2f} | {mem_s} |")
        del x
        gc.collect()
    return rows
