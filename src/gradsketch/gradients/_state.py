"""Per-task state of the gradient engines, kept here rather than on the caller's Task.

A :class:`~gradsketch.model.Task` only declares; the engines that compute its gradients (the hook engine,
the factored engine) and what they learned about the model (vmap cannot trace it; a batched backward
through the sketch fails) are cached in a ``WeakKeyDictionary`` keyed by the task, so they live exactly as
long as the task and never appear as attributes on it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from .._validation import check_bool


@dataclass
class EngineState:
    """What the gradient engines remember about one task."""

    use_loop: bool = False            # vmap could not trace the model: one backward pass per example
    hooks: bool = True                # the hook engine may be used (benchmarks switch it off)
    hook_engine: Any = None           # HookEngine, built on first use
    factored_engine: Any = None       # FactoredEngine of the last FactoredSketch used
    implicit_unbatched: bool = False  # the batched backward through the sketch failed once


_STATES: weakref.WeakKeyDictionary[Any, EngineState] = weakref.WeakKeyDictionary()


def state(task: Any) -> EngineState:
    """The :class:`EngineState` of ``task`` (created on first use)."""
    st = _STATES.get(task)
    if st is None:
        st = _STATES[task] = EngineState(use_loop=getattr(task, "per_example", "auto") == "loop")
    return st


def use_hooks(task: Any, enabled: bool) -> None:
    """Allow (``True``, the default) or forbid the hook engine for ``task``'s explicit/implicit sketched
    gradients (then per-example gradients come from vmap or the loop; used by benchmarks to compare).

    >>> import torch, gradsketch
    >>> task = gradsketch.Task(torch.nn.Linear(2, 1), lambda m, b: m(b[0]).sum(1))
    >>> use_hooks(task, False); state(task).hooks
    False
    """
    state(task).hooks = check_bool(enabled, "enabled")


def uses_loop(task: Any) -> bool:
    """Whether per-example gradients of ``task`` run one backward pass per example (``per_example="loop"``,
    or vmap failed on this model and ``"auto"`` fell back)."""
    return state(task).use_loop
