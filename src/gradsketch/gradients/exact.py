"""Exact per-example gradients of a :class:`~gradsketch.model.Task`: ``vmap(grad)`` or one backward pass per
example, and the non-finite policy shared by every per-example path.

θ ∈ R^N is the concatenation of the task's selected parameters (``task.named_params`` order). For a batch
of B examples, :func:`grads` is the [B, N] matrix with rows g_i = ∇_θ ℓ_i(θ), computed with
``torch.func.vmap(torch.func.grad(...))`` over ``torch.func.functional_call`` (other parameters and the
buffers held fixed), falling back to a loop when vmap cannot trace the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..model._batch import SplitBatch
from ..model.task import NAN_POLICIES
from ._state import state

if TYPE_CHECKING:
    from ..model.task import Task


def _pe_vmap(task: Task, split: SplitBatch, names: Sequence[str]) -> tuple[dict[str, Tensor], Tensor]:
    base = task.params_dict()
    sel = {n: base[n] for n in names}
    fixed = {n: t for n, t in base.items() if n not in sel}

    def one(p: dict[str, Tensor], *leaves: Tensor) -> Tensor:
        b1 = split.rebuild([t.unsqueeze(0) for t in leaves])
        return task.losses_at({**fixed, **p}, b1, 1)[0]

    in_dims = (None,) + (0,) * len(split.leaves)
    with torch.no_grad():
        fn = vmap(grad_and_value(one), in_dims=in_dims, randomness=task.randomness)
        g, losses = fn(sel, *split.leaves)
    return g, losses


def _pe_loop(task: Task, split: SplitBatch, names: Sequence[str]) -> tuple[dict[str, Tensor], Tensor]:
    base = task.params_dict()
    outs: dict[str, list[Tensor]] = {n: [] for n in names}
    losses = []
    for i in range(split.size):
        p = {n: (t.requires_grad_(True) if n in outs else t) for n, t in
             ((n, t.detach()) for n, t in base.items())}
        with torch.enable_grad():
            li = task.losses_at(p, split.slice(i, i + 1).rebuild(), 1)[0]
            gs = torch.autograd.grad(li, [p[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            outs[n].append(torch.zeros_like(p[n]) if g is None else g)
        losses.append(li.detach())
    return {n: torch.stack(v) for n, v in outs.items()}, torch.stack(losses)


def run_per_example(task: Task, vmap_fn: Callable[[], Any], loop_fn: Callable[[], Any]) -> Any:
    """Run ``vmap_fn``, or ``loop_fn`` when the task asks for the loop or vmap has failed on it before
    (``per_example="auto"`` falls back once, with a warning, and remembers it)."""
    if state(task).use_loop:
        return loop_fn()
    if task.per_example == "vmap":
        return vmap_fn()
    try:
        return vmap_fn()
    except (ValueError, TypeError, FloatingPointError):
        raise
    except (RuntimeError, NotImplementedError) as e:
        warnings.warn(f"Task: torch.func.vmap cannot trace this model ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); falling back to one backward pass per example "
                      "(slower). Pass per_example='loop' to silence this; for transformers models, "
                      "model.set_attn_implementation('eager') usually makes vmap work.",
                      RuntimeWarning, stacklevel=3)
        state(task).use_loop = True
        return loop_fn()


def per_example_grads(task: Task, batch: Any, names: Sequence[str] | None = None
                      ) -> tuple[dict[str, Tensor], Tensor]:
    """Exact per-example gradients ``name -> [B, *shape]`` and the losses ``[B]`` (no NaN check).
    ``ValueError`` before any forward pass when a BatchNorm mixes the examples (:meth:`check_per_example`)."""
    task.check_per_example()
    split = task.split(batch)
    task.validate_batch(split)
    names = list(task.param_names if names is None else names)
    return run_per_example(task, lambda: _pe_vmap(task, split, names), lambda: _pe_loop(task, split, names))


def grads(task: Task, batch: Any, nan_policy: str | None = None) -> Tensor:
    """Exact per-example gradients ``[B, N]``: row i is ∇_θ ℓ_i(θ), flattened in parameter order.

    >>> import torch, gradsketch
    >>> lin = torch.nn.Linear(3, 1, bias=False).double()
    >>> task = gradsketch.Task(lin, lambda m, b: (m(b[0])[:, 0] - b[1]) ** 2 / 2)
    >>> X, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    >>> bool(torch.allclose(grads(task, (X, y)), lin.weight.detach() * torch.eye(3, dtype=torch.float64)))
    True


    Holds B·N numbers: for large models use :meth:`sketch_grads`. ``ValueError`` before any forward pass
    when a BatchNorm normalises with batch statistics (train mode, or ``track_running_stats=False``):
    per-example gradients are then not defined (:meth:`check_per_example`)."""
    task.check_per_example()
    split = task.split(batch)
    g, losses = per_example_grads(task, split)
    G = task.flatten(g, batch_dims=1)
    task.skipped_indices_ = []
    return handle_nonfinite(task, G, losses, 0, nan_policy, task.skipped_indices_)


def handle_nonfinite(task: Task, rows: Tensor, losses: Tensor, offset: int, nan_policy: str | None,
                     record: list[int]) -> Tensor:
    """Rows of examples whose loss or row is not finite: ``FloatingPointError`` naming the first example's
    index (``offset`` + its row) under ``"raise"``, or zeroed and recorded in ``record`` under ``"skip"``
    (``nan_policy=None``: the task's own policy)."""
    policy = task.nan_policy if nan_policy is None else nan_policy
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {NAN_POLICIES}, got {policy!r}")
    # one reduction: a sum containing NaN or ±Inf is not finite, so a finite sum proves every entry
    # finite (a sum that merely overflows falls through to the exact per-row test below)
    if bool(torch.isfinite(losses.sum() + rows.sum())):
        return rows
    # row max and min propagate NaN and show ±Inf: the same test as isfinite(rows).all(1) without a
    # [B, d] temporary
    bad = ~(torch.isfinite(losses.reshape(-1)) & torch.isfinite(rows.amax(dim=1))
            & torch.isfinite(rows.amin(dim=1)))
    if not bool(bad.any()):
        return rows
    idx = bad.nonzero().flatten().tolist()
    if policy == "raise":
        i = idx[0]
        raise FloatingPointError(
            f"non-finite loss or gradient for example index {offset + i} (loss = {float(losses[i])}); "
            f"{len(idx)} such example(s) in this batch. Pass nan_policy='skip' to zero their rows and "
            "record them in task.skipped_indices_")
    record.extend(offset + i for i in idx)
    rows = rows.clone()
    rows[bad] = 0
    return rows

