"""Streaming sketched per-example gradients: explicit, implicit and factored modes.

All three produce row i = Φ g_i with g_i = ∇_θ ℓ_i(θ) (same Φ, same numbers up to rounding); they differ in
what they materialise: explicit holds [chunk, N] exact gradients, implicit differentiates ω ↦ ℓ_i(θ0 + Φᵀω)
at ω = 0 (Schioppa 2024, §3), factored never forms weight gradients (LoGra).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ._batch import data_len

if TYPE_CHECKING:
    from .task import Task

DEFAULT_GRAD_BYTES = 256 * 2**20


class SketchAdapter:
    """Uniform view of a sketch over the task's parameters: ``apply(list of [m, n_i]) -> [m, d]`` and
    ``adjoint([..., d]) -> list of [..., n_i]`` (parameter order)."""

    def __init__(self, sketch: Any, task: Task) -> None:
        from .factored import FactoredSketch

        self.sketch = sketch
        self.sizes = list(task.param_sizes)
        n = getattr(sketch, "n", None)
        d = getattr(sketch, "d", None)
        if n is None or d is None or not callable(sketch) or not hasattr(sketch, "T"):
            raise TypeError("sketch: expected a gradsketch sketch (BlockSketch, sketch(...) or "
                            f"FactoredSketch) with n, d, __call__ and T, got {type(sketch).__name__}")
        if int(n) != task.n_params:
            raise ValueError(f"sketch: expected a sketch with n = task.n_params = {task.n_params}, got "
                             f"n = {n} (build it with task.block_sketch(d, ...))")
        self.d = int(d)
        self.kind = "plain"
        if isinstance(sketch, FactoredSketch):
            if sketch.names != task.param_names or sketch.sizes != self.sizes:
                raise ValueError("sketch: this FactoredSketch was built for other parameters; build it with "
                                 "task.factored_sketch(d, ...)")
            self.kind = "factored"
        else:
            sizes = getattr(sketch, "sizes", None)
            if sizes is not None:
                vals = list(sizes.values()) if isinstance(sizes, dict) else list(sizes)
                if [int(v) for v in vals] != self.sizes:
                    raise ValueError(
                        f"sketch: expected BlockSketch blocks of sizes {self.sizes} (the task's parameters, "
                        f"in order), got {vals}; build it with task.block_sketch(d, ...)")
                self.kind = "block"
                self.keys = list(sizes.keys()) if isinstance(sizes, dict) else None

    def apply(self, xs: Sequence[Tensor]) -> Tensor:
        # non-finite rows are the task's business (nan_policy), not the sketch's
        if self.kind == "factored":
            return self.sketch(list(xs), nan_policy="propagate")
        if self.kind == "block":
            if self.keys is not None:
                return self.sketch(dict(zip(self.keys, xs)), nan_policy="propagate")
            return self.sketch(list(xs), nan_policy="propagate")
        return self.sketch(torch.cat(list(xs), dim=-1), nan_policy="propagate")

    def adjoint(self, y: Tensor) -> list[Tensor]:
        out = self.sketch.T(y, nan_policy="propagate")
        if self.kind == "plain":
            return list(torch.split(out, self.sizes, dim=-1))
        if isinstance(out, dict):
            return list(out.values())
        return list(out)


def default_chunk(task: Task, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
        return int(chunk_size)
    per = task.n_params * torch.finfo(task.dtype).bits // 8
    return max(1, DEFAULT_GRAD_BYTES // max(per, 1))


def _explicit(task: Task, split: Any, ad: SketchAdapter, chunk: int) -> tuple[Tensor, Tensor]:
    rows, losses = [], []
    for _, sub in split.chunks(chunk):
        g, li = task.per_example_grads(sub)
        m = sub.size
        rows.append(ad.apply([g[n].reshape(m, -1) for n in task.param_names]))
        losses.append(li)
    return torch.cat(rows), torch.cat(losses)


def _implicit(task: Task, split: Any, ad: SketchAdapter, chunk: int) -> tuple[Tensor, Tensor]:
    theta0 = task.params_dict()
    names, shapes = task.param_names, task.param_shapes
    omega0 = torch.zeros(ad.d, dtype=task.dtype, device=task.device)

    def loss_at(omega: Tensor, batch: Any, m: int) -> Tensor:
        deltas = ad.adjoint(omega)
        p = {n: theta0[n] + dl.reshape(s).to(theta0[n].dtype) for n, dl, s in zip(names, deltas, shapes)}
        return task._losses(p, batch, m)

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

    task._check_once(split)
    rows, losses = [], []
    for _, sub in split.chunks(chunk):
        r, li = task._run_per_example(lambda sub=sub: vmapped(sub), lambda sub=sub: looped(sub))
        rows.append(r)
        losses.append(li)
    return torch.cat(rows), torch.cat(losses)


def iter_sketch_grads(task: Task, data: Iterable, sketch: Any, mode: str = "explicit", progress: bool = True,
                      chunk_size: int | None = None, nan_policy: str | None = None) -> Iterator[Tensor]:
    """Yields ``[B, d]`` sketched per-example gradients batch by batch (see ``Task.sketch_grads``)."""
    from .task import SKETCH_MODES, _tqdm

    if mode not in SKETCH_MODES:
        raise ValueError(f"mode: expected one of {SKETCH_MODES}, got {mode!r}")
    ad = SketchAdapter(sketch, task)
    if mode == "factored":
        if ad.kind != "factored":
            raise TypeError("sketch: mode='factored' needs a FactoredSketch (task.factored_sketch(d, ...)), "
                            f"got {type(sketch).__name__}")
        from .factored import FactoredEngine

        engine = FactoredEngine(task, sketch)
    chunk = default_chunk(task, chunk_size)
    offset = 0
    for batch in _tqdm(data, progress, f"sketch_grads[{mode}]", data_len(data)):
        split = task._split(batch)
        if mode == "explicit":
            rows, losses = _explicit(task, split, ad, chunk)
        elif mode == "implicit":
            rows, losses = _implicit(task, split, ad, chunk)
        else:
            rows, losses = engine.batch(split, chunk)
        yield task._nonfinite(rows, losses, offset, nan_policy, task.skipped_indices_)
        offset += split.size
