"""A cost model for featurisation, curvature products and top-k at 1,000 ranks and 10⁹ training examples,
with its parameters taken from the measured 1- and 2-rank runs (``distributed.json``) where this machine can
measure them and stated as assumptions where it cannot (GPU time per example, file-system bandwidth).

Featurisation, weak scaling, ``P`` ranks with ``n_r`` examples each (time on one rank / time on ``P``)::

    T(P) = n_r · t_ex / w  +  n_r · b / min(B_rank, B_fs / P)  +  α · log2 P  +  c · t_ex

``t_ex``: featurisation time per example on one device; ``w``: the work efficiency measured with 2 ranks
(``featurise_weak_work_efficiency``, capped at 1); ``b``: bytes per stored row (``2 d`` for float16);
``B_rank``: one rank's write bandwidth; ``B_fs``: the shared file system's aggregate write bandwidth; ``α``:
one collective's latency per tree level (from the measured 2-rank ``all_reduce`` of one float: the final
barrier); ``c``: rows per chunk (shares are chunk-aligned, so ranks differ by at most one chunk).

Curvature products (one HVP of ``N`` parameters over all ``n`` examples): each rank's ``n_r`` examples
then a ring all-reduce of ``4N`` bytes, ``2 · 4N · (P − 1)/P / B_net + 2(P − 1) · α_net``.
Top-k of ``m`` queries: each rank scores ``m × n_r`` and keeps ``k``; the merge gathers ``m · k · P``
candidates (12 bytes each) per rank (``merge_topk``), or ``m · k`` per level of a tree merge.

    python benchmarks/scale_model.py [--measured benchmarks/results/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def featurise_time(P: int, n_r: float, t_ex: float, w: float, b: float, b_rank: float, b_fs: float,
                   alpha: float, chunk: int) -> float:
    write_bw = min(b_rank, b_fs / P)
    return n_r * t_ex / w + n_r * b / write_bw + alpha * math.log2(max(P, 1)) + (chunk * t_ex if P > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--measured", default="benchmarks/results/distributed.json")
    ap.add_argument("--ranks", type=int, default=1000)
    ap.add_argument("--examples", type=float, default=1e9)
    ap.add_argument("--d", type=int, default=4096, help="sketch dimension (float16 rows)")
    ap.add_argument("--t-ex-ms", type=float, nargs="+", default=[0.25, 1.0, 4.0],
                    help="assumed featurisation time per example on one GPU (ms)")
    ap.add_argument("--fs-gbs", type=float, nargs="+", default=[50.0, 200.0, 1000.0],
                    help="assumed aggregate write bandwidth of the shared file system (GB/s)")
    ap.add_argument("--rank-gbs", type=float, default=2.0, help="assumed write bandwidth of one rank (GB/s)")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--params", type=float, default=125e6, help="parameters, for the HVP all-reduce")
    ap.add_argument("--net-gbs", type=float, default=25.0, help="assumed all-reduce bus bandwidth (GB/s)")
    args = ap.parse_args()
    m = json.loads(Path(args.measured).read_text())
    w = min(1.0, float(m["featurise_weak_work_efficiency"]))
    alpha = float(m["collectives_s"]["2"]["all_reduce_1"])
    P, n_r, b = args.ranks, args.examples / args.ranks, 2.0 * args.d
    print(f"measured here: work efficiency w = {w:.2f} (featurisation, 2 ranks), collective latency "
          f"α = {alpha * 1e3:.2f} ms (gloo, 2 ranks); P = {P}, n = {args.examples:.0e}, n_r = {n_r:.0e}, "
          f"rows {b / 1024:.0f} KiB, store {args.examples * b / 1e12:.1f} TB")
    print("\nweak-scaling efficiency of featurisation T(1)/T(P):")
    print("| t_ex per example | " + " | ".join(f"B_fs {x:g} GB/s" for x in args.fs_gbs) + " |")
    print("|---|" + "---|" * len(args.fs_gbs))
    rows = {}
    for t in args.t_ex_ms:
        t_ex = t * 1e-3
        effs = []
        for fs in args.fs_gbs:
            t1 = featurise_time(1, n_r, t_ex, w, b, args.rank_gbs * 1e9, fs * 1e9, alpha, args.chunk)
            tp = featurise_time(P, n_r, t_ex, w, b, args.rank_gbs * 1e9, fs * 1e9, alpha, args.chunk)
            effs.append(t1 / tp)
        rows[t] = effs
        print(f"| {t:g} ms (phase {n_r * t_ex / 3600:.2f} h) | " + " | ".join(f"{e:.3f}" for e in effs) + " |")
    hvp_bytes = 4 * args.params
    t_ar = 2 * hvp_bytes * (P - 1) / P / (args.net_gbs * 1e9) + 2 * (P - 1) * alpha
    print(f"\nHVP all-reduce of {args.params:.0e} float32 parameters: {t_ar:.3f} s per product (ring, "
          f"{args.net_gbs:g} GB/s; the latency term 2(P-1)α = {2 * (P - 1) * alpha:.3f} s uses the gloo α measured "
          f"here and is pessimistic for NCCL)")
    mq, k = 1000, 100
    print(f"top-k merge, {mq} queries × top-{k}: all_gather {mq * k * P * 12 / 1e9:.2f} GB per rank "
          f"(merge_topk as implemented); a tree merge moves {mq * k * 12 / 1e6:.1f} MB per level, "
          f"{math.ceil(math.log2(P))} levels")


if __name__ == "__main__":
    main()
