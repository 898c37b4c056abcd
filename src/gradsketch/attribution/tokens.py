"""Per-token attribution for language models: the score of every training example for every target token of
a query, and per-token self-influence, streamed a block of tokens at a time (never an n_tokens × n_train
matrix).

A target token t of a query sequence x is treated as its own test example with loss ℓ_t(x) (e.g. the
next-token loss −log p(x_{t+1} | x_{≤t}), :func:`gradsketch.losses.causal_lm_token_losses`): its feature row
is φ_t = Φ∇θ ℓ_t(x) and its score against a training example z is the fitted method's bilinear form,
score(t, z) = Σ_c w_c (M_c φ_{c,t})ᵀ φ_c(z) · q(z) (the per-token form of Grosse et al. 2023, §3.2, "token-wise
attribution"; the same kernel M as :meth:`Attributor.score`). Each token is differentiated through its own
copy of the sequence (one forward/backward of the sequence per token, vectorised over a block of
``block_tokens`` tokens), so the cost is that of n_tokens per-example gradients.

The functions take a fitted attributor (:meth:`Attributor.topk_tokens`,
:meth:`Attributor.self_influence_tokens` call them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._features import iter_feature_chunks


class TokenTopK(NamedTuple):
    """Result of :meth:`Attributor.topk_tokens`: per target token (rows in query order), the k proponents
    (largest scores, descending) and opponents (smallest, ascending), ``[n_tokens, k]``; ``tokens [n_tokens,
    2]``: (query sequence index, position t in the token loss's output) of each row."""

    values: Tensor
    indices: Tensor
    opponent_values: Tensor
    opponent_indices: Tensor
    tokens: Tensor


def _token_task(task: Any, token_loss: Callable) -> Any:
    """A Task whose examples are (sequence, position) pairs: loss = ``token_loss(model, seq)[:, pos]``."""
    from ..model import Task

    def loss(model: Any, batch: Any) -> Tensor:
        inner, pos = batch
        out = token_loss(model, inner)
        if not isinstance(out, Tensor) or out.ndim != 2:
            raise ValueError(f"token_loss: expected per-token losses [B, T], got {getattr(out, 'shape', type(out))}")
        return out.gather(1, pos[:, None])[:, 0]

    return Task(task.model, loss, params=[p for _, p in task.named_params], nan_policy=task.nan_policy)


def token_batches(query: Iterable, token_loss: Callable, task: Any, block_tokens: int,
                  targets: list[tuple[int, int]]) -> Iterator[Any]:
    """Batches of ``block_tokens`` (sequence, position) examples over the target tokens of ``query``
    (positions where ``token_loss`` is finite), appending each token's (sequence index, position) to
    ``targets`` in order."""
    from ..model._batch import SplitBatch

    seq0 = 0
    for batch in query:
        split = SplitBatch(batch, task.device)
        with torch.no_grad():
            with task.frozen_running_stats():
                L = token_loss(task.model, split.rebuild())
        if not isinstance(L, Tensor) or L.ndim != 2 or L.shape[0] != split.size:
            raise ValueError(f"token_loss: expected per-token losses [B, T] with B = {split.size}, got "
                             f"{getattr(L, 'shape', type(L).__name__)}")
        rows, pos = torch.isfinite(L).nonzero(as_tuple=True)
        for s in range(0, rows.numel(), block_tokens):
            r, p = rows[s:s + block_tokens], pos[s:s + block_tokens]
            leaves = [t.index_select(0, r.to(t.device)) for t in split.leaves]
            targets.extend((seq0 + int(i), int(j)) for i, j in zip(r.tolist(), p.tolist()))
            yield (split.rebuild(leaves), p.to(task.device))
        seq0 += split.size


def token_feature_chunks(attr: Any, query: Iterable, token_loss: Callable, block_tokens: int, progress: bool,
                         targets: list[tuple[int, int]]) -> Iterator[tuple[int, list[Tensor]]]:
    """``(row_start, [φ_c [m, d_c] per component])`` for blocks of target tokens (φ_c = Φ_c ∇θ_c ℓ_t)."""
    comps = attr._components
    if len(comps) == 1 and comps[0].state is None:
        comp = comps[0]
        tt = _token_task(attr.task, token_loss)
        batches = token_batches(query, token_loss, attr.task, block_tokens, targets)
        for r0, phi in iter_feature_chunks(tt, batches, comp.sketch, attr._feature_mode(comp), attr.nan_policy,
                                           progress, "query", "featurise query tokens", block_tokens):
            yield r0, [phi]
        return
    per = []
    for i, comp in enumerate(comps):  # several model states: each one's token features, then regrouped
        with attr._state(comp.state):
            tt = _token_task(attr.task, token_loss)
            tg: list[tuple[int, int]] = []
            batches = token_batches(query, token_loss, attr.task, block_tokens, tg)
            per.append(list(iter_feature_chunks(tt, batches, comp.sketch, attr._feature_mode(comp), attr.nan_policy,
                                                progress, "query", f"featurise query tokens [{i + 1}]", block_tokens)))
            if i == 0:
                targets.extend(tg)
            elif tg != targets:
                raise ValueError("token_loss: the target tokens differ between model states (NaN positions must "
                                 "depend on the batch only, e.g. its attention_mask)")
    for j in range(len(per[0])):
        yield per[0][j][0], [per[i][j][1] for i in range(len(comps))]


def check_token_method(attr: Any) -> None:
    kind = attr.feature_kind()
    if kind not in ("loss-gradient", "arnoldi-projection"):
        raise ValueError(f"method: per-token attribution differentiates each token's loss, but {attr.method!r} "
                         f"here featurises {kind!r} rows (e.g. TRAK with margin_fn); expected a method with loss-"
                         "gradient features (grad-dot, grad-cos, tracin, trak without margin_fn, arnoldi, influence, "
                         "ekfac, kfac)")


__all__ = ["TokenTopK", "token_batches", "token_feature_chunks", "check_token_method"]
