"""Structured orthogonal transforms on the last dimension: Kronecker products of small matrices,
Walsh–Hadamard factors, Haar-random orthogonal rows and the discrete Hartley transform (via the FFT).
All functions act on ``[M, n]`` tensors and know nothing of sketches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from . import _native, _triton


def kron_apply(x: Tensor, mats: Sequence[Tensor], tail: int = 1) -> Tensor:
    """``(M_1 ⊗ … ⊗ M_K ⊗ I_tail) x`` for every row of ``x``: ``[M, ∏c_i·tail] -> [M, ∏r_i·tail]``, ``M_i`` of
    shape [r_i, c_i].

    Row-major convention: the first factor acts on the slowest-varying index. Factor i is one batched
    GEMM ``M_i @ y`` on the view ``[M·∏r_{<i}, c_i, ∏c_{>i}·tail]`` (no transposed copies; the last factor
    is a plain GEMM when tail = 1). The Kronecker product is never formed.
    """
    m = x.shape[0]
    cols = [int(a.shape[1]) for a in mats]
    pre = m
    y = x
    for i, a in enumerate(mats):
        post = math.prod(cols[i + 1:]) * tail
        if post == 1:
            y = y.reshape(pre, cols[i]) @ a.T
        else:
            y = torch.matmul(a, y.reshape(pre, cols[i], post))
        pre *= int(a.shape[0])
    return y.reshape(m, -1)


def kron_apply_padded(x: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """:func:`kron_apply` of ``x`` zero-padded to ``∏c_i`` columns, without forming the padded copy: the
    first factor (slowest index, blocks of ``P = ∏c_{>1}`` contiguous inputs) is contracted on the full
    blocks in place and on the zero-padded last partial block separately."""
    m, n = x.shape
    cols = [int(a.shape[1]) for a in mats]
    n_pad = math.prod(cols)
    if n == n_pad or len(mats) < 2:
        return kron_apply(x if n == n_pad else torch.nn.functional.pad(x, (0, n_pad - n)), mats)
    a0 = mats[0]
    p = n_pad // cols[0]
    full = n // p
    tail = x[:, full * p:]
    y = None
    if full:
        # a contiguous copy of the factor's kept columns: MKL's batched GEMM is ~1.4x slower on the strided slice
        y = torch.matmul(a0[:, :full].contiguous(), x[:, : full * p].reshape(m, full, p))  # [m, r0, p]
    if full < cols[0] and tail.shape[1]:
        t = torch.nn.functional.pad(tail, (0, p - tail.shape[1]))  # [m, p]
        extra = a0[:, full, None] * t[:, None, :]
        y = extra if y is None else y + extra
    if y is None:
        y = x.new_zeros(m, int(a0.shape[0]), p)
    return kron_apply(y.reshape(m * int(a0.shape[0]), p), mats[1:]).reshape(m, -1)


def kron_apply_t(y: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """Adjoint of :func:`kron_apply`: ``(M_1ᵀ ⊗ … ⊗ M_Kᵀ) y``."""
    return kron_apply(y, [a.T for a in mats])


@lru_cache(maxsize=64)
def _hadamard_cpu(b: int) -> Tensor:
    if b < 1 or b & (b - 1):
        raise ValueError(f"hadamard size: expected a power of two, got {b}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


@lru_cache(maxsize=256)
def _hadamard_cached(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return _hadamard_cpu(b).to(device=device, dtype=dtype)


def hadamard(b: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Normalised Sylvester Walsh–Hadamard matrix ``H_b`` (orthogonal, symmetric), ``b`` a power of two.

    Cached per (b, dtype, device): treat the result as read-only."""
    return _hadamard_cached(b, dtype, torch.device(device))


def kron_rot(y: Tensor, mats: Sequence[Tensor], bufs: Sequence[Tensor]) -> Tensor:
    """``(M_1 ⊗ … ⊗ M_K) y`` for a contiguous ``[r, ∏c_i]`` block, written into the two flat scratch
    buffers ``bufs`` (ping-pong, no allocation; no autograd). Same contraction order as
    :func:`kron_apply` (first factor first, ``M_i @ Y`` on ``[pre, c_i, post]``, the last factor as one
    GEMM); a "rotation" order (last factor first, ``M_K @ Yᵀ``) measured slower. Returns a view of one
    of ``bufs``.
    """
    cols = [int(a.shape[1]) for a in mats]
    pre = y.shape[0]
    for i, a in enumerate(mats):
        ro, c = int(a.shape[0]), cols[i]
        post = math.prod(cols[i + 1:])
        o = bufs[1] if y.data_ptr() == bufs[0].data_ptr() else bufs[0]
        if post == 1:
            torch.mm(y.reshape(pre, c), a.t(), out=o[: pre * ro].view(pre, ro))
        elif pre == 1:
            torch.mm(a, y.reshape(c, post), out=o[: ro * post].view(ro, post))
        else:
            torch.matmul(a, y.reshape(pre, c, post), out=o[: pre * ro * post].view(pre, ro, post))
        pre *= ro
        y = o[: pre * post]
    return _rows(y, mats)


def _rows(y: Tensor, mats: Sequence[Tensor]) -> Tensor:
    return y.view(-1, math.prod(int(a.shape[0]) for a in mats))


def wht_mats(n: int, factor: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """Kronecker factors of the normalised ``H_n`` (``n`` a power of two), each ≤ ``factor``."""
    return [hadamard(b, dtype, device) for b in pow2_split(n, factor)]


class _NativeWHT(torch.autograd.Function):
    """The normalised WHT by the native kernel, differentiable to any order (H is symmetric: the
    backward and forward-mode rules are the transform itself)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return _wht_native(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return wht(g)

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        return wht(t)


class _TritonWHT(torch.autograd.Function):
    """The normalised WHT by the Triton kernel (CUDA), differentiable to any order like :class:`_NativeWHT`."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return _triton.fwht(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return wht(g)

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        return wht(t)


def _wht_native(x: Tensor) -> Tensor:
    return _native.fwht_(x.contiguous().clone(), 1.0 / math.sqrt(x.shape[-1]))


def native_wht_ok(x: Tensor) -> bool:
    """The native kernel can transform ``x`` (a 2-D CPU float32/float64 tensor outside torch.func)."""
    return x.dim() == 2 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
        and _native.usable(x.contiguous() if not x.is_contiguous() else x)


def wht(x: Tensor, factor: int = 64) -> Tensor:
    """Normalised Walsh–Hadamard transform of every row, ``[M, 2^p] -> [M, 2^p]``.

    ``H_{2^p} = H_{b_1} ⊗ … ⊗ H_{b_K}`` for any split of p, so ``factor`` only changes speed. On the CPU
    the cache-blocked native kernel (:mod:`._native`) computes it when available, on CUDA (float32/16/bf16)
    the Triton kernel (:mod:`._triton`); otherwise, and inside torch.func transforms, the Kronecker factors
    as batched GEMMs.
    """
    n = x.shape[-1]
    if native_wht_ok(x):
        if (torch.is_grad_enabled() and x.requires_grad) or torch.autograd.forward_ad._current_level >= 0:
            return _NativeWHT.apply(x)
        return _wht_native(x)
    if x.dim() == 2 and _triton.usable(x):
        return _TritonWHT.apply(x)
    mats = [hadamard(b, x.dtype, x.device) for b in pow2_split(n, factor)]
    return kron_apply(x, mats)


def pow2_split(n: int, max_factor: int) -> list[int]:
    """Split the power of two ``n`` into as few power-of-two factors ≤ ``max_factor`` as possible, balanced."""
    p = n.bit_length() - 1
    if 1 << p != n:
        raise ValueError(f"n: expected a power of two, got {n}")
    q = max(1, max_factor.bit_length() - 1)
    k = max(1, -(-p // q))
    base, extra = divmod(p, k)
    exps = [base + (1 if i < extra else 0) for i in range(k)]
    return [1 << e for e in exps]


def split_exponent_like(q: int, caps: Sequence[int]) -> list[int]:
    """Split ``2^q`` into factors ``2^{q_i}`` with ``q_i ≤ log2(caps_i)`` and ``Σ q_i = q``, balanced."""
    lim = [c.bit_length() - 1 for c in caps]
    if q > sum(lim):
        raise ValueError(f"cannot split 2^{q} into factors bounded by {list(caps)}")
    out = [0] * len(caps)
    left = q
    # water-filling: repeatedly give one to the factor with the most remaining room relative to use
    while left:
        i = max(range(len(caps)), key=lambda j: (lim[j] - out[j], -j))
        out[i] += 1
        left -= 1
    return [1 << e for e in out]


def balanced_factors(n: int, k: int) -> list[int]:
    """``k`` integers as equal as possible whose product is ≥ ``n`` (and minimal padding greedily)."""
    if k == 1:
        return [n]
    b = math.ceil(n ** (1.0 / k) - 1e-9)
    fac = [b] * k
    # shrink factors one by one while the product still covers n
    for i in range(k):
        while fac[i] > 1:
            fac[i] -= 1
            if math.prod(fac) < n:
                fac[i] += 1
                break
    return fac


def haar_rows(b: int, r: int, gen: torch.Generator) -> Tensor:
    """The first ``r`` rows of a Haar-random ``b × b`` orthogonal matrix, float64 ``[r, b]`` (QR with sign fix)."""
    g = torch.randn(b, r, generator=gen, dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(rr))
    sign[sign == 0] = 1.0
    return (q * sign).T.contiguous()


def dht(x: Tensor) -> Tensor:
    """Orthonormal discrete Hartley transform of every row, ``[M, n] -> [M, n]``: ``(Re F − Im F) x / √n``.

    Real, symmetric and its own inverse, so it is its own adjoint. Computed with one real FFT.
    """
    n = x.shape[-1]
    f = torch.fft.rfft(x, dim=-1)
    h_lo = f.real - f.imag  # k = 0 .. n//2
    # for k > n/2: X_k = conj(X_{n-k}) so Re X_k - Im X_k = Re X_{n-k} + Im X_{n-k}
    m_hi = n - n // 2 - 1
    if m_hi > 0:
        tail = f[..., 1 : 1 + m_hi]
        h_hi = (tail.real + tail.imag).flip(-1)
        h = torch.cat([h_lo, h_hi], dim=-1)
    else:
        h = h_lo
    return h * (1.0 / math.sqrt(n))
