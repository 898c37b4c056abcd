"""Filling a GradientStore: the one fill loop, the writers' lock and the write that never overwrites.

Everything that writes rows into a store goes through :func:`fill_stream`: items (batches of examples, or
chunk ranges) arrive in row order, each covering a known number of rows; an item is computed only if it
overlaps a chunk that is still missing, a chunk is written as soon as all its rows are there, and every
write happens under :class:`ChunkLock` after re-checking the chunk's marker (:func:`write_missing`), so
several processes can fill one store at once and a chunk completed by another writer is never
overwritten. :func:`fill` (``compute_fn(row_start, row_stop)`` per chunk) is the same loop over chunks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .gradient_store import GradientStore


class ChunkLock:
    """An exclusive advisory lock (``flock``) on ``<store>/.write.lock``, taken around each
    chunk write, so that concurrent writers never write the same chunk: the one that gets the lock second
    finds the marker and skips it. A no-op where ``fcntl`` is unavailable.

    >>> import tempfile
    >>> with ChunkLock(Path(tempfile.mkdtemp()) / "store") as lock:
    ...     lock.held
    True
    """

    def __init__(self, store_path: Path | str) -> None:
        store_path = Path(store_path)
        self.path = store_path / ".write.lock"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> ChunkLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def write_missing(store: GradientStore, c: int, rows: Any, lock: ChunkLock, allow_nonfinite: bool = False) -> bool:
    """Write chunk ``c`` unless another writer completed it meanwhile; ``True`` if this call wrote it."""
    with lock:
        if store.is_chunk_complete(c):  # completed by another process since we last looked: never overwrite
            return False
        try:
            store.write_chunk(c, rows, allow_nonfinite=allow_nonfinite)
        except ValueError:
            if not store.is_chunk_complete(c):
                raise
            # completed by a writer that does not take this lock between the check and our marker: it is
            # done; make sure the bytes on disk are the ones its marker records
            store.verify(store.chunk_range(c))
            return False
    return True


def fill_stream(store: GradientStore, items: Iterable[Any], size_of: Callable[[Any], int],
                rows_fn: Callable[[Any, int, int, int], Any], *, row_range: tuple[int, int] | None = None,
                progress: bool = True, desc: str = "gradsketch store", name: str = "data",
                allow_nonfinite: bool = False, first_row: int = 0, leave: bool = False) -> list[int]:
    """The one fill loop. ``items`` are consecutive pieces of the rows (batches of examples, chunk ranges),
    ``size_of(item)`` their row counts; ``rows_fn(item, lo, hi, row0) -> [hi - lo, d]`` computes the rows
    ``[lo, hi)`` of an item (item-relative; ``row0`` is the store row of ``lo``). Fills the missing chunks
    of ``row_range`` (default: all rows; iteration stops once they are done) and returns the chunks this
    call wrote. Items before the range are skipped without computation; ``first_row`` is the store row of
    the first item.

    >>> import tempfile, torch
    >>> st = GradientStore.create_or_open(tempfile.mkdtemp() + "/s", 5, 2, {"kind": "x"}, "fp", chunk_rows=2)
    >>> X = torch.arange(10.0).reshape(5, 2)
    >>> fill_stream(st, [X[:3], X[3:]], len, lambda b, lo, hi, r0: b[lo:hi], progress=False)
    [0, 1, 2]
    """
    n_rows, cr = store.n_rows, store.chunk_rows
    lo_row, hi_row = (0, n_rows) if row_range is None else row_range
    missing = set(store.missing_chunks((lo_row, hi_row)))
    written: list[int] = []
    if not missing:
        return written
    lock = ChunkLock(store.path)
    bufs: dict[int, dict[int, Any]] = {}  # chunk -> row_start -> rows
    offset = first_row
    bar = tqdm(total=len(missing), desc=desc, unit="chunk", disable=not progress, leave=leave)
    try:
        for item in items:
            b = int(size_of(item))
            if offset + b <= lo_row:  # before the range: nothing to compute
                offset += b
                continue
            lo_c, hi_c = offset // cr, (offset + b - 1) // cr
            need = [c for c in range(lo_c, hi_c + 1) if c in missing]
            for c in need:  # completed by another writer since we looked: done, drop what we buffered
                if store.is_chunk_complete(c):
                    missing.discard(c)
                    bufs.pop(c, None)
                    bar.update()
            need = [c for c in need if c in missing]
            if need:
                lo = max(offset, need[0] * cr)
                hi = min(offset + b, min((need[-1] + 1) * cr, n_rows))
                rows = rows_fn(item, lo - offset, hi - offset, lo)
                shape = tuple(getattr(rows, "shape", ()))
                if len(shape) != 2 or shape[0] != hi - lo or shape[1] != store.d:
                    raise ValueError(f"rows: expected shape ({hi - lo}, {store.d}) for rows [{lo}, {hi}), got "
                                     f"{shape if shape else type(rows).__name__}")
                for c in need:
                    c0, c1 = store.chunk_range(c)
                    a, z = max(c0, lo), min(c1, hi)
                    if a < z:
                        bufs.setdefault(c, {})[a] = rows[a - lo:z - lo]
                    got = sum(t.shape[0] for t in bufs.get(c, {}).values())
                    if got == c1 - c0:
                        parts = [bufs[c][k] for k in sorted(bufs[c])]
                        if write_missing(store, c, _cat(parts), lock, allow_nonfinite=allow_nonfinite):
                            written.append(c)
                        del bufs[c]
                        missing.discard(c)
                        bar.update()
            offset += b
            if not missing:
                break
    finally:
        bar.close()
    if missing:
        raise ValueError(f"{name}: the data yielded {offset} examples now but {n_rows} before; expected the "
                         "same examples in the same order on every pass")
    return sorted(written)


def _cat(parts: list[Any]) -> Any:
    import numpy as np
    import torch

    if len(parts) == 1:
        p = parts[0]
        return p.float() if isinstance(p, torch.Tensor) else p
    if isinstance(parts[0], torch.Tensor):
        return torch.cat([p.float() for p in parts], 0)
    return np.concatenate([np.asarray(p) for p in parts], 0)


def fill(
    store: GradientStore,
    compute_fn: Callable,
    *,
    row_range=None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> list[int]:
    """Compute and write every missing chunk of ``store`` in ``row_range``; return the chunks written.

    ``compute_fn(row_start, row_stop) -> [row_stop - row_start, d]`` (numpy array or torch tensor) is
    called once per missing chunk. Restrict the work with either ``row_range=(start, stop)``
    (chunk-aligned) or ``rank``/``world_size`` (the contiguous share of
    ``store.row_range_for_rank(rank, world_size)``); several processes may run ``fill`` on one store at
    once (each write under :class:`ChunkLock`; a chunk completed meanwhile is skipped, never recomputed
    or overwritten). Resumable: rerunning after a crash only computes what is missing. The loop is
    :func:`fill_stream` over the chunk ranges.

    >>> import tempfile, numpy as np
    >>> st = GradientStore.create_or_open(tempfile.mkdtemp() + "/s", 5, 2, {"kind": "x"}, "fp", chunk_rows=2)
    >>> fill(st, lambda a, b: np.ones((b - a, 2)), progress=False)
    [0, 1, 2]
    """
    if (rank is None) != (world_size is None):
        raise ValueError(f"rank, world_size: expected both or neither, got rank={rank!r}, "
                         f"world_size={world_size!r}")
    if rank is not None:
        if row_range is not None:
            raise ValueError(f"row_range: expected None when rank/world_size are given, got {row_range!r}")
        assert world_size is not None  # both-or-neither checked above
        row_range = store.row_range_for_rank(rank, world_size)
    start, stop = store._row_range(row_range)
    aligned = start % store.chunk_rows == 0 and (stop % store.chunk_rows == 0 or stop == store.n_rows)
    if not aligned:
        raise ValueError(f"row_range: expected chunk-aligned bounds (multiples of chunk_rows="
                         f"{store.chunk_rows}, or stop={store.n_rows}), got ({start}, {stop})")
    if not callable(compute_fn):
        raise TypeError(f"compute_fn: expected a callable (row_start, row_stop) -> rows, "
                        f"got {type(compute_fn).__name__}")
    ranges = [store.chunk_range(i) for i in store.chunks_in((start, stop))]
    return fill_stream(store, ranges, lambda r: r[1] - r[0], lambda r, lo, hi, row0: compute_fn(row0, row0 + hi - lo),
                       row_range=(start, stop), progress=progress, desc="gradsketch store", name="compute_fn",
                       allow_nonfinite=allow_nonfinite, first_row=start, leave=True)
