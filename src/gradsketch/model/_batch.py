"""Batches as nested containers of tensors: split into per-example leaves, slice, rebuild.

A batch is a tensor, a tuple/list, or a mapping (``dict``, transformers' ``BatchEncoding``) nested to any
depth. Every tensor leaf with at least one dimension is an example-indexed leaf and must share the same
leading (batch) size ``B``; 0-d tensors and non-tensor leaves are passed through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


def _walk(batch: Any, path: str, out: list[tuple[str, Tensor]]) -> Any:
    """Replace every batched tensor leaf by an integer index into ``out``; returns the skeleton."""
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            return ("const", batch)
        out.append((path, batch))
        return ("leaf", len(out) - 1)
    if isinstance(batch, Mapping):
        return ("map", type(batch), {k: _walk(v, f"{path}[{k!r}]", out) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return ("seq", type(batch), [_walk(v, f"{path}[{i}]", out) for i, v in enumerate(batch)])
    return ("const", batch)


def _build(skel: Any, leaves: list[Tensor]) -> Any:
    tag = skel[0]
    if tag == "leaf":
        return leaves[skel[1]]
    if tag == "const":
        return skel[1]
    if tag == "map":
        items = {k: _build(v, leaves) for k, v in skel[2].items()}
        # BatchEncoding and other Mapping types rebuild as plain dicts (models accept both)
        return items if skel[1] is dict else dict(items)
    seq = [_build(v, leaves) for v in skel[2]]
    if skel[1] is tuple or skel[1] is list:
        return skel[1](seq)
    try:  # namedtuple
        return skel[1](*seq)
    except TypeError:
        return tuple(seq)


class SplitBatch:
    """A batch split into its batched tensor leaves ``[B, ...]`` and a skeleton to rebuild it."""

    def __init__(self, batch: Any, device: torch.device | None = None) -> None:
        found: list[tuple[str, Tensor]] = []
        self.skeleton = _walk(batch, "batch", found)
        if not found:
            raise TypeError(
                "batch: expected a tensor or a tuple/list/dict of tensors with a leading batch dimension, "
                f"got {type(batch).__name__} with no such tensor")
        sizes = {path: t.shape[0] for path, t in found}
        first = next(iter(sizes.values()))
        if any(s != first for s in sizes.values()):
            raise ValueError(
                "batch: every tensor must have the same leading (batch) dimension; "
                f"got {', '.join(f'{p}: {s}' for p, s in sizes.items())}")
        if first == 0:
            raise ValueError("batch: expected at least one example, got an empty batch")
        self.size = int(first)
        self.paths = [p for p, _ in found]
        leaves = [t for _, t in found]
        if device is not None:
            leaves = [t.to(device) if t.device != device else t for t in leaves]
        self.leaves = leaves

    def rebuild(self, leaves: list[Tensor] | None = None) -> Any:
        return _build(self.skeleton, self.leaves if leaves is None else leaves)

    def slice(self, start: int, stop: int) -> SplitBatch:
        out = object.__new__(SplitBatch)
        out.skeleton, out.paths = self.skeleton, self.paths
        out.leaves = [t[start:stop] for t in self.leaves]
        out.size = stop - start
        return out

    def chunks(self, chunk: int) -> Iterator[tuple[int, SplitBatch]]:
        for s in range(0, self.size, chunk):
            yield s, self.slice(s, min(s + chunk, self.size))


def single_example_fn(split: SplitBatch, fn: Callable[[Any], Any]) -> Callable[..., Any]:
    """``f(*leaves_without_batch_dim) = fn(batch of one example)``: the form ``torch.func.vmap`` maps."""

    def one(*leaves: Tensor) -> Any:
        return fn(split.rebuild([t.unsqueeze(0) for t in leaves]))

    return one


def is_reiterable(data: Iterable) -> bool:
    """Lists, DataLoaders and other containers can be iterated twice; generators/iterators cannot."""
    return iter(data) is not data


def check_batches(data: Any, name: str) -> None:
    """Refuse the common mistake of passing one batch ``(X, Y)`` where an iterable of batches ``[(X, Y)]`` is
    expected (iterating ``(X, Y)`` would yield ``X`` and then ``Y`` as "batches", and the loss fails far away
    with "too many values to unpack"): a tuple of 2–3 tensors with one leading dimension.

    >>> import torch
    >>> check_batches([(torch.ones(4, 2), torch.zeros(4))], "train_data")   # a list of batches: fine
    >>> check_batches((torch.ones(4, 2), torch.zeros(4)), "train_data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: train_data: expected an iterable of batches such as [(X, Y)] or a DataLoader, got one batch ...
    """
    if (isinstance(data, tuple) and 2 <= len(data) <= 3 and all(isinstance(t, Tensor) for t in data)
            and all(t.ndim >= 1 for t in data) and len({int(t.shape[0]) for t in data}) == 1):
        n = int(data[0].shape[0])
        names = "(X, Y)" if len(data) == 2 else "(X, Y, W)"
        raise TypeError(f"{name}: expected an iterable of batches such as [{names}] or a DataLoader, got one "
                        f"batch {names} of {len(data)} tensors with {n} examples; wrap it in a list: [{names}] "
                        f"(or pass a list if these are batches)")


def data_len(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_iter(iterable: Iterable, progress: bool, desc: str, total: int | None = None) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``progress`` (else unchanged)."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
