"""The Triton kernels behind :mod:`._triton` (imported only from there, and only when triton imports).

Every kernel loads its input in the input's dtype (float32, float16 or bfloat16), computes in float32
registers and stores in the output's dtype. Walsh–Hadamard butterflies are done on register tiles: one
radix-2 stage at stride h is a reshape ``[..., 2, h]``, a split into the two halves, and a join of their
sum and difference (no shared-memory round trip is written by hand; the compiler lays it out).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stage_last(x, P: tl.constexpr, Q: tl.constexpr, H: tl.constexpr):
    # one radix-2 butterfly stage at stride H along axis 1 of the [P, Q] tile
    y = tl.reshape(x, (P, Q // (2 * H), 2, H))
    y = tl.permute(y, (0, 1, 3, 2))
    a, b = tl.split(y)
    y = tl.join(a + b, a - b)
    y = tl.permute(y, (0, 1, 3, 2))
    return tl.reshape(y, (P, Q))


@triton.jit
def _wht_last(x, P: tl.constexpr, LOG_Q: tl.constexpr):
    # the unnormalised H_Q (Sylvester order) on every row of the [P, Q] tile
    for i in tl.static_range(LOG_Q):
        x = _stage_last(x, P, 1 << LOG_Q, 1 << i)
    return x


@triton.jit
def _stage_first(x, P: tl.constexpr, Q: tl.constexpr, H: tl.constexpr):
    # one radix-2 butterfly stage at stride H along axis 0 of the [P, Q] tile
    y = tl.reshape(x, (P // (2 * H), 2, H, Q))
    y = tl.permute(y, (0, 2, 3, 1))
    a, b = tl.split(y)
    y = tl.join(a + b, a - b)
    y = tl.permute(y, (0, 3, 1, 2))
    return tl.reshape(y, (P, Q))


@triton.jit
def fwht_fast_kernel(x_ptr, out_ptr, mult_ptr, n_in, stride_in, n_out, groups, scale,
                     LOG_R: tl.constexpr, BG: tl.constexpr, HAS_MULT: tl.constexpr):
    """out[m, g·R + k] = scale · (H_R t)[k], t[k] = (mult ⊙ pad(x))[m, g·R + k]: H_R on the fast index of
    a row of ``n_out`` (= groups·R) columns read from ``n_in`` ≤ n_out columns (zero padding)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1)
    R: tl.constexpr = 1 << LOG_R
    g = pid_g * BG + tl.arange(0, BG)
    k = tl.arange(0, R)
    col = g[:, None] * R + k[None, :]
    gm = g[:, None] < groups
    inside = gm & (col < n_in)
    x = tl.load(x_ptr + pid_m * stride_in + col, mask=inside, other=0.0).to(tl.float32)
    if HAS_MULT:
        x = x * tl.load(mult_ptr + col, mask=inside, other=0.0).to(tl.float32)
    x = _wht_last(x, BG, LOG_R) * scale
    tl.store(out_ptr + pid_m * n_out + col, x.to(out_ptr.dtype.element_ty), mask=gm)


@triton.jit
def fwht_strided_kernel(in_ptr, out_ptr, C, scale, LOG_R: tl.constexpr, BC: tl.constexpr):
    """H_R along the middle index of the contiguous ``[B, R, C]`` view, ``BC`` columns per program
    (``in_ptr`` and ``out_ptr`` may be the same buffer: each program owns its elements)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    R: tl.constexpr = 1 << LOG_R
    r = tl.arange(0, R)
    c = pid_c * BC + tl.arange(0, BC)
    off = pid_b * R * C + r[:, None] * C + c[None, :]
    x = tl.load(in_ptr + off).to(tl.float32)
    for i in tl.static_range(LOG_R):
        x = _stage_first(x, R, BC, 1 << i)
    tl.store(out_ptr + off, (x * scale).to(out_ptr.dtype.element_ty))


@triton.jit
def whtsel_kernel(x_ptr, out_ptr, src_ptr, mult_ptr, sel_ptr, n, groups, r, scale,
                  LOG_B: tl.constexpr, LOG_RS: tl.constexpr, BG: tl.constexpr,
                  HAS_SRC: tl.constexpr, HAS_MULT: tl.constexpr):
    """out[m, g, i] = scale · (H_B t_g)[sel[i]], t_g[k] = (mult ⊙ x)[m, g·B + src[k]] (i < r)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1)
    B: tl.constexpr = 1 << LOG_B
    RS: tl.constexpr = 1 << LOG_RS
    g = pid_g * BG + tl.arange(0, BG)
    k = tl.arange(0, B)
    if HAS_SRC:
        kk = tl.load(src_ptr + k)
    else:
        kk = k
    col = g[:, None] * B + kk[None, :]
    gm = g[:, None] < groups
    x = tl.load(x_ptr + pid_m * n + col, mask=gm, other=0.0).to(tl.float32)
    if HAS_MULT:
        x = x * tl.load(mult_ptr + col, mask=gm, other=0.0).to(tl.float32)
    x = _wht_last(x, BG, LOG_B)
    i = tl.arange(0, RS)
    im = i < r
    sel = tl.load(sel_ptr + i, mask=im, other=0)
    y = tl.gather(x, tl.broadcast_to(sel[None, :], (BG, RS)), 1) * scale
    tl.store(out_ptr + pid_m * groups * r + g[:, None] * r + i[None, :], y.to(out_ptr.dtype.element_ty),
             mask=gm & im[None, :])


@triton.jit
def whtsel_t_kernel(y_ptr, out_ptr, src_ptr, mult_ptr, inv_ptr, n, groups, r, scale,
                    LOG_B: tl.constexpr, LOG_RS: tl.constexpr, BG: tl.constexpr,
                    HAS_SRC: tl.constexpr, HAS_MULT: tl.constexpr):
    """The adjoint of :func:`whtsel_kernel`: out[m, g·B + src[k]] = mult · scale · (H_B z_g)[k] with
    z_g[k] = y[m, g, inv[k]] where inv[k] ≥ 0 (k = sel[inv[k]]), else 0."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1)
    B: tl.constexpr = 1 << LOG_B
    RS: tl.constexpr = 1 << LOG_RS
    g = pid_g * BG + tl.arange(0, BG)
    gm = g[:, None] < groups
    i = tl.arange(0, RS)
    y = tl.load(y_ptr + pid_m * groups * r + g[:, None] * r + i[None, :], mask=gm & (i[None, :] < r),
                other=0.0).to(tl.float32)
    k = tl.arange(0, B)
    inv = tl.load(inv_ptr + k)
    z = tl.gather(y, tl.broadcast_to(tl.maximum(inv, 0)[None, :], (BG, B)), 1)
    z = tl.where(inv[None, :] >= 0, z, 0.0)
    z = _wht_last(z, BG, LOG_B) * scale
    if HAS_SRC:
        kk = tl.load(src_ptr + k)
    else:
        kk = k
    col = g[:, None] * B + kk[None, :]
    if HAS_MULT:
        z = z * tl.load(mult_ptr + col, mask=gm, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_m * n + col, z.to(out_ptr.dtype.element_ty), mask=gm)


@triton.jit
def sjlt_kernel(x_ptr, rows_ptr, vals_ptr, y_ptr, M, n, d, s, BM: tl.constexpr, BN: tl.constexpr):
    """y[m, rows[k, j]] += vals[k, j] · x[m, j] (float32 atomics into ``y``)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    j = pid_n * BN + tl.arange(0, BN)
    jm = j < n
    m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    mask = (m[:, None] < M) & jm[None, :]
    x = tl.load(x_ptr + m[:, None] * n + j[None, :], mask=mask, other=0.0).to(tl.float32)
    for t in range(s):
        rr = tl.load(rows_ptr + t * n + j, mask=jm, other=0)
        v = tl.load(vals_ptr + t * n + j, mask=jm, other=0.0).to(tl.float32)
        tl.atomic_add(y_ptr + m[:, None] * d + rr[None, :], x * v[None, :], mask=mask)
