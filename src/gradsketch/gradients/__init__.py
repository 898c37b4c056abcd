"""Per-example gradients of a :class:`~gradsketch.model.Task`: exact (vmap or a loop), and sketched in three
modes (explicit, implicit, factored) with the hook engine that forms per-layer gradients from one batched
forward and backward pass. Imports Task; never imported by it (Task's conveniences call in lazily).
"""

from ._state import use_hooks, uses_loop
from .exact import grads, handle_nonfinite, per_example_grads
from .factored import FactoredEngine, HookEngine, factored_sketch_for
from .sketching import check_sketch, default_chunk, iter_sketch_grads, sketch_grads

__all__ = ["grads", "per_example_grads", "handle_nonfinite", "sketch_grads", "iter_sketch_grads", "check_sketch",
           "default_chunk", "HookEngine", "FactoredEngine", "factored_sketch_for", "use_hooks", "uses_loop"]
