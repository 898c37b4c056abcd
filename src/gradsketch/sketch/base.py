"""The ``Sketch`` base class: validation, dtype handling, spec, devices. Kinds implement two methods.

A sketch is a :class:`gradsketch.linalg.LinearOperator` of shape ``(d, n)``. ``S.T`` serves two roles: it
is the adjoint *operator* Φᵀ (so the sketched Hessian is ``S @ H @ S.T``) and it is *callable* on rows like
the sketch itself, ``S.T(y)`` for ``y [..., d] -> [..., n]``, with the same ``out_dtype``/``nan_policy``
keywords as ``S(x)``; this keeps the long-standing ``S.T(y)`` calls working.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validation import check_int
from ..linalg.operator import AdjointOperator, LinearOperator

#: elements per row chunk of the no-autograd fast path (two scratch buffers of this size, 64 MiB each in
#: float32): no large fresh allocation per op — their page faults cost more than the arithmetic — and
#: several rows per GEMM so that both BLAS threads are used (1-row chunks measured slower)
CHUNK_ELEMS = 1 << 24
#: below this many input elements the fast path's extra ops cost more than the allocations it saves
FAST_MIN_ELEMS = 1 << 20

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAN_POLICIES = ("raise", "propagate")


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Kept for the kinds' option checks: :func:`gradsketch._validation.check_int` with (name, value)."""
    return check_int(value, name, minimum=minimum)


class SketchAdjoint(AdjointOperator):
    """Φᵀ of a sketch: an operator ``[n, d]`` (``S.T @ V``, ``S @ H @ S.T``) that is also callable on rows,
    ``S.T(y, out_dtype=None, nan_policy=None)`` for ``y [..., d] -> [..., n]``."""

    def __call__(self, y: Any, out_dtype: torch.dtype | None = None, nan_policy: str | None = None) -> Any:
        return self.op._adjoint_rows(y, out_dtype=out_dtype, nan_policy=nan_policy)  # type: ignore[attr-defined]


class SketchOperator(LinearOperator):
    """Shared operator plumbing of :class:`Sketch`, ``BlockSketch`` and ``FactoredSketch``: ``(d, n)``
    operators whose row call is the sketch itself and whose ``.T`` is a callable :class:`SketchAdjoint`.
    Their ``dtype`` (float32) only records the default working precision: a sketch keeps float64 input in
    float64, and a product such as ``S @ H @ S.T`` takes the dtype of its data operators."""

    dtype_neutral = True

    def _init_operator(self, n: int, d: int, device: torch.device | str = "cpu") -> None:
        LinearOperator.__init__(self, (d, n), torch.float32, device, symmetric=False)

    @property
    def T(self) -> SketchAdjoint:  # type: ignore[override]
        """Φᵀ: the adjoint operator, callable on rows as ``S.T(y)``; see the module docstring."""
        return SketchAdjoint(self)

    def _adjoint_rows(self, y: Any, out_dtype: torch.dtype | None = None, nan_policy: str | None = None) -> Any:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return self(V.T, nan_policy="propagate").T

    def _rmatmat(self, W: Tensor) -> Tensor:
        return self._adjoint_rows(W.T, nan_policy="propagate").T

    # -- block-partitioned vectors (a model's parameters) ----------------------------------------
    def apply_blocks(self, xs: list[Tensor]) -> Tensor:
        """Φx for ``x`` given as consecutive blocks ``xs[i] [..., n_i]`` (Σ n_i = n): ``[..., d]``.
        Non-finite values propagate (the caller owns the NaN policy). Block-structured sketches take the
        blocks as they are; a plain sketch concatenates them."""
        return self(torch.cat(list(xs), dim=-1), nan_policy="propagate")

    def adjoint_blocks(self, y: Tensor, sizes: list[int]) -> list[Tensor]:
        """Φᵀy split into consecutive blocks of ``sizes``: list of ``[..., n_i]``."""
        out = self._adjoint_rows(y, nan_policy="propagate")
        if isinstance(out, dict):
            out = list(out.values())
        if isinstance(out, list | tuple):
            return [t.reshape(*y.shape[:-1], -1) for t in out]
        return list(torch.split(out, list(sizes), dim=-1))


class BlockSketchOperator(SketchOperator):
    """Shared plumbing of the sketches that take a vector as consecutive blocks of ``self.sizes`` (a model's
    parameters, never concatenated): ``BlockSketch`` and ``FactoredSketch``."""

    sizes: list[int]

    def apply_blocks(self, xs: list[Tensor]) -> Tensor:
        return self(list(xs), nan_policy="propagate")  # type: ignore[call-arg, arg-type]

    def _matmat(self, V: Tensor) -> Tensor:
        return self(list(torch.split(V.T, self.sizes, dim=-1)), nan_policy="propagate").T  # type: ignore[call-arg, arg-type]

    def _rmatmat(self, W: Tensor) -> Tensor:
        parts = self._adjoint_rows(W.T, nan_policy="propagate")
        seq = list(parts.values()) if isinstance(parts, dict) else parts
        return torch.cat([p.reshape(W.shape[1], -1) for p in seq], dim=-1).T



def _unrecorded(x: Tensor) -> bool:
    """Nothing records ``x``: no autograd graph, no torch.func transform, no forward-mode dual (the condition of
    the sketches' in-place fast paths)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
        if torch.autograd.forward_ad._current_level >= 0:
            return False
    except AttributeError:  # pragma: no cover - private API moved: be conservative
        return False
    return True

class Sketch(SketchOperator):
    """A random linear map Φ: Rⁿ → Rᵈ with E‖Φx‖² = ‖x‖², fixed by its spec, never stored as a d×n matrix.

    ``S(x)``: ``[..., n] -> [..., d]``; ``S.T(y)``: the exact adjoint ``[..., d] -> [..., n]``. Both are
    differentiable (autograd through linear torch ops), batched over leading dimensions, and accept
    float16/bfloat16/float32/float64 (computed in float32, or float64 for float64 input; the output has
    the input's dtype unless ``out_dtype`` is given). As a :class:`gradsketch.linalg.LinearOperator` of
    shape ``(d, n)`` it composes: ``S @ v`` for columns, ``S @ H @ S.T`` for the sketched Hessian.

    >>> import gradsketch
    >>> S = gradsketch.sketch("sjlt", 64, 8, seed=0)
    >>> S(torch.ones(3, 64)).shape, S.T(torch.ones(8)).shape, S.shape
    (torch.Size([3, 8]), torch.Size([64]), (8, 64))
    >>> bool(torch.allclose(S.T.to_dense(), S.matrix().T.float()))
    True
    """

    kind: ClassVar[str] = ""
    allows_d_greater_than_n: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n: int, d: int, seed: int = 0, **options: Any) -> None:
        self.n = check_int(n, "n", minimum=1)
        self.d = check_int(d, "d", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ValueError(
                f"{self.kind}: unknown option(s) {unknown}; valid options are {list(self.option_names)}")
        if self.d > self.n and not self.allows_d_greater_than_n:
            raise ValueError(
                f"d: kind {self.kind!r} needs d <= n, got d={self.d} > n={self.n} "
                "(use kind 'dense' or 'sjlt' for d > n)")
        self._init_operator(self.n, self.d, "cpu")
        self._bufs: dict[str, Tensor] = {}
        self._cache: dict[tuple[str, torch.dtype], Tensor] = {}
        self.nan_policy = "raise"
        self._options: dict[str, Any] = {}

    # -- spec and devices --------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable dict; ``gradsketch.sketch(**S.spec)`` rebuilds the identical sketch."""
        return {"kind": self.kind, "n": self.n, "d": self.d, "seed": self.seed, **self._options}

    def to(self, device: torch.device | str) -> Sketch:
        """Move the sketch's state to ``device`` (in place; returns self)."""
        device = torch.device(device)
        self._bufs = {k: v.to(device) for k, v in self._bufs.items()}
        self._cache = {}
        self.device = device
        return self

    def state_bytes(self) -> int:
        """Bytes of state held (excluding per-dtype caches)."""
        return sum(t.numel() * t.element_size() for t in self._bufs.values())

    def _buf(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        t = self._bufs[name]
        if dtype is None or t.dtype == dtype:
            return t
        key = (name, dtype)
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = t.to(dtype)
        return c

    def _fast_ok(self, x: Tensor) -> bool:
        """The chunked fast path applies: the kind has one, and nothing records ``x`` (no autograd graph,
        no torch.func transform, no forward-mode dual)."""
        if self._forward_fast is None or x.numel() < self._fast_min_elems():
            return False
        return _unrecorded(x)

    def _fast_min_elems(self) -> int:
        """Inputs with fewer elements take the plain path (the fast path's set-up would not pay off)."""
        return FAST_MIN_ELEMS

    _forward_fast: Callable[[Tensor], Tensor] | None = None  # optional: (x [M, n] contiguous, no autograd) -> [M, d]
    #: optional: (y [M, d], no autograd) -> [M, n], the adjoint with in-place steps on fresh buffers only
    _adjoint_fast: Callable[[Tensor], Tensor] | None = None

    def _adjoint_fast_ok(self, y: Tensor) -> bool:
        """The adjoint's no-autograd path applies: the kind has one and nothing records ``y``."""
        if self._adjoint_fast is None:
            return False
        return _unrecorded(y)

    def _chunked(self, x: Tensor, width: int, fn) -> Tensor:
        """Run ``fn(x_chunk, bufs) -> [rows, d]`` over row chunks of ``x`` with two reused scratch
        buffers of ``rows·width`` elements; returns ``[M, d]``."""
        m = x.shape[0]
        x = x.contiguous()
        rows = max(1, min(m, CHUNK_ELEMS // max(1, width)))
        out = x.new_empty(m, self.d)
        bufs = (x.new_empty(rows * width), x.new_empty(rows * width))
        for i in range(0, m, rows):
            out[i:i + rows] = fn(x[i:i + rows], bufs)
        return out

    # -- to implement --------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:  # [M, n] -> [M, d], x in the compute dtype
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:  # [M, d] -> [M, n]
        raise NotImplementedError

    # -- public -----------------------------------------------------------------------------
    def _prepare(self, x: Tensor, size: int, what: str) -> tuple[Tensor, tuple[int, ...], torch.dtype]:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{what}: expected a floating tensor ({', '.join(map(str, _FLOATS))}), got {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != size:
            raise ValueError(f"{what}: expected a tensor of shape [..., {size}], got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(
                f"{what}: the tensor is on {x.device} but the sketch is on {self.device}; call S.to({str(x.device)!r})")
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, size).to(cdt), lead, cdt

    def _finish(self, out: Tensor, inp: Tensor, lead: tuple[int, ...], size: int, dtype: torch.dtype,
                nan_policy: str | None, what: str) -> Tensor:
        policy = self.nan_policy if nan_policy is None else nan_policy
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy: expected one of {NAN_POLICIES}, got {policy!r}")
        # one reduction first (a NaN/Inf anywhere makes the sum non-finite); the exact elementwise test only
        # then, because a finite output can still overflow its sum
        if policy == "raise" and out.numel() and not bool(torch.isfinite(out.sum())) \
                and not bool(torch.isfinite(out).all()):
            bad = (~torch.isfinite(inp)).nonzero()
            if bad.numel():
                row, col = (int(v) for v in bad[0])
                raise ValueError(
                    f"{what}: input contains NaN or Inf (first at row {row}, coordinate {col}); "
                    "pass nan_policy='propagate' to let it through")
            raise ValueError(f"{what}: the result overflowed to Inf/NaN for a finite input (dtype {dtype})")
        return out.to(dtype).reshape(*lead, size)

    def __call__(self, x: Tensor, out_dtype: torch.dtype | None = None, nan_policy: str | None = None) -> Tensor:
        """Φx: ``[..., n] -> [..., d]``."""
        x2, lead, _ = self._prepare(x, self.n, "x")
        if not x2.shape[0]:
            y = x2.new_zeros(0, self.d)
        elif self._fast_ok(x2):
            assert self._forward_fast is not None  # _fast_ok checked it
            y = self._forward_fast(x2)
        else:
            y = self._forward(x2)
        return self._finish(y, x2, lead, self.d, out_dtype or x.dtype, nan_policy, "x")

    def _adjoint_rows(self, y: Tensor, out_dtype: torch.dtype | None = None, nan_policy: str | None = None
                      ) -> Tensor:
        """Φᵀy, the exact adjoint: ``[..., d] -> [..., n]`` (called as ``S.T(y)``)."""
        y2, lead, _ = self._prepare(y, self.d, "y")
        if not y2.shape[0]:
            x = y2.new_zeros(0, self.n)
        elif self._adjoint_fast_ok(y2):
            assert self._adjoint_fast is not None  # _adjoint_fast_ok checked it
            x = self._adjoint_fast(y2)
        else:
            x = self._adjoint(y2)
        return self._finish(x, y2, lead, self.n, out_dtype or y.dtype, nan_policy, "y")

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The explicit ``[d, n]`` matrix (tests and tiny n only)."""
        if self.n * self.d > 2**26:
            raise ValueError(f"matrix(): refusing to materialise a {self.d}x{self.n} matrix")
        cols = []
        for i in range(0, self.n, 512):
            eye = torch.zeros(min(512, self.n - i), self.n, dtype=dtype, device=self.device)
            eye[torch.arange(eye.shape[0]), torch.arange(i, i + eye.shape[0])] = 1.0
            cols.append(self(eye).T)
        return torch.cat(cols, dim=1).contiguous()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"Sketch(kind={self.kind!r}, n={self.n}, d={self.d}, seed={self.seed}{', ' + opts if opts else ''})"


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n))) if n > 1 else 1
