"""The sketch kinds of Schioppa (NeurIPS 2024, arXiv 2402.03994) and their classical baselines.

Every kind satisfies E‖Φx‖² = ‖x‖²; ``n_pad`` below is the padded input length of the structure.
Inputs are zero-padded to ``n_pad`` and outputs cropped to ``d``; the scales account for both.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _native, _triton
from ._random import chi, generator
from ._transforms import (
    balanced_factors,
    dht,
    haar_rows,
    hadamard,
    kron_apply,
    kron_apply_padded,
    kron_apply_t,
    kron_rot,
    native_wht_ok,
    pow2_split,
    split_exponent_like,
    wht,
    wht_mats,
)
from .base import Sketch, _check_int, next_pow2

PRECONDITIONERS = ("hadamard", "fft", "orthogonal")
# Kronecker factor size used to evaluate a *full* Walsh–Hadamard transform. H_{2^p} is the same matrix
# whatever the split, so this is a speed knob only (tuned in benchmarks/bench_sketch_speed.py).
WHT_FACTOR = 64
#: factor size of the full WHT in the chunked no-autograd fast path (see benchmarks/results/sketch_speed.md)
WHT_FACTOR_FAST = 16


def _load(xc: Tensor, n_pad: int, buf: Tensor, signs: Tensor | None = None) -> Tensor:
    """``pad(xc, n_pad)·signs`` as a contiguous ``[r, n_pad]`` block in ``buf`` (``xc`` itself if nothing to do)."""
    r, n = xc.shape
    if n == n_pad and signs is None:
        return xc
    u = buf[: r * n_pad].view(r, n_pad)
    if signs is None:
        u[:, :n].copy_(xc)
    else:
        _mul_signs(xc, signs[:n], out=u[:, :n])
    if n_pad > n:
        u[:, n:].zero_()
    return u


def _mul_signs(x: Tensor, signs: Tensor, out: Tensor | None = None) -> Tensor:
    """``x·signs`` into ``out`` (in place into ``x`` when ``None``), no autograd: the native sign flips for int8
    signs on the CPU (bit-equal to the product), else ``torch.mul``."""
    out = x if out is None else out
    if (signs.dtype == torch.int8 and x.dim() == 2 and _native.usable(x, contiguous=False)
            and _native.usable(out, contiguous=False) and signs.is_contiguous()):
        return _native.signs_mul(x, signs, out)
    return torch.mul(x, signs, out=out)


#: elements per chunk of blocks in the Fastfood no-autograd paths (4 MiB in float32)
FFD_CHUNK = 1 << 20


def _pad(x: Tensor, n_pad: int) -> Tensor:
    return x if x.shape[1] == n_pad else torch.nn.functional.pad(x, (0, n_pad - x.shape[1]))


def _signs(n: int, gen: torch.Generator) -> Tensor:
    return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)


# ----------------------------------------------------------------------------------------------------
class DenseSketch(Sketch):
    """Φ = G/√d with G i.i.d. N(0,1) (or ±1); generated in column blocks of 1024 from the seed.

    O(dn) time per vector, one [d, 1024] block in memory at a time. The baseline (what TRAK does).
    """

    kind = "dense"
    allows_d_greater_than_n = True
    option_names = ("dist",)
    BLOCK = 1024

    def __init__(self, n: int, d: int, seed: int = 0, dist: str = "gaussian") -> None:
        super().__init__(n, d, seed, dist=dist)
        if dist not in ("gaussian", "rademacher"):
            raise ValueError(f"dist: expected 'gaussian' or 'rademacher', got {dist!r}")
        self._options = {"dist": dist}

    def _block(self, j: int, dtype: torch.dtype) -> Tensor:
        c = min(self.BLOCK, self.n - j * self.BLOCK)
        g = generator(self.seed, "dense", j)
        if self._options["dist"] == "gaussian":
            m = torch.randn(self.d, c, generator=g, dtype=torch.float32)
        else:
            m = torch.randint(0, 2, (self.d, c), generator=g, dtype=torch.int8).to(torch.float32) * 2 - 1
        return m.to(device=self.device, dtype=dtype) * (1.0 / math.sqrt(self.d))

    def _forward(self, x: Tensor) -> Tensor:
        y = x.new_zeros(x.shape[0], self.d)
        for j in range(-(-self.n // self.BLOCK)):
            sl = slice(j * self.BLOCK, (j + 1) * self.BLOCK)
            y = y + x[:, sl] @ self._block(j, x.dtype).T
        return y

    def _adjoint(self, y: Tensor) -> Tensor:
        parts = [y @ self._block(j, y.dtype) for j in range(-(-self.n // self.BLOCK))]
        return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------------------------------
class _Hashed:
    """s hashed rows per column with values: y[:, rows[j, k]] += vals[j, k] · x[:, k] (CountSketch core)."""

    @staticmethod
    def draw(n: int, d: int, s: int, gen: torch.Generator, dtype: torch.dtype = torch.int32) -> Tensor:
        # s disjoint row ranges, one row per range per column: the s rows of a column are distinct.
        # drawn as int32 (or int16, d <= 2^15) directly: torch draws the same values for every integer dtype
        # (tested), without an int64 copy of n entries per row (this runs on every map with
        # BlockSketch(regenerate=True))
        bounds = [d * j // s for j in range(s + 1)]
        rows = [torch.randint(0, bounds[j + 1] - bounds[j], (n,), generator=gen, dtype=dtype).add_(bounds[j])
                for j in range(s)]
        return rows[0][None] if s == 1 else torch.stack(rows)

    @staticmethod
    def wide(rows: Tensor) -> Tensor:
        """``rows`` as an index torch's indexing and Triton take (int16 rows are widened to int32: a copy)."""
        return rows if rows.dtype in (torch.int32, torch.int64) else rows.to(torch.int32)

    @staticmethod
    def forward(x: Tensor, rows: Tensor, vals: Tensor, d: int) -> Tensor:
        # Accumulate in the transposed [d, M] layout: index_add along dim 0 moves contiguous rows of M
        # values, while along dim 1 torch's CPU kernel loops over n strided column slices (measured 1.2-5.6x
        # slower for M = 8..128, n = 3k..1M).
        rows = _Hashed.wide(rows)
        if _triton.usable(x):
            return _TritonSJLTFn.apply(x, rows, vals, d)
        y = x.new_zeros(d, x.shape[0])
        for j in range(rows.shape[0]):
            y = y.index_add(0, rows[j], (x * vals[j]).T)
        return y.T

    @staticmethod
    def forward_into(u: Tensor, rows: Tensor, vals: Tensor, d: int, tmp: Tensor) -> Tensor:
        """:meth:`forward` for a contiguous block ``u`` with a scratch buffer ``tmp`` (no autograd); the
        native scatter kernel when it applies (each output row stays in cache while its input streams by)."""
        if _native.usable(u):
            return _native.sjlt(u, rows, vals, d)
        rows = _Hashed.wide(rows)
        if _triton.usable(u):
            return _triton.sjlt(u, rows, vals, d)
        y = u.new_zeros(u.shape[0], d)
        t = tmp[: u.numel()].view(u.shape)
        for j in range(rows.shape[0]):
            torch.mul(u, vals[j], out=t)
            for i in range(u.shape[0]):  # 1-D index_add_ is a vectorised kernel; dim=1 on 2-D is not
                y[i].index_add_(0, rows[j], t[i])
        return y

    @staticmethod
    def adjoint(y: Tensor, rows: Tensor, vals: Tensor) -> Tensor:
        rows = _Hashed.wide(rows)
        out = y[:, rows[0]] * vals[0]
        for j in range(1, rows.shape[0]):
            out = out + y[:, rows[j]] * vals[j]
        return out


class _TritonSJLTFn(torch.autograd.Function):
    """The CountSketch scatter by the Triton kernel under autograd and forward-mode AD: the backward is
    the adjoint gather (torch), the tangent map the scatter itself."""

    @staticmethod
    def forward(x, rows, vals, d):  # type: ignore[override]
        return _triton.sjlt(x, rows, vals, d)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        _, ctx.rows, ctx.vals, ctx.d = inputs

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _Hashed.adjoint(g, ctx.rows, ctx.vals), None, None, None

    @staticmethod
    def jvp(ctx, t, *_):  # type: ignore[override]
        return _Hashed.forward(t, ctx.rows, ctx.vals, ctx.d)


class SJLTSketch(Sketch):
    """Sparse JL / CountSketch: each coordinate goes to s distinct rows with random signs, scaled 1/√s.

    O(sn) time; s ≤ d (clamped). Kane & Nelson (2014).
    """

    kind = "sjlt"
    allows_d_greater_than_n = True
    option_names = ("s",)

    def __init__(self, n: int, d: int, seed: int = 0, s: int = 2) -> None:
        super().__init__(n, d, seed, s=s)
        s = _check_int("s", s)
        self._options = {"s": s}
        s = min(s, self.d)
        g = generator(self.seed, "sjlt")
        self._bufs["rows"] = _Hashed.draw(self.n, self.d, s, g)
        self._bufs["signs"] = torch.stack([_signs(self.n, g) for _ in range(s)])
        self._scale = 1.0 / math.sqrt(s)

    def _vals(self, dtype: torch.dtype) -> Tensor:
        return self._buf("signs", dtype) * self._scale

    def _fast_min_elems(self) -> int:
        # the native scatter has no per-call set-up to amortise: use it at every size
        return 0 if _native.library() is not None and not _native._off else super()._fast_min_elems()

    def _forward(self, x: Tensor) -> Tensor:
        return _Hashed.forward(x, self._bufs["rows"], self._vals(x.dtype), self.d)

    def _forward_fast(self, x: Tensor) -> Tensor:
        rows, vals = self._bufs["rows"], self._vals(x.dtype)
        return self._chunked(x, self.n, lambda xc, bufs: _Hashed.forward_into(xc, rows, vals, self.d, bufs[0]))

    def _adjoint(self, y: Tensor) -> Tensor:
        return _Hashed.adjoint(y, self._bufs["rows"], self._vals(y.dtype))


# ----------------------------------------------------------------------------------------------------
class _Precond:
    """A full orthogonal pre-conditioner P on R^{n_pad} (applied after random signs where it needs them).

    hadamard: Walsh–Hadamard, n_pad = next power of two. fft: discrete Hartley transform (real, via the
    FFT), n_pad = n. orthogonal: Kronecker product of Haar-random orthogonal factors ≤ max_factor.
    """

    def __init__(self, kind: str, n: int, max_factor: int, gen: torch.Generator) -> None:
        self.kind = kind
        if kind == "hadamard":
            self.n_pad = next_pow2(n)
            self.mats: list[Tensor] = []
        elif kind == "fft":
            self.n_pad = n
            self.mats = []
        else:
            facs = _ortho_factors(n, max_factor)
            self.n_pad = math.prod(facs)
            self.mats = [haar_rows(b, b, gen).to(torch.float32) for b in facs]
        self.needs_signs = kind != "orthogonal"

    def apply(self, x: Tensor, mats: list[Tensor] | None) -> Tensor:
        if self.kind == "hadamard":
            return wht(x, WHT_FACTOR)
        if self.kind == "fft":
            return dht(x)
        assert mats is not None
        return kron_apply(x, mats)

    def apply_t(self, x: Tensor, mats: list[Tensor] | None) -> Tensor:
        if self.kind == "orthogonal":
            assert mats is not None
            return kron_apply_t(x, mats)
        return self.apply(x, mats)  # WHT and DHT are symmetric


def _pre_mats(kind: str, n_pad: int, mats: list[Tensor], x: Tensor) -> list[Tensor]:
    """Kronecker factors of a hadamard/orthogonal pre-conditioner for :func:`kron_rot`."""
    return wht_mats(n_pad, WHT_FACTOR_FAST, x.dtype, x.device) if kind == "hadamard" else mats


def _pre_load_apply(kind: str, xc: Tensor, n_pad: int, signs: Tensor | None, pm: list[Tensor],
                    bufs: tuple[Tensor, Tensor]) -> Tensor:
    """The full pre-conditioner on ``pad(xc)·signs``: on CUDA one Triton pass over ``xc`` with the padding
    and the signs fused into the transform's first pass; elsewhere :func:`_load` into ``bufs[0]`` and
    :func:`_pre_apply`."""
    if kind == "hadamard" and _triton.usable(xc):
        return _triton.fwht(xc, n_pad, mult=signs)
    return _pre_apply(kind, _load(xc, n_pad, bufs[0], signs), pm, bufs)


def _pre_apply(kind: str, u: Tensor, pm: list[Tensor], bufs: tuple[Tensor, Tensor]) -> Tensor:
    """The full pre-conditioner on a loaded block ``u`` that lives in ``bufs[0]``: the native FWHT in
    place when it applies, else :func:`kron_rot` into the buffers."""
    if kind == "hadamard" and u.data_ptr() == bufs[0].data_ptr() and native_wht_ok(u):
        return _native.fwht_(u, 1.0 / math.sqrt(u.shape[1]))
    return kron_rot(u, pm, bufs)


def _restricted_factors(kind: str, n_pad: int, d: int, max_factor: int, gen: torch.Generator,
                        permute_cols: bool) -> tuple[list[Tensor], int, list[tuple[Tensor, Tensor | None]]]:
    """Kronecker factors [D_i, b_i] of a row-restricted orthogonal transform R·H·Π (Π within factors).

    hadamard: rows of H_{b_i} chosen at random, columns permuted at random; orthogonal: Haar rows.
    Returns the factors, D_pad = ∏ D_i ≥ d (the output is cropped to d) and, for hadamard, each factor's
    kept rows and the gather order of its columns (``M_i = H[rows][:, perm]``, so ``M_i y = H[rows]·y[src]``
    with ``src = argsort(perm)``; ``None`` without permutation), which the native kernel uses.
    """
    index: list[tuple[Tensor, Tensor | None]] = []
    if kind == "hadamard":
        q = next_pow2(d).bit_length() - 1

        def floats(k: int) -> int:
            bs = pow2_split(n_pad, 1 << -(-(n_pad.bit_length() - 1) // k))
            return sum(b * r for b, r in zip(bs, split_exponent_like(q, bs)))

        k = _n_factors(n_pad, max_factor, floats)
        bs = pow2_split(n_pad, 1 << -(-(n_pad.bit_length() - 1) // k))
        ds = split_exponent_like(q, bs)
        mats = []
        for b, r in zip(bs, ds):
            h = hadamard(b, torch.float64)
            rows = torch.randperm(b, generator=gen)[:r]
            m = h[rows]
            src = None
            if permute_cols:
                perm = torch.randperm(b, generator=gen)
                m = m[:, perm]
                src = torch.argsort(perm).to(torch.int32)
            mats.append(m.contiguous())  # float64, exact ±1/√b: stored as int8 signs by the sketch
            index.append((rows.to(torch.int32), src))
    else:
        bs = _ortho_factors(n_pad, max_factor)
        if math.prod(bs) != n_pad:
            raise AssertionError("internal: orthogonal factors must tile n_pad")
        ds = _bounded_factors(d, bs)
        mats = [haar_rows(b, r, gen).to(torch.float32) for b, r in zip(bs, ds)]
    # contract the most reducing factor first: the definition orders factors that way
    return mats, math.prod(int(m.shape[0]) for m in mats), index


class _NativeRestricted:
    """The row-restricted Hadamard transform ``(M_1 ⊗ … ⊗ M_K)`` of AFJL/AFFD evaluated with the native
    kernel on its last (fast-index) factor, which shrinks the data by ``b_K / D_K`` in one pass over it, and
    batched GEMMs for the other factors on the shrunk data. Same linear map as :func:`kron_apply`."""

    def __init__(self, sk: Sketch, mats: list[Tensor], index: list[tuple[Tensor, Tensor | None]]) -> None:
        self.b = int(mats[-1].shape[1])
        self.r = int(mats[-1].shape[0])
        sk._bufs["Rsel"] = index[-1][0]
        if index[-1][1] is not None:
            sk._bufs["Rsrc"] = index[-1][1]

    def __call__(self, sk: Sketch, u: Tensor, rm: list[Tensor], mult: Tensor | None) -> Tensor:
        """``(M_1 ⊗ … ⊗ M_K)(mult ⊙ u)`` for the contiguous ``[r, n_pad]`` block ``u`` (no autograd)."""
        v = self.last(sk, u, mult, adjoint=False)
        return kron_apply(v.view(u.shape[0], -1), rm[:-1], tail=self.r)

    def last(self, sk: Sketch, u: Tensor, mult: Tensor | None, adjoint: bool) -> Tensor:
        """The last factor with the multiplier: ``[M, G·b] -> [M, G, r]`` (adjoint: ``[M, G·r] -> [M, G·b]``).
        The native kernel when it can take ``u``, else the same map as a GEMM (autograd-transparent)."""
        src, sel = sk._bufs.get("Rsrc"), sk._bufs["Rsel"]
        m = u.shape[0]
        if _native.usable(u):
            if adjoint:
                return _native.whtsel_t(u.view(m, -1, self.r), self.b, sel, 1.0 / math.sqrt(self.b), src=src,
                                        mult=mult)
            return _native.whtsel(u, self.b, sel, 1.0 / math.sqrt(self.b), src=src, mult=mult)
        if _triton.usable(u):
            if adjoint:
                return _triton.whtsel_t(u.reshape(m, -1, self.r), self.b, sel, 1.0 / math.sqrt(self.b), src=src,
                                        mult=mult)
            return _triton.whtsel(u, self.b, sel, 1.0 / math.sqrt(self.b), src=src, mult=mult)
        a = sk._rmats(u.dtype)[-1]  # type: ignore[attr-defined]
        if adjoint:
            out = (u.reshape(m, -1, self.r) @ a).reshape(m, -1)
            return out * mult if mult is not None else out
        return (u * mult if mult is not None else u).reshape(m, -1, self.b) @ a.T

    def apply(self, sk: Sketch, u: Tensor, rm: list[Tensor], mult: Tensor | None) -> Tensor:
        """``(M_1 ⊗ … ⊗ M_K)(mult ⊙ u)`` for any ``[M, n_pad]`` ``u``, differentiable."""
        v = self._last_any(sk, u, mult, adjoint=False)
        return kron_apply(v.reshape(u.shape[0], -1), rm[:-1], tail=self.r)

    def apply_t(self, sk: Sketch, y: Tensor, rm: list[Tensor], mult: Tensor | None) -> Tensor:
        """The adjoint of :meth:`apply`: ``[M, ∏D_i] -> [M, n_pad]``, differentiable."""
        v = kron_apply(y, [a.T for a in rm[:-1]], tail=self.r)
        return self._last_any(sk, v, mult, adjoint=True)

    def _last_any(self, sk: Sketch, u: Tensor, mult: Tensor | None, adjoint: bool) -> Tensor:
        u = u.contiguous()
        if _native.usable(u) or _triton.usable(u):
            return _LastFactorFn.apply(u, self, sk, mult, adjoint)
        return self.last(sk, u, mult, adjoint)


class _LastFactorFn(torch.autograd.Function):
    """:meth:`_NativeRestricted.last` under autograd and forward-mode AD: each direction's backward is the
    other direction (the map is linear)."""

    @staticmethod
    def forward(u, nr, sk, mult, adjoint):  # type: ignore[override]
        return nr.last(sk, u, mult, adjoint)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        _, ctx.nr, ctx.sk, ctx.mult, ctx.adjoint = inputs
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        gi = ctx.nr._last_any(ctx.sk, g.reshape(g.shape[0], -1), ctx.mult, not ctx.adjoint)
        return gi.reshape(ctx.shape), None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):  # type: ignore[override]
        return ctx.nr._last_any(ctx.sk, t, ctx.mult, ctx.adjoint)


def _n_factors(n: int, max_factor: int, floats_for_k) -> int:
    """Fewest Kronecker factors (each ≤ max_factor) whose stored matrices take ≤ 4 floats per input."""
    k = max(1, math.ceil(math.log(max(n, 2)) / math.log(max_factor)))
    while k < max(1, n.bit_length()) and floats_for_k(k) > 4 * n:
        k += 1
    return k


def _bounded_factors(d: int, caps: list[int]) -> list[int]:
    """Factors d_i ≤ caps_i, balanced, with ∏ d_i ≥ d."""
    out: list[int] = []
    left = d
    for i, c in enumerate(caps):
        rest = len(caps) - i
        want = math.ceil(left ** (1.0 / rest) - 1e-9)
        di = max(1, min(c, want))
        out.append(di)
        left = math.ceil(left / di)
    if math.prod(out) < d:
        raise ValueError(f"d: cannot factor d={d} within factor sizes {caps}")
    return out


def _ortho_factors(n: int, max_factor: int) -> list[int]:
    """Sizes of the Haar factors of an orthogonal pre-conditioner on R^n (product ≥ n, ≤ 4 floats/input)."""
    k = _n_factors(n, max_factor, lambda k: sum(b * b for b in balanced_factors(n, k)))
    return balanced_factors(n, k)


class _StructuredBase(Sketch):
    option_names: ClassVar[tuple[str, ...]] = ("preconditioner", "max_factor")
    default_max_factor = 1024

    def _common(self, preconditioner: str, max_factor: int) -> None:
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner: expected one of {PRECONDITIONERS}, got {preconditioner!r}")
        max_factor = _check_int("max_factor", max_factor, minimum=2)
        self._options = {"preconditioner": preconditioner, "max_factor": max_factor}
        self.preconditioner = preconditioner
        self.max_factor = max_factor


    n_rmats = 0
    _rscale: list[float | None] = []

    def _signs_for(self, x: Tensor) -> Tensor:
        """The ±1 signs: on the CPU the stored int8 vector itself (a float·int8 product promotes to the float
        dtype, with or without autograd), so no n_pad-long float copy is cached; elsewhere the float copy."""
        return self._bufs["B"] if x.device.type == "cpu" else self._buf("B", x.dtype)

    def _store_rmats(self, mats: list[Tensor], signs_only: bool) -> None:
        """Keep the restricted factors: Hadamard ones as int8 ±1 with their 1/√b applied in the compute
        dtype (exact in float64, and the same map the native kernel evaluates), others as float32."""
        self._rscale = []
        for i, m in enumerate(mats):
            if signs_only:
                b = int(m.shape[1])
                self._bufs[f"R{i}"] = torch.round(m * math.sqrt(b)).to(torch.int8)
                self._rscale.append(1.0 / math.sqrt(b))
            else:
                self._bufs[f"R{i}"] = m.to(torch.float32)
                self._rscale.append(None)
        self.n_rmats = len(mats)

    def _rmats(self, dtype: torch.dtype) -> list[Tensor]:
        out = []
        for i, sc in enumerate(self._rscale):
            if sc is None:
                out.append(self._buf(f"R{i}", dtype))
                continue
            key = (f"R{i}*", dtype)
            c = self._cache.get(key)
            if c is None:
                c = self._cache[key] = self._bufs[f"R{i}"].to(dtype) * sc
            out.append(c)
        return out


class FJLSketch(_StructuredBase):
    """Fast JL (Ailon & Chazelle 2009): Φ = G_s·P·B/√s — random signs B, orthogonal pre-conditioner P
    (Walsh–Hadamard by default), then a sparse Gaussian G_s with s non-zeros per column.

    State per padded coordinate: a row index, a Gaussian value (float32) and a sign (int8). On the CPU the row
    indices are kept as int16 when d ≤ 2^15 (the native kernels read them as they are; 2 bytes instead of 4),
    as int32 otherwise and on other devices; the same values either way, so the matrix does not depend on it.
    """

    kind = "fjl"
    option_names = ("preconditioner", "max_factor", "s")

    def __init__(self, n: int, d: int, seed: int = 0, preconditioner: str = "hadamard",
                 max_factor: int = 1024, s: int = 1) -> None:
        super().__init__(n, d, seed, preconditioner=preconditioner, max_factor=max_factor, s=s)
        self._common(preconditioner, max_factor)
        s = _check_int("s", s)
        self._options["s"] = s
        s = min(s, self.d)
        g = generator(self.seed, "fjl")
        self.pre = _Precond(preconditioner, self.n, max_factor, g)
        self.n_pad = self.pre.n_pad
        for i, m in enumerate(self.pre.mats):
            self._bufs[f"P{i}"] = m
        if self.pre.needs_signs:
            self._bufs["B"] = _signs(self.n_pad, g)
        self._bufs["rows"] = _Hashed.draw(self.n_pad, self.d, s, g, self._rows_dtype(torch.device("cpu")))
        self._bufs["vals"] = torch.randn(s, self.n_pad, generator=g).div_(math.sqrt(s))

    def _rows_dtype(self, device: torch.device) -> torch.dtype:
        return torch.int16 if device.type == "cpu" and self.d <= 1 << 15 else torch.int32

    def to(self, device: torch.device | str) -> FJLSketch:
        super().to(device)
        self._bufs["rows"] = self._bufs["rows"].to(self._rows_dtype(self.device))
        return self

    def _mats(self, dtype: torch.dtype) -> list[Tensor]:
        return [self._buf(f"P{i}", dtype) for i in range(len(self.pre.mats))]

    def _forward(self, x: Tensor) -> Tensor:
        u = _pad(x, self.n_pad)
        if self.pre.needs_signs:
            u = u * self._buf("B", x.dtype)
        u = self.pre.apply(u, self._mats(x.dtype))
        return _Hashed.forward(u, self._bufs["rows"], self._buf("vals", x.dtype), self.d)

    def _fast_min_elems(self) -> int:
        # with the native scatter kernel the fast path wins at every size (a 147,840-long row with d = 2^14:
        # 0.6 ms against 23 ms for the index_add path, which subspace training's backward hits per block)
        return 0 if _native.library() is not None and not _native._off else super()._fast_min_elems()

    def _forward_fast(self, x: Tensor) -> Tensor:
        if self.preconditioner == "fft":
            return self._forward(x)
        pm = _pre_mats(self.preconditioner, self.n_pad, self._mats(x.dtype), x)
        signs = self._signs_for(x) if self.pre.needs_signs else None
        rows, vals = self._bufs["rows"], self._buf("vals", x.dtype)

        def fn(xc: Tensor, bufs: tuple[Tensor, Tensor]) -> Tensor:
            u = _pre_load_apply(self.preconditioner, xc, self.n_pad, signs, pm, bufs)
            tmp = bufs[1] if u.data_ptr() == bufs[0].data_ptr() else bufs[0]
            return _Hashed.forward_into(u, rows, vals, self.d, tmp)

        return self._chunked(x, self.n_pad, fn)

    def _adjoint(self, y: Tensor) -> Tensor:
        u = _Hashed.adjoint(y, self._bufs["rows"], self._buf("vals", y.dtype))
        u = self.pre.apply_t(u, self._mats(y.dtype))
        if self.pre.needs_signs:
            u = u * self._buf("B", y.dtype)
        return u[:, : self.n]

    def _adjoint_fast_ok(self, y: Tensor) -> bool:
        return self.preconditioner == "hadamard" and y.device.type == "cpu" and super()._adjoint_fast_ok(y)

    def _adjoint_fast(self, y: Tensor) -> Tensor:
        """:meth:`_adjoint` without autograd on one n_pad-long buffer: the hashed gather-multiply-add, the
        native FWHT and the signs all in place."""
        rows, vals = self._bufs["rows"], self._buf("vals", y.dtype)
        y = y.contiguous()
        if _native.usable(y):
            u = _native.gather(y, rows, vals)  # one pass, no int64 index (torch's y[:, rows] is ~7x slower)
        else:
            rows = _Hashed.wide(rows)
            u = y[:, rows[0]]
            u.mul_(vals[0])
            for j in range(1, rows.shape[0]):
                u.addcmul_(y[:, rows[j]], vals[j])
        u = _native.fwht_(u, 1.0 / math.sqrt(u.shape[1])) if native_wht_ok(u) else self.pre.apply_t(u, None)
        u = u[:, : self.n]
        if self.pre.needs_signs:
            _mul_signs(u, self._signs_for(y)[: self.n])
        return u


class AFFDSketch(_StructuredBase):
    """AFFD (Schioppa 2024): Φx = √(n_pad/d)·R_d·H^{π2}·G_v·H^{π1}·B·x.

    B random signs; H^{π1} a full pre-conditioner; G_v an n_pad-diagonal Gaussian; H^{π2} a Kronecker
    transform (factors ≤ max_factor) with columns permuted inside each factor; R_d keeps d rows (a random
    subset inside each factor, so the second transform is evaluated only on the kept rows). The row
    permutation π1 of the paper is folded into π2: G_v is i.i.d., so Π·G_v·Πᵀ has the same law as G_v and
    the two permutations compose into one, with identical distribution of Φ.
    """

    kind = "affd"

    def __init__(self, n: int, d: int, seed: int = 0, preconditioner: str = "hadamard",
                 max_factor: int = 1024) -> None:
        super().__init__(n, d, seed, preconditioner=preconditioner, max_factor=max_factor)
        self._common(preconditioner, max_factor)
        g = generator(self.seed, "affd")
        self.pre = _Precond(preconditioner, self.n, max_factor, g)
        self.n_pad = self.pre.n_pad
        for i, m in enumerate(self.pre.mats):
            self._bufs[f"P{i}"] = m
        if self.pre.needs_signs:
            self._bufs["B"] = _signs(self.n_pad, g)
        self._bufs["G"] = torch.randn(self.n_pad, generator=g)
        if preconditioner == "fft":
            self._bufs["perm"] = torch.randperm(self.n_pad, generator=g).to(torch.int32)
            self._bufs["rows"] = torch.randperm(self.n_pad, generator=g)[: self.d].to(torch.int32)
            self.n_rmats = 0
            self._native_r: _NativeRestricted | None = None
        else:
            mats, _, index = _restricted_factors(preconditioner, self.n_pad, self.d, max_factor, g,
                                                 permute_cols=True)
            self._store_rmats(mats, preconditioner == "hadamard")
            self._native_r = _NativeRestricted(self, mats, index) if preconditioner == "hadamard" else None
        self.scale = math.sqrt(self.n_pad / self.d)

    def _pmats(self, dtype: torch.dtype) -> list[Tensor]:
        return [self._buf(f"P{i}", dtype) for i in range(len(self.pre.mats))]


    def _forward(self, x: Tensor) -> Tensor:
        u = _pad(x, self.n_pad)
        if self.pre.needs_signs:
            u = u * self._signs_for(x)
        u = self.pre.apply(u, self._pmats(x.dtype))
        gs = self._buf("G", x.dtype) * self.scale
        if self._native_r is not None:
            return self._native_r.apply(self, u, self._rmats(x.dtype), gs)[:, : self.d]
        u = u * gs
        if self.preconditioner == "fft":
            return dht(u[:, self._bufs["perm"]])[:, self._bufs["rows"]]
        return kron_apply(u, self._rmats(x.dtype))[:, : self.d]

    def _forward_fast(self, x: Tensor) -> Tensor:
        if self.preconditioner == "fft":
            return self._forward(x)
        pm = _pre_mats(self.preconditioner, self.n_pad, self._pmats(x.dtype), x)
        rm = self._rmats(x.dtype)
        signs = self._signs_for(x) if self.pre.needs_signs else None
        g = self._buf("G", x.dtype)  # the scale goes on the d outputs: no n_pad-long G·scale copy per call

        nr = self._native_r

        def fn(xc: Tensor, bufs: tuple[Tensor, Tensor]) -> Tensor:
            u = _pre_load_apply(self.preconditioner, xc, self.n_pad, signs, pm, bufs)
            if nr is not None and (_native.usable(u) or _triton.usable(u)):
                return nr(self, u, rm, g)[:, : self.d] * self.scale  # the G product is fused into the kernel
            u.mul_(g)
            return kron_rot(u, rm, bufs)[:, : self.d] * self.scale

        return self._chunked(x, self.n_pad, fn)

    def _adjoint_fast_ok(self, y: Tensor) -> bool:
        return self._native_r is not None and y.device.type == "cpu" and super()._adjoint_fast_ok(y)

    def _adjoint_fast(self, y: Tensor) -> Tensor:
        """:meth:`_adjoint` without autograd and with one n_pad-long buffer: the scale is applied to the d
        inputs, G is fused into the restricted transform's kernel, the pre-conditioner (native FWHT) and the
        signs work in place on that buffer."""
        mats = self._rmats(y.dtype)
        d_pad = math.prod(int(m.shape[0]) for m in mats)
        assert self._native_r is not None
        u = self._native_r.apply_t(self, _pad(y * self.scale, d_pad), mats, self._buf("G", y.dtype))
        if native_wht_ok(u) and u.is_contiguous():
            u = _native.fwht_(u, 1.0 / math.sqrt(u.shape[1]))
        else:
            u = self.pre.apply_t(u, self._pmats(y.dtype))
        u = u[:, : self.n]
        if self.pre.needs_signs:
            _mul_signs(u, self._signs_for(y)[: self.n])
        return u


    def _adjoint(self, y: Tensor) -> Tensor:
        if self.preconditioner == "fft":
            z = y.new_zeros(y.shape[0], self.n_pad).index_copy(1, self._bufs["rows"].long(), y)
            z = dht(z)
            u = z.new_zeros(z.shape).index_copy(1, self._bufs["perm"].long(), z)
        elif self._native_r is not None:
            mats = self._rmats(y.dtype)
            d_pad = math.prod(int(m.shape[0]) for m in mats)
            u = self._native_r.apply_t(self, _pad(y, d_pad), mats, self._buf("G", y.dtype) * self.scale)
            u = self.pre.apply_t(u, self._pmats(y.dtype))
            return (u * self._signs_for(y) if self.pre.needs_signs else u)[:, : self.n]
        else:
            mats = self._rmats(y.dtype)
            d_pad = math.prod(int(m.shape[0]) for m in mats)
            u = kron_apply_t(_pad(y, d_pad), mats)
        u = u * (self._buf("G", y.dtype) * self.scale)
        u = self.pre.apply_t(u, self._pmats(y.dtype))
        if self.pre.needs_signs:
            u = u * self._signs_for(y)
        return u[:, : self.n]


class AFJLSketch(_StructuredBase):
    """AFJL (Schioppa 2024): Φx = √(n_pad/d)·G_d·R_d·H^{π1}·B·x — AFFD without the second transform.

    Only the d kept rows of H^{π1} are evaluated (a Kronecker product of row-subsets of the factors),
    so the cost is one restricted transform; G_d is a d-diagonal Gaussian.
    """

    kind = "afjl"

    def __init__(self, n: int, d: int, seed: int = 0, preconditioner: str = "hadamard",
                 max_factor: int = 1024) -> None:
        super().__init__(n, d, seed, preconditioner=preconditioner, max_factor=max_factor)
        self._common(preconditioner, max_factor)
        g = generator(self.seed, "afjl")
        if preconditioner == "hadamard":
            self.n_pad = next_pow2(self.n)
        elif preconditioner == "fft":
            self.n_pad = self.n
        else:
            self.n_pad = math.prod(_ortho_factors(self.n, max_factor))
        self.needs_signs = preconditioner != "orthogonal"
        if self.needs_signs:
            self._bufs["B"] = _signs(self.n_pad, g)
        if preconditioner == "fft":
            self._bufs["rows"] = torch.randperm(self.n_pad, generator=g)[: self.d].to(torch.int32)
            self.n_rmats = 0
            self._native_r: _NativeRestricted | None = None
        else:
            mats, _, index = _restricted_factors(preconditioner, self.n_pad, self.d, max_factor, g,
                                                 permute_cols=False)
            self._store_rmats(mats, preconditioner == "hadamard")
            self._native_r = _NativeRestricted(self, mats, index) if preconditioner == "hadamard" else None
        self._bufs["G"] = torch.randn(self.d, generator=g)
        self.scale = math.sqrt(self.n_pad / self.d)


    def _forward(self, x: Tensor) -> Tensor:
        u = _pad(x, self.n_pad)
        if self.needs_signs:
            u = u * self._buf("B", x.dtype)
        if self.preconditioner == "fft":
            v = dht(u)[:, self._bufs["rows"]]
        elif self._native_r is not None:
            v = self._native_r.apply(self, u, self._rmats(x.dtype), None)[:, : self.d]
        else:
            v = kron_apply(u, self._rmats(x.dtype))[:, : self.d]
        return v * (self._buf("G", x.dtype) * self.scale)

    def _forward_fast(self, x: Tensor) -> Tensor:
        if self.preconditioner == "fft":
            return self._forward(x)
        rm = self._rmats(x.dtype)
        signs = self._buf("B", x.dtype) if self.needs_signs else None
        gs = self._buf("G", x.dtype) * self.scale
        nr = self._native_r

        def fn(xc: Tensor, bufs: tuple[Tensor, Tensor]) -> Tensor:
            if nr is not None and (_native.usable(xc) or _triton.usable(xc)):
                if xc.shape[1] == self.n_pad:  # the signs are fused into the kernel: one pass over x
                    return nr(self, xc, rm, signs)[:, : self.d] * gs
                return nr(self, _load(xc, self.n_pad, bufs[0], signs), rm, None)[:, : self.d] * gs
            return kron_rot(_load(xc, self.n_pad, bufs[0], signs), rm, bufs)[:, : self.d] * gs

        return self._chunked(x, self.n_pad, fn)

    def _adjoint(self, y: Tensor) -> Tensor:
        v = y * (self._buf("G", y.dtype) * self.scale)
        if self.preconditioner == "fft":
            u = dht(v.new_zeros(v.shape[0], self.n_pad).index_copy(1, self._bufs["rows"].long(), v))
        elif self._native_r is not None:  # the signs are fused into the last factor's kernel
            mats = self._rmats(y.dtype)
            d_pad = math.prod(int(m.shape[0]) for m in mats)
            return self._native_r.apply_t(self, _pad(v, d_pad), mats, self._buf("B", y.dtype))[:, : self.n]
        else:
            mats = self._rmats(y.dtype)
            d_pad = math.prod(int(m.shape[0]) for m in mats)
            u = kron_apply_t(_pad(v, d_pad), mats)
        if self.needs_signs:
            u = u * self._buf("B", y.dtype)
        return u[:, : self.n]


class FFDSketch(_StructuredBase):
    """Fastfood (Le et al. 2013) as used for intrinsic dimension (Li et al. 2018): Φᵀ stacks ⌈n/L⌉
    blocks V_i = S_i·H·G_i·Π_i·H·B_i of size L = next power of two ≥ d, so Φx = √(L/d)·crop_d(Σ_i V_iᵀ x_i).

    S_i = s/‖G_i‖_F with s ~ χ_L. NOT a valid sketch for every input (Theorem 3.1 of Schioppa 2024):
    an input equal to a Hadamard row inside one block is scaled by a single Gaussian. Kept for
    comparison and intrinsic dimension.
    """

    kind = "ffd"
    option_names = ("preconditioner", "max_factor", "rng")

    #: Version of the scheme that draws the random state. 1: χ draws from numpy (before 2026-12-04);
    #: 2 (default): every draw from torch generators; 3: as 2, except that the χ draws of S come from one
    #: generator per chunk of CHI_CHUNK elements (same law; the float64 temporaries of the χ sampler are
    #: chunk-sized instead of n_pad-sized: 2 builds a 22.7M-parameter model's ffd with ~0.5 GB of them, which
    #: set subspace training's peak memory). The version is part of the spec, so a store or checkpoint made
    #: with another version is refused as a different sketch instead of silently rebuilt differently.
    RNG_VERSION = 2
    RNG_VERSIONS = (2, 3)
    #: elements of S drawn per χ generator with rng=3 (whole blocks; part of the scheme, do not change)
    CHI_CHUNK = 1 << 20

    def __init__(self, n: int, d: int, seed: int = 0, preconditioner: str = "hadamard",
                 max_factor: int = 1024, rng: int = RNG_VERSION) -> None:
        if isinstance(rng, bool) or rng not in self.RNG_VERSIONS:
            raise ValueError(f"rng: expected 2 or 3 (the ffd random-draw schemes this version can rebuild), got "
                             f"{rng!r}; re-create the sketch (and re-featurise any store made with it)")
        super().__init__(n, d, seed, preconditioner=preconditioner, max_factor=max_factor, rng=rng)
        self._common(preconditioner, max_factor)
        self._options["rng"] = rng
        g = generator(self.seed, "ffd")
        L = next_pow2(self.d) if preconditioner != "fft" else self.d
        if preconditioner == "orthogonal":
            facs = _ortho_factors(L, max_factor)
            if math.prod(facs) != L:
                facs = pow2_split(L, 1 << max(1, (L.bit_length() - 1 + 1) // 2))
            self.qmats = [haar_rows(b, b, g).to(torch.float32) for b in facs]
            for i, m in enumerate(self.qmats):
                self._bufs[f"Q{i}"] = m
        else:
            self.qmats = []
        self.L = L
        self.nb = -(-self.n // L)
        self.n_pad = self.nb * L
        nb = self.nb
        self._bufs["B"] = _signs(self.n_pad, g).view(nb, L)
        G = torch.randn(nb, L, generator=g)
        self._bufs["G"] = G
        # the per-block permutations as int16 when L fits (half the memory of int32; the maps use .long())
        pdt = torch.int16 if L <= 2**15 else torch.int32
        self._bufs["perm"] = torch.stack([torch.randperm(L, generator=g) for _ in range(nb)]).to(pdt) \
            if nb * L <= 2**28 else torch.empty(0)
        gnorm = G.norm(dim=1, keepdim=True)
        if rng == 2:
            chi_draws = chi(L, (nb, L), generator(self.seed, "ffd-chi"))  # all randomness from torch generators
            self._bufs["S"] = chi_draws.to(torch.float32) / gnorm
        else:  # one χ generator per chunk of whole blocks: chunk-sized temporaries
            S = torch.empty(nb, L)
            per = max(1, self.CHI_CHUNK // L)
            for c, a in enumerate(range(0, nb, per)):
                b = min(nb, a + per)
                torch.div(chi(L, (b - a, L), generator(self.seed, "ffd-chi", c)).to(torch.float32), gnorm[a:b],
                          out=S[a:b])
            self._bufs["S"] = S
        self.scale = math.sqrt(L / self.d)

    def _h(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.L)
        if self.preconditioner == "hadamard":
            out = wht(flat, WHT_FACTOR)
        elif self.preconditioner == "fft":
            out = dht(flat)
        else:
            out = kron_apply(flat, [self._buf(f"Q{i}", x.dtype) for i in range(len(self.qmats))])
        return out.reshape(shape)

    def _ht(self, x: Tensor) -> Tensor:
        if self.preconditioner != "orthogonal":
            return self._h(x)
        shape = x.shape
        out = kron_apply_t(x.reshape(-1, self.L), [self._buf(f"Q{i}", x.dtype) for i in range(len(self.qmats))])
        return out.reshape(shape)

    def _perm_idx(self) -> Tensor:
        return self._bufs["perm"].long()

    def _forward(self, x: Tensor) -> Tensor:
        # Φ = Σ_i B_i H Π_i G_i H S_i (the transpose of Li et al.'s Φᵀ, with Π drawn uniformly)
        m = x.shape[0]
        u = _pad(x, self.n_pad).reshape(m, self.nb, self.L)
        u = self._h(u * self._buf("S", x.dtype))
        u = u * self._buf("G", x.dtype)
        u = torch.gather(u, 2, self._perm_idx().expand(m, -1, -1))
        u = self._h(u) * self._buf("B", x.dtype)
        return u.sum(dim=1)[:, : self.d] * self.scale

    def _adjoint(self, y: Tensor) -> Tensor:
        m = y.shape[0]
        v = _pad(y * self.scale, self.L)[:, None, :] * self._buf("B", y.dtype)  # [m, nb, L]
        v = self._ht(v)
        v = torch.zeros_like(v).scatter(2, self._perm_idx().expand(m, -1, -1), v)
        v = self._ht(v * self._buf("G", y.dtype)) * self._buf("S", y.dtype)
        return v.reshape(m, self.n_pad)[:, : self.n]

    # -- no-autograd paths: the blocks are independent, so both maps run over chunks of blocks with
    # -- temporaries of the chunk's size only (FFD_CHUNK elements), never of the padded length
    def _block_chunks(self, m: int) -> list[tuple[int, int]]:
        step = max(1, FFD_CHUNK // max(1, m * self.L))
        return [(a, min(self.nb, a + step)) for a in range(0, self.nb, step)]

    def _fast_min_elems(self) -> int:
        return 0

    def _fast_ok(self, x: Tensor) -> bool:
        return self._bufs["perm"].numel() > 0 and super()._fast_ok(x)

    def _adjoint_fast_ok(self, y: Tensor) -> bool:
        return self._bufs["perm"].numel() > 0 and super()._adjoint_fast_ok(y)

    def _chunk_bufs(self, like: Tensor, m: int, per: int) -> tuple[Tensor, Tensor, Tensor]:
        """Two flat ``m·per·L`` buffers of ``like``'s dtype and an int64 ``per·L`` index buffer, reused by every
        chunk of one call (fresh temporaries per chunk are page-faulted afresh once the allocator mmaps them)."""
        k = m * per * self.L
        return like.new_empty(k), like.new_empty(k), torch.empty(per * self.L, dtype=torch.long)

    def _h_(self, u: Tensor, transpose: bool = False) -> Tensor:
        """:meth:`_h` (or :meth:`_ht`) of a contiguous ``[m, k, L]`` chunk, in place when the native kernel
        applies (the same values as :meth:`_h`, which transforms a copy)."""
        flat = u.view(-1, self.L)
        if self.preconditioner == "hadamard" and native_wht_ok(flat):
            _native.fwht_(flat, 1.0 / math.sqrt(self.L))
            return u
        return self._ht(u) if transpose else self._h(u)

    def _forward_fast(self, x: Tensor) -> Tensor:
        m, L = x.shape[0], self.L
        B, G, S = self._bufs["B"], self._buf("G", x.dtype), self._buf("S", x.dtype)
        perm = self._bufs["perm"]
        acc = x.new_zeros(m, L)
        chunks = self._block_chunks(m)
        ubuf, gbuf, ibuf = self._chunk_bufs(x, m, chunks[0][1] - chunks[0][0])
        for a, b in chunks:
            lo, hi, k = a * L, min(b * L, self.n), b - a
            u = ubuf[: m * k * L].view(m, k, L)
            u.view(m, -1)[:, : hi - lo].copy_(x[:, lo:hi])
            u.view(m, -1)[:, hi - lo:].zero_()
            u = self._h_(u.mul_(S[a:b]))
            u.mul_(G[a:b])
            idx = ibuf[: k * L].view(k, L)
            idx.copy_(perm[a:b])
            u = torch.gather(u, 2, idx.expand(m, -1, -1), out=gbuf[: m * k * L].view(m, k, L))
            u = self._h_(u)
            u.mul_(B[a:b])
            acc += u.sum(dim=1)
        return acc[:, : self.d] * self.scale

    def _adjoint_fast(self, y: Tensor) -> Tensor:
        m, L = y.shape[0], self.L
        B, G, S = self._bufs["B"], self._buf("G", y.dtype), self._buf("S", y.dtype)
        perm = self._bufs["perm"]
        ys = _pad(y * self.scale, L)[:, None, :]
        out = y.new_empty(m, self.n)
        chunks = self._block_chunks(m)
        vbuf, wbuf, ibuf = self._chunk_bufs(y, m, chunks[0][1] - chunks[0][0])
        for a, b in chunks:
            lo, hi, k = a * L, min(b * L, self.n), b - a
            v = self._h_(torch.mul(ys, B[a:b], out=vbuf[: m * k * L].view(m, k, L)), transpose=True)
            idx = ibuf[: k * L].view(k, L)
            idx.copy_(perm[a:b])
            w = wbuf[: m * k * L].view(m, k, L).zero_().scatter_(2, idx.expand(m, -1, -1), v)
            w = self._h_(w.mul_(G[a:b]), transpose=True)
            w.mul_(S[a:b])
            out[:, lo:hi] = w.reshape(m, -1)[:, : hi - lo]
        return out


class QKSketch(Sketch):
    """QK (Schioppa 2024): Φx = √(n_pad/d)·(Q¹ ⊗ … ⊗ Q^K)·x, each Q^i the first d_i rows of a Haar
    orthogonal b_i×b_i matrix; ∏b_i = n_pad ≥ n (zero padding), ∏d_i ≥ d (output cropped to d)."""

    kind = "qk"
    option_names = ("max_factor", "in_factors", "out_factors")

    def __init__(self, n: int, d: int, seed: int = 0, max_factor: int = 1024,
                 in_factors: list[int] | None = None, out_factors: list[int] | None = None) -> None:
        super().__init__(n, d, seed, max_factor=max_factor, in_factors=in_factors, out_factors=out_factors)
        max_factor = _check_int("max_factor", max_factor, minimum=2)
        if in_factors is None:
            def floats(k: int) -> int:
                bs = balanced_factors(self.n, k)
                try:
                    return sum(b * r for b, r in zip(bs, _bounded_factors(self.d, bs)))
                except ValueError:
                    return 1 << 62

            bs = balanced_factors(self.n, _n_factors(self.n, max_factor, floats))
        else:
            bs = [_check_int("in_factors[]", b) for b in in_factors]
            if math.prod(bs) < self.n:
                raise ValueError(f"in_factors: expected a product >= n={self.n}, got {bs} (product {math.prod(bs)})")
        if out_factors is None:
            ds = _bounded_factors(self.d, bs)
        else:
            ds = [_check_int("out_factors[]", r) for r in out_factors]
            if len(ds) != len(bs):
                raise ValueError(f"out_factors: expected {len(bs)} factors to match in_factors {bs}, got {ds}")
            if math.prod(ds) < self.d or any(r > b for r, b in zip(ds, bs)):
                raise ValueError(f"out_factors: expected d_i <= b_i with product >= d={self.d}, got {ds} for {bs}")
        self._options = {"max_factor": max_factor, "in_factors": list(bs) if in_factors is not None else None,
                         "out_factors": list(ds) if out_factors is not None else None}
        self.in_factors, self.out_factors = bs, ds
        self.n_pad = math.prod(bs)
        g = generator(self.seed, "qk")
        for i, (b, r) in enumerate(zip(bs, ds)):
            self._bufs[f"Q{i}"] = haar_rows(b, r, g).to(torch.float32)
        self.scale = math.sqrt(self.n_pad / self.d)

    def _mats(self, dtype: torch.dtype) -> list[Tensor]:
        return [self._buf(f"Q{i}", dtype) for i in range(len(self.in_factors))]

    def factor_matrices(self, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """[d_i, b_i] factors with the scale folded into the first: Φ vec(X) = vec(F₁ X F₂ᵀ) for K = 2.

        Needs ∏b_i = n and ∏d_i = d exactly (no padding, no cropping)."""
        if self.n_pad != self.n or math.prod(self.out_factors) != self.d:
            raise ValueError("factor_matrices(): needs in_factors with product n and out_factors with product d")
        mats = [m.clone() for m in self._mats(dtype)]
        mats[0] = mats[0] * self.scale
        return mats

    def _forward(self, x: Tensor) -> Tensor:
        return kron_apply_padded(x, self._mats(x.dtype))[:, : self.d] * self.scale

    def _adjoint(self, y: Tensor) -> Tensor:
        d_pad = math.prod(self.out_factors)
        return kron_apply_t(_pad(y * self.scale, d_pad), self._mats(y.dtype))[:, : self.n]


KINDS: dict[str, type[Sketch]] = {
    c.kind: c for c in (DenseSketch, SJLTSketch, FJLSketch, FFDSketch, AFFDSketch, AFJLSketch, QKSketch)
}


def sketch(kind: str, n: int, d: int, seed: int = 0, **options: Any) -> Sketch:
    """Build the sketch Φ: Rⁿ → Rᵈ of ``kind`` (dense, sjlt, fjl, ffd, affd, afjl, qk), fixed by its spec."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {unknown}; valid options are {list(cls.option_names)}")
    return cls(n, d, seed, **options)
