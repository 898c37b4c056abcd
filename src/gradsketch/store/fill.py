"""Filling a GradientStore: the one fill loop, the writers' lock and the write that never overwrites.

Everything that writes rows into a store goes through :func:`fill_stream`: items (batches of examples, or
chunk ranges) arrive in row order, each covering a known number of rows; an item is computed only if it
overlaps a chunk that is still missing, a chunk is written as soon as all its rows are there, and every
write happens under :class:`ChunkLock` after re-checking the chunk's marker (:func:`write_missing`), so
several processes can fill one store at once and a chunk completed by another writer is never
overwritten. :func:`fill` (``compute_fn(row_start, row_stop)`` per chunk) is the same loop over chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .gradient_store import GradientStore

_END = object()


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


def write_missing(store: GradientStore, c: int, rows: Any, lock: ChunkLock, allow_nonfinite: bool = False,
                  data_fingerprint: str | None = None, skipped: list[int] | None = None) -> bool:
    """Write chunk ``c`` unless another writer completed it meanwhile; ``True`` if this call wrote it."""
    with lock:
        if store.is_chunk_complete(c):  # completed by another process since we last looked: never overwrite
            return False
        try:
            store.write_chunk(c, rows, allow_nonfinite=allow_nonfinite, data_fingerprint=data_fingerprint,
                              skipped=skipped)
        except ValueError:
            if not store.is_chunk_complete(c):
                raise
            # completed by a writer that does not take this lock between the check and our marker: it is
            # done; make sure the bytes on disk are the ones its marker records
            store.verify(store.chunk_range(c))
            return False
    return True


class DataChangedError(ValueError):
    """Completed chunks of a store whose examples differ from the ones their rows were computed from.

    ``err.chunks`` lists the chunk indices, ``err.row_ranges`` their example ranges ``(start, stop)``.
    """

    def __init__(self, message: str, chunks: list[int], row_ranges: list[tuple[int, int]]):
        super().__init__(message)
        self.chunks = list(chunks)
        self.row_ranges = list(row_ranges)


_RANDOM_SAMPLERS = ("RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler")


def check_sequential(data: Any, name: str = "data") -> None:
    """Refuse a data loader that yields its examples in a random order (a ``RandomSampler``, e.g.
    ``DataLoader(shuffle=True)``, or any sampler with ``shuffle=True``): store row ``j`` must be example ``j``
    on every pass. Other iterables are accepted (the per-chunk data fingerprint catches later order changes).

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> ds = TensorDataset(torch.zeros(4, 2))
    >>> check_sequential(DataLoader(ds, batch_size=2))
    >>> check_sequential(DataLoader(ds, batch_size=2, shuffle=True), "train_data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: train_data: expected the examples in a fixed order, got a DataLoader with a RandomSampler ...
    """
    cands = [getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
             getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    for s in cands:
        if s is None:
            continue
        kind = type(s).__name__
        if kind in _RANDOM_SAMPLERS or getattr(s, "shuffle", False) is True:
            raise ValueError(
                f"{name}: expected the examples in a fixed order, got a {type(data).__name__} with a {kind} "
                "(shuffle=True draws a new order on every pass, so row j of the features would not be example "
                "j, and a resumed store would mix two orders); pass a loader without shuffling, e.g. "
                "DataLoader(dataset, batch_size=..., shuffle=False), or gradsketch.attribution.batches(X, y)")


class _ChunkHash:
    """Fingerprint of the examples of one chunk: per tensor leaf, a blake2b over the bytes of its rows in
    order (with its dtype and per-example shape), so it does not depend on where the batches are cut."""

    def __init__(self) -> None:
        self.leaves: dict[str, tuple[Any, Any]] = {}  # path -> (last (dtype, tail), hasher)

    def update(self, leaves: list[tuple[str, Any]], a: int, b: int) -> None:
        import torch

        for path, t in leaves:
            piece = t[a:b].detach()
            key = (str(piece.dtype), tuple(piece.shape[1:]))
            last, h = self.leaves.get(path, (None, None))
            if h is None:
                h = hashlib.blake2b(digest_size=16)
            if key != last:  # leaf layout (first time, or padded text of another length): part of the data
                h.update(f"\0{key[0]}{key[1]}\0".encode())
            self.leaves[path] = (key, h)
            flat = piece.reshape(-1)
            if flat.device.type != "cpu":
                flat = flat.cpu()
            try:
                raw = flat.contiguous().view(torch.uint8).numpy()
            except (RuntimeError, TypeError):  # exotic dtypes: hash their values' text
                h.update(repr(flat.tolist()).encode())
                continue
            h.update(memoryview(raw))

    def hexdigest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for path in sorted(self.leaves):
            h.update(f"{path}\0".encode() + self.leaves[path][1].digest())
        return "blake2b:" + h.hexdigest()


def batch_leaves(item: Any) -> list[tuple[str, Any]] | None:
    """The example-indexed tensor leaves ``[(path, tensor [B, ...])]`` of a fill item when it is a batch
    (:class:`~gradsketch.model._batch.SplitBatch`), else ``None`` (e.g. chunk ranges: nothing to hash)."""
    from ..model._batch import SplitBatch

    if isinstance(item, SplitBatch):
        return list(zip(item.paths, item.leaves, strict=True))
    return None


def fill_stream(store: GradientStore, items: Iterable[Any], size_of: Callable[[Any], int],
                rows_fn: Callable[[Any, int, int, int], Any], *, row_range: tuple[int, int] | None = None,
                progress: bool = True, desc: str = "gradsketch store", name: str = "data",
                allow_nonfinite: bool = False, first_row: int = 0, leave: bool = False,
                leaves_of: Callable[[Any], Any] | None = None, on_data_change: str = "raise",
                source: Any = None, skipped: list[int] | None = None) -> list[int]:
    """The one fill loop. ``items`` are consecutive pieces of the rows (batches of examples, chunk ranges),
    ``size_of(item)`` their row counts; ``rows_fn(item, lo, hi, row0) -> [hi - lo, d]`` computes the rows
    ``[lo, hi)`` of an item (item-relative; ``row0`` is the store row of ``lo``). Fills the missing chunks
    of ``row_range`` (default: all rows) and returns the chunks this call wrote. Items before the range are
    skipped without computation; ``first_row`` is the store row of the first item.

    Batch layout on the chunk grid: ``rows_fn`` is always called on the part of an item inside one chunk,
    never across a chunk boundary, so an interrupted and resumed fill computes exactly the same pieces as an
    uninterrupted one and writes the same bytes.

    Data fingerprints: when the items are batches (``leaves_of(item)`` gives their tensor leaves; by default
    :func:`batch_leaves`), the examples of every chunk in the range are hashed while streaming (blake2b over
    the tensor bytes, no gradient work) and recorded in the chunk's marker. A completed chunk whose recorded
    fingerprint differs from the examples now streamed (relabelled, replaced or reordered data) raises
    :class:`DataChangedError` naming every such chunk and its example range (``on_data_change="raise"``;
    nothing more is computed once a change is seen), or is recomputed and rewritten
    (``on_data_change="refeaturise"``). ``source``: the user's data object, refused if it shuffles
    (:func:`check_sequential`). ``skipped``: a list that ``rows_fn`` appends the store rows of skipped examples
    to (non-finite gradients zeroed); each chunk's share is recorded in its marker.

    >>> import tempfile, torch
    >>> st = GradientStore.create_or_open(tempfile.mkdtemp() + "/s", 5, 2, {"kind": "x"}, "fp", chunk_rows=2)
    >>> X = torch.arange(10.0).reshape(5, 2)
    >>> fill_stream(st, [X[:3], X[3:]], len, lambda b, lo, hi, r0: b[lo:hi], progress=False)
    [0, 1, 2]
    """
    if on_data_change not in ("raise", "refeaturise"):
        raise ValueError(f"on_data_change: expected 'raise' or 'refeaturise', got {on_data_change!r}")
    if source is not None:
        check_sequential(source, name)
    n_rows, cr = store.n_rows, store.chunk_rows
    lo_row, hi_row = (0, n_rows) if row_range is None else store._row_range(row_range)
    missing = set(store.missing_chunks((lo_row, hi_row)))
    written: list[int] = []
    leaves_of = batch_leaves if leaves_of is None else leaves_of
    it = iter(items)
    first = next(it, _END)
    if first is _END:
        if missing:
            raise ValueError(f"{name}: expected {n_rows} examples, got none")
        return written
    hashing = leaves_of(first) is not None
    if not missing and not hashing:
        return written
    refeaturise = on_data_change == "refeaturise"
    lock = ChunkLock(store.path)
    bufs: dict[int, dict[int, Any]] = {}  # chunk -> row_start -> rows
    hashes: dict[int, _ChunkHash] = {}
    pending: dict[int, list[tuple[Any, int, int, int]]] = {}  # complete chunk -> its pieces (refeaturise)
    changed: list[tuple[int, str | None, str]] = []
    offset = first_row
    bar = tqdm(total=len(missing), desc=desc, unit="chunk", disable=not progress, leave=leave)

    def compute(item: Any, lo: int, hi: int, row0: int) -> Any:
        rows = rows_fn(item, lo, hi, row0)
        shape = tuple(getattr(rows, "shape", ()))
        if len(shape) != 2 or shape[0] != hi - lo or shape[1] != store.d:
            raise ValueError(f"rows: expected shape ({hi - lo}, {store.d}) for rows [{row0}, {row0 + hi - lo}), "
                             f"got {shape if shape else type(rows).__name__}")
        return rows

    try:
        for item in itertools.chain([first], it):
            b = int(size_of(item))
            if offset + b <= lo_row:  # before the range: nothing to compute
                offset += b
                continue
            if offset >= hi_row:
                break
            leaves = leaves_of(item) if hashing else None
            for c in range(max(offset, lo_row) // cr, (min(offset + b, hi_row) - 1) // cr + 1):
                c0, c1 = store.chunk_range(c)
                a, z = max(c0, offset), min(c1, offset + b)
                if leaves is not None:
                    hashes.setdefault(c, _ChunkHash()).update(leaves, a - offset, z - offset)
                if c in missing:
                    if store.is_chunk_complete(c):  # completed by another writer: its data are checked below
                        missing.discard(c)
                        bufs.pop(c, None)
                        bar.update()
                    elif not changed:
                        bufs.setdefault(c, {})[a] = compute(item, a - offset, z - offset, a)
                elif refeaturise:
                    pending.setdefault(c, []).append((item, a - offset, z - offset, a))
                if z < c1:
                    continue
                # the chunk's last example has been seen
                fp = hashes.pop(c).hexdigest() if c in hashes else None
                if c in missing:
                    if not changed:
                        parts = [bufs[c][k] for k in sorted(bufs[c])]
                        if write_missing(store, c, _cat(parts), lock, allow_nonfinite=allow_nonfinite,
                                         data_fingerprint=fp, skipped=_within(skipped, c0, c1)):
                            written.append(c)
                        missing.discard(c)
                        bar.update()
                    bufs.pop(c, None)
                elif fp is not None:
                    record = store.chunk_record(c) or {}
                    if record.get("data") != fp:
                        pieces = pending.get(c, [])
                        if refeaturise and sum(p[2] - p[1] for p in pieces) == c1 - c0:
                            rows = _cat([compute(*p) for p in pieces])
                            with lock:
                                store.write_chunk(c, rows, overwrite=True, allow_nonfinite=allow_nonfinite,
                                                  data_fingerprint=fp, skipped=_within(skipped, c0, c1))
                            written.append(c)
                        else:
                            changed.append((c, record.get("data"), fp))
                pending.pop(c, None)
            offset += b
            if not missing and not hashing:
                break
    finally:
        bar.close()
    if changed:
        shown = ", ".join(f"chunk {c} (examples {store.chunk_range(c)[0]}:{store.chunk_range(c)[1]})"
                          for c, _, _ in changed[:10]) + (", ..." if len(changed) > 10 else "")
        raise DataChangedError(
            f"{name}: the examples of {len(changed)} completed chunk(s) of the store at {str(store.path)!r} differ "
            f"from the ones their rows were computed from: {shown}. The data changed since the store was filled "
            "(relabelled, replaced or reordered examples; random data augmentation also changes them on every "
            "pass: featurise without it); recompute those chunks (on_data_change='refeaturise'; on the command "
            "line --on-data-change refeaturise), or use another store path", [c for c, _, _ in changed],
            [store.chunk_range(c) for c, _, _ in changed])
    if missing:
        raise ValueError(f"{name}: the data yielded {offset - first_row} examples now but {n_rows} before; expected "
                         "the same examples in the same order on every pass")
    return sorted(written)


def _within(rows: list[int] | None, start: int, stop: int) -> list[int] | None:
    return None if rows is None else sorted({r for r in rows if start <= r < stop})


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
