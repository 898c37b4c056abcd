"""Small data helper: tensors -> a list of batches (the form every gradsketch routine iterates)."""

from __future__ import annotations

from torch import Tensor


def batches(*tensors: Tensor, batch_size: int = 256) -> list[tuple[Tensor, ...]]:
    """Split aligned tensors ``[n, ...]`` into a list of ``batch_size``-row tuples (in order)."""
    if not tensors:
        raise ValueError("tensors: expected at least one tensor, got none")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    n = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.shape[0] != n:
            raise ValueError(f"tensors[{i}]: expected {n} rows (as tensors[0]), got {t.shape[0]}")
    return [tuple(t[s:s + batch_size] for t in tensors) for s in range(0, n, batch_size)]
