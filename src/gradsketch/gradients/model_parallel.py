"""Sketched per-example gradients of a model whose parameters are sharded over ranks (FSDP2, issue 15).

A :class:`~gradsketch.BlockSketch` is a sum over its groups, and a group's sketch is linear in each of its
columns: ``Φ_g x_g = Σ_r Φ_g[:, C_r] x_g[C_r]`` for any split of the group's columns into sets ``C_r``.
Under ``torch.distributed.fsdp.fully_shard`` every rank holds rows ``[a_r, b_r)`` of every parameter (a
``DTensor`` with placement ``Shard(0)``), which are the contiguous flat elements ``[a_r·w, b_r·w)`` of the
parameter (``w`` the product of the other dimensions). So every rank

1. runs the batch forward and backward through the sharded model (FSDP gathers the parameters as usual;
   every rank takes the *same* examples: this is model parallelism, not data parallelism),
2. forms the per-example gradient of *its rows only* of each hooked parameter from the layer inputs and
   output-gradients the hooks captured (``G_i[a:b] = Σ_t δ_{i,t}[a:b] a_{i,t}ᵀ`` for a Linear weight,
   the matching slices for Conv1D/Conv2d/Embedding/LayerNorm; :class:`HookEngine`'s rules restricted),
3. applies the columns of the group's sketch that belong to those elements, and
4. one ``all_reduce`` sums the ``[B, d]`` rows over the ranks.

The result is the sketch of the full per-example gradient with the same ``task.block_sketch(d, kind,
seed)`` as the unsharded model, for every sketch kind. Kinds whose columns are independent (``sjlt``) apply
only the rank's columns (``O(s · n / P)`` work); the structured kinds (``affd``, ``fjl``, ...) mix all
columns of a group, so the rank's slice is zero-padded to the group's width and sketched whole (the sum over
ranks is still exact; the saving is then in the per-example gradient memory, ``B × n / P``, not in the
sketch's work). Parameters that are not ``DTensor`` s (replicated on every rank) are sketched by rank 0.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..linalg.distributed import all_gather_objects, check_same, is_distributed, rank_and_world

if TYPE_CHECKING:
    from ..model.task import Task


def _is_dtensor(p: Any) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        # no DTensor can exist before its module is imported; importing it here would cost ~1.5 CPU s on the
        # first fit of every process that never shards a model
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)


def is_model_sharded(task: Task) -> bool:
    """Whether any selected parameter of ``task`` is a ``DTensor`` (a model wrapped by FSDP2's
    ``fully_shard``): its sketched gradients then take the model-parallel path of this module.

    >>> from torch import nn
    >>> from gradsketch import Task
    >>> is_model_sharded(Task.from_classifier(nn.Linear(3, 2)))
    False
    """
    return any(_is_dtensor(p) for _, p in task.named_params)


def shard_rows(task: Task, group: Any = None) -> dict[str, tuple[int, int]]:
    """``name -> [a, b)``: the rows (dim 0) of each selected parameter that this rank holds.

    ``DTensor`` parameters must be ``Shard(0)`` on a one-dimensional mesh (FSDP2's layout); the row offsets
    come from one all-gather of every rank's local row counts (so uneven shards, ``101 = 51 + 50``, are
    exact). Replicated (plain) parameters belong to rank 0 whole and to no other rank.

    >>> from torch import nn
    >>> from gradsketch import Task
    >>> shard_rows(Task.from_classifier(nn.Linear(3, 2)))  # no process group: rank 0 holds everything
    {'weight': (0, 2), 'bias': (0, 2)}
    """
    rank, world = rank_and_world(group)
    local: dict[str, int] = {}
    for name, param in task.named_params:
        if not _is_dtensor(param):
            continue
        from torch.distributed.tensor import Shard

        p: Any = param

        placements = tuple(p.placements)
        if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise ValueError(f"params: {name} is a DTensor with placements {placements}; the sharded sketch "
                             "supports FSDP2's Shard(0) on a one-dimensional mesh")
        if p.device_mesh.size() != world:
            raise ValueError(f"params: {name} is sharded over a mesh of {p.device_mesh.size()} ranks, the "
                             f"process group has {world}; build the mesh over the whole group")
        local[name] = int(p.to_local().shape[0]) if p.ndim else 1
    counts = all_gather_objects(local, group)
    out: dict[str, tuple[int, int]] = {}
    for name, p in task.named_params:
        rows = int(p.shape[0]) if p.ndim else 1
        if name not in local:
            out[name] = (0, rows) if rank == 0 else (0, 0)
            continue
        start = sum(c[name] for c in counts[:rank])
        if sum(c[name] for c in counts) != rows:
            raise ValueError(f"params: the shards of {name} hold {sum(c[name] for c in counts)} rows over the "
                             f"ranks, its global shape has {rows}")
        out[name] = (start, start + local[name])
    return out


def _rows_slice(kind: str, role: str, mod: Any, x: Tensor, dy: Tensor, shape: tuple[int, ...], a: int, b: int
                ) -> Tensor:
    """Per-example gradient of rows ``[a, b)`` of one use of a hooked parameter: ``[m, b - a, *shape[1:]]``."""
    from .factored import HookEngine, _rows_cols

    m = x.shape[0]
    if role == "weight" and kind in ("linear", "conv1d", "conv2d"):
        r, c = _rows_cols(kind, mod, x, dy)  # dim 0 of the weight is r's last dimension for all three
        g = torch.einsum("mtr,mtc->mrc", r[..., a:b], c)
        return g.reshape(m, b - a, *shape[1:])
    if role == "weight" and kind == "embedding":
        ids, c = _rows_cols(kind, mod, x, dy)
        inside = (ids >= a) & (ids < b)
        c = c * inside.unsqueeze(-1).to(c.dtype)
        local = torch.where(inside, ids - a, torch.zeros_like(ids))
        g = torch.zeros(m, b - a, c.shape[-1], dtype=c.dtype, device=c.device)
        return g.scatter_add_(1, local.unsqueeze(-1).expand(-1, -1, c.shape[-1]), c)
    return HookEngine._exact(kind, role, mod, x, dy, shape)[:, a:b]  # biases, LayerNorm: vectors, cheap


class ShardedSketcher:
    """Runs ``sketch_grads`` for a task over an FSDP2-sharded model (see the module docstring).

    Args:
        task: a :class:`~gradsketch.Task` whose model holds ``DTensor`` parameters (``fully_shard``).
        sketch: ``task.block_sketch(d, kind, seed)`` (a BlockSketch over the global parameter sizes; the
            same object the unsharded model uses).
        group: the process group of the mesh (default group).

    Use it through ``task.sketch_grads`` (and ``Attributor``), which pick it when the model holds DTensors::

        model = GPT2LMHeadModel(config); mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h: fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        task = Task(model, loss_fn)                 # same parameter names and global sizes as unsharded
        rows = task.sketch_grads(data, task.block_sketch(d, "sjlt", seed=0))   # [n, d], equal on all ranks

    >>> from torch import nn
    >>> from gradsketch import Task
    >>> task = Task.from_classifier(nn.Linear(3, 2))
    >>> ShardedSketcher(task, task.block_sketch(4, "sjlt"))
    Traceback (most recent call last):
    ...
    ValueError: task: the model holds DTensor parameters (FSDP2) but no process group is initialised
    """

    def __init__(self, task: Task, sketch: Any, group: Any = None) -> None:
        from ..sketch import BlockSketch
        from .factored import HookEngine

        if not isinstance(sketch, BlockSketch):
            raise TypeError(f"sketch: a model sharded by FSDP2 needs a BlockSketch (task.block_sketch(d, ...)), "
                            f"got {type(sketch).__name__}")
        if not is_distributed():
            raise ValueError("task: the model holds DTensor parameters (FSDP2) but no process group is "
                             "initialised")
        self.task, self.sketch, self.group = task, sketch, group
        # ranks with different sketches would sum unrelated rows: fail together, before any batch
        check_same(sketch.spec, "sketch", group)
        self.rows = shard_rows(task, group)
        eng = HookEngine(task)
        generic = [n for n in task.param_names if n in eng.generic]
        if generic:
            raise ValueError(f"params: under FSDP2 the per-example gradients come from layer hooks, which do not "
                             f"see {generic[:6]}{' ...' if len(generic) > 6 else ''} (supported: Linear, "
                             "transformers Conv1D, Conv2d, Embedding, LayerNorm weights and biases); deselect "
                             "them with Task(params=...)")
        self.eng = eng
        # the flat columns [lo, hi) of each parameter's shard inside its BlockSketch group
        self.cols: list[list[tuple[int, int, int]]] = []  # per group: (param index, lo, hi)
        for g in sketch.groups:
            off, spans = 0, []
            for i in g:
                name = task.param_names[i]
                a, b = self.rows[name]
                width = math.prod(task.param_shapes[i][1:])
                if b > a:
                    spans.append((i, off + a * width, off + b * width))
                off += sketch.sizes[i]
            self.cols.append(spans)

    def _capture(self, split: Any) -> tuple[Tensor, dict[int, list[tuple[Tensor, Tensor]]]]:
        losses, caps, _ = self.eng._capture(split, param_grads=False)
        return losses, caps

    def _shard_grad(self, caps: dict[int, list[tuple[Tensor, Tensor]]], i: int) -> Tensor:
        """``[m, (b - a) · w]``: this rank's slice of parameter ``i``'s per-example gradients."""
        name = self.task.param_names[i]
        plan = self.eng.plans[name]
        a, b = self.rows[name]
        shape = plan.shape if plan.shape else (1,)
        g = None
        for mod, kind, role in plan.uses:
            for x, dy in caps[id(mod)]:
                e = _rows_slice(kind, role, mod, x, dy, shape, a, b)
                g = e if g is None else g + e
        assert g is not None
        return g.reshape(g.shape[0], -1)

    def rows_of(self, split: Any) -> tuple[Tensor, Tensor]:
        """``([m, d] sketched rows, [m] losses)`` for one batch, identical on every rank."""
        from ..sketch import kinds

        task, S = self.task, self.sketch
        m = split.size
        sizes = torch.tensor([m, -m], dtype=torch.int64)
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if int(sizes[0]) != -int(sizes[1]):  # every rank sees the same extremes: all raise, none hangs
            raise ValueError(f"data: a model sharded by FSDP2 needs the same batch on every rank, got batches of "
                             f"{-int(sizes[1])} to {int(sizes[0])} examples across the ranks")
        losses, caps = self._capture(split)
        out = torch.zeros(m, S.d, dtype=torch.promote_types(task.dtype, torch.float32), device=task.device)
        for g, Sg, spans in zip(S.groups, S.sketches, self.cols):
            if not spans:
                continue
            width = sum(S.sizes[i] for i in g)
            parts = [(lo, hi, self._shard_grad(caps, i)) for i, lo, hi in spans]
            if isinstance(Sg, kinds.SJLTSketch):  # independent columns: only this rank's columns
                rows, vals = Sg._bufs["rows"], Sg._vals(out.dtype)
                for lo, hi, x in parts:
                    out += kinds._Hashed.forward(x.to(out.dtype), rows[:, lo:hi], vals[:, lo:hi], S.d)
            else:  # a structured kind mixes the group's columns: the slice in place, zeros elsewhere
                full = torch.zeros(m, width, dtype=out.dtype, device=out.device)
                for lo, hi, x in parts:
                    full[:, lo:hi] = x
                out += Sg(full, out_dtype=out.dtype, nan_policy="propagate")
        torch.distributed.all_reduce(out, group=self.group)
        return out.to(task.dtype), losses
