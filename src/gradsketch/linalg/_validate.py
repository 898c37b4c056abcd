"""Input checks, random probes and progress bars shared by the ``gradsketch.linalg`` algorithms.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value) with a
message that names the argument, what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .._validation import check_bool, check_choice, check_int, check_real  # noqa: F401  (re-exported)
from .operator import LinearOperator

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_operator(op: Any, name: str = "op", square: bool = True) -> LinearOperator:
    """``op`` must be a real-valued :class:`LinearOperator` (square unless ``square=False``)."""
    if not isinstance(op, LinearOperator):
        raise TypeError(f"{name}: expected a gradsketch.linalg.LinearOperator, got {type(op).__name__}")
    if op.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a real floating-point operator dtype, got {op.dtype}")
    if square and op.shape[0] != op.shape[1]:
        raise ValueError(f"{name}: expected a square operator, got shape {op.shape}")
    return op


def work_dtype(op: LinearOperator) -> torch.dtype:
    """Precision of the Krylov vectors: the operator's own for float32/float64, float32 for half types."""
    return op.dtype if op.dtype in (torch.float32, torch.float64) else torch.float32


def make_generator(seed: Any, name: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator`` from an integer seed (>= 0); a given CPU generator is used as is.

    Probes are drawn on the CPU and then moved, so results do not depend on the device.
    """
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU torch.Generator, got one on {seed.device}")
        return seed
    check_int(seed, name, minimum=0)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def random_probes(n: int, k: int, dist: str, gen: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """``[n, k]`` probes: Rademacher (±1), Gaussian N(0, 1), drawn on the CPU, then moved."""
    if dist == "rademacher":
        Z = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
    elif dist == "gaussian":
        Z = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
    else:  # pragma: no cover - callers validate
        raise ValueError(f"dist: expected 'rademacher' or 'gaussian', got {dist!r}")
    return Z.to(device)


def check_tensor(x: Any, name: str, n: int, dtype: torch.dtype, device: torch.device,
                 ndims: tuple[int, ...] = (1,), nonzero: bool = False) -> Tensor:
    """A finite tensor with first dimension ``n``; returned as ``dtype`` on ``device``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected a real tensor, got dtype {x.dtype}")
    if x.ndim not in ndims or x.shape[0] != n:
        want = " or ".join(f"[{n}]" if d == 1 else f"[{n}, k]" for d in ndims)
        raise ValueError(f"{name}: expected a tensor of shape {want}, got {tuple(x.shape)}")
    if x.ndim == 2 and x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one column, got shape {tuple(x.shape)}")
    x = x.detach().to(device=device, dtype=dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    if nonzero and float(torch.linalg.vector_norm(x)) == 0.0:
        raise ValueError(f"{name}: expected a non-zero vector, got all zeros")
    return x


def apply(op: LinearOperator, V: Tensor, dtype: torch.dtype, where: str) -> Tensor:
    """``op @ V`` cast to ``dtype``; raises ``ValueError`` when the product is not finite."""
    W = op.matmat(V if V.dtype == op.dtype else V.to(op.dtype))
    if W.shape != (op.shape[0], V.shape[1]):
        raise ValueError(f"op: the operator returned shape {tuple(W.shape)} for an input of shape "
                         f"{tuple(V.shape)}; expected {(op.shape[0], V.shape[1])}")
    W = W.to(dtype)
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"op: the operator product contains NaN or Inf ({where}); the operator itself "
                         "produced non-finite values, check the model/loss or the input scaling")
    return W


def default_tol(dtype: torch.dtype, tol64: float, tol32: float) -> float:
    return tol64 if dtype == torch.float64 else tol32


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar when ``enabled``, else a do-nothing object with the same methods."""
    check_bool(enabled, "progress")
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def batches(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(total, start + size)
