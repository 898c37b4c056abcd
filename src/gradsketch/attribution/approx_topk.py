"""Top-k through a FAISS index (``Attributor.topk(..., index="faiss")``; issue 15).

Every method's score is an inner product: ``score(z, x_j) = Σ_c ψ_c(z) · (s_j q_{c,j} t_c(F_c[j]))`` over the
components ``c`` (checkpoints), with ψ the kernel-applied test rows, ``t_c`` the method's training-row map
(GradCos normalises), ``q`` the per-row weights (TracIn/TRAK) and ``s`` the shared weights. So the top-k
proponents of a test example are a maximum-inner-product search of ``[ψ_1, ..., ψ_C]`` among the training
vectors ``v_j = s_j [q_{1,j} t_1(F_1[j]), ...]``, and the opponents the same search with ``-ψ``.

``nlist=None`` builds ``faiss.IndexFlatIP``: an exhaustive search, exact up to float32 rounding (the plain
path scores in float32 too, float64 for float64 in-memory features). ``nlist=L`` builds ``IndexIVFFlat``: the
vectors are clustered into ``L`` lists by k-means on a sample and a query visits the ``nprobe`` lists whose
centroids score highest, so it reads about ``nprobe / L`` of the store (approximate; recall measured in
``benchmarks/bench_faiss_topk.py``). Gradient rows differ widely in norm, and the largest inner products
belong to long rows wherever they point, which clustering by direction misses; so the IVF index holds the
augmented rows ``[v, √(M² − ‖v‖²)]`` (``M`` the largest norm; all rows then have norm ``M``) and is searched
with ``[q, 0]``: the inner products are unchanged and the maximum inner product becomes the nearest neighbour
(Bachrach et al. 2014, "Speeding up the Xbox recommender system"). A query whose visited lists hold fewer
than ``k`` vectors gets index ``-1`` and score ``-inf`` (``+inf`` for opponents) in the missing slots.

The index is built once per fit (cached on the attributor, keyed by ``nlist``) from the store's blocks, reading
each block twice for IVF (a training sample, then the vectors). Under ``torch.distributed`` each rank indexes
its share of the blocks and the per-rank lists are merged (:func:`~gradsketch.linalg.distributed.merge_topk`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .._validation import check_int
from ..linalg.distributed import is_distributed, merge_topk

if TYPE_CHECKING:
    from .base import Attributor

INDEXES = ("faiss",)
TRAIN_PER_LIST = 64  # k-means sample: this many vectors per list (FAISS warns below 39)


def import_faiss() -> Any:
    """The ``faiss`` module, or an ImportError naming the extra that installs it.

    >>> import_faiss().__name__
    'faiss'
    """
    try:
        import faiss
    except ImportError as e:
        raise ImportError("index='faiss' needs the faiss-cpu package: pip install 'gradsketch[faiss]' "
                          "(or pip install faiss-cpu)") from e
    return faiss


def _train_vectors(att: Attributor, blocks: list[tuple[int, int, Tensor]]) -> Tensor:
    """``[r1 - r0, D]`` float32 vectors ``v_j`` of one block of training rows (one block per component)."""
    parts = []
    for (r0, r1, F), comp in zip(blocks, att._components):
        v = att.train_rows(comp, F.cpu())
        if comp.q is not None:
            v = v * comp.q[r0:r1].to(v.dtype).unsqueeze(1)
        parts.append(v)
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    if att._shared_q is not None:
        r0, r1 = blocks[0][0], blocks[0][1]
        out = out * att._shared_q[r0:r1].to(out.dtype).unsqueeze(1)
    return out.to(torch.float32).contiguous()


def _augment(v: Tensor, norm: float) -> Tensor:
    """``[v, √(M² − ‖v‖²)]``: every row of norm ``M``, inner products with ``[q, 0]`` unchanged."""
    extra = (norm ** 2 - v.to(torch.float64).pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt()
    return torch.cat([v, extra.to(v.dtype)], 1).contiguous()


def _build(att: Attributor, nlist: int | None) -> tuple[Any, int]:
    """(the index over this rank's training rows, the global index of its first row)."""
    faiss = import_faiss()
    first = next(iter(att._iter_train_blocks(torch.float32, shard=True)), None)
    if first is None:  # an empty share (more ranks than blocks)
        return None, 0
    dim = sum(b[2].shape[1] for b in first)
    lo = first[0][0]
    if nlist is None:
        index = faiss.IndexFlatIP(dim)
        for b in att._iter_train_blocks(torch.float32, shard=True):
            index.add(_train_vectors(att, list(b)).numpy())
        return index, lo
    # IVF: first pass for the largest norm M and a k-means sample, second pass to add the vectors
    need, sample, norm = TRAIN_PER_LIST * nlist, [], 0.0
    for b in att._iter_train_blocks(torch.float32, shard=True):
        v = _train_vectors(att, list(b))
        norm = max(norm, float(v.to(torch.float64).norm(dim=1).max()))
        if need > 0:
            sample.append(v)
            need -= v.shape[0]
    xs = torch.cat(sample)
    if xs.shape[0] < nlist:
        raise ValueError(f"nlist: expected at most the {xs.shape[0]} training rows of this rank's share, got "
                         f"{nlist}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim + 1), dim + 1, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(_augment(xs, norm).numpy())
    for b in att._iter_train_blocks(torch.float32, shard=True):
        index.add(_augment(_train_vectors(att, list(b)), norm).numpy())
    return index, lo


def faiss_topk(att: Attributor, test_data: Iterable, k: int, progress: bool, nlist: int | None = None,
               nprobe: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:meth:`Attributor.topk` through a FAISS index (see the module docstring): ``(values, indices,
    opponent_values, opponent_indices)``, ``[n_test, k]`` each.

    >>> import gradsketch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> task = gradsketch.Task.from_classifier(nn.Linear(3, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> att = gradsketch.Attributor(task, "grad-dot").fit(data, progress=False)
    >>> top = faiss_topk(att, data, k=2, progress=False)
    >>> top[1].shape, bool((top[1] == att.topk(data, k=2, progress=False).indices).all())
    (torch.Size([8, 2]), True)
    """
    faiss = import_faiss()
    for name in ("_score_block", "_combine"):  # the inner-product form holds for the base class's scoring only
        owner = next(c for c in type(att).__mro__ if name in vars(c))
        if owner.__module__ != "gradsketch.attribution.base":
            raise ValueError(f"index: {type(att).__name__} scores its rows its own way ({owner.__name__}.{name}), "
                             "not as the inner products a FAISS index searches; use index=None")
    if nlist is not None:
        nlist = check_int(nlist, "nlist", minimum=1)
    nprobe = check_int(nprobe if nprobe is not None else 1, "nprobe", minimum=1)
    if nlist is None and nprobe != 1:
        raise ValueError(f"nprobe: only an IVF index (nlist=...) has lists to probe; got nprobe={nprobe} with "
                         "nlist=None (the flat index searches everything)")
    key = (nlist, id(att._components))
    cache = getattr(att, "_faiss_index", None)
    if cache is None or cache[0] != key:
        cache = (key, *_build(att, nlist))
        att._faiss_index = cache  # type: ignore[attr-defined]
    _, index, lo = cache
    if index is not None and nlist is not None:
        index.nprobe = min(nprobe, nlist)
    del faiss
    outs = []
    for _, psis in att._test_chunks(test_data, progress, int(att._opt("test_block_rows", 1024))):
        qt = torch.cat([p.cpu() for p in psis], 1).to(torch.float32)
        m = qt.shape[0]
        if nlist is not None:  # the augmented index: queries [q, 0]
            qt = torch.cat([qt, qt.new_zeros(m, 1)], 1)
        q = qt.contiguous().numpy()
        res = []
        for sign in (1.0, -1.0):
            if index is None or index.ntotal == 0:
                v = torch.full((m, 0), -np.inf)
                i = torch.zeros((m, 0), dtype=torch.long)
            else:
                kk = min(k, index.ntotal)
                d, ix = index.search(np.ascontiguousarray(sign * q), kk)
                v, i = torch.from_numpy(d).to(torch.float64), torch.from_numpy(ix).to(torch.long)
                missing = i < 0
                v = torch.where(missing, torch.full_like(v, -np.inf), v)
                i = torch.where(missing, i, i + lo)
            v = v * sign  # the opponents' search ran with -ψ: back to the scores themselves
            if is_distributed():
                keep = i >= 0
                v = torch.where(keep, v, torch.full_like(v, -np.inf * sign))
                v, i = merge_topk(v, torch.where(keep, i, torch.full_like(i, -1)), k, largest=sign > 0)
            if v.shape[1] < k:  # fewer candidates than k: pad the missing slots
                pad = k - v.shape[1]
                v = torch.cat([v, torch.full((m, pad), -np.inf * sign, dtype=v.dtype)], 1)
                i = torch.cat([i, torch.full((m, pad), -1, dtype=i.dtype)], 1)
            res.append((v.to(att._score_dtype()), i))
        outs.append((res[0][0], res[0][1], res[1][0], res[1][1]))
    v, i, ov, oi = (torch.cat([o[j] for o in outs], 0) for j in range(4))
    return v, i, ov, oi
