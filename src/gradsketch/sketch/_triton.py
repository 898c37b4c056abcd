"""Optional Triton kernels for the structured sketches on CUDA tensors.

Three kernels (in ``_triton_kernels.py``), each reading its input once in its own dtype (float32,
float16, bfloat16) and accumulating in float32:

* :func:`fwht` — the normalised fast Walsh–Hadamard transform of every row, zero padding and a diagonal
  multiplier (the random signs B) fused into its first pass. ``H_{2^p} = H_{2^{p_1}} ⊗ … ⊗ H_{2^{p_k}}``:
  one pass per factor, the fastest index first, each a register-tile butterfly network; rows of up to
  2^12 take one pass, longer rows one more pass per 2^8 of length (2^20: two, 2^24 and 2^26: three).
* :func:`whtsel` / :func:`whtsel_t` — AFJL/AFFD's row-restricted last Hadamard factor with its column
  permutation and diagonal (G·scale or B) fused in, and its adjoint: one read of the data, ``b/r`` times
  fewer writes.
* :func:`sjlt` — the CountSketch scatter (float32 atomics).

Not built: the QK Kronecker apply. It is a chain of GEMMs that cuBLAS already runs at one read of the
input plus the shrunk intermediate (a factor ``r_1/b_1`` of it), so a fused kernel could save at most
that intermediate's traffic; benchmarks/bench_gpu.py measures QK against a copy to confirm.

Dispatch (:func:`usable`): CUDA tensors of those three dtypes, outside torch.func transforms, when
triton imports and the kernels have not been switched off with ``GRADSKETCH_TRITON=0`` (read, never
written) or :func:`disabled`. float64 and CPU tensors always take the torch formulation (or the native
CPU kernels). Results are the same linear maps as the torch formulation, to float32 rounding.

On a CPU the kernels run through Triton's interpreter when the process was started with
``TRITON_INTERPRET=1`` (set before triton is imported; the library never sets it): tests call the
functions below directly with CPU tensors there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest factor done in one pass on the fast (contiguous) index, and on a strided index (speed knobs
#: only, to be tuned on a GPU: every split computes the same transform)
FAST_LOG_MAX = 12
STRIDED_LOG_MAX = 8
#: elements of one program's register tile; a strided pass's tile is [2^r, STRIDED_TILE >> r] so that
#: each of its rows is at least 32 contiguous floats (128 bytes) for r ≤ STRIDED_LOG_MAX
TILE = 1 << 12
STRIDED_TILE = 1 << 13
#: devices whose tensors :func:`usable` accepts (tests add "cpu" in an interpreter subprocess)
DEVICES: tuple[str, ...] = ("cuda",)

_off = False
_status: dict[str, str] = {"state": "not loaded"}


@lru_cache(maxsize=1)
def kernels() -> Any:
    """The kernel module, or ``None`` when triton does not import or ``GRADSKETCH_TRITON=0``."""
    if os.environ.get("GRADSKETCH_TRITON", "1").strip().lower() in ("0", "false", "no", "off"):
        _status["state"] = "disabled by GRADSKETCH_TRITON"
        return None
    try:
        from . import _triton_kernels as k
    except Exception as e:  # not installed, or a broken install: the torch formulation runs
        _status["state"] = f"triton unavailable ({type(e).__name__}: {str(e)[:200]})"
        return None
    _status["state"] = "loaded"
    return k


def status() -> dict[str, str]:
    """Whether the Triton kernels are in use (only asked for when a CUDA tensor has been sketched)."""
    return dict(_status)


@contextmanager
def disabled() -> Iterator[None]:
    """Within this block the sketches do not use the Triton kernels (benchmarks compare both paths)."""
    global _off
    old, _off = _off, True
    try:
        yield
    finally:
        _off = old


def usable(x: Tensor) -> bool:
    """``x`` is a tensor the kernels take (on a device in :data:`DEVICES`, float32/float16/bfloat16, with
    storage, not wrapped by torch.func) and the kernels are available."""
    if _off or x.device.type not in DEVICES or x.dtype not in _DTYPES:
        return False
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
        x.data_ptr()
    except (AttributeError, RuntimeError):
        return False
    return kernels() is not None


def _warps(elems: int) -> int:
    """Warps per program for a register tile of ``elems`` float32 values: about 16 values per thread (a
    sm_90 compile of the strided FWHT pass with an 8192 tile takes 250 registers per thread at 4 warps,
    64 at 16)."""
    return max(4, min(16, elems // 512))


def _log2(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what}: expected a power of two, got {n}")
    return n.bit_length() - 1


def _passes(p: int) -> list[int]:
    """log2 sizes of the factors, fastest index first: one ≤ FAST_LOG_MAX, then balanced ≤ STRIDED_LOG_MAX."""
    first = min(p, FAST_LOG_MAX)
    rest = p - first
    k = -(-rest // STRIDED_LOG_MAX) if rest else 0
    return [first] + [rest // k + (1 if i < rest % k else 0) for i in range(k)]


def fwht(x: Tensor, n_pad: int | None = None, mult: Tensor | None = None, scale: float | None = None,
         out_dtype: torch.dtype | None = None) -> Tensor:
    """``scale · H (mult ⊙ pad(x, n_pad))`` for every row of the 2-D ``x``: ``[M, n] -> [M, n_pad]``.

    ``H`` the unnormalised Sylvester–Hadamard matrix of size ``n_pad`` (a power of two ≥ n, default n);
    ``scale`` defaults to ``1/√n_pad`` (the orthonormal transform); ``mult`` ``[n_pad]`` or ``None``.
    Output in ``out_dtype`` (default x's), accumulated in float32.
    """
    k = kernels()
    m, n = x.shape
    n_pad = n if n_pad is None else n_pad
    p = _log2(n_pad, "fwht: n_pad")
    if n_pad < n:
        raise ValueError(f"fwht: n_pad must be >= the row length {n}, got {n_pad}")
    scale = 1.0 / math.sqrt(n_pad) if scale is None else float(scale)
    x = x.contiguous()
    out = torch.empty(m, n_pad, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    passes = _passes(p)
    if mult is not None:
        mult = mult.to(device=x.device).contiguous()
        if mult.numel() != n_pad:
            raise ValueError(f"fwht: mult must have n_pad={n_pad} entries, got {mult.numel()}")
    # first pass: fast index; into float32 scratch when more passes follow (float32 between passes)
    mid = out if len(passes) == 1 or out.dtype == torch.float32 else torch.empty(m, n_pad, dtype=torch.float32,
                                                                                  device=x.device)
    r0 = passes[0]
    groups = n_pad >> r0
    bg = max(1, min(groups, TILE >> r0))
    k.fwht_fast_kernel[(m, -(-groups // bg))](
        x, mid, mult if mult is not None else x, n, n, n_pad, groups, scale if len(passes) == 1 else 1.0,
        LOG_R=r0, BG=bg, HAS_MULT=mult is not None, num_warps=_warps(bg << r0))
    c = 1 << r0
    for i, lr in enumerate(passes[1:]):
        last = i == len(passes) - 2
        bc = max(1, min(c, STRIDED_TILE >> lr))
        blocks = m * (n_pad // (c << lr))
        k.fwht_strided_kernel[(blocks, c // bc)](mid, out if last else mid, c, scale if last else 1.0,
                                                  LOG_R=lr, BC=bc, num_warps=_warps(bc << lr))
        c <<= lr
    return out


def _whtsel_prep(n: int, b: int, sel: Tensor, src: Tensor | None, mult: Tensor | None, device: torch.device):
    lb = _log2(b, "whtsel: b")
    if n % b:
        raise ValueError(f"whtsel: b={b} must divide n={n}")
    sel = sel.to(device=device, dtype=torch.int32).contiguous()
    if src is not None:
        src = src.to(device=device, dtype=torch.int32).contiguous()
        if src.numel() != b:
            raise ValueError(f"whtsel: src must have b={b} entries, got {src.numel()}")
    if mult is not None:
        mult = mult.to(device=device).contiguous()
        if mult.numel() != n:
            raise ValueError(f"whtsel: mult must have n={n} entries, got {mult.numel()}")
    r = sel.numel()
    lrs = max(0, (r - 1).bit_length())
    return lb, sel, src, mult, r, lrs


def whtsel(x: Tensor, b: int, sel: Tensor, scale: float, src: Tensor | None = None,
           mult: Tensor | None = None) -> Tensor:
    """``out[m, g, i] = scale · (H_b t_g)[sel[i]]``, ``t_g[k] = (mult ⊙ x)[m, g·b + src[k]]``: the native
    kernel's :func:`._native.whtsel` on the device. ``[M, n] -> [M, n // b, len(sel)]`` in x's dtype."""
    k = kernels()
    x = x.contiguous()
    m, n = x.shape
    lb, sel, src, mult, r, lrs = _whtsel_prep(n, b, sel, src, mult, x.device)
    groups = n // b
    out = torch.empty(m, groups, r, dtype=x.dtype, device=x.device)
    if m == 0 or groups == 0:
        return out
    bg = max(1, min(1 << max(0, (groups - 1).bit_length()), TILE >> lb))
    k.whtsel_kernel[(m, -(-groups // bg))](
        x, out, src if src is not None else sel, mult if mult is not None else x, sel, n, groups, r, float(scale),
        LOG_B=lb, LOG_RS=lrs, BG=bg, HAS_SRC=src is not None, HAS_MULT=mult is not None,
        num_warps=_warps(bg << lb))
    return out


def whtsel_t(y: Tensor, b: int, sel: Tensor, scale: float, src: Tensor | None = None,
             mult: Tensor | None = None) -> Tensor:
    """The adjoint of :func:`whtsel`: ``[M, G, r] -> [M, G·b]`` in y's dtype."""
    k = kernels()
    y = y.contiguous()
    m, groups, r = y.shape
    n = groups * b
    lb, sel, src, mult, r2, lrs = _whtsel_prep(n, b, sel, src, mult, y.device)
    if r2 != r:
        raise ValueError(f"whtsel_t: y has {r} outputs per group but sel has {r2}")
    inv = torch.full((b,), -1, dtype=torch.int32, device=y.device)
    inv[sel.long()] = torch.arange(r, dtype=torch.int32, device=y.device)
    out = torch.empty(m, n, dtype=y.dtype, device=y.device)
    if m == 0 or groups == 0:
        return out
    bg = max(1, min(1 << max(0, (groups - 1).bit_length()), TILE >> lb))
    k.whtsel_t_kernel[(m, -(-groups // bg))](
        y, out, src if src is not None else inv, mult if mult is not None else y, inv, n, groups, r, float(scale),
        LOG_B=lb, LOG_RS=lrs, BG=bg, HAS_SRC=src is not None, HAS_MULT=mult is not None,
        num_warps=_warps(bg << lb))
    return out


def sjlt(x: Tensor, rows: Tensor, vals: Tensor, d: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """``y[m, rows[k, j]] += vals[k, j] · x[m, j]``: ``x`` ``[M, n]``, ``rows`` ``[s, n]`` in ``[0, d)``,
    ``vals`` ``[s, n]``; ``[M, d]`` accumulated in float32, returned in ``out_dtype`` (default x's)."""
    k = kernels()
    x = x.contiguous()
    m, n = x.shape
    s = rows.shape[0]
    if rows.shape != (s, n) or vals.shape != (s, n):
        raise ValueError(f"sjlt: expected rows and vals of shape [s, {n}], got {tuple(rows.shape)} and "
                         f"{tuple(vals.shape)}")
    rows = rows.to(device=x.device, dtype=torch.int32).contiguous()
    vals = vals.to(device=x.device).contiguous()
    y = torch.zeros(m, d, dtype=torch.float32, device=x.device)
    if m and n:
        bm = min(16, 1 << max(0, (m - 1).bit_length()))
        bn = max(16, TILE // bm)
        k.sjlt_kernel[(-(-n // bn), -(-m // bm))](x, rows, vals, y, m, n, d, s, BM=bm, BN=bn,
                                                  num_warps=_warps(bm * bn))
    od = out_dtype or x.dtype
    return y if od == torch.float32 else y.to(od)
