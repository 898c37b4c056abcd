"""Run by test_sketch_triton.py in a subprocess started with TRITON_INTERPRET=1 and GRADSKETCH_NATIVE=0:
the Triton kernels on CPU tensors through Triton's interpreter, against exact float64 answers (explicit
Hadamard matrices, index_add) and against the torch formulation of every sketch that dispatches to them.

Prints one JSON list of {"name", "err", "tol"}; the parent asserts err <= tol for each. Argument
``quick`` (the default test run) takes a subset of the cases below; ``full`` (a slow test) takes all.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
torch.manual_seed(0)
FULL = len(sys.argv) > 1 and sys.argv[1] == "full"

from gradsketch import sketch  # noqa: E402
from gradsketch.sketch import _triton as T  # noqa: E402
from gradsketch.sketch import base  # noqa: E402
from gradsketch.sketch._transforms import hadamard  # noqa: E402

T.DEVICES = ("cuda", "cpu")  # route CPU tensors to the kernels (the interpreter runs them)
# small passes and tiles, so that small rows go through the multi-pass and multi-program code paths
T.FAST_LOG_MAX, T.STRIDED_LOG_MAX, T.TILE, T.STRIDED_TILE = 3, 2, 16, 16
out: list[dict] = []
g = torch.Generator().manual_seed(1)
# float32 rounding: a sum of n terms of size ~|x| has error ~ sqrt(log n) · 6e-8 relative to max |y|
TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def add(name: str, err: float, tol: float) -> None:
    out.append({"name": name, "err": err, "tol": tol})


assert T.usable(torch.zeros(2, 4)) and not T.usable(torch.zeros(2, 4, dtype=torch.float64))

# -- kernels against exact float64 -------------------------------------------------------------------
for n, n_pad in [(1, 1), (2, 2), (8, 8), (100, 128), (256, 256)] if FULL else [(8, 8), (100, 128)]:
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    mult = torch.randn(n_pad, generator=g, dtype=torch.float64)
    want = (torch.nn.functional.pad(x, (0, n_pad - n)) * mult) @ hadamard(n_pad, torch.float64)
    for dt in (torch.float32, torch.float16, torch.bfloat16) if FULL else (torch.float32, torch.bfloat16):
        got = T.fwht(x.to(dt), n_pad, mult.to(dt), out_dtype=torch.float32)
        # the input's own rounding to dt is part of the error: compare with the exact transform of the
        # rounded input too (float32 accumulation must then agree to float32 rounding)
        exact_rounded = (torch.nn.functional.pad(x.to(dt).double(), (0, n_pad - n)) * mult.to(dt).double()) \
            @ hadamard(n_pad, torch.float64)
        add(f"fwht n={n} n_pad={n_pad} {dt} vs float64", rel(got, want), TOL[dt])
        add(f"fwht n={n} n_pad={n_pad} {dt} vs float64 of its rounded input", rel(got, exact_rounded), 2e-6)

for b, r, groups in [(1, 1, 3), (4, 3, 2), (8, 2, 5), (16, 16, 3), (64, 4, 7)] if FULL else [(8, 2, 5), (16, 16, 3)]:
    n = b * groups
    x = torch.randn(2, n, generator=g, dtype=torch.float64)
    sel = torch.randperm(b, generator=g)[:r]
    src = torch.randperm(b, generator=g)
    mult = torch.randn(n, generator=g, dtype=torch.float64)
    H = hadamard(b, torch.float64) * math.sqrt(b)
    for use_src, use_mult in [(True, True), (False, False)]:
        t = (x * mult if use_mult else x).view(2, groups, b)
        t = t[:, :, src] if use_src else t
        want = 0.5 * (t @ H.T)[:, :, sel]
        got = T.whtsel(x.float(), b, sel, 0.5, src=src if use_src else None, mult=mult.float() if use_mult else None)
        add(f"whtsel b={b} r={r} G={groups} src={use_src} mult={use_mult}", rel(got, want), 2e-6)
        # the adjoint against the explicit transpose of the same map
        y = torch.randn(2, groups, r, generator=g, dtype=torch.float64)
        z = torch.zeros(2, groups, b, dtype=torch.float64)
        z[:, :, sel] = y
        w = 0.5 * (z @ H)  # H symmetric
        want_t = torch.zeros(2, groups, b, dtype=torch.float64)
        if use_src:
            want_t[:, :, src] = w
        else:
            want_t = w
        want_t = want_t.reshape(2, n) * (mult if use_mult else 1.0)
        got_t = T.whtsel_t(y.float(), b, sel, 0.5, src=src if use_src else None,
                           mult=mult.float() if use_mult else None)
        add(f"whtsel_t b={b} r={r} G={groups} src={use_src} mult={use_mult}", rel(got_t, want_t), 2e-6)

# d small: many collisions inside one program's atomics
for m, n, d, s in [(3, 50, 7, 2), (17, 300, 16, 1), (1, 2000, 3, 3)] if FULL else [(3, 50, 7, 2), (1, 400, 3, 3)]:
    x = torch.randn(m, n, generator=g, dtype=torch.float64)
    rows = torch.randint(0, d, (s, n), generator=g, dtype=torch.int32)
    vals = torch.randn(s, n, generator=g, dtype=torch.float64)
    want = torch.zeros(m, d, dtype=torch.float64)
    for k in range(s):
        want.index_add_(1, rows[k].long(), x * vals[k])
    for dt in (torch.float32, torch.bfloat16) if FULL else (torch.float32,):
        got = T.sjlt(x.to(dt), rows, vals.to(dt), d, out_dtype=torch.float32)
        add(f"sjlt M={m} n={n} d={d} s={s} {dt}", rel(got, want), TOL[dt] * 2)

# -- sketches: the Triton dispatch against the torch formulation and the explicit float64 matrix ------------
# the interpreter runs programs one after another: larger tiles here, still two or more passes per FWHT
T.FAST_LOG_MAX, T.STRIDED_LOG_MAX, T.TILE, T.STRIDED_TILE = 5, 2, 1 << 12, 1 << 12
VARIANTS = [("affd", {}), ("afjl", {}), ("fjl", {}), ("sjlt", {}), ("ffd", {}), ("sjlt", {"s": 3})]
for fast in (False, True):
    base.FAST_MIN_ELEMS = 0 if fast else 1 << 40  # force the chunked no-autograd path, or the plain one
    base.CHUNK_ELEMS = 700  # several chunks
    for kind, opts in VARIANTS if FULL else (VARIANTS[:4] if not fast else VARIANTS[:2]):
        n, d = 300, 24
        S = sketch(kind, n, d, seed=5, **opts)
        Phi = S.matrix(torch.float64)  # float64: never on the Triton path
        x = torch.randn(5, n, generator=g, dtype=torch.float64)
        y = torch.randn(5, d, generator=g, dtype=torch.float64)
        tag = f"{kind}{opts or ''} {'fast' if fast else 'plain'}"
        got = S(x.float())
        with T.disabled():
            ref = S(x.float())
        add(f"sketch {tag}: triton vs torch formulation (float32)", rel(got, ref), 2e-6)
        add(f"sketch {tag}: triton vs explicit float64 matrix", rel(got, x @ Phi.T), 2e-6)
        got_t = S.T(y.float())
        add(f"adjoint {tag}: triton vs explicit float64 transpose", rel(got_t, y @ Phi), 2e-6)
        # autograd: the gradient of <Φx, w> is Φᵀw; forward-mode: the tangent is Φt
        if not fast and (FULL or kind == "affd"):
            xr = x.float().requires_grad_(True)
            (gx,) = torch.autograd.grad((S(xr) * y.float()).sum(), xr)
            add(f"autograd {tag}: grad vs explicit Φᵀw", rel(gx, y @ Phi), 2e-6)
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                dual = fwAD.make_dual(x.float(), y.float() @ Phi.float())
                tangent = fwAD.unpack_dual(S(dual)).tangent
            add(f"forward AD {tag}: tangent vs explicit Φt", rel(tangent, (y @ Phi) @ Phi.T), 5e-6)

# the dispatch really reached the kernels: count launches through the module's wrappers
calls = {"n": 0}
orig = T.fwht


def counting(*a, **k):
    calls["n"] += 1
    return orig(*a, **k)


T.fwht = counting
base.FAST_MIN_ELEMS = 0
sketch("affd", 300, 24, seed=5)(torch.randn(2, 300))
T.fwht = orig
add("affd fast path calls the Triton FWHT (0 = yes)", 0.0 if calls["n"] >= 1 else 1.0, 0.0)

json.dump(out, sys.stdout)
