"""Sketch speed: every kind on a batch of 32 float32 vectors, as a multiple of reading the batch once.

    .venv/bin/python benchmarks/bench_sketch_speed.py                    # n = 2^20, 2^22, 2^24; d = 2^10, 2^12, 2^14
    .venv/bin/python benchmarks/bench_sketch_speed.py --quick            # small sizes
    .venv/bin/python benchmarks/bench_sketch_speed.py --log2-n 22 --log2-d 12 --variant affd --variant qk
    .venv/bin/python benchmarks/bench_sketch_speed.py --trak-only        # TRAK comparison only

Method (see gradsketch.cli_bench): the baseline x.sum() and the sketch are timed alternately, the ratio
of medians is printed; peak extra memory is the VmHWM - VmRSS increase during one call (Linux). dense
is O(nd) and is timed only where n·d ≤ 2^30 (one repeat). Where the `traker` package is installed,
TRAK's CPU projector (trak.projectors.BasicProjector, rademacher — TRAKer's default projection type —
block_size 100, its default) is timed at n = 2^20, d = 2^10 and each variant's speed-up over it printed.
The benchmark never downloads anything; TRAK is imported here only, never by the library.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from gradsketch.bench import VARIANTS, speed_table


def trak_compare(variants, repeats: int) -> None:
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        print("\n(traker not installed: TRAK comparison skipped; `pip install traker` into the venv to run it)")
        return
    from gradsketch import sketch
    from gradsketch.sketch import _native

    n, d = 1 << 20, 1 << 10
    x = torch.randn(32, n, generator=torch.Generator().manual_seed(0))
    P = BasicProjector(grad_dim=n, proj_dim=d, seed=0, proj_type=ProjectionType.rademacher,
                       device=torch.device("cpu"))
    P.project(x, model_id=0)
    tt = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        P.project(x, model_id=0)
        tt.append(time.perf_counter() - t0)
    t_trak = statistics.median(tt)
    print(f"\nTRAK BasicProjector (CPU, rademacher, block_size 100) at n = 2^20, d = 2^10, batch 32: "
          f"{t_trak * 1e3:.0f} ms (median of {len(tt)})")
    print("| variant | ms | speed-up over TRAK CPU |")
    print("|---|---|---|")
    for label, kind, opts in VARIANTS:
        if (variants and label not in variants) or kind == "dense":  # dense: O(nd) like TRAK, ~40 s here
            continue
        if label.endswith("-torch") and not variants:
            continue  # the pure-torch rows only where asked for
        S = sketch(kind, n, d, seed=1, **opts)
        ctx = _native.disabled if label.endswith("-torch") else contextlib.nullcontext
        with ctx():
            S(x)
            ts = []
            for _ in range(1 if kind == "dense" else repeats):
                t0 = time.perf_counter()
                S(x)
                ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        print(f"| {label} | {t * 1e3:.1f} | {t_trak / t:.0f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n = 2^16, 2^18; d = 2^8, 2^10")
    ap.add_argument("--log2-n", type=int, nargs="*", default=None)
    ap.add_argument("--log2-d", type=int, nargs="*", default=None)
    ap.add_argument("--variant", action="append", default=None, choices=[v[0] for v in VARIANTS])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-trak", action="store_true")
    ap.add_argument("--trak-only", action="store_true")
    args = ap.parse_args()
    ns = args.log2_n or ([16, 18] if args.quick else [20, 22, 24])
    ds = args.log2_d or ([8, 10] if args.quick else [10, 12, 14])
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    if not args.trak_only:
        speed_table(ns, ds, args.variant, repeats=args.repeats, memory=not args.no_memory)
    if not args.no_trak:
        trak_compare(args.variant, args.repeats)


if __name__ == "__main__":
    main()
