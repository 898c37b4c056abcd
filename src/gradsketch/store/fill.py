"""fill: compute and write the missing chunks of a GradientStore (one rank's share or all of it)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from .gradient_store import GradientStore


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
    ``store.row_range_for_rank(rank, world_size)``); several processes may run ``fill`` on disjoint
    shares of one store at once. Resumable: rerunning after a crash only computes what is missing.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(f"rank, world_size: expected both or neither, received rank={rank!r}, "
                         f"world_size={world_size!r}")
    if rank is not None:
        if row_range is not None:
            raise ValueError("row_range: expected None when rank/world_size are given, "
                             f"received {row_range!r}")
        assert world_size is not None  # both-or-neither checked above
        row_range = store.row_range_for_rank(rank, world_size)
    start, stop = store._row_range(row_range)
    aligned = start % store.chunk_rows == 0 and (stop % store.chunk_rows == 0 or stop == store.n_rows)
    if not aligned:
        raise ValueError(f"row_range: expected chunk-aligned bounds (multiples of chunk_rows="
                         f"{store.chunk_rows}, or stop={store.n_rows}), received ({start}, {stop})")
    if not callable(compute_fn):
        raise TypeError(f"compute_fn: expected a callable (row_start, row_stop) -> rows, "
                        f"received {type(compute_fn).__name__}")
    todo = store.missing_chunks((start, stop))
    written = []
    for i in tqdm(todo, desc="gradsketch store", unit="chunk", disable=not progress):
        if store._marker(i).exists():  # completed meanwhile (e.g. by another writer): skip, don't recompute
            continue
        r0, r1 = store.chunk_range(i)
        store.write_chunk(i, compute_fn(r0, r1), allow_nonfinite=allow_nonfinite)
        written.append(i)
    return written
