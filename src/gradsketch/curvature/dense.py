"""Dense curvature matrices of small models in a few vectorised passes (torch.func), not N products.

``dense_curvature(task, data, kind="hessian")`` returns H = (1/n) Σ_i ∇²ℓ_i as an explicit ``[N, N]`` matrix:
per batch, the Hessian-vector products with ``chunk_size`` basis vectors at a time are one vmapped
forward-over-reverse pass (``jvp`` of ``grad``; Pearlmutter 1994), so building H costs N / chunk_size batched
passes instead of N sequential ones. ``kind="ggn"`` returns G = (1/n) Σ_i J_iᵀ H_{L,i} J_i from per-example
output Jacobians J_i = ∂z_i/∂θ (``vmap`` over examples of ``jacrev``; C reverse passes for C outputs) and the
output Hessians H_{L,i} = ∂²ℓ_i/∂z_i², as one GEMM: G = (1/n) Σ_i (L_iᵀ J_i)ᵀ (L_iᵀ J_i) with L_i L_iᵀ = H_{L,i}
(an exactly symmetric positive semi-definite result when the loss is convex in z). Memory: the result
(N² entries) plus ``chunk_size`` (Hessian) or B·C (GGN) rows of N. For models up to a few thousand
parameters; the matrix-free operators of :mod:`gradsketch.curvature.operators` serve larger ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vmap

from .._validation import check_choice, check_int
from ..model._batch import data_len, progress_iter, single_example_fn

if TYPE_CHECKING:
    from ..model.task import Task

DENSE_KINDS = ("hessian", "ggn")
#: refuse dense matrices above this many parameters (N² float64 entries: 32 GiB at 65,536)
MAX_DENSE_PARAMS = 1 << 15


def dense_curvature(task: Task, data: Iterable, kind: str = "hessian", *, chunk_size: int = 512,
                    dtype: torch.dtype | None = None, progress: bool = False) -> Tensor:
    """The ``[N, N]`` Hessian (``kind="hessian"``) or GGN (``kind="ggn"``) of the task's mean loss over
    ``data``, parameter order of ``task.named_params``, in ``dtype`` (default: the parameters' dtype).

    Same matrix as ``HessianOperator(task, data).to_dense()`` / ``GGNOperator(...).to_dense()``, built
    with batched ``torch.func`` transforms (see the module docstring). ``chunk_size``: basis vectors per
    vmapped Hessian pass (memory ∝ chunk_size × the batch's activations).

    >>> import torch
    >>> from torch import nn
    >>> from gradsketch import Task
    >>> from gradsketch.curvature import HessianOperator
    >>> _ = torch.manual_seed(0)
    >>> task = Task.from_classifier(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())
    >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    >>> H = dense_curvature(task, data)
    >>> H.shape, bool(torch.allclose(H, HessianOperator(task, data).to_dense()))
    (torch.Size([26, 26]), True)
    """
    kind = check_choice(kind, "kind", DENSE_KINDS)
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    N = task.n_params
    if N > MAX_DENSE_PARAMS:
        raise ValueError(f"task: a dense {N} x {N} curvature matrix is too large (more than {MAX_DENSE_PARAMS} "
                         "parameters); use the matrix-free operators (HessianOperator, GGNOperator) instead")
    if kind == "ggn" and (task.output_fn is None or task.loss_on_output is None):
        raise ValueError("task: the GGN needs output_fn and loss_on_output (Task(model, output_fn=..., "
                         "loss_on_output=...) or Task.from_classifier); got a task with only loss_fn")
    out_dtype = task.dtype if dtype is None else dtype
    acc = torch.zeros(N, N, dtype=task.dtype, device=task.device)
    n = 0
    p0 = task.params_dict()
    for batch in progress_iter(data, progress, f"dense {kind}", data_len(data)):
        split = task.split(batch)
        task.validate_batch(split)
        if kind == "hessian":
            _hessian_batch(task, split, p0, acc, chunk_size)
        else:
            _ggn_batch(task, split, p0, acc)
        n += split.size
    if n == 0:
        raise ValueError("data: expected at least one batch, got an empty iterable")
    acc /= n
    return (0.5 * (acc + acc.T)).to(out_dtype)


def _hessian_batch(task: Task, split, p0: dict[str, Tensor], acc: Tensor, chunk_size: int) -> None:
    batch, B = split.rebuild(), split.size
    g = grad(lambda p: task.losses_at(p, batch, B).sum())

    def col(v: Tensor) -> Tensor:
        return task.flatten(jvp(g, (p0,), (task.unflatten(v),))[1])

    eye = torch.eye(task.n_params, dtype=task.dtype, device=task.device)
    with torch.no_grad():
        for lo in range(0, task.n_params, chunk_size):
            hi = min(lo + chunk_size, task.n_params)
            acc[lo:hi] += vmap(col, randomness="same")(eye[lo:hi])


def _ggn_batch(task: Task, split, p0: dict[str, Tensor], acc: Tensor) -> None:
    output_fn, loss_on_output = task.output_fn, task.loss_on_output
    assert output_fn is not None and loss_on_output is not None

    def one_out(p: dict[str, Tensor], *leaves: Tensor) -> Tensor:
        z = single_example_fn(split, lambda b: task.call(output_fn, p, b))(*leaves)
        return z.reshape(-1)

    def one_loss(z: Tensor, *leaves: Tensor) -> Tensor:
        b = split.rebuild([t.unsqueeze(0) for t in leaves])
        return loss_on_output(z.reshape(1, *z_shape), b).sum()

    with torch.no_grad():
        z0 = task.call(output_fn, p0, split.rebuild())
    if not isinstance(z0, Tensor) or z0.ndim == 0 or z0.shape[0] != split.size:
        got = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
        raise ValueError(f"output_fn: expected a tensor [B={split.size}, ...] of model outputs, got {got}")
    z_shape = tuple(z0.shape[1:])
    nd = (None,) + (0,) * len(split.leaves)
    with torch.no_grad():
        J = vmap(jacrev(one_out), in_dims=nd, randomness="same")(p0, *split.leaves)   # name -> [B, C, *shape]
        Jf = task.flatten(J, batch_dims=2)                                              # [B, C, N]
        z = z0.reshape(split.size, -1)
        H = vmap(torch.func.hessian(one_loss), in_dims=(0,) + (0,) * len(split.leaves))(z, *split.leaves)
        H = 0.5 * (H + H.transpose(1, 2)).double()
        w, U = torch.linalg.eigh(H)
        L = (U * w.clamp_min(0).sqrt().unsqueeze(1)).to(Jf.dtype)                      # L Lᵀ = H
        M = torch.einsum("bck,bcn->bkn", L, Jf).reshape(-1, task.n_params)               # rows L_iᵀ J_i
        acc.addmm_(M.T, M)
