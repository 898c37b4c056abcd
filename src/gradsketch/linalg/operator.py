"""Linear operators: the one interface every algorithm in ``gradsketch.linalg`` consumes.

An operator is anything with a ``shape`` (m, n), a ``dtype``, a ``device`` and a ``matmat`` that maps
``[n, k] -> [m, k]``. Curvature matrices (``gradsketch.model``), sketched operators Φ H Φᵀ and explicit
matrices are all operators, so Lanczos, Arnoldi, Hutchinson and SLQ never see a model (curvlinops' habit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class LinearOperator:
    """Base class: subclasses implement ``_matmat(V: [n, k]) -> [m, k]``.

    ``op @ v`` accepts ``[n]`` or ``[n, k]``; ``symmetric`` is a promise that algorithms may rely on.
    """

    symmetric: bool = False

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str,
                 symmetric: bool = False) -> None:
        m, n = shape
        if int(m) != m or int(n) != n or m < 1 or n < 1:
            raise ValueError(f"shape: expected two positive integers, got {shape!r}")
        self.shape = (int(m), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = symmetric

    # -- to implement -------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public surface ------------------------------------------------------------------------
    def matmat(self, V: Tensor) -> Tensor:
        """``[n, k] -> [m, k]``."""
        if V.ndim != 2 or V.shape[0] != self.shape[1]:
            raise ValueError(f"V: expected a tensor of shape [{self.shape[1]}, k], got {tuple(V.shape)}")
        return self._matmat(V)

    def matvec(self, v: Tensor) -> Tensor:
        """``[n] -> [m]``."""
        if v.ndim != 1 or v.shape[0] != self.shape[1]:
            raise ValueError(f"v: expected a tensor of shape [{self.shape[1]}], got {tuple(v.shape)}")
        return self._matmat(v[:, None])[:, 0]

    def __matmul__(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"operator @ x: expected a torch.Tensor, got {type(v).__name__}")
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

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
            if not self.symmetric:
                raise NotImplementedError("to_scipy(): rmatvec needs a symmetric operator")
            return mm(X)

        return SciPyOp(self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class MatrixOperator(LinearOperator):
    """An explicit matrix as an operator (tests, small problems)."""

    def __init__(self, A: Tensor, symmetric: bool | None = None) -> None:
        if A.ndim != 2:
            raise ValueError(f"A: expected a 2-D tensor, got shape {tuple(A.shape)}")
        if symmetric is None:
            symmetric = A.shape[0] == A.shape[1] and bool(torch.allclose(A, A.T))
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=symmetric)  # type: ignore[arg-type]
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V.to(self.A.dtype)


class FunctionOperator(LinearOperator):
    """Wraps a function ``[n, k] -> [m, k]``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str = "cpu", symmetric: bool = False) -> None:
        super().__init__(shape, dtype, device, symmetric=symmetric)
        self._fn = fn

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fn(V)


class DampedOperator(LinearOperator):
    """``A + λ I``."""

    def __init__(self, op: LinearOperator, damping: float) -> None:
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"op: damping needs a square operator, got shape {op.shape}")
        super().__init__(op.shape, op.dtype, op.device, symmetric=op.symmetric)
        self.op, self.damping = op, float(damping)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op.matmat(V) + self.damping * V
