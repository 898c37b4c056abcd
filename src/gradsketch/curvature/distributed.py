"""Dataset-level curvature operators under ``torch.distributed``: each rank takes its shard of the batches.

``sharded(kind, task, data)`` gives the Hessian / GGN / empirical Fisher of the mean loss over *all* of
``data`` while this rank only touches its contiguous shard of the batches: every product is
``Σ_r (n_r / n) C_r V`` with ``C_r`` the curvature of shard ``r``'s mean loss, summed by one
``all_reduce`` (:class:`gradsketch.linalg.distributed.AllReduceOperator`). Every rank receives the same
product, so Lanczos, Arnoldi, SLQ and Hutchinson run unchanged, with identical Krylov bases on all ranks,
and give one process's eigenvalues to float tolerance. Without a process group it is the plain operator.

Every rank passes the same ``data`` (a sized, re-iterable sequence of batches: a list or a DataLoader
without shuffling); ranks that disagree on its number of batches, or on the model's parameter count,
fail together with one message (:func:`gradsketch.linalg.distributed.check_same`).

>>> import torch
>>> from gradsketch import Task
>>> model = torch.nn.Linear(3, 1, dtype=torch.float64)
>>> data = [(torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))]
>>> H = sharded("hessian", Task.from_classifier(model, loss="mse"), data)   # one process: the plain Hessian
>>> H.shape
(4, 4)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .._validation import check_choice, describe
from ..linalg.distributed import AllReduceOperator, check_same, rank_and_world, shard_range
from ..linalg.operator import FunctionOperator, LinearOperator
from ..model.task import Task
from .operators import FisherOperator, GGNOperator, HessianOperator, renamed_mode

__all__ = ["sharded", "BatchShard"]

_KINDS = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}


class BatchShard:
    """The batches ``[start, stop)`` of a sized, re-iterable ``data`` (a list is sliced; other iterables are
    walked and the batches outside the shard skipped), re-iterable itself.

    >>> list(BatchShard([10, 11, 12, 13], 1, 3))
    [11, 12]
    """

    def __init__(self, data: Iterable, start: int, stop: int) -> None:
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator:
        if isinstance(self.data, (list, tuple)):
            yield from self.data[self.start:self.stop]
            return
        for i, batch in enumerate(self.data):
            if i >= self.stop:
                return
            if i >= self.start:
                yield batch


def sharded(kind: str, task: Task, data: Any, group: Any = None, **kwargs: Any) -> LinearOperator:
    """The ``kind`` (``"hessian"``, ``"ggn"``, ``"fisher"``) curvature of ``task``'s mean loss over all of
    ``data``, computed by this rank on its contiguous shard of the batches and all-reduced per product.

    Args:
        kind: which curvature.
        task: the :class:`gradsketch.Task` (the same model on every rank).
        data: a sized, re-iterable sequence of batches, the same on every rank.
        group: the ``torch.distributed`` process group (default group when ``None``).
        kwargs: passed to the operator (``damping``, ``method``, ``progress``; ``sampling`` must be ``"full"``:
            a ``"batch"``/``"stochastic"`` operator is not a dataset-level one).

    Returns:
        a symmetric ``[N, N]`` LinearOperator; without a process group, the plain operator on ``data``.
    """
    kind = check_choice(kind, "kind", tuple(_KINDS))
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a gradsketch.Task, got {describe(task)}")
    renamed_mode(kwargs.get("mode"))  # the curvature's data choice is ``sampling`` (``mode=`` is refused)
    sampling = kwargs.get("sampling", "full")
    rank, world = rank_and_world(group)
    if world == 1:
        return _KINDS[kind](task, data, **kwargs)
    if sampling != "full":
        raise ValueError(f"sampling: expected 'full' for a curvature sharded over ranks, got {sampling!r}")
    try:
        n_batches = len(data)
    except TypeError:
        raise TypeError(f"data: expected a sized sequence of batches (list, DataLoader) to shard over ranks, "
                        f"got {describe(data)}") from None
    check_same(n_batches, "data (number of batches)", group)
    check_same(task.n_params, "task (number of parameters)", group)
    start, stop = shard_range(n_batches, rank, world)
    local_data = BatchShard(data, start, stop)
    n_local = sum(task.split(b).size for b in local_data)
    import torch.distributed as dist

    counts = torch.tensor([float(n_local)], dtype=torch.float64)
    dist.all_reduce(counts, group=group)
    n_total = float(counts[0])
    if n_total == 0:
        raise ValueError("data: expected at least one example over all ranks, got none")
    if n_local:
        local: LinearOperator = _KINDS[kind](task, local_data, **kwargs)
    else:  # an empty shard contributes nothing (its operator is never applied)
        local = FunctionOperator(lambda V: torch.zeros_like(V), (task.n_params, task.n_params), task.dtype,
                                 task.device, symmetric=True)
    return AllReduceOperator(local, n_local / n_total, group=group)
