"""Featurisation: per-example feature rows φ(z) = P g(z) streamed to memory or to a resumable GradientStore.

``P`` is any "sketch-like" object accepted by :meth:`gradsketch.Task.sketch_grads` (a BlockSketch, a plain
sketch with ``n = task.n_params``, a FactoredSketch, the identity or a projection onto Arnoldi eigenvectors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..model._batch import SplitBatch, data_len


class IdentitySketch:
    """The identity map R^N -> R^N in the sketch interface (``n = d = N``): unsketched gradients."""

    def __init__(self, n: int) -> None:
        self.n = self.d = int(n)
        self.kind = "identity"

    @property
    def spec(self) -> dict:
        return {"kind": "identity", "n": self.n}

    def __call__(self, x: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        return x if out_dtype is None else x.to(out_dtype)

    def T(self, y: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        return y if out_dtype is None else y.to(out_dtype)

    def to(self, device: Any) -> IdentitySketch:
        return self


class ProjectionSketch:
    """x ↦ x V for a fixed basis ``V [N, k]`` (e.g. Arnoldi eigenvectors): ``p_i(z) = ⟨v_i, g(z)⟩``."""

    def __init__(self, V: Tensor, tag: str = "projection") -> None:
        self.V = V
        self.n, self.d = int(V.shape[0]), int(V.shape[1])
        self.kind = tag
        h = hashlib.sha256(V.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()
        self._spec = {"kind": tag, "n": self.n, "d": self.d, "sha256": h[:32]}

    @property
    def spec(self) -> dict:
        return dict(self._spec)

    def __call__(self, x: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        return x @ self.V.to(x.dtype)

    def T(self, y: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        return y @ self.V.to(y.dtype).T

    def to(self, device: Any) -> ProjectionSketch:
        self.V = self.V.to(device)
        return self


def sketch_spec(sketch: Any) -> dict:
    spec = getattr(sketch, "spec", None)
    if isinstance(spec, dict):
        return spec
    return {"kind": type(sketch).__name__, "n": int(sketch.n), "d": int(sketch.d)}


def count_examples(data: Iterable, name: str) -> int:
    """Number of examples in ``data`` (one pass over the batches, no computation)."""
    n = 0
    for batch in data:
        n += SplitBatch(batch).size
    if n == 0:
        raise ValueError(f"{name}: expected at least one example, got an empty dataset")
    return n


def _rows(task: Any, batch: Any, sketch: Any, mode: str, nan_policy: str, offset: int, name: str) -> Tensor:
    """Sketched rows of one batch; non-finite examples raise naming their index in the whole dataset."""
    rows = task.sketch_grads([batch], sketch, mode=mode, progress=False, nan_policy="skip")
    bad = [offset + i for i in task.skipped_indices_]
    if bad and nan_policy == "raise":
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise FloatingPointError(
            f"{name}: non-finite loss or gradient for example index(es) {shown}; everything computed "
            "before this batch is kept (in the store, when one is used). Fix the data/model, or pass "
            "nan_policy='skip' to the Attributor to zero these rows")
    return rows.detach()


def featurise_memory(task: Any, data: Iterable, sketch: Any, mode: str, nan_policy: str, progress: bool,
                     name: str, desc: str) -> Tensor:
    """``[n, d]`` feature rows in the task's dtype."""
    from tqdm.auto import tqdm

    parts, offset = [], 0
    for batch in tqdm(data, desc=desc, total=data_len(data), disable=not progress, leave=False):
        r = _rows(task, batch, sketch, mode, nan_policy, offset, name)
        parts.append(r)
        offset += r.shape[0]
    if not parts:
        raise ValueError(f"{name}: expected at least one example, got an empty dataset")
    return torch.cat(parts, 0)


def iter_feature_chunks(task: Any, data: Iterable, sketch: Any, mode: str, nan_policy: str, progress: bool,
                        name: str, desc: str, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """Yields ``(row_start, [m, d])`` groups of at least ``rows_per_chunk`` rows (the last may be smaller):
    test features computed a group at a time, so memory stays O(rows_per_chunk · d)."""
    from tqdm.auto import tqdm

    buf, start, offset = [], 0, 0
    for batch in tqdm(data, desc=desc, total=data_len(data), disable=not progress, leave=False):
        r = _rows(task, batch, sketch, mode, nan_policy, offset, name)
        buf.append(r)
        offset += r.shape[0]
        if offset - start >= rows_per_chunk:
            yield start, torch.cat(buf, 0)
            buf, start = [], offset
    if buf:
        yield start, torch.cat(buf, 0)
    if offset == 0:
        raise ValueError(f"{name}: expected at least one example, got an empty dataset")


def featurise_store(task: Any, data: Iterable, sketch: Any, mode: str, nan_policy: str, progress: bool,
                    path: Any, spec: dict, fingerprint: str, dtype: str, chunk_rows: int | None,
                    metadata: dict | None, name: str, desc: str) -> Any:
    """Fill a :class:`GradientStore` at ``path`` with the feature rows of ``data`` (resumable).

    The data are iterated once in order; a batch is differentiated only if it overlaps a chunk that is
    still missing, and a chunk is written as soon as all its rows are computed, so a process killed at any
    point loses at most the chunks it had not finished. A store on disk that was built with another
    sketch spec, model fingerprint, row count or dtype is refused (ValueError naming what differs).
    """
    from tqdm.auto import tqdm

    from ..store import GradientStore

    n_rows = count_examples(data, name)
    d = int(sketch.d)
    try:
        store = GradientStore.create_or_open(path, n_rows, d, spec, fingerprint, dtype=dtype,
                                             chunk_rows=chunk_rows, metadata=metadata)
    except ValueError as e:
        raise ValueError(f"store: the feature store at {str(path)!r} was built for another model, sketch or "
                         f"dataset and cannot be reused (delete it or pick another path): {e}") from e
    if store.completed_chunks():  # reopened: never build on corrupt rows (CorruptChunkError names them)
        store.verify()
    missing = set(store.missing_chunks())
    if not missing:
        return store
    cr = store.chunk_rows
    bufs: dict[int, dict[int, Tensor]] = {}  # chunk -> row_start -> rows
    offset = 0
    bar = tqdm(total=len(missing), desc=desc, unit="chunk", disable=not progress, leave=False)
    try:
        for batch in data:
            split = SplitBatch(batch)
            b = split.size
            lo_c, hi_c = offset // cr, (offset + b - 1) // cr
            need = [c for c in range(lo_c, hi_c + 1) if c in missing]
            if need:
                lo = max(offset, need[0] * cr)
                hi = min(offset + b, min((need[-1] + 1) * cr, n_rows))
                sub = split.slice(lo - offset, hi - offset).rebuild()
                rows = _rows(task, sub, sketch, mode, nan_policy, lo, name)
                for c in need:
                    c0, c1 = store.chunk_range(c)
                    a, z = max(c0, lo), min(c1, hi)
                    if a < z:
                        bufs.setdefault(c, {})[a] = rows[a - lo:z - lo]
                    got = sum(t.shape[0] for t in bufs.get(c, {}).values())
                    if got == c1 - c0:
                        parts = [bufs[c][k] for k in sorted(bufs[c])]
                        store.write_chunk(c, torch.cat(parts, 0).float())
                        del bufs[c]
                        missing.discard(c)
                        bar.update()
            offset += b
            if not missing:
                break
    finally:
        bar.close()
    if offset < n_rows and missing:
        raise ValueError(f"{name}: the data yielded {offset} examples now but {n_rows} before; expected the "
                         "same examples in the same order on every pass")
    return store
