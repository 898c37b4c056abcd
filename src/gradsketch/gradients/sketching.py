"""Streaming sketched per-example gradients: explicit, implicit and factored modes.

All three produce row i = Φ g_i with g_i = ∇_θ ℓ_i(θ) (same Φ, same numbers up to rounding); they differ in
what they materialise: explicit holds [chunk, N] exact gradients, implicit differentiates ω ↦ ℓ_i(θ0 + Φᵀω)
at ω = 0 (Schioppa 2024, §3), factored never forms weight gradients (LoGra).

Explicit and implicit take their exact per-example gradients from :class:`~.factored.HookEngine` when they
can (``per_example="auto"``, ``randomness="different"``): one batched forward and
one backward pass to the hooked layers' outputs, then Σ_t δ_t a_tᵀ per layer, formed for one BlockSketch
group and one chunk of examples at a time (peak: one group × chunk, not N × batch). This replaced
``vmap(grad)`` over examples, which is slower and, for transformers 5 models with an attention mask, cannot
trace at all (data-dependent mask checks) and fell back to one backward pass per example. The vmap/loop path
remains for the parameters hooks cannot see and when hooks are not allowed.

A BatchNorm that normalises with batch statistics (train mode, or ``track_running_stats=False``) mixes the
examples of a batch, so per-example gradients are not defined: every mode raises ``ValueError`` naming it
(:meth:`Task.check_per_example`) when the call starts and before each batch, before any forward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..model._batch import data_len, progress_iter
from ._state import state
from .exact import handle_nonfinite, per_example_grads, run_per_example

if TYPE_CHECKING:
    from ..model.task import Task

DEFAULT_GRAD_BYTES = 256 * 2**20


def check_sketch(sketch: Any, task: Task) -> Any:
    """``sketch`` is a gradsketch sketch operator over ``task``'s parameters (``n = task.n_params``; a
    BlockSketch with the parameters' block sizes; a FactoredSketch built for these parameters)."""
    from ..sketch import BlockSketch, FactoredSketch
    from ..sketch.base import SketchOperator

    if not isinstance(sketch, SketchOperator):
        raise TypeError("sketch: expected a gradsketch sketch (BlockSketch, sketch(...) or FactoredSketch), got "
                        f"{type(sketch).__name__}")
    if int(sketch.n) != task.n_params:
        raise ValueError(f"sketch: expected a sketch with n = task.n_params = {task.n_params}, got "
                         f"n = {sketch.n} (build it with task.block_sketch(d, ...))")
    sizes = list(task.param_sizes)
    if isinstance(sketch, FactoredSketch):
        if sketch.names != task.param_names or sketch.sizes != sizes:
            raise ValueError("sketch: this FactoredSketch was built for other parameters; build it with "
                             "task.factored_sketch(d, ...)")
    elif isinstance(sketch, BlockSketch) and [int(v) for v in sketch.sizes] != sizes:
        raise ValueError(
            f"sketch: expected BlockSketch blocks of sizes {sizes} (the task's parameters, in order), got "
            f"{sketch.sizes}; build it with task.block_sketch(d, ...)")
    return sketch


def default_chunk(task: Task, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
        return int(chunk_size)
    per = task.n_params * torch.finfo(task.dtype).bits // 8
    return max(1, DEFAULT_GRAD_BYTES // max(per, 1))


def _explicit(task: Task, split: Any, ad: Any, chunk: int) -> tuple[Tensor, Tensor]:
    rows, losses = [], []
    for _, sub in split.chunks(chunk):
        g, li = per_example_grads(task, sub)
        m = sub.size
        rows.append(ad.apply_blocks([g[n].reshape(m, -1) for n in task.param_names]))
        losses.append(li)
    return torch.cat(rows), torch.cat(losses)


def hook_engine(task: Task) -> Any:
    """The task's cached :class:`HookEngine`, or None when per-example gradients must come from vmap/loop:
    ``per_example`` other than ``"auto"`` (an explicit choice of vmap or loop) or ``randomness="same"``.
    (A BatchNorm with batch statistics, under which slices of the batch backward would not be per-example
    gradients, is refused before: :meth:`Task.check_per_example`.)"""
    if task.per_example != "auto" or task.randomness != "different":
        return None
    st = state(task)
    if not st.hooks:  # hooks switched off (gradients.use_hooks; benchmarks compare with the vmap/loop path)
        return None
    if st.hook_engine is None:
        from .factored import HookEngine

        st.hook_engine = HookEngine(task)  # cached beside the task (gradients._state), not on it
    return st.hook_engine if st.hook_engine.hooked else None


def _row_steps(m: int, numel: int, itemsize: int, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    return max(1, DEFAULT_GRAD_BYTES // max(numel * itemsize, 1))


def _explicit_hooked(task: Task, split: Any, ad: Any, chunk: int | None, eng: Any
                     ) -> tuple[Tensor, Tensor]:
    """Explicit mode from one batched forward/backward with hooks: each BlockSketch group's exact
    per-example gradients are formed (``chunk`` examples at a time, default ~256 MiB) and sketched, then
    dropped; the sum over groups is the BlockSketch's, in the same order."""
    names, m = task.param_names, split.size
    losses, caps, gd = eng.prepare(split)
    item = torch.finfo(task.dtype).bits // 8
    from ..sketch import BlockSketch

    if isinstance(ad, BlockSketch):
        S = ad
        out = None
        for g, Sg in zip(S.groups, S.sketches):
            width = sum(S.sizes[i] for i in g)
            step = _row_steps(m, width, item, chunk)
            ys = []
            for lo in range(0, m, step):
                hi = min(m, lo + step)
                # the group's per-example gradients written side by side into a scratch buffer kept
                # across batches (no torch.cat, no fresh [rows, width] allocation per batch)
                x = eng.scratch((hi - lo) * width, task.dtype, task.device).view(hi - lo, width)
                off = 0
                for i in g:
                    eng.grad_into(caps, gd, names[i], lo, hi, x[:, off:off + S.sizes[i]])
                    off += S.sizes[i]
                ys.append(Sg(x, out_dtype=torch.promote_types(x.dtype, torch.float32), nan_policy="propagate"))
                del x
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
            if out is None and y.untyped_storage().data_ptr() == eng.scratch(0, task.dtype, task.device
                                                                           ).untyped_storage().data_ptr():
                y = y.clone()  # a sketch that returned a view of its input: the scratch is reused next
            out = y if out is None else out.add_(y)
        return cast(Tensor, out).to(task.dtype), losses  # a BlockSketch has at least one group
    step = _row_steps(m, task.n_params, item, chunk)
    rows = []
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        rows.append(ad.apply_blocks([eng.grad(caps, gd, n, lo, hi) for n in names]))
    return torch.cat(rows), losses


def _implicit_hooked(task: Task, split: Any, ad: Any, chunk: int | None, eng: Any
                     ) -> tuple[Tensor, Tensor]:
    """Implicit mode: ∇_ω ℓ_i(θ0 + Φᵀω) at ω = 0 by the chain rule, batched over examples: the exact
    ∇_θ ℓ_i from the hooks, pulled back through ω ↦ Φᵀω by autograd (``is_grads_batched``), ``chunk``
    examples at a time (default ~256 MiB of θ-gradients)."""
    names, m = task.param_names, split.size
    losses, caps, gd = eng.prepare(split)
    item = torch.finfo(task.dtype).bits // 8
    omega = torch.zeros(ad.d, dtype=task.dtype, device=task.device, requires_grad=True)
    with torch.enable_grad():
        deltas = ad.adjoint_blocks(omega, task.param_sizes)
    keep = [i for i, dl in enumerate(deltas) if dl.requires_grad]
    step = _row_steps(m, task.n_params, item, chunk)
    rows = []
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        if not keep:
            rows.append(torch.zeros(hi - lo, ad.d, dtype=task.dtype, device=task.device))
            continue
        cot = [eng.grad(caps, gd, names[i], lo, hi).to(deltas[i].dtype).reshape(hi - lo, *deltas[i].shape)
               for i in keep]
        outs = [deltas[i] for i in keep]
        r = None
        if not state(task).implicit_unbatched:
            try:
                (r,) = torch.autograd.grad(outs, omega, cot, retain_graph=True, is_grads_batched=True)
            except RuntimeError as e:
                # a sketch op whose backward cannot run under vmap (e.g. a native kernel handed a batched
                # tensor): one backward per example instead (same numbers, slower), remembered on the task
                warnings.warn(f"implicit mode: batched backward through the sketch failed ({str(e)[:120]}); "
                              "using one backward per example", RuntimeWarning, stacklevel=2)
                state(task).implicit_unbatched = True
        if r is None:
            r = torch.stack([torch.autograd.grad(outs, omega, [c[k] for c in cot], retain_graph=True)[0]
                             for k in range(hi - lo)])
        rows.append(r)
    return torch.cat(rows), losses


def _implicit(task: Task, split: Any, ad: Any, chunk: int) -> tuple[Tensor, Tensor]:
    theta0 = task.params_dict()
    names, shapes = task.param_names, task.param_shapes
    omega0 = torch.zeros(ad.d, dtype=task.dtype, device=task.device)

    def loss_at(omega: Tensor, batch: Any, m: int) -> Tensor:
        deltas = ad.adjoint_blocks(omega, task.param_sizes)
        p = {n: theta0[n] + dl.reshape(s).to(theta0[n].dtype) for n, dl, s in zip(names, deltas, shapes)}
        return task.losses_at(p, batch, m)

    def vmapped(sub: Any) -> tuple[Tensor, Tensor]:
        def one(omega: Tensor, *leaves: Tensor) -> Tensor:
            return loss_at(omega, sub.rebuild([t.unsqueeze(0) for t in leaves]), 1)[0]

        in_dims = (None,) + (0,) * len(sub.leaves)
        with torch.no_grad():
            return vmap(grad_and_value(one), in_dims=in_dims, randomness=task.randomness)(omega0, *sub.leaves)

    def looped(sub: Any) -> tuple[Tensor, Tensor]:
        rows, ls = [], []
        for i in range(sub.size):
            omega = omega0.clone().requires_grad_(True)
            with torch.enable_grad():
                li = loss_at(omega, sub.slice(i, i + 1).rebuild(), 1)[0]
                (gi,) = torch.autograd.grad(li, omega)
            rows.append(gi)
            ls.append(li.detach())
        return torch.stack(rows), torch.stack(ls)

    task.validate_batch(split)
    rows, losses = [], []
    for _, sub in split.chunks(chunk):
        r, li = run_per_example(task, lambda sub=sub: vmapped(sub), lambda sub=sub: looped(sub))  # type: ignore[misc]
        rows.append(r)
        losses.append(li)
    return torch.cat(rows), torch.cat(losses)


class _Runner:
    """One ``sketch_grads`` call: validates the arguments once, then ``rows(split, out)`` gives a batch's
    ``[B, d]`` sketched gradients (non-finite rows handled), written into ``out`` when the mode can."""

    def __init__(self, task: Task, sketch: Any, mode: str, chunk_size: int | None, nan_policy: str | None,
                 record: list[int]) -> None:
        from ..model.task import SKETCH_MODES

        if mode not in SKETCH_MODES:
            raise ValueError(f"mode: expected one of {SKETCH_MODES}, got {mode!r}")
        task.check_per_example()  # BatchNorm with batch statistics: refused before any forward pass
        self.task, self.mode, self.chunk_size, self.nan_policy, self.record = (
            task, mode, chunk_size, nan_policy, record)
        self.ad = check_sketch(sketch, task)
        self.engine: Any = None
        if mode == "factored":
            from ..sketch import FactoredSketch

            if not isinstance(self.ad, FactoredSketch):
                raise TypeError("sketch: mode='factored' needs a FactoredSketch (task.factored_sketch(d, ...)), "
                                f"got {type(sketch).__name__}")
            from .factored import FactoredEngine

            st = state(task)
            engine = st.factored_engine
            if engine is None or engine.sketch is not sketch:  # cached: the hook check runs once per sketch
                engine = st.factored_engine = FactoredEngine(task, sketch)
            self.engine = engine
        self.chunk = default_chunk(task, chunk_size)
        self.eng = hook_engine(task) if mode != "factored" else None
        self.offset = 0
        self.sharded: Any = None
        from .model_parallel import ShardedSketcher, is_model_sharded

        if is_model_sharded(task):  # FSDP2: each rank sketches its parameter shards, one all-reduce sums
            if mode != "explicit":
                raise ValueError(f"mode: a model sharded by FSDP2 is sketched in mode 'explicit', got {mode!r}")
            self.sharded = ShardedSketcher(task, self.ad)

    def rows(self, split: Any, out: Tensor | None = None) -> Tensor:
        task, mode, ad = self.task, self.mode, self.ad
        task.check_per_example()  # again per batch: the model may have been put in train mode meanwhile
        if self.sharded is not None:
            rows, losses = self.sharded.rows_of(split)
        elif mode != "factored" and self.eng is not None and self.eng.hooked:
            task.validate_batch(split)
            fn = _explicit_hooked if mode == "explicit" else _implicit_hooked
            rows, losses = fn(task, split, ad, self.chunk_size, self.eng)
        elif mode == "explicit":
            rows, losses = _explicit(task, split, ad, self.chunk)
        elif mode == "implicit":
            rows, losses = _implicit(task, split, ad, self.chunk)
        else:
            # the hooks hold activations, not [chunk, N] gradients: the whole batch by default
            rows, losses = self.engine.batch(split, self.chunk_size, out=out)
        rows = handle_nonfinite(task, rows, losses, self.offset, self.nan_policy, self.record)
        self.offset += split.size
        if out is not None and rows is not out:
            out.copy_(rows)
            return out
        return rows


def iter_sketch_grads(task: Task, data: Iterable, sketch: Any, mode: str = "explicit", progress: bool = True,
                      chunk_size: int | None = None, nan_policy: str | None = None) -> Iterator[Tensor]:
    """Yields ``[B, d]`` sketched per-example gradients batch by batch (see ``Task.sketch_grads``).
    ``task.skipped_indices_`` lists the skipped examples of this pass (indices counted from its first batch)."""
    task.skipped_indices_ = []  # this pass's examples only (it used to accumulate across calls)
    run = _Runner(task, sketch, mode, chunk_size, nan_policy, task.skipped_indices_)
    if run.sharded is not None:  # FSDP2: every rank takes every batch (see sketch_grads)
        from ..linalg.distributed import check_same

        check_same(data_len(data), "data (its number of batches)")
    for batch in progress_iter(data, progress, f"sketch_grads[{mode}]", data_len(data)):
        yield run.rows(task.split(batch))


def sketch_grads(task: Task, data: Iterable, sketch: Any, mode: str = "explicit", progress: bool = True,
                 chunk_size: int | None = None, nan_policy: str | None = None) -> Tensor:
    """All rows as one ``[n, d]`` tensor. When ``len(data)`` is known the result is allocated once (sized
    from the first batch) and each batch's rows are written into it (the factored mode computes them in
    place), instead of concatenating per-batch results at the end."""
    run = _Runner(task, sketch, mode, chunk_size, nan_policy, task.skipped_indices_)
    n_batches = data_len(data)
    if run.sharded is not None:  # FSDP2: every rank must take every batch; a shorter rank would leave the others
        from ..linalg.distributed import check_same  # waiting in a collective

        check_same(n_batches, "data (its number of batches)")
    buf: Tensor | None = None
    pos = 0
    extra: list[Tensor] = []  # rows that did not fit (batches larger than the first)
    for batch in progress_iter(data, progress, f"sketch_grads[{mode}]", n_batches):
        split = task.split(batch)
        if buf is None and n_batches is not None and not extra:
            buf = torch.empty(n_batches * split.size, run.ad.d, dtype=task.dtype, device=task.device)
        if buf is not None and not extra and pos + split.size <= buf.shape[0]:
            run.rows(split, out=buf[pos:pos + split.size])
            pos += split.size
        else:
            extra.append(run.rows(split))
    if buf is None and not extra:
        raise ValueError("data: expected at least one batch, got an empty iterable")
    if not extra:
        assert buf is not None
        return buf[:pos] if pos < buf.shape[0] else buf
    parts = ([buf[:pos]] if buf is not None and pos else []) + extra
    return torch.cat(parts, 0)
