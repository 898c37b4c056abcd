"""Linear operators and their algebra: the one interface every algorithm in ``gradsketch.linalg`` consumes.

An operator ``A`` has a ``shape`` (m, n), a ``dtype``, a ``device`` and two ways to act:

* on columns, ``A @ V`` with ``V [n]`` or ``[n, k]`` (``matvec``/``matmat``), as a matrix would;
* on rows, ``A(X)`` with ``X [..., n] -> [..., m]``: each row ``x`` becomes ``(A x)ᵀ``, as ``nn.Linear`` and
  the sketches do (``A(X) == (A @ X.T).T`` for a 2-D ``X``).

Operators compose like matrices: ``A.T`` is the adjoint, ``A @ B`` a product, ``A + B``, ``A - B``, ``c * A``
sums and scalings, ``A.damped(λ)`` is ``A + λI``, and :func:`gradsketch.linalg.inverse` gives
``(A + λI)⁻¹`` as an operator (Cholesky, eigendecomposition, conjugate gradients or LiSSA). A curvature
matrix from ``gradsketch.curvature``, an explicit matrix and a sketch Φ are all operators, so the sketched
Hessian is ``S @ H @ S.T`` and Lanczos, Arnoldi, Hutchinson and SLQ never see a model. The design follows
curvlinops (F. Dangel et al., ``curvlinops/_torch_base.py``, ``inverse.py``); the code is our own.

>>> A = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
>>> B = A @ A.T + 0.5 * IdentityOperator(2, torch.float64)
>>> B.to_dense().tolist()
[[5.5, 5.0], [5.0, 10.5]]
>>> from gradsketch.linalg import inverse
>>> (inverse(B) @ (B @ torch.ones(2, dtype=torch.float64))).round(decimals=6)
tensor([1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_choice, check_real, describe

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LinearOperator:
    """Base class: subclasses implement ``_matmat(V: [n, k]) -> [m, k]`` and, when they are not symmetric
    and their adjoint is wanted, ``_rmatmat(W: [m, k]) -> [n, k]`` (the product with Aᵀ).

    ``symmetric`` is a promise that algorithms may rely on (the adjoint of a symmetric operator is itself).

    >>> op = FunctionOperator(lambda V: 2 * V, (3, 3), torch.float64, symmetric=True)
    >>> op @ torch.ones(3, dtype=torch.float64)
    tensor([2., 2., 2.], dtype=torch.float64)
    >>> op(torch.ones(4, 3, dtype=torch.float64)).shape
    torch.Size([4, 3])
    """

    symmetric: bool = False

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str,
                 symmetric: bool = False) -> None:
        try:
            m, n = shape
        except (TypeError, ValueError):
            raise ValueError(f"shape: expected two positive integers, got {shape!r}") from None
        if int(m) != m or int(n) != n or m < 1 or n < 1:
            raise ValueError(f"shape: expected two positive integers, got {shape!r}")
        self.shape = (int(m), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = bool(symmetric)

    # -- to implement -------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatmat(self, W: Tensor) -> Tensor:
        """``Aᵀ W`` (``[m, k] -> [n, k]``); symmetric operators reuse ``_matmat``."""
        if self.symmetric:
            return self._matmat(W)
        raise NotImplementedError(f"{type(self).__name__}: the adjoint product is not implemented")

    # -- columns ---------------------------------------------------------------------------------
    def matmat(self, V: Tensor) -> Tensor:
        """``[n, k] -> [m, k]``."""
        if not isinstance(V, Tensor):
            raise TypeError(f"V: expected a torch.Tensor, got {describe(V)}")
        if V.ndim != 2 or V.shape[0] != self.shape[1]:
            raise ValueError(f"V: expected a tensor of shape [{self.shape[1]}, k], got {tuple(V.shape)}")
        return self._matmat(V)

    def matvec(self, v: Tensor) -> Tensor:
        """``[n] -> [m]``."""
        if not isinstance(v, Tensor):
            raise TypeError(f"v: expected a torch.Tensor, got {describe(v)}")
        if v.ndim != 1 or v.shape[0] != self.shape[1]:
            raise ValueError(f"v: expected a tensor of shape [{self.shape[1]}], got {tuple(v.shape)}")
        return self._matmat(v[:, None])[:, 0]

    def rmatmat(self, W: Tensor) -> Tensor:
        """``Aᵀ W``: ``[m, k] -> [n, k]``."""
        if not isinstance(W, Tensor):
            raise TypeError(f"W: expected a torch.Tensor, got {describe(W)}")
        if W.ndim != 2 or W.shape[0] != self.shape[0]:
            raise ValueError(f"W: expected a tensor of shape [{self.shape[0]}, k], got {tuple(W.shape)}")
        return self._rmatmat(W)

    # -- rows ------------------------------------------------------------------------------------
    def __call__(self, X: Tensor) -> Tensor:
        """Rows: ``[..., n] -> [..., m]`` (each row ``x`` becomes ``A x``)."""
        if not isinstance(X, Tensor):
            raise TypeError(f"X: expected a torch.Tensor, got {describe(X)}")
        if X.ndim == 0 or X.shape[-1] != self.shape[1]:
            raise ValueError(f"X: expected a tensor of shape [..., {self.shape[1]}], got {tuple(X.shape)}")
        lead = X.shape[:-1]
        flat = X.reshape(-1, self.shape[1])
        return self._matmat(flat.T).T.reshape(*lead, self.shape[0])

    def quadratic(self, X: Tensor) -> Tensor:
        """``xᵀ A x`` for every row of ``X [m, n]`` (square operators): ``[m]``."""
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"quadratic: expected a square operator, got shape {self.shape}")
        Y = self(X)
        return (Y * X.to(Y.dtype)).sum(-1)

    # -- algebra -----------------------------------------------------------------------------------
    @property
    def T(self) -> LinearOperator:
        """The adjoint operator Aᵀ (``A`` itself when symmetric)."""
        return self if self.symmetric else AdjointOperator(self)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator([self, other])
        if not isinstance(other, Tensor):
            raise TypeError(f"operator @ x: expected a torch.Tensor or a LinearOperator, got {describe(other)}")
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([self, other], [1.0, 1.0])

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([self, other], [1.0, -1.0])

    def __mul__(self, c: Any) -> LinearOperator:
        if isinstance(c, bool) or not isinstance(c, int | float):
            return NotImplemented
        return SumOperator([self], [float(c)])

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> LinearOperator:
        if isinstance(c, bool) or not isinstance(c, int | float):
            return NotImplemented
        return SumOperator([self], [1.0 / float(c)])

    def __neg__(self) -> LinearOperator:
        return SumOperator([self], [-1.0])

    def damped(self, damping: float) -> LinearOperator:
        """``A + λI`` (square operators)."""
        return DampedOperator(self, damping)

    # -- conversions -------------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The explicit ``[m, n]`` matrix (small operators only: costs n products)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self):  # -> scipy.sparse.linalg.LinearOperator
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy arrays (float64 in, float64 out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as SciPyOp

        def mm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            T = torch.as_tensor(X.reshape(self.shape[1], -1), dtype=self.dtype, device=self.device)
            out = self.matmat(T).detach().to("cpu", torch.float64).numpy()
            return out[:, 0] if one else out

        def rmm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            T = torch.as_tensor(X.reshape(self.shape[0], -1), dtype=self.dtype, device=self.device)
            try:
                out = self._rmatmat(T).detach().to("cpu", torch.float64).numpy()
            except NotImplementedError:
                raise NotImplementedError("to_scipy(): rmatvec needs a symmetric operator or one with an "
                                          "adjoint") from None
            return out[:, 0] if one else out

        return SciPyOp(self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


# --------------------------------------------------------------------------------------------- basics
class MatrixOperator(LinearOperator):
    """An explicit matrix ``A [m, n]`` as an operator (tests, small problems).

    >>> MatrixOperator(torch.eye(2)).symmetric
    True
    """

    def __init__(self, A: Tensor, symmetric: bool | None = None) -> None:
        if not isinstance(A, Tensor):
            raise TypeError(f"A: expected a torch.Tensor, got {describe(A)}")
        if A.ndim != 2:
            raise ValueError(f"A: expected a 2-D tensor, got shape {tuple(A.shape)}")
        if symmetric is None:
            symmetric = A.shape[0] == A.shape[1] and bool(torch.allclose(A, A.T))
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=symmetric)  # type: ignore[arg-type]
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V.to(self.A.dtype)

    def _rmatmat(self, W: Tensor) -> Tensor:
        return self.A.T @ W.to(self.A.dtype)

    def to_dense(self) -> Tensor:
        return self.A


class FunctionOperator(LinearOperator):
    """Wraps ``fn: [n, k] -> [m, k]`` (and optionally ``rfn: [m, k] -> [n, k]`` for the adjoint).

    >>> FunctionOperator(lambda V: V.flip(0), (2, 2), torch.float64).to_dense()
    tensor([[0., 1.],
            [1., 0.]], dtype=torch.float64)
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str = "cpu", symmetric: bool = False,
                 rfn: Callable[[Tensor], Tensor] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable [n, k] -> [m, k], got {describe(fn)}")
        super().__init__(shape, dtype, device, symmetric=symmetric)
        self._fn, self._rfn = fn, rfn

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fn(V)

    def _rmatmat(self, W: Tensor) -> Tensor:
        if self._rfn is not None:
            return self._rfn(W)
        return super()._rmatmat(W)


class IdentityOperator(LinearOperator):
    """``I [n, n]``.

    >>> IdentityOperator(3) @ torch.ones(3)
    tensor([1., 1., 1.])
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__((n, n), dtype, device, symmetric=True)

    def _matmat(self, V: Tensor) -> Tensor:
        return V

    def quadratic(self, X: Tensor) -> Tensor:
        return (X * X).sum(-1)


class AdjointOperator(LinearOperator):
    """``Aᵀ [n, m]`` of an operator ``A [m, n]``; ``(Aᵀ)ᵀ`` is ``A`` again.

    >>> A = MatrixOperator(torch.tensor([[1.0, 2.0]]))
    >>> A.T.to_dense()
    tensor([[1.],
            [2.]])
    >>> A.T.T is A
    True
    """

    def __init__(self, op: LinearOperator) -> None:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"op: expected a LinearOperator, got {describe(op)}")
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device, symmetric=op.symmetric)
        self.op = op

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._rmatmat(V)

    def _rmatmat(self, W: Tensor) -> Tensor:
        return self.op._matmat(W)

    @property
    def T(self) -> LinearOperator:
        return self.op

    def __repr__(self) -> str:
        return f"{self.op!r}.T"


def _is_adjoint_pair(a: LinearOperator, b: LinearOperator) -> bool:
    """``b`` is ``aᵀ`` by construction (or both are one symmetric operator)."""
    if a is b:
        return a.symmetric
    return (isinstance(b, AdjointOperator) and b.op is a) or (isinstance(a, AdjointOperator) and a.op is b) \
        or getattr(b, "adjoint_of", None) is a or getattr(a, "adjoint_of", None) is b


class ProductOperator(LinearOperator):
    """``A₁ A₂ ⋯ A_p``: applied right to left. Symmetric when the factors read the same from both ends up
    to adjoints around a symmetric middle (``S @ H @ S.T`` with symmetric ``H``).

    >>> A = MatrixOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64))
    >>> P = A @ A.T
    >>> P.symmetric, P.to_dense().tolist()
    (True, [[5.0, 2.0], [2.0, 1.0]])
    """

    def __init__(self, factors: Sequence[LinearOperator]) -> None:
        flat: list[LinearOperator] = []
        for f in factors:
            if not isinstance(f, LinearOperator):
                raise TypeError(f"factors: expected LinearOperators, got {describe(f)}")
            flat.extend(f.factors if isinstance(f, ProductOperator) else [f])
        for a, b in zip(flat, flat[1:]):
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"A @ B: expected A's columns to match B's rows, got shapes {a.shape} and {b.shape}")
        sym = flat[0].shape[0] == flat[-1].shape[1] and all(
            _is_adjoint_pair(flat[i], flat[-1 - i]) for i in range(len(flat) // 2))
        if sym and len(flat) % 2 == 1:
            sym = flat[len(flat) // 2].symmetric
        dtype = flat[0].dtype
        for f in flat[1:]:
            dtype = torch.promote_types(dtype, f.dtype)
        # where the result lands: the device of the operator that acts last; a sketch's "dtype" only records
        # its default working precision, so the data operators decide it when there are any
        data = [f for f in flat if not getattr(f, "dtype_neutral", False)]
        if data:
            dtype = data[0].dtype
            for f in data[1:]:
                dtype = torch.promote_types(dtype, f.dtype)
        super().__init__((flat[0].shape[0], flat[-1].shape[1]), dtype, flat[0].device, symmetric=sym)
        self.factors = flat

    def _matmat(self, V: Tensor) -> Tensor:
        for f in reversed(self.factors):
            V = f._matmat(V.to(f.device))
        return V.to(self.dtype)

    def _rmatmat(self, W: Tensor) -> Tensor:
        for f in self.factors:
            W = f._rmatmat(W.to(f.device))
        return W.to(self.dtype)

    @property
    def T(self) -> LinearOperator:
        return self if self.symmetric else ProductOperator([f.T for f in reversed(self.factors)])

    def __repr__(self) -> str:
        return " @ ".join(repr(f) for f in self.factors)


class SumOperator(LinearOperator):
    """``Σ_i c_i A_i`` (equal shapes).

    >>> A = MatrixOperator(torch.eye(2, dtype=torch.float64))
    >>> (2 * A - A).to_dense().diagonal().tolist()
    [1.0, 1.0]
    """

    def __init__(self, terms: Sequence[LinearOperator], coefs: Sequence[float]) -> None:
        ops: list[LinearOperator] = []
        cs: list[float] = []
        for t, c in zip(terms, coefs):
            if not isinstance(t, LinearOperator):
                raise TypeError(f"terms: expected LinearOperators, got {describe(t)}")
            c = check_real(c, "coefficient")
            if isinstance(t, SumOperator):  # flatten nested sums and scalings
                ops.extend(t.terms)
                cs.extend(c * ci for ci in t.coefs)
            else:
                ops.append(t)
                cs.append(c)
        shape = ops[0].shape
        for t in ops[1:]:
            if t.shape != shape:
                raise ValueError(f"A + B: expected operators of equal shape, got {shape} and {t.shape}")
        dtype = ops[0].dtype
        for t in ops[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        super().__init__(shape, dtype, ops[0].device, symmetric=all(t.symmetric for t in ops))
        self.terms, self.coefs = ops, cs

    def _combine(self, parts: list[Tensor]) -> Tensor:
        out = None
        for c, p in zip(self.coefs, parts):
            p = p.to(device=self.device, dtype=self.dtype)
            p = p if c == 1.0 else c * p
            out = p if out is None else out + p
        assert out is not None
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        return self._combine([t._matmat(V.to(t.device)) for t in self.terms])

    def _rmatmat(self, W: Tensor) -> Tensor:
        return self._combine([t._rmatmat(W.to(t.device)) for t in self.terms])

    def __repr__(self) -> str:
        return " + ".join(f"{c:g}*{t!r}" for c, t in zip(self.coefs, self.terms))


class DampedOperator(LinearOperator):
    """``A + λI`` (``damping`` λ ≥ 0 finite).

    >>> DampedOperator(MatrixOperator(torch.zeros(2, 2)), 0.5).to_dense().diagonal().tolist()
    [0.5, 0.5]
    """

    def __init__(self, op: LinearOperator, damping: float) -> None:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"op: expected a LinearOperator, got {describe(op)}")
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"op: damping needs a square operator, got shape {op.shape}")
        super().__init__(op.shape, op.dtype, op.device, symmetric=op.symmetric)
        self.op, self.damping = op, check_real(damping, "damping", minimum=0.0)

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.op._matmat(V)
        return out + self.damping * V.to(out.dtype) if self.damping else out

    def _rmatmat(self, W: Tensor) -> Tensor:
        out = self.op._rmatmat(W)
        return out + self.damping * W.to(out.dtype) if self.damping else out


# ------------------------------------------------------------------------------------------ inverses
class EigenOperator(LinearOperator):
    """``V diag(w) Vᵀ + shift·I`` for ``V [n, r]`` (orthonormal columns) and ``w [r]``; ``V = None`` means
    ``diag(w) + shift·I`` (vectors already in the eigenbasis). Float64 on the CPU unless the inputs say
    otherwise. The inverse of an eigendecomposed matrix, Arnoldi influence's ``Σ_i u_i u_iᵀ / (λ_i + δ)`` and
    its low-rank-plus-tail form ``U diag(c − t) Uᵀ + t·I`` (``shift = t``) are all of this form.

    >>> E = EigenOperator(torch.tensor([2.0, 0.5], dtype=torch.float64))
    >>> E(torch.ones(1, 2, dtype=torch.float64)).tolist(), E.quadratic(torch.ones(1, 2, dtype=torch.float64)).tolist()
    ([[2.0, 0.5]], [2.5])
    >>> EigenOperator(torch.tensor([2.0], dtype=torch.float64), torch.tensor([[1.0], [0.0]]), shift=1.0).to_dense()
    tensor([[3., 0.],
            [0., 1.]], dtype=torch.float64)
    """

    def __init__(self, w: Tensor, V: Tensor | None = None, shift: float = 0.0) -> None:
        self.w = w.detach().to(torch.float64)
        self.V = None if V is None else V.detach().to(torch.float64)
        self.shift = float(shift)
        n = self.w.numel() if self.V is None else self.V.shape[0]
        if self.V is not None and (self.V.ndim != 2 or self.V.shape[1] != self.w.numel()):
            raise ValueError(f"V: expected shape [n, {self.w.numel()}], got {tuple(self.V.shape)}")
        super().__init__((n, n), torch.float64, self.w.device, symmetric=True)

    def _matmat(self, V: Tensor) -> Tensor:
        X = V.to(torch.float64)
        w = self.w.to(X.device)
        if self.V is None:
            out = X * w[:, None]
        else:
            U = self.V.to(X.device)
            out = U @ ((U.T @ X) * w[:, None])
        return out + self.shift * X if self.shift else out

    def quadratic(self, X: Tensor) -> Tensor:
        X = X.to(torch.float64)
        w = self.w.to(X.device)
        p = X if self.V is None else X @ self.V.to(X.device)
        q = (p * p * w).sum(-1)
        return q + self.shift * (X * X).sum(-1) if self.shift else q


class CholeskyInverse(LinearOperator):
    """``(L Lᵀ)⁻¹`` from the Cholesky factor ``L`` of a symmetric positive definite matrix (float64).
    ``quadratic`` is ``‖L⁻¹x‖²``, non-negative by construction.

    >>> K = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    >>> M = CholeskyInverse(torch.linalg.cholesky(K))
    >>> torch.allclose(M.to_dense() @ K, torch.eye(2, dtype=torch.float64))
    True
    """

    def __init__(self, L: Tensor) -> None:
        self.L = L.detach().to(torch.float64)
        super().__init__(tuple(self.L.shape), torch.float64, self.L.device, symmetric=True)  # type: ignore[arg-type]

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.cholesky_solve(V.to(torch.float64), self.L)

    def quadratic(self, X: Tensor) -> Tensor:
        z = torch.linalg.solve_triangular(self.L, X.to(torch.float64).T, upper=False)
        return (z * z).sum(0)


class WoodburyInverse(LinearOperator):
    """``(FᵀF + λI)⁻¹`` (λ > 0) for features ``F [n, d]``, applied through the Gram matrix ``G = FFᵀ [n, n]``:
    ``M x = (x − Fᵀ (G + λI)⁻¹ F x) / λ`` (Woodbury), O(n²d + n³) instead of O(d²n + d³) when d > n.

    The large products run in the features' precision (float32 or float64), the n × n factorisation and
    solves in float64; the subtraction loses about eps·‖G‖/λ relative accuracy, which :func:`ridge_inverse`
    bounds by using this form only for λ ≥ 1e-8·tr(G).

    >>> F = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    >>> WoodburyInverse(F, 1.0).to_dense().diagonal().round(decimals=12).tolist()
    [0.5, 1.0, 1.0]
    """

    def __init__(self, F: Tensor, damping: float, G: Tensor | None = None) -> None:
        self.F = F.detach().to("cpu")
        if self.F.dtype not in (torch.float32, torch.float64):
            self.F = self.F.to(torch.float32)
        self.damping = check_real(damping, "damping", minimum=0.0, min_inclusive=False)
        A = (self.F @ self.F.T if G is None else G).to(torch.float64).clone()
        A.diagonal().add_(self.damping)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise FloatingPointError(f"damping: the Gram matrix FFᵀ + λI (λ = {self.damping:.3g}) is not positive "
                                     "definite in float64; expected a positive damping and finite features")
        self.L = L
        d = self.F.shape[1]
        super().__init__((d, d), torch.float64, "cpu", symmetric=True)

    def _u(self, X: Tensor) -> Tensor:  # X [d, k] -> F X [n, k] in float64
        return (self.F @ X.to(self.F.dtype)).to(torch.float64)

    def _matmat(self, V: Tensor) -> Tensor:
        c = torch.cholesky_solve(self._u(V), self.L)
        back = (self.F.T @ c.to(self.F.dtype)).to(torch.float64)
        return (V.to(torch.float64) - back) / self.damping

    def quadratic(self, X: Tensor) -> Tensor:
        z = torch.linalg.solve_triangular(self.L, self._u(X.T), upper=False)
        p = X.to(torch.float64)
        return ((p * p).sum(1) - (z * z).sum(0)) / self.damping


def _square(op: Any) -> None:
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op: expected a gradsketch.linalg.LinearOperator, got {describe(op)}")
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"op: expected a square operator, got shape {op.shape}")


def dense_inverse(K: Tensor, damping: float = 0.0, method: str = "auto") -> LinearOperator:
    """``(K + λI)⁻¹`` of an explicit symmetric ``K [n, n]`` (float64 on the CPU).

    ``"cholesky"`` needs ``K + λI`` positive definite (``ValueError`` otherwise); ``"eigh"`` inverts the
    eigenvalues, with a pseudo-inverse on exactly singular directions (|w| ≤ n·eps·max|w|), and accepts
    indefinite matrices; ``"auto"`` tries Cholesky (about 30× faster than eigh at n = 2048) and falls back
    to eigh.

    >>> K = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    >>> dense_inverse(K, 0.0).to_dense().diagonal().tolist()
    [0.5, -1.0]
    """
    method = check_choice(method, "method", ("auto", "cholesky", "eigh"))
    damping = check_real(damping, "damping", minimum=0.0)
    if not isinstance(K, Tensor) or K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K: expected a square 2-D tensor, got {describe(K)}")
    K = K.detach().to("cpu", torch.float64)
    if method in ("auto", "cholesky"):
        A = K.clone()  # Cholesky reads only the lower triangle
        A.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
            return CholeskyInverse(L)
        if method == "cholesky":
            raise ValueError(f"damping: K + {damping:g} I is not positive definite; expected a damping above "
                             "-lambda_min(K), or method='eigh'")
    w, V = torch.linalg.eigh((K + K.T) / 2)
    w = w + damping
    tiny = float(w.abs().max()) * K.shape[0] * torch.finfo(torch.float64).eps if w.numel() else 0.0
    c = torch.where(w.abs() > tiny, 1.0 / w, torch.zeros_like(w))
    return EigenOperator(c, V)


def ridge_inverse(F: Tensor, damping: float, G: Tensor | None = None) -> LinearOperator:
    """``(FᵀF + λI)⁻¹`` for training features ``F [n, d]`` (TRAK's kernel; on the CPU): the Gram form
    (:class:`WoodburyInverse`; ``G`` = FFᵀ if already computed) when d > n and λ ≥ 1e-8·tr(FᵀF), else a
    d × d Cholesky / eigh (:func:`dense_inverse`).

    >>> F = torch.eye(2, dtype=torch.float64)
    >>> ridge_inverse(F, 1.0).to_dense().diagonal().round(decimals=12).tolist()
    [0.5, 0.5]
    """
    n, d = F.shape
    F = F.detach().to("cpu")
    if d > n and damping > 0:
        G = gram(F) if G is None else G
        if damping >= 1e-8 * float(torch.trace(G)):
            return WoodburyInverse(F, damping, G)
    F = F.to(torch.float64)
    return dense_inverse(F.T @ F, damping)


def gram(F: Tensor, block: int = 512) -> Tensor:
    """``FFᵀ [n, n]`` in float64, computed with GEMMs in F's precision (float32 or float64).

    Only the lower block triangle is multiplied (``block`` rows at a time against the rows up to the end of
    their block) and mirrored, about (n + block)/(2n) of the flops of ``F @ F.T``: 0.55 of it at n = 5,000
    (TRAK's n × n Gram on a Fashion-MNIST CNN, the largest cost of its fit).

    >>> gram(torch.ones(2, 3)).tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    F = F.detach().to("cpu")
    if F.dtype not in (torch.float32, torch.float64):
        F = F.to(torch.float32)
    n = F.shape[0]
    if n <= 2 * block:
        return (F @ F.T).to(torch.float64)
    G = torch.empty(n, n, dtype=torch.float64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        B = (F[lo:hi] @ F[:hi].T).to(torch.float64)   # rows [lo, hi) against rows [0, hi): the diagonal block too
        D = B[:, lo:hi]
        B[:, lo:hi] = D.tril() + D.tril(-1).T   # the diagonal block made exactly symmetric (its lower triangle)
        G[lo:hi, :hi] = B
        G[:lo, lo:hi] = B[:, :lo].T
    return G
